"""Model specs and open_clip loading: which CLIP a string names, where its weights are, and building it.

A spec is one string, the same everywhere (CLI ``--model``, manifests, node widgets):

==========================================  =================================================================
``ViT-L-14/openai``                          architecture / pretrained tag (the LAION-5B embedding model)
``ViT-B-32/openai``, ``ViT-H-14/laion2b_s32b_b79k``
``ViT-L-14-quickgelu//models/vitl14.pt``      architecture / local checkpoint (.safetensors, or .pt/.pth/.bin
                                             read with ``weights_only=True``); the path is everything after
                                             the first ``/``
``hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K``  a Hugging Face repository with open_clip_config.json
``local-dir:/models/my-clip``                a folder with open_clip_config.json and a checkpoint
==========================================  =================================================================

Weights are looked up in the local caches first. When they are not there, the weights host is probed with a
short timeout (config.NETWORK_PROBE_TIMEOUT_S) before anything is downloaded, so an offline machine gets a
``ModelLoadError`` that says how to point at a local file within seconds instead of hanging a UI; with
``HF_HUB_OFFLINE=1`` no probe is made at all.
"""
from __future__ import annotations

import json
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .config import NETWORK_PROBE_TIMEOUT_S
from .errors import ConfigError, ModelLoadError
from .logs import silenced

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec. ``kind`` is one of ``tag``, ``file``, ``hf-hub``, ``local-dir``."""

    raw: str
    kind: str
    arch: str | None
    source: str

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        spec = (spec or "").strip()
        if not spec:
            raise ConfigError("no model given; pass e.g. --model ViT-L-14/openai (see docs/checking.md, 'Models')")
        for prefix, kind in (("hf-hub:", "hf-hub"), ("local-dir:", "local-dir")):
            if spec.startswith(prefix):
                source = spec[len(prefix):].strip()
                if not source:
                    raise ConfigError(f"model spec {spec!r} names no {kind} location after '{prefix}'")
                if kind == "local-dir":
                    source = str(Path(source).expanduser())
                return cls(spec, kind, None, source)
        arch, sep, rest = spec.partition("/")
        if not sep or not rest:
            raise ConfigError(
                f"model spec {spec!r} names an architecture but no weights; give ARCH/TAG "
                f"(e.g. ViT-L-14/openai) or ARCH/path/to/checkpoint.safetensors"
            )
        looks_like_file = rest.startswith(("/", ".", "~")) or rest.lower().endswith(CHECKPOINT_SUFFIXES)
        if looks_like_file:
            return cls(spec, "file", arch, str(Path(rest).expanduser()))
        return cls(spec, "tag", arch, rest)

    def __str__(self) -> str:
        return self.raw


def _probe(url: str) -> str | None:
    """None when the host of url accepts a TCP connection within the timeout, else the reason."""
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return f"{url!r} has no host"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=NETWORK_PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"{host}:{port} cannot be reached ({exc})"


def file_arch(spec: ModelSpec) -> str:
    """The architecture to give with a local weights file standing in for spec: OpenAI's checkpoints use
    QuickGELU, which open_clip builds from the tag "openai" but from a file only as ARCH-quickgelu."""
    arch = spec.arch or "ARCH"
    if spec.kind == "tag" and spec.source == "openai" and not arch.endswith("-quickgelu"):
        return f"{arch}-quickgelu"
    return arch


def _offline_help(spec: ModelSpec, what: str, reason: str) -> ModelLoadError:
    arch = file_arch(spec)
    return ModelLoadError(
        f"model {spec.raw!r}: {what} could not be fetched: {reason}. Download the weights on a connected "
        f"machine, then either put them into the Hugging Face cache (HF_HOME), whose files are used without a "
        f"connection (the way inside the webuis), or point at them as {arch}//path/to/weights.safetensors (a "
        f".pt/.bin file works too) or local-dir:/path/to/folder holding open_clip_config.json and the weights: "
        f"the command line's --model, ComfyUI's model_override input."
    )


def hf_cache_dirs() -> list[str]:
    """Where Hugging Face caches may hold weights: the configured cache (HF_HOME / HF_HUB_CACHE), then the
    default ~/.cache/huggingface/hub. Forge points HF_HOME at its models/diffusers folder unless the user set
    it, so weights a user cached the usual way are only found in the second place."""
    from huggingface_hub import constants as hf_constants

    dirs = [str(hf_constants.HF_HUB_CACHE)]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    default = os.path.join(xdg, "huggingface", "hub")
    if os.path.realpath(default) != os.path.realpath(dirs[0]):
        dirs.append(default)
    return dirs


def _hf_file(spec: ModelSpec, repo_id: str, filenames: list[str]) -> str:
    """Path of the first of filenames in repo_id: from a HF cache, else downloaded after a probe."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub import constants as hf_constants

    caches = hf_cache_dirs()
    for name in filenames:
        for cache in caches:
            hit = try_to_load_from_cache(repo_id, name, cache_dir=cache)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    where = " or ".join(caches)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or hf_constants.HF_HUB_OFFLINE:
        raise _offline_help(spec, f"{repo_id}/{filenames[-1]}", f"HF_HUB_OFFLINE is set and it is not cached in {where}")
    endpoint = os.environ.get("HF_ENDPOINT") or hf_constants.ENDPOINT
    reason = _probe(endpoint)
    if reason:
        raise _offline_help(spec, f"{repo_id}/{filenames[-1]}", f"{reason}; it is not cached in {where}")
    errors = []
    for name in filenames:
        try:
            return hf_hub_download(repo_id=repo_id, filename=name)
        except Exception as exc:  # noqa: BLE001 - the hub raises many kinds; the last one is reported
            errors.append(f"{name}: {exc}")
    raise ModelLoadError(f"model {spec.raw!r}: no weights could be downloaded from {repo_id}: {'; '.join(errors)}")


