"""Studio enforcement: no image data of a queued graph reaches an output node without a blocking
Provenance Check in front of it, so no workflow can skip the check.

Opt-in, by either
- the environment variable PROVENANCE_GUARD_ENFORCE=<bundle> (a folder name under models/provenance, a
  path, or a server URL), or
- a file provenance_guard.json in ComfyUI's user folder:
  {"enforce": {"bundle": "...", "fail_mode": "closed", "exempt_nodes": [], "save_nodes": [], "top_k": 5,
  "verify": "confirm+escalate", "views": "whole", "monitor": true, "image_types": [], "data_types": []}}
  (views: "multi" queries each image's quarters and centre too (core.policy.VIEWS); monitor: a Memorization
  Monitor goes in front of every sampler's model, so every enforced check also gets
  the sampler's memorization signal; exempt_nodes: output node classes a studio lets through unchecked,
  named explicitly; save_nodes: node classes to guard although they are not output nodes; image_types and
  data_types: a node pack's own input types, as carrying image data or not).

What reaches an output node (each node whose class ComfyUI marks OUTPUT_NODE, and the save_nodes), by the
type of each linked input (the producing node's output type, or the input's declared type):
- IMAGE: a check goes on that link.
- VIDEO (CreateVideo -> SaveVideo), MASK (ImageToMask -> MaskPreview), "*" and the configured image_types:
  traced upstream, and a check goes on every IMAGE link they are made from, where the frames are still
  images; a VIDEO made from no IMAGE this graph can check refuses the prompt.
- LATENT (SaveLatent, or a LATENT met while tracing): pixels before decoding cannot be checked: the prompt
  is refused (unless the node class is exempt).
- types that carry no image data (STRING, numbers, MODEL, CONDITIONING, AUDIO ..., and data_types) pass.
- any other type is refused, with a message naming it and the two settings that classify it.
Every check enforcement inserts has the enforced settings, strict evidence (never the checked pixels)
included; a check already in the graph counts as the enforced one only when every one of its inputs equals
what enforcement gives its own (so a user's look-alike check with its own references folder gets one in
front of it).
A user's own Provenance Check in the graph is made strict too. Latent previews (--preview-method) are
turned off while enforcement is on: they would send undecoded, unchecked pixels to the browser.

Enforcement fails closed. Once it is configured (the variable is set, or the file exists and holds more
than a "credentials" object: Content Credentials alone, comfyui_nodes/credentials.py, configure no
enforcement), a configuration that cannot be read or validated (a file without a usable "enforce" object
included), a graph that cannot be rewritten, or any error in the handler makes the prompt be refused with a
message saying why: the graph is replaced by one ProvenanceGuardRefusal node, whose validation fails with
that message, so ComfyUI answers the POST /prompt with a 400 naming it. (ComfyUI swallows exceptions raised
by prompt handlers and would queue the graph unchecked.)
"""
from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any
from collections.abc import Callable

from ..core.errors import ConfigError
from ..core.policy import VERIFY_MODES, VIEWS

ENV = "PROVENANCE_GUARD_ENFORCE"
CONFIG_FILE = "provenance_guard.json"
PREFIX = "provenance-guard-enforce-"
REFUSAL_ID = "provenance-guard-refused"
CHECK_CLASS = "ProvenanceCheck"
REFUSAL_CLASS = "ProvenanceGuardRefusal"
DEFAULTS: dict[str, Any] = {"fail_mode": "closed", "exempt_nodes": [], "save_nodes": [], "top_k": 5,
                            "verify": "confirm+escalate", "views": "whole", "monitor": True, "image_types": [],
                            "data_types": []}
