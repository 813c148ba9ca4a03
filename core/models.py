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

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from .config import NETWORK_PROBE_TIMEOUT_S
from .errors import ConfigError, ModelLoadError

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec. ``kind`` is one of ``tag``, ``file``, ``hf-hub``, ``local-dir``."""

    raw: str
    kind: str
    arch: Optional[str]
    source: str

    @classmethod
    def parse(cls, spec: str) -> "ModelSpec":
        spec = (spec or "").strip()
        if not spec:
            raise ConfigError("no model given; pass e.g. --model ViT-L-14/openai (see README, 'Models')")
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


def _probe(url: str) -> Optional[str]:
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


def _offline_help(spec: ModelSpec, what: str, reason: str) -> ModelLoadError:
    arch = spec.arch or "ARCH"
    return ModelLoadError(
        f"model {spec.raw!r}: {what} could not be fetched: {reason}. Download the weights on a connected "
        f"machine and point at them: --model {arch}//path/to/weights.safetensors (a .pt/.bin file works "
        f"too), or --model local-dir:/path/to/folder holding open_clip_config.json and the weights. "
        f"Files already in the Hugging Face cache (HF_HOME) are used without a connection."
    )


def _hf_file(spec: ModelSpec, repo_id: str, filenames: list[str]) -> str:
    """Path of the first of filenames in repo_id: from the HF cache, else downloaded after a probe."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub import constants as hf_constants

    for name in filenames:
        hit = try_to_load_from_cache(repo_id, name)
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or hf_constants.HF_HUB_OFFLINE:
        raise _offline_help(spec, f"{repo_id}/{filenames[-1]}", "HF_HUB_OFFLINE is set and it is not cached")
    endpoint = os.environ.get("HF_ENDPOINT") or hf_constants.ENDPOINT
    reason = _probe(endpoint)
    if reason:
        raise _offline_help(spec, f"{repo_id}/{filenames[-1]}", reason)
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


def _resolve_tag(spec: ModelSpec) -> tuple[str, dict[str, Any]]:
    """(local weights path, pretrained cfg) for an ARCH/TAG spec."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(spec.arch, spec.source)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(spec.arch)
        raise ConfigError(
            f"model {spec.raw!r}: open_clip knows no tag {spec.source!r} for {spec.arch}; "
            f"known tags: {', '.join(tags) or 'none'}"
        )
    if cfg.get("hf_hub"):
        repo_id, filename = os.path.split(cfg["hf_hub"])
        filename = filename or "open_clip_pytorch_model.bin"
        return _hf_file(spec, repo_id, _weights_names(filename)), cfg
    url = cfg.get("url", "")
    target = Path("~/.cache/clip").expanduser() / os.path.basename(url)
    if target.is_file():
        return str(target), cfg
    reason = _probe(url)
    if reason:
        raise _offline_help(spec, url, reason)
    from open_clip.pretrained import download_pretrained_from_url

    return download_pretrained_from_url(url), cfg


def _check_arch(spec: ModelSpec) -> None:
    import open_clip

    if spec.arch not in open_clip.list_models():
        raise ConfigError(
            f"model {spec.raw!r}: {spec.arch!r} is not an open_clip architecture; "
            f"see open_clip.list_models() (e.g. ViT-L-14, ViT-B-32, ViT-H-14)"
        )


def _local_dir(spec: ModelSpec) -> str:
    folder = Path(spec.source)
    if not (folder / "open_clip_config.json").is_file():
        raise ModelLoadError(
            f"model {spec.raw!r}: {folder / 'open_clip_config.json'} is missing; a local-dir model is a folder "
            f"holding open_clip_config.json and its weights"
        )
    if not any(p.suffix in CHECKPOINT_SUFFIXES for p in folder.iterdir()):
        raise ModelLoadError(
            f"model {spec.raw!r}: {folder} holds no weights (.safetensors, .bin, .pth); a model without weights "
            f"would embed noise, so it is refused"
        )
    return "local-dir:" + str(folder)


def build_model(spec: ModelSpec, device: str, precision: str):
    """Build the open_clip model for spec on device; returns (model in eval mode, preprocess cfg dict)."""
    import open_clip

    kwargs: dict[str, Any] = dict(device=device, precision=precision, weights_only=True, require_pretrained=True)
    try:
        if spec.kind == "tag":
            _check_arch(spec)
            path, cfg = _resolve_tag(spec)
            pre = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
            model = open_clip.create_model(spec.arch, pretrained=path, force_quick_gelu=bool(cfg.get("quick_gelu")),
                                           force_preprocess_cfg=pre, **kwargs)
        elif spec.kind == "file":
            _check_arch(spec)
            if not os.path.isfile(spec.source):
                raise ModelLoadError(f"model {spec.raw!r}: checkpoint {spec.source} does not exist; check the path")
            if not spec.source.lower().endswith(CHECKPOINT_SUFFIXES):
                raise ModelLoadError(
                    f"model {spec.raw!r}: {spec.source} is not a checkpoint; give a .safetensors, .pt, .pth or .bin file"
                )
            model = open_clip.create_model(spec.arch, pretrained=spec.source, **kwargs)
        elif spec.kind == "local-dir":
            model = open_clip.create_model(_local_dir(spec), **kwargs)
        else:  # hf-hub
            config_path = _hf_file(spec, spec.source, ["open_clip_config.json"])
            _hf_file(spec, spec.source, _weights_names("open_clip_pytorch_model.bin"))
            model = open_clip.create_model("local-dir:" + os.path.dirname(config_path), **kwargs)
    except (ConfigError, ModelLoadError):
        raise
    except Exception as exc:  # noqa: BLE001 - open_clip and torch raise many kinds while building
        raise ModelLoadError(
            f"model {spec.raw!r} could not be built: {type(exc).__name__}: {exc}. Check that the checkpoint "
            f"belongs to that architecture (OpenAI weights need a -quickgelu architecture when given as a file)"
        ) from exc
    model.eval()
    pre = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    return model, pre