def _weights_names(filename: str) -> list[str]:
    # open_clip prefers a safetensors twin of the file a tag names; so do we.
    stem, ext = os.path.splitext(filename)
    if filename == "open_clip_pytorch_model.bin":
        return ["open_clip_model.safetensors", filename]
    if ext in (".bin", ".pth"):
        return [stem + ".safetensors", filename]
    return [filename]


# OpenAI's weights as plain state dicts on the Hugging Face hub, where open_clip >= 2.24 takes them from.
# Older open_clip (A1111 and Forge pin 2.20) only knows OpenAI's TorchScript archives, which are not loaded.
OPENAI_HF = {
    "RN50": "timm/resnet50_clip.openai", "RN101": "timm/resnet101_clip.openai",
    "RN50x4": "timm/resnet50x4_clip.openai", "RN50x16": "timm/resnet50x16_clip.openai",
    "RN50x64": "timm/resnet50x64_clip.openai", "ViT-B-32": "timm/vit_base_patch32_clip_224.openai",
    "ViT-B-16": "timm/vit_base_patch16_clip_224.openai", "ViT-L-14": "timm/vit_large_patch14_clip_224.openai",
    "ViT-L-14-336": "timm/vit_large_patch14_clip_336.openai",
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ResolvedModel:
    """What building a model needs, found without building it: the architecture config, where the weights
    are on this machine, and the preprocessing its weights were trained with."""

    model_cfg: dict[str, Any]
    weights: str
    quick_gelu: bool = False
    preprocess: dict[str, Any] = field(default_factory=dict)


def _base_arch(arch: str) -> str:
    return arch[: -len("-quickgelu")] if arch.endswith("-quickgelu") else arch


def _arch_config(spec: ModelSpec) -> dict[str, Any]:
    import open_clip

    cfg = open_clip.get_model_config(spec.arch) if spec.arch in open_clip.list_models() else None
    if cfg is None:
        raise ConfigError(
            f"model {spec.raw!r}: {spec.arch!r} is not an open_clip architecture; "
            f"see open_clip.list_models() (e.g. ViT-L-14, ViT-B-32, ViT-H-14)"
        )
    return cfg


def _resolve_tag(spec: ModelSpec) -> ResolvedModel:
    import open_clip

    model_cfg = _arch_config(spec)
    cfg = open_clip.get_pretrained_cfg(spec.arch, spec.source)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(spec.arch)
        raise ConfigError(
            f"model {spec.raw!r}: open_clip knows no tag {spec.source!r} for {spec.arch}; "
            f"known tags: {', '.join(tags) or 'none'}"
        )
    quick_gelu = bool(cfg.get("quick_gelu")) or spec.source == "openai"
    hub = cfg.get("hf_hub") or ""
    if not hub and spec.source == "openai":
        hub = OPENAI_HF.get(_base_arch(spec.arch), "")
    pre = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if cfg.get(k)}
    if hub:
        repo_id, filename = os.path.split(hub.rstrip("/")) if hub.count("/") > 1 else (hub.rstrip("/"), "")
        weights = _hf_file(spec, repo_id, _weights_names(filename or "open_clip_pytorch_model.bin"))
        return ResolvedModel(model_cfg, weights, quick_gelu, pre)
    url = cfg.get("url", "")
    target = Path("~/.cache/clip").expanduser() / os.path.basename(url)
    if not target.is_file():
        reason = _probe(url)
        if reason:
            raise _offline_help(spec, url, reason)
        from open_clip.pretrained import download_pretrained_from_url

        target = Path(download_pretrained_from_url(url))
    return ResolvedModel(model_cfg, str(target), quick_gelu, pre)