KEYS = set(DEFAULTS) | {"bundle"}
IMAGE = "IMAGE"
# Types made from images upstream: traced to the IMAGE links they come from.
TRACED_TYPES = frozenset({"VIDEO", "MASK", "*"})
# A traced type that must come from at least one IMAGE this graph can check (a loaded video cannot be).
NEEDS_IMAGE = frozenset({"VIDEO"})
# Pixels before decoding: no check can see them.
REFUSED_TYPES = frozenset({"LATENT"})
# Types that carry no image data (ComfyUI's own; a pack's are added with "data_types").
DATA_FREE_TYPES = frozenset({
    "STRING", "INT", "FLOAT", "BOOLEAN", "COMBO", "MODEL", "CLIP", "VAE", "CONDITIONING", "CLIP_VISION",
    "CLIP_VISION_OUTPUT", "CONTROL_NET", "STYLE_MODEL", "GLIGEN", "UPSCALE_MODEL", "SIGMAS", "SAMPLER", "NOISE",
    "GUIDER", "AUDIO", "LATENT_OPERATION", "HOOKS", "HOOK_KEYFRAMES", "TIMESTEPS_RANGE", "PHOTOMAKER",
    "TAESD", "LORA_MODEL", "LOSS_MAP", "WEBCAM"})
MAX_TRACE = 10_000  # nodes visited per prompt, at most
MONITOR_CLASS = "ProvenanceMemorizationMonitor"
# Nodes whose "model" input is what samples with CFG: a Memorization Monitor goes in front of it.
SAMPLING_NODES = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "CFGGuider", "DualCFGGuider")

MAX_CONFIG_BYTES = 1 << 20

log = logging.getLogger("provenance_guard")


class EnforcementConfigError(ConfigError):
    """The studio enforcement configuration cannot be read or validated; every prompt is refused."""


# The file's top-level objects: "enforce" (this module) and "credentials" (comfyui_nodes/credentials.py).
SECTIONS = ("enforce", "credentials")


def read_user_config(path: str | None) -> dict[str, Any] | None:
    """The JSON object in provenance_guard.json at path (None when there is no file); EnforcementConfigError
    when it cannot be read or is no object. Its top-level keys are checked by load_config."""
    if not path or not os.path.exists(path):
        return None
    try:
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise EnforcementConfigError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
        with open(path, encoding="utf-8-sig") as f:  # a UTF-8 BOM, as Windows editors write, is fine
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EnforcementConfigError(f"{path} cannot be read as JSON ({exc}); fix it (see docs/hosts.md, 'Studio "
                                     f"enforcement')") from exc
    if not isinstance(data, dict):
        raise EnforcementConfigError(f"{path} must hold a JSON object such as "
                                     f'{{"enforce": {{"bundle": "..."}}}}, not a {type(data).__name__}')
    return data


