"""Studio enforcement: every queued graph gets a Provenance Check (on_match=block) in front of every output
node that receives images, so no workflow can skip the check.

Opt-in, by either
- the environment variable PROVENANCE_GUARD_ENFORCE=<bundle> (a folder name under models/provenance, a
  path, or a server URL), or
- a file provenance_guard.json in ComfyUI's user folder:
  {"enforce": {"bundle": "...", "fail_mode": "closed", "exempt_nodes": [], "save_nodes": [], "top_k": 5,
  "verify": "confirm+escalate", "monitor": true}}
  (monitor: a Memorization Monitor goes in front of every sampler's model, so every enforced check also gets
  the sampler's memorization signal).
  (exempt_nodes: output node classes a studio lets through unchecked, named explicitly; save_nodes: node
  classes to guard although they are not output nodes).

What "every output node" means: each node whose class ComfyUI marks OUTPUT_NODE (SaveImage, PreviewImage,
SaveAnimatedWEBP/PNG, SaveWEBM, SaveImageWebsocket, custom save nodes ...), for each of its inputs that is
declared IMAGE or is linked to an IMAGE output. An input already fed by a Provenance Check that blocks
(on_match block, the enforced fail mode, the enforced bundle, its thresholds, no model override or CLIP
vision input) counts as checked: that is decided by the node's class and settings, never by its id.

Enforcement fails closed. Once it is configured (the variable is set or the file exists), a configuration
that cannot be read or validated, a graph that cannot be rewritten, or any error in the handler makes the
prompt be refused with a message saying why: the graph is replaced by one ProvenanceGuardRefusal node,
whose validation fails with that message, so ComfyUI answers the POST /prompt with a 400 naming it.
(ComfyUI swallows exceptions raised by prompt handlers and would queue the graph unchecked.)
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Optional

from ..core.errors import ConfigError
from ..core.policy import VERIFY_MODES

ENV = "PROVENANCE_GUARD_ENFORCE"
CONFIG_FILE = "provenance_guard.json"
PREFIX = "provenance-guard-enforce-"
REFUSAL_ID = "provenance-guard-refused"
CHECK_CLASS = "ProvenanceCheck"
REFUSAL_CLASS = "ProvenanceGuardRefusal"
DEFAULTS: dict[str, Any] = {"fail_mode": "closed", "exempt_nodes": [], "save_nodes": [], "top_k": 5,
                            "verify": "confirm+escalate", "monitor": True}
KEYS = {"bundle", "fail_mode", "exempt_nodes", "save_nodes", "top_k", "verify", "monitor"}
MONITOR_CLASS = "ProvenanceMemorizationMonitor"
# Nodes whose "model" input is what samples with CFG: a Memorization Monitor goes in front of it.
SAMPLING_NODES = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "CFGGuider", "DualCFGGuider")

MAX_CONFIG_BYTES = 1 << 20

log = logging.getLogger("provenance_guard")


class EnforcementConfigError(ConfigError):
    """The studio enforcement configuration cannot be read or validated; every prompt is refused."""


def load_config(user_dir: Optional[str] = None, environ=os.environ) -> Optional[dict[str, Any]]:
    """The validated enforcement settings, None when enforcement is not configured, or EnforcementConfigError
    when it is configured (the variable is set or the file exists) but cannot be used."""
    path = os.path.join(user_dir, CONFIG_FILE) if user_dir else None
    cfg: dict[str, Any] = {}
    if path and os.path.exists(path):
        try:
            if os.path.getsize(path) > MAX_CONFIG_BYTES:
                raise EnforcementConfigError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
            with open(path, encoding="utf-8-sig") as f:  # a UTF-8 BOM, as Windows editors write, is fine
                data = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise EnforcementConfigError(f"{path} cannot be read as JSON ({exc}); fix it (see the README, 'Studio "
                                         f"enforcement')") from exc
        if not isinstance(data, dict):
            raise EnforcementConfigError(f"{path} must hold a JSON object such as "
                                         f'{{"enforce": {{"bundle": "..."}}}}, not a {type(data).__name__}')
        section = data.get("enforce")
        if section is not None and not isinstance(section, dict):
            raise EnforcementConfigError(f'{path}: "enforce" must be an object such as {{"bundle": "studio-refs"}}, '
                                         f"not {section!r}")
        cfg = dict(section or {})
        unknown = sorted(set(cfg) - KEYS)
        if unknown:
            raise EnforcementConfigError(f'{path}: unknown key(s) {unknown} under "enforce"; the keys are '
                                         f"{sorted(KEYS)}")
    if environ.get(ENV):
        cfg["bundle"] = environ[ENV]
    elif ENV in environ:
        raise EnforcementConfigError(f"{ENV} is set but empty; give a bundle name, path or server URL, or unset it")
    if not cfg:
        return None
    return _validated({**DEFAULTS, **cfg}, path or ENV)


def _validated(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    def names(key: str) -> list[str]:
        value = cfg.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise EnforcementConfigError(f'{where}: "{key}" must be a list of node class names such as '
                                         f'["SaveImage"], not {value!r}')
        return list(value)

    bundle = cfg.get("bundle")
    if not isinstance(bundle, str) or not bundle.strip():
        raise EnforcementConfigError(f'{where}: "bundle" must name the bundle to enforce (a folder under '
                                     f"models/provenance, a path or a server URL), not {bundle!r}")
    if cfg.get("fail_mode") not in ("open", "closed"):
        raise EnforcementConfigError(f'{where}: "fail_mode" must be "closed" (or "open"), not {cfg.get("fail_mode")!r}')
    top_k = cfg.get("top_k")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 100:
        raise EnforcementConfigError(f'{where}: "top_k" must be a whole number from 1 to 100, not {top_k!r}')
    if cfg.get("verify") not in VERIFY_MODES:
        raise EnforcementConfigError(f'{where}: "verify" must be one of {list(VERIFY_MODES)}, not {cfg.get("verify")!r}')
    if not isinstance(cfg.get("monitor"), bool):
        raise EnforcementConfigError(f'{where}: "monitor" must be true or false, not {cfg.get("monitor")!r}')
    return {"bundle": bundle.strip(), "fail_mode": cfg["fail_mode"], "exempt_nodes": names("exempt_nodes"),
            "save_nodes": names("save_nodes"), "top_k": top_k, "verify": cfg["verify"], "monitor": cfg["monitor"]}


def _is_path(bundle: str) -> bool:
    return "://" in bundle or os.path.isabs(bundle) or bundle.startswith(("./", "../", "~"))


def check_inputs(config: dict[str, Any], source: list) -> dict[str, Any]:
    """The inputs of the check enforcement inserts in front of ``source``."""
    bundle = str(config["bundle"])
    return {"images": source, "bundle": "" if _is_path(bundle) else bundle,
            "bundle_path": bundle if _is_path(bundle) else "", "on_match": "block",
            "fail_mode": config["fail_mode"], "use_bundle_thresholds": True, "warn": 0.90, "block": 0.95,
            "top_k": int(config["top_k"]), "model_override": "", "verify": config.get("verify", "confirm+escalate")}


def _enforcing(node: Any, config: dict[str, Any]) -> bool:
    """Whether node is a Provenance Check that blocks as enforcement would (class and settings, not id)."""
    if not isinstance(node, dict) or node.get("class_type") != CHECK_CLASS:
        return False
    inputs = node.get("inputs") if isinstance(node.get("inputs"), dict) else {}
    want = check_inputs(config, [])
    bundle_ok = (inputs.get("bundle_path") or "").strip() == want["bundle_path"] if want["bundle_path"] else (
        inputs.get("bundle") == want["bundle"] and not (inputs.get("bundle_path") or "").strip())
    return (bundle_ok and inputs.get("on_match") == "block" and inputs.get("fail_mode") == want["fail_mode"]
            and inputs.get("use_bundle_thresholds") is True and not (inputs.get("model_override") or "").strip()
            and "clip_vision" not in inputs and inputs.get("verify", "confirm") == want["verify"])


def _image_inputs(cls) -> set[str]:
    declared = set()
    spec = cls.INPUT_TYPES() if hasattr(cls, "INPUT_TYPES") else {}
    for group in ("required", "optional"):
        for name, kind in (spec.get(group) or {}).items():
            if isinstance(kind, (tuple, list)) and kind and kind[0] == "IMAGE":
                declared.add(name)
    return declared


def _returns_image(classes: dict, node: Any, slot: Any) -> bool:
    cls = classes.get(node.get("class_type")) if isinstance(node, dict) else None
    returns = getattr(cls, "RETURN_TYPES", ()) or ()
    return isinstance(slot, int) and 0 <= slot < len(returns) and returns[slot] == "IMAGE"


def enforce_prompt(json_data: dict, config: dict[str, Any], classes: dict) -> dict:
    """Insert a blocking Provenance Check in front of every image input of every output node of
    json_data["prompt"]. ``classes`` is ComfyUI's NODE_CLASS_MAPPINGS. Never raises: a graph that cannot be
    rewritten is refused (see refuse)."""
    try:
        prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
        if not isinstance(prompt, dict):
            return json_data
        exempt, extra = set(config["exempt_nodes"]), set(config["save_nodes"])
        if config.get("monitor", True):
            _insert_monitors(prompt)
        for node_id, node in list(prompt.items()):
            if not isinstance(node, dict):
                continue
            cls = classes.get(node.get("class_type"))
            name = node.get("class_type")
            if name in (CHECK_CLASS, REFUSAL_CLASS) or name in exempt:
                continue
            if not (getattr(cls, "OUTPUT_NODE", False) is True or name in extra):
                continue
            declared = _image_inputs(cls) if cls is not None else {"images"}
            inputs = node.setdefault("inputs", {})
            for key, value in list(inputs.items()):
                if not (isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt):
                    continue
                source = prompt[str(value[0])]
                if key not in declared and not _returns_image(classes, source, value[1]):
                    continue
                if _enforcing(source, config) and value[1] == 0:
                    continue  # fed by a check that blocks as enforcement would
                check_id = f"{PREFIX}{node_id}-{key}"
                while check_id in prompt:
                    check_id += "-"
                prompt[check_id] = {"class_type": CHECK_CLASS, "inputs": check_inputs(config, value),
                                    "_meta": {"title": "Provenance Check (studio enforced)"}}
                inputs[key] = [check_id, 0]
        return json_data
    except Exception as exc:  # noqa: BLE001 - ComfyUI would log it and queue the graph unchecked
        log.exception("provenance-guard: could not insert the enforced check; refusing the prompt")
        return refuse(json_data, f"Provenance Guard studio enforcement could not insert its check into this graph "
                                 f"({type(exc).__name__}: {exc}); the prompt is refused rather than run unchecked")


def _insert_monitors(prompt: dict) -> None:
    """A Memorization Monitor in front of the model input of every node that samples with CFG, so the
    enforced checks also get the prompt-side signal (no extra forward pass)."""
    for node_id, node in list(prompt.items()):
        if not isinstance(node, dict) or node.get("class_type") not in SAMPLING_NODES:
            continue
        inputs = node.get("inputs") if isinstance(node.get("inputs"), dict) else {}
        source = inputs.get("model")
        if not (isinstance(source, list) and len(source) == 2 and str(source[0]) in prompt):
            continue
        if (prompt[str(source[0])] or {}).get("class_type") == MONITOR_CLASS:
            continue
        monitor_id = f"provenance-guard-monitor-{node_id}"
        while monitor_id in prompt:
            monitor_id += "-"
        prompt[monitor_id] = {"class_type": MONITOR_CLASS, "inputs": {"model": source, "steps": 5},
                              "_meta": {"title": "Memorization Monitor (studio enforced)"}}
        inputs["model"] = [monitor_id, 0]


def refuse(json_data: Any, reason: str) -> dict:
    """json_data with its graph replaced by one refusal node: ComfyUI's validation fails with reason."""
    if not isinstance(json_data, dict):
        json_data = {}
    json_data["prompt"] = {REFUSAL_ID: {"class_type": REFUSAL_CLASS, "inputs": {"reason": reason},
                                        "_meta": {"title": "Provenance Guard"}}}
    return json_data