def _read_local_dir(spec: ModelSpec, folder: Path) -> ResolvedModel:
    config_path = folder / "open_clip_config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"model {spec.raw!r}: {config_path} is missing; a local-dir model is a folder holding "
            f"open_clip_config.json and its weights"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        model_cfg = dict(config["model_cfg"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"model {spec.raw!r}: {config_path} is not an open_clip config with a \"model_cfg\" "
                             f"object ({exc}); copy the model folder again") from exc
    preferred = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    found = [folder / n for n in preferred if (folder / n).is_file()]
    found += sorted(p for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p not in found)
    if not found:
        raise ModelLoadError(
            f"model {spec.raw!r}: {folder} holds no weights (.safetensors, .bin, .pth); a model without weights "
            f"would embed noise, so it is refused"
        )
    pre = dict(config.get("preprocess_cfg") or {})
    return ResolvedModel(model_cfg, str(found[0]), bool(model_cfg.get("quick_gelu")), pre)


def resolve(spec: ModelSpec) -> ResolvedModel:
    """Architecture config, local weights and preprocessing of spec (downloading nothing when offline)."""
    if spec.kind == "tag":
        return _resolve_tag(spec)
    if spec.kind == "file":
        model_cfg = _arch_config(spec)
        if not os.path.isfile(spec.source):
            raise ModelLoadError(f"model {spec.raw!r}: checkpoint {spec.source} does not exist; check the path")
        if not spec.source.lower().endswith(CHECKPOINT_SUFFIXES):
            raise ModelLoadError(
                f"model {spec.raw!r}: {spec.source} is not a checkpoint; give a .safetensors, .pt, .pth or .bin file"
            )
        return ResolvedModel(model_cfg, spec.source, bool(model_cfg.get("quick_gelu")))
    if spec.kind == "local-dir":
        return _read_local_dir(spec, Path(spec.source))
    config_path = _hf_file(spec, spec.source, ["open_clip_config.json"])
    _hf_file(spec, spec.source, _weights_names("open_clip_pytorch_model.bin"))
    return _read_local_dir(spec, Path(config_path).parent)


def read_state_dict(path: str) -> dict[str, Any]:
    """A checkpoint's tensors: safetensors, or a torch file read with weights_only=True (a pickle that
    would run code is refused, never executed)."""
    import torch

    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


_REGISTER_LOCK = threading.Lock()


def _construct(model_cfg: dict[str, Any], quick_gelu: bool, device: str, precision: str):
    """The open_clip model of an architecture config, without weights. The config is registered under a
    name made from its own hash (so one name is one config) with open_clip.add_model_config, and built by
    open_clip's create_model, which work alike from open_clip 2.20 (A1111's and Forge's pin) to 3.x; no
    weights are fetched here (pretrained_hf=False keeps HF text towers offline)."""
    import hashlib
    import tempfile

    import open_clip

    name = "pg-" + hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:16]
    with _REGISTER_LOCK:
        if open_clip.get_model_config(name) is None:
            # add_model_config reads a <name>.json file; the registry keeps the config once the file is gone
            with tempfile.TemporaryDirectory(prefix="provenance-guard-") as tmp:
                path = Path(tmp) / f"{name}.json"
                path.write_text(json.dumps(model_cfg))
                open_clip.add_model_config(path)
            if open_clip.get_model_config(name) is None:  # open_clip skips a config without these three
                missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
                raise ModelLoadError(f"the model config has no {', '.join(missing) or 'usable fields'}: give an "
                                     f"open_clip_config.json whose model_cfg has embed_dim, vision_cfg and text_cfg")
    with silenced("open_clip"):
        model = open_clip.create_model(name, pretrained=None, precision=precision, device=device,
                                       force_quick_gelu=quick_gelu, pretrained_hf=False)
    model.provenance_guard_arch = name  # get_tokenizer(name) finds the text config under this name
    return model