def load_config(user_dir: str | None = None, environ=os.environ) -> dict[str, Any] | None:
    """The validated enforcement settings, None when enforcement is not configured, or EnforcementConfigError
    when it is configured (the variable is set, or the file exists with anything but a "credentials" object
    alone) but cannot be used."""
    path = os.path.join(user_dir, CONFIG_FILE) if user_dir else None
    data = read_user_config(path)
    cfg: dict[str, Any] = {}
    configured = data is not None and set(data) != {"credentials"}  # credentials alone: no enforcement
    if configured:
        section = data.get("enforce")
        if section is None:
            raise EnforcementConfigError(f'{path} exists but holds no "enforce" object, so enforcement cannot run; '
                                         f'write {{"enforce": {{"bundle": "studio-refs"}}}} (see docs/hosts.md, '
                                         f"'Studio enforcement'), or delete the file to turn enforcement off")
        if not isinstance(section, dict):
            raise EnforcementConfigError(f'{path}: "enforce" must be an object such as {{"bundle": "studio-refs"}}, '
                                         f"not {section!r}")
        others = sorted(set(data) - set(SECTIONS))
        if others:
            raise EnforcementConfigError(f'{path}: unknown key(s) {others} beside "enforce" and "credentials"; put '
                                         f'every setting inside one of them (see docs/hosts.md, \'Studio enforcement\')')
        cfg = dict(section)
        unknown = sorted(set(cfg) - KEYS)
        if unknown:
            raise EnforcementConfigError(f'{path}: unknown key(s) {unknown} under "enforce"; the keys are '
                                         f"{sorted(KEYS)}")
    if environ.get(ENV):
        cfg["bundle"] = environ[ENV]
    elif ENV in environ:
        raise EnforcementConfigError(f"{ENV} is set but empty; give a bundle name, path or server URL, or unset it")
    if not cfg and not configured:
        return None
    return _validated({**DEFAULTS, **cfg}, path if configured else ENV)


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
    if not isinstance(cfg.get("views"), str) or cfg.get("views") not in VIEWS:
        raise EnforcementConfigError(f'{where}: "views" must be one of {list(VIEWS)}, not {cfg.get("views")!r}')
    if not isinstance(cfg.get("monitor"), bool):
        raise EnforcementConfigError(f'{where}: "monitor" must be true or false, not {cfg.get("monitor")!r}')
    reserved = {IMAGE} | REFUSED_TYPES | TRACED_TYPES
    for key in ("image_types", "data_types"):
        taken = sorted(set(names(key)) & reserved)
        if taken:
            raise EnforcementConfigError(f'{where}: "{key}" may name a node pack\'s own types only, not {taken} '
                                         f"(enforcement decides those itself)")
    return {"bundle": bundle.strip(), "fail_mode": cfg["fail_mode"], "exempt_nodes": names("exempt_nodes"),
            "save_nodes": names("save_nodes"), "top_k": top_k, "verify": cfg["verify"], "views": cfg["views"],
            "monitor": cfg["monitor"],
            "image_types": names("image_types"), "data_types": names("data_types")}


def _is_path(bundle: str) -> bool:
    return "://" in bundle or os.path.isabs(bundle) or bundle.startswith(("./", "../", "~"))


def check_inputs(config: dict[str, Any], source: list) -> dict[str, Any]:
    """The inputs of the check enforcement inserts in front of ``source``: every input the node takes."""
    bundle = str(config["bundle"])
    return {"images": source, "bundle": "" if _is_path(bundle) else bundle,
            "bundle_path": bundle if _is_path(bundle) else "", "on_match": "block",
            "fail_mode": config["fail_mode"], "use_bundle_thresholds": True, "warn": 0.90, "block": 0.95,
            "top_k": int(config["top_k"]), "model_override": "", "verify": config.get("verify", "confirm+escalate"),
            "fetch_references": False, "references": "", "prompt_action": "warn", "strict": True, "bundle_url": "",
            "views": config.get("views", "whole")}


def _enforcing(node: Any, config: dict[str, Any]) -> bool:
    """Whether node is a Provenance Check exactly as enforcement inserts it: its class and every one of its
    inputs (a check that differs in any input, a references folder included, is the user's, not ours). An
    optional input the node leaves out runs with the node's default (as ComfyUI calls it), so it is compared
    as that default: a check saved before an input existed still matches when the default is enforcement's."""
    if not isinstance(node, dict) or node.get("class_type") != CHECK_CLASS:
        return False
    inputs = node.get("inputs") if isinstance(node.get("inputs"), dict) else {}
    want = check_inputs(config, inputs.get("images"))
    inputs = {**{k: v for k, v in _node_defaults().items() if k in want}, **inputs}
    return set(inputs) == set(want) and all(inputs[k] == v and type(inputs[k]) is type(v) for k, v in want.items())


@functools.cache
def _node_defaults() -> dict[str, Any]:
    """The defaults of the check node's optional inputs (what it runs with when the graph leaves one out;
    a required input left out fails ComfyUI's validation). Read once: they are the code's."""
    import inspect

    from .nodes_provenance import ProvenanceCheck

    optional = set(ProvenanceCheck.INPUT_TYPES().get("optional") or {})
    return {k: p.default for k, p in inspect.signature(ProvenanceCheck.check).parameters.items()
            if k in optional and p.default is not inspect.Parameter.empty}


class Refused(Exception):
    """A graph enforcement will not run: the message says which node and why."""