def refuse_all(reason: str) -> Callable[[dict], dict]:
    def handler(json_data: dict) -> dict:
        return refuse(json_data, reason)

    return handler


class ProvenanceGuardRefusal:
    """What a refused prompt runs as: an output node whose validation fails with the reason, so the client
    gets a 400 that says why (studio enforcement could not run)."""

    CATEGORY = "provenance"
    FUNCTION = "refuse"
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    DESCRIPTION = "Stands in for a prompt that studio enforcement refused; it never runs."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"reason": ("STRING", {"default": ""})}}

    @classmethod
    def VALIDATE_INPUTS(cls, reason):
        return str(reason or "refused by Provenance Guard studio enforcement")

    def refuse(self, reason):
        raise RuntimeError(str(reason))


def record_slot(json_data: dict) -> dict:
    """Give a queued graph that holds a Provenance Check an EXTRA_PNGINFO dict, so the node has somewhere to
    put the record for Save Image even when an API client sent no extra_data (the UI always sends one)."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if isinstance(prompt, dict) and any(isinstance(n, dict) and n.get("class_type") == CHECK_CLASS
                                        for n in prompt.values()):
        extra = json_data.get("extra_data")
        if not isinstance(extra, dict):
            extra = json_data["extra_data"] = {}
        if not isinstance(extra.get("extra_pnginfo"), dict):
            extra["extra_pnginfo"] = {}
    return json_data


def register(server, config: dict[str, Any], classes: dict) -> None:
    """Registered before ``record_slot`` (register_with_comfyui), so the slot also covers the checks that
    enforcement inserts."""
    server.add_on_prompt_handler(lambda json_data: enforce_prompt(json_data, config, classes))
    log.info("provenance-guard: studio enforcement on: every output node that receives images is preceded by a "
             "blocking check against %s (fail mode %s)", config["bundle"], config["fail_mode"])