def _load_weights(model, state: dict[str, Any]) -> None:
    """State dict into model, with the format fixes open_clip's own loader makes (across its versions)."""
    from open_clip import model as oc_model

    for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI's archive metadata
        state.pop(key, None)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = oc_model.convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in state and own is not None and own.ndim != state[key].ndim:
            state[key] = state[key].reshape(own.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
        import torch

        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    position_ids = "text.transformer.embeddings.position_ids"  # gone from transformers >= 4.31
    if position_ids in state and position_ids not in model.state_dict():
        del state[position_ids]
    oc_model.resize_pos_embed(state, model)
    if hasattr(oc_model, "resize_text_pos_embed"):
        oc_model.resize_text_pos_embed(state, model)
    model.load_state_dict(state, strict=True)


def preprocess_config(resolved: ResolvedModel) -> dict[str, Any]:
    size = resolved.model_cfg.get("vision_cfg", {}).get("image_size", 224)
    pre = {"size": (size, size) if isinstance(size, int) else tuple(size), "mean": OPENAI_MEAN, "std": OPENAI_STD,
           "interpolation": "bicubic", "resize_mode": "shortest"}
    pre.update({k: v for k, v in resolved.preprocess.items() if k in ("mean", "std", "interpolation", "resize_mode")})
    if "size" in resolved.preprocess:
        size = resolved.preprocess["size"]
        pre["size"] = (size, size) if isinstance(size, int) else tuple(size)
    return pre


def build_model(spec: ModelSpec, device: str, precision: str):
    """Build the open_clip model for spec on device; returns (model in eval mode, preprocess cfg dict).

    Weights are read here (safetensors, or torch files with weights_only=True) and never by open_clip, so
    the same code path serves every open_clip release from 2.20 on."""
    resolved = resolve(spec)
    try:
        model = _construct(resolved.model_cfg, resolved.quick_gelu, device, precision)
    except Exception as exc:  # noqa: BLE001 - open_clip raises many kinds while building
        import open_clip

        raise ModelLoadError(
            f"model {spec.raw!r}: open_clip {getattr(open_clip, '__version__', '?')} cannot build its architecture "
            f"({type(exc).__name__}: {exc}); the config may need a newer open_clip (pip install -U open_clip_torch)"
        ) from exc
    try:
        state = read_state_dict(resolved.weights)
        _load_weights(model, state)
    except Exception as exc:  # noqa: BLE001 - torch, safetensors and pickle raise many kinds
        raise ModelLoadError(
            f"model {spec.raw!r} could not be built from {resolved.weights}: {type(exc).__name__}: {exc}. Check "
            f"that the checkpoint belongs to that architecture (OpenAI weights need a -quickgelu architecture "
            f"when given as a file)"
        ) from exc
    model.eval()
    return model, preprocess_config(resolved)