def _type_name(kind: Any) -> str | None:
    if isinstance(kind, (list, tuple)):
        return "COMBO"  # a list of choices
    return str(kind) if isinstance(kind, str) and kind else None


def _declared(cls: Any, key: str) -> str | None:
    try:
        spec = cls.INPUT_TYPES() if cls is not None and hasattr(cls, "INPUT_TYPES") else {}
    except Exception:  # noqa: BLE001 - a pack's INPUT_TYPES may fail: the link's own type decides then
        return None
    for group in ("required", "optional"):
        kind = (spec.get(group) or {}).get(key)
        if isinstance(kind, (tuple, list)) and kind:
            return _type_name(kind[0])
    return None


def _produced(classes: dict, node: Any, slot: Any) -> str | None:
    cls = classes.get(node.get("class_type")) if isinstance(node, dict) else None
    returns = getattr(cls, "RETURN_TYPES", ()) or ()
    if isinstance(slot, int) and not isinstance(slot, bool) and 0 <= slot < len(returns):
        return _type_name(returns[slot])
    return None


class _Guard:
    """One prompt's rewrite: checks inserted on IMAGE links, traced types followed upstream."""

    def __init__(self, prompt: dict, config: dict[str, Any], classes: dict):
        self.prompt, self.config, self.classes = prompt, config, classes
        self.traced = TRACED_TYPES | set(config.get("image_types") or ())
        self.data_free = DATA_FREE_TYPES | set(config.get("data_types") or ())
        self.found: dict[str, bool] = {}  # node id traced -> whether an IMAGE link was checked above it
        self.steps = 0

    def kind(self, node: dict, key: str, value: list) -> str | None:
        produced = _produced(self.classes, self.prompt.get(str(value[0])), value[1])
        declared = _declared(self.classes.get(node.get("class_type")), key)
        return IMAGE if IMAGE in (produced, declared) else produced or declared

    def output(self, node_id: str, node: dict) -> None:
        for key, value in list((node.get("inputs") or {}).items()):
            if _linked(value, self.prompt):
                self.link(node_id, node, key, value, f"output node {node_id} ({node.get('class_type')})")

    def link(self, node_id: str, node: dict, key: str, value: list, where: str) -> bool:
        """Guard one linked input; True when an IMAGE link was checked on the way."""
        self.steps += 1
        if self.steps > MAX_TRACE:
            raise Refused(f"the graph is too large to trace (over {MAX_TRACE} links)")
        slot = value[1]
        if not isinstance(slot, int) or isinstance(slot, bool) or slot < 0:
            # ComfyUI indexes outputs with Python's rules (-1: the last, True: 1): a slot that is no plain index
            # would be typed by another output than the one read
            raise Refused(f"{where}: input {key!r} links to output slot {slot!r} of node {value[0]}, which is not "
                          f"a plain output index (0, 1, ...); relink it in the editor")
        if slot == 0 and _enforcing(self.prompt.get(str(value[0])), self.config):
            return True  # fed by a check exactly as enforcement inserts it, whatever the input's type
        kind = self.kind(node, key, value)
        if kind == IMAGE:
            self.check(node_id, node, key, value)
            return True
        if kind in self.data_free:
            return False
        if kind in REFUSED_TYPES:
            raise Refused(f"{where} receives {kind} through its input {key!r}: undecoded pixels cannot be checked "
                          f"before they leave ComfyUI. Decode them (VAE Decode) and save images instead, or name "
                          f"the node class in \"exempt_nodes\" of provenance_guard.json")
        if kind in self.traced:
            source_id = str(value[0])
            found = self.upstream(source_id, where)
            if not found and kind in NEEDS_IMAGE:
                raise Refused(f"{where} receives {kind} through its input {key!r}, made from no image this graph "
                              f"can check (node {source_id}, {self.prompt[source_id].get('class_type')}); build it "
                              f"from generated images (e.g. Create Video), or exempt the node class")
            return found
        raise Refused(f"{where} receives {kind or 'an unknown type'} through its input {key!r}, a type studio "
                      f"enforcement does not know; add it to \"image_types\" (it carries pixels made from images) "
                      f"or \"data_types\" (it carries no image data) in provenance_guard.json")

    def upstream(self, node_id: str, where: str) -> bool:
        if node_id in self.found:
            return self.found[node_id]
        self.found[node_id] = False  # a cycle (ComfyUI refuses those) ends here
        node = self.prompt.get(node_id)
        found = False
        if isinstance(node, dict):
            for key, value in list((node.get("inputs") or {}).items()):
                if _linked(value, self.prompt):
                    found = self.link(node_id, node, key, value, f"{where}, through node {node_id} "
                                                                 f"({node.get('class_type')})") or found
        self.found[node_id] = found
        return found

    def check(self, node_id: str, node: dict, key: str, value: list) -> None:
        check_id = f"{PREFIX}{node_id}-{key}"
        while check_id in self.prompt:
            check_id += "-"
        self.prompt[check_id] = {"class_type": CHECK_CLASS, "inputs": check_inputs(self.config, value),
                                 "_meta": {"title": "Provenance Check (studio enforced)"}}
        node["inputs"][key] = [check_id, 0]


def _linked(value: Any, prompt: dict) -> bool:
    return isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt


def enforce_prompt(json_data: dict, config: dict[str, Any], classes: dict) -> dict:
    """Insert a blocking Provenance Check on every IMAGE link whose data reaches an output node of
    json_data["prompt"] (see the module docstring). ``classes`` is ComfyUI's NODE_CLASS_MAPPINGS. Never
    raises: a graph that cannot be guarded is refused (see refuse)."""
    try:
        disable_previews()
        prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
        if not isinstance(prompt, dict):
            return json_data
        exempt, extra = set(config["exempt_nodes"]), set(config["save_nodes"])
        if config.get("monitor", True):
            _insert_monitors(prompt)
        for node in prompt.values():  # a user's own checks never show checked pixels under enforcement
            if isinstance(node, dict) and node.get("class_type") == CHECK_CLASS and isinstance(node.get("inputs"), dict):
                node["inputs"]["strict"] = True
        guard = _Guard(prompt, config, classes)
        for node_id, node in list(prompt.items()):
            if not isinstance(node, dict):
                continue
            cls = classes.get(node.get("class_type"))
            name = node.get("class_type")
            if name in (CHECK_CLASS, REFUSAL_CLASS) or name in exempt:
                continue
            if not (getattr(cls, "OUTPUT_NODE", False) is True or name in extra):
                continue
            node.setdefault("inputs", {})
            guard.output(str(node_id), node)
        return json_data
    except Refused as exc:
        log.warning("provenance-guard: prompt refused by studio enforcement: %s", exc)
        return refuse(json_data, f"Provenance Guard studio enforcement refused this prompt: {exc}")
    except Exception as exc:  # noqa: BLE001 - ComfyUI would log it and queue the graph unchecked
        log.exception("provenance-guard: could not insert the enforced check; refusing the prompt")
        return refuse(json_data, f"Provenance Guard studio enforcement could not insert its check into this graph "
                                 f"({type(exc).__name__}: {exc}); the prompt is refused rather than run unchecked")


def disable_previews() -> None:
    """Latent previews off (--preview-method): they reach the browser before any check runs."""
    try:
        from comfy.cli_args import LatentPreviewMethod, args
    except ImportError:
        return
    if getattr(args, "preview_method", None) != LatentPreviewMethod.NoPreviews:
        log.warning("provenance-guard: latent previews turned off: under studio enforcement unchecked pixels "
                    "must not reach the browser")
        args.preview_method = LatentPreviewMethod.NoPreviews


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
    disable_previews()
    server.add_on_prompt_handler(lambda json_data: enforce_prompt(json_data, config, classes))
    log.info("provenance-guard: studio enforcement on: every output node that receives images is preceded by a "
             "blocking check against %s (fail mode %s)", config["bundle"], config["fail_mode"])
