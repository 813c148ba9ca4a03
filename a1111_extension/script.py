"""The always-visible "Provenance Guard" script of txt2img and img2img (A1111 1.10 and Forge).

Hooks, and why these:
- process: reads and validates the arguments (a setting the webui cannot use is a failure under the fail
  mode, never ignored) and registers the infotext fields as callables: the webui calls them for each image
  with that image's position (so each infotext carries its own verdict) and once for the grid with
  ``use_main_prompt`` (which gets the batch's: the worst verdict with a count, "block 1 of 3").
- postprocess_batch_list: the whole batch, as tensors, before anything is saved or face-restored: the one
  forward pass per batch. Withheld images are blacked out in the batch right away, so the "save before face
  restoration / color correction" copies and the mask composites never hold an original.
- postprocess_image_after_composite: per image, after every script's postprocess_image, the inpaint overlay
  and color correction, just before the image is saved and shown, whatever order scripts run in (Forge
  orders hooks by load order and its callback-order settings). An image that changed since the batch check
  is checked again here, on these final pixels; a withheld image is replaced by a black placeholder carrying
  the notice (the webui swallows exceptions in hooks, so blocking never relies on raising); the record goes
  into image.info, which the on_before_image_saved callback copies into the PNG's "provenance" chunk. A
  script whose own postprocess_image_after_composite runs after this one and changes pixels is not seen.
- postprocess: the per-image results and the batch summary in the response info (what API clients read,
  and what javascript/provenance_guard.js draws the panel in the accordion from).
- on_image_saved (a script callback, credentials.image_saved): with Content Credentials on, the file the
  webui just wrote is signed in place with its image's check, as the file's last write.
Any unexpected error inside a hook is caught and applied as the fail mode. Under fail mode closed an image
that could not be checked is withheld whatever the action (core.policy.host_action).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
from dataclasses import dataclass, field, replace
from typing import Any
from collections.abc import Callable

import modules.scripts as scripts

from ..core.check import failed_result, shared_checker
from ..core.errors import ConfigError
from ..core.references import ReferenceOptions
from ..core.memorization import DEFAULT_STEPS, MemorizationMonitor, post_cfg_step, score_text
from ..core.policy import BLOCK, UNCHECKED, WARN, Policy, apply_prompt, host_action
from ..core.report import (batch_summary, block_message, placeholder_image, result_payload, short, short_notices,
                           summary_line)
from ..core.result import CheckResult, GenerationRecord
from . import credentials, settings

log = logging.getLogger("provenance_guard")

ACTIONS = settings.ACTIONS
FAIL_MODES = settings.FAIL_MODES
# The order of ui()'s components = the order of alwayson_scripts args in the API (docs/hosts.md documents it).
# New arguments go at the end, so API callers that send the older, shorter list keep working.
ARG_NAMES = ["enabled", "bundle", "bundle_path", "use_bundle_thresholds", "warn", "block", "action", "fail_mode",
             "verify", "fetch_references", "bundle_url", "views"]
HIGHRES_COPY = ("a copy of this image from before highres fix was saved before any check could run "
                "('Save a copy of image before applying highres fix' is on); turn that setting off so no "
                "unchecked copy reaches the outputs")
INFOTEXT_FIELDS = ("Provenance", "Provenance similarity", "Provenance bundle", "Provenance memorization")
# The webui's API fills the script arguments a caller leaves out with the values of the components ui()
# returns when it collects its defaults (modules/api/api.py init_default_script_args, cached at the first API
# call). Those components carry FROM_SETTINGS instead, so what a caller leaves out follows the settings as
# they are at each call; a caller may also send null for "as in Settings".
FROM_SETTINGS = None
API_DEFAULTS_CALLER = "init_default_script_args"


@dataclass
class RunState:
    """What one generation (one p) carries between hooks."""

    action: str
    policy: Policy
    bundle: str = ""
    error: str | None = None  # a setting or bundle that makes every check of this run fail
    references: ReferenceOptions = field(default_factory=lambda: ReferenceOptions())
    warnings: list[str] = field(default_factory=list)
    results: dict[int, CheckResult] = field(default_factory=dict)  # global image index -> result
    withheld: set[int] = field(default_factory=set)
    monitor: MemorizationMonitor | None = None  # the current batch's memorization signal (None: off)
    family: str | None = None
    signing: credentials.Signing | None = None  # Content Credentials of this run's saved images (None: off)

    def record(self, index: int, result: CheckResult) -> CheckResult:
        for warning in self.warnings:
            if warning not in result.warnings:
                result.warnings.append(warning)
        self.results[index] = result
        if host_action(result, self.action) != "pass":
            self.withheld.add(index)
        return result


def parse_args(args) -> dict[str, Any]:
    """The script's arguments by name; one left out (an API caller sending fewer) or FROM_SETTINGS (what the
    API fills in for one left out, or a caller's null) takes the setting's value at this call."""
    values = dict(zip(ARG_NAMES, args, strict=False))  # a caller may send fewer: the rest are settings'
    for name in ARG_NAMES:
        if values.get(name, FROM_SETTINGS) is FROM_SETTINGS:
            values[name] = settings.default(name)
    return values


def run_state(values: dict[str, Any]) -> RunState:
    """The run's state from the arguments. A safety value that cannot be used counts as its safe value
    (settings.SAFE: closed, block, confirm+escalate, ...) and the run says so once; thresholds or a bundle
    that cannot be used make every check of the run fail under the fail mode."""
    warnings: list[str] = []
    fail_mode = settings.safe_choice("fail_mode", values.get("fail_mode"), warnings)
    action = settings.safe_choice("action", values.get("action"), warnings)
    verify = settings.safe_choice("verify", values.get("verify"), warnings)
    views = settings.safe_choice("views", values.get("views"), warnings)
    prompt_action = settings.choice("prompt_action")
    use_bundle = values.get("use_bundle_thresholds")
    problems = []
    if not isinstance(use_bundle, bool):  # neither set of thresholds is surely the stricter: the fail mode decides
        problems.append(f"use_bundle_thresholds {use_bundle!r} is not true or false")
        use_bundle = True
    fetch = values.get("fetch_references") is True
    strict = settings.safe_choice("strict", settings.default("strict"), warnings)
    policy = Policy(fail_mode=fail_mode, strict=strict, views=views)
    try:
        threshold = float(settings.default("memorization_threshold") or 0.0)
        policy = Policy(warn=None if use_bundle else float(values["warn"]),
                        block=None if use_bundle else float(values["block"]),
                        fail_mode=fail_mode, verify=verify, prompt_action=prompt_action, strict=strict, views=views,
                        memorization_thresholds={"*": threshold} if threshold > 0 else None)
    except (ConfigError, TypeError, ValueError) as exc:
        problems.append(f"thresholds warn={values.get('warn')!r}, block={values.get('block')!r}: {exc}")
    for name in ("bundle", "bundle_path", "bundle_url"):
        if values.get(name) is not None and not isinstance(values.get(name), str):
            problems.append(f"{name} {values.get(name)!r} is not text")
    references = settings.default("references")
    if references is not None and not isinstance(references, str):
        problems.append(f"setting {settings.option_name('references')} = {references!r} is not a folder path")
        references = ""
    state = RunState(action=action, policy=policy, warnings=warnings,
                     references=ReferenceOptions(root=(references or "").strip() or None,
                                                 fetch=fetch, root_hint=settings.FIELDS["references"],
                                                 fetch_hint=settings.FIELDS["fetch"]))
    if problems:
        state.error = ("Provenance Guard settings cannot be used: " + "; ".join(problems) +
                       ". Fix them in Settings > Provenance Guard or in the script's arguments")
        return state
    try:
        state.bundle = resolve_bundle(values.get("bundle") or "", values.get("bundle_path") or "",
                                      values.get("bundle_url") or "")
    except ConfigError as exc:
        state.error = str(exc)
    return state


def resolve_bundle(bundle: str, bundle_path: str, bundle_url: str = "") -> str:
    """The bundle a run checks against: the path or server URL, else the bundle URL's download (pulled once
    into models/provenance in the background: until it is there this raises, and the fail mode decides),
    else the folder picked from the list."""
    if bundle_url and str(bundle_url).strip():
        if bundle_path and str(bundle_path).strip():
            raise ConfigError("both a bundle path / index server URL and a bundle URL are set; clear one of them "
                              "(Settings > Provenance Guard, or the script's fields)")
        from ..core.pull import bundle_from_url

        return bundle_from_url(str(bundle_url).strip(), settings.models_dir())
    if bundle_path and str(bundle_path).strip():
        return str(bundle_path).strip()
    if not bundle:
        raise ConfigError("no bundle chosen: put a bundle folder (made by 'provenance-guard index build') into "
                          "the webui's models/provenance/ and pick it, or give a path in Settings > Provenance Guard")
    if os.path.isabs(bundle) or "://" in bundle:
        return bundle
    path = os.path.join(settings.models_dir(), bundle)
    if not os.path.isfile(os.path.join(path, "manifest.json")):
        raise ConfigError(f"bundle {bundle!r} is not in {settings.models_dir()}; pick another or give its path")
    return path


def _collecting_api_defaults() -> bool:
    """Whether ui() is being called by the webui's API to collect default argument values (not to draw)."""
    frame = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return False
        if frame.f_code.co_name == API_DEFAULTS_CALLER:
            return True
        frame = frame.f_back
    return False


def _to_bhwc(images):
    """The webui's batch (CHW float tensors in 0..1, or numpy) -> one [B,H,W,C] float tensor on the CPU."""
    import numpy as np
    import torch

    out = []
    for x in images:
        t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
        t = t.detach().float().cpu()
        out.append(t.permute(1, 2, 0) if t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4) else t)
    return torch.stack(out)


def _host() -> str:
    """"forge" inside Forge (it imports its modules_forge package at start-up), else "a1111"."""
    import importlib.util

    if "modules_forge" in sys.modules:
        return "forge"
    try:
        return "forge" if importlib.util.find_spec("modules_forge") is not None else "a1111"
    except (ImportError, ValueError):
        return "a1111"


def _global_index(p, position: int) -> int:
    return int(getattr(p, "iteration", 0) or 0) * int(getattr(p, "batch_size", 1) or 1) + int(position)


def infotext_value(state: RunState, name: str) -> Callable[..., str | None]:
    """A callable for p.extra_generation_params[name]: create_infotext calls it with its locals (p, index =
    the image's position in its batch, use_main_prompt for the grid)."""

    def value(**kwargs) -> str | None:
        if kwargs.get("use_main_prompt"):
            return infotext_fields(list(state.results.values()), batch=True).get(name)
        result = state.results.get(_global_index(kwargs.get("p"), kwargs.get("index") or 0))
        return infotext_fields([result], batch=False).get(name) if result is not None else None

    return value


def infotext_fields(results: list[CheckResult], batch: bool) -> dict[str, str | None]:
    """The infotext fields of one image, or of a batch (the worst verdict with a count; the best score)."""
    if not results:
        return {}
    scores = [r.max_score for r in results if r.max_score is not None]
    first = next((r for r in results if r.thresholds), None)
    return {
        "Provenance": batch_summary(results) if batch else results[0].verdict,
        "Provenance similarity": f"{max(scores):.4f}" if scores else None,
        "Provenance bundle": (f"{first.thresholds[0].bundle_id}@{first.thresholds[0].bundle_version}"
                              if first else None),
        "Provenance memorization": _batch_memorization(results) if batch else score_text(results[0].prompt),
    }


def _batch_memorization(results: list[CheckResult]) -> str | None:
    """The batch's highest memorization score in a few words (None when no image has one)."""
    scored = [r.prompt for r in results if r.prompt is not None and r.prompt.memorization_score is not None]
    if scored:
        return score_text(max(scored, key=lambda c: c.memorization_score))
    return next((score_text(r.prompt) for r in results if r.prompt is not None), None)


def result_summary(index: int, r: CheckResult) -> dict[str, Any]:
    """One image's entry in the response info ("Provenance results"), which the panel is drawn from."""
    return {"index": index, **result_payload(r),
            "top": ({"url": r.top.url, "caption": r.top.caption, "score": r.top.score, "bundle": r.top.bundle_id}
                    if r.top else None)}


class ProvenanceGuardScript(scripts.Script):
    def title(self):
        return "Provenance Guard"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        import gradio as gr

        with gr.Accordion("Provenance Guard", open=False):
            with gr.Row():
                enabled = gr.Checkbox(label="Check generated images against training images",
                                      value=settings.default("enabled"), elem_id=self.elem_id("enabled"))
                action = gr.Radio(ACTIONS, value=settings.choice("action"), label="On a match",
                                  elem_id=self.elem_id("action"))
                fail_mode = gr.Radio(FAIL_MODES, value=settings.choice("fail_mode"),
                                     label="If the check cannot run", elem_id=self.elem_id("fail_mode"))
            with gr.Row():
                bundle = gr.Dropdown(settings.bundle_choices(), value=settings.default("bundle") or None,
                                     label="Bundle (models/provenance)", allow_custom_value=True,
                                     elem_id=self.elem_id("bundle"))
                bundle_path = gr.Textbox(value=settings.default("bundle_path"),
                                         label="or a bundle folder path, or a studio's index server URL "
                                               "(http://host:port/NAME)",
                                         elem_id=self.elem_id("bundle_path"))
                bundle_url = gr.Textbox(value=settings.default("bundle_url"),
                                        label="or a bundle URL to download once into models/provenance "
                                              "(https://host/path/ or hf://datasets/OWNER/NAME)",
                                        elem_id=self.elem_id("bundle_url"))
            with gr.Row():
                use_bundle = gr.Checkbox(label="Use the bundle's thresholds",
                                         value=settings.default("use_bundle_thresholds"),
                                         elem_id=self.elem_id("use_bundle_thresholds"))
                warn = gr.Slider(-1.0, 1.0, value=settings.default("warn"), step=0.001, label="Warn at similarity",
                                 elem_id=self.elem_id("warn"))
                block = gr.Slider(-1.0, 1.0, value=settings.default("block"), step=0.001,
                                  label="Block at similarity", elem_id=self.elem_id("block"))
            with gr.Row():
                verify = gr.Radio(settings.VERIFY_MODES, value=settings.choice("verify"),
                                  label="Verify matches on the training image's pixels", elem_id=self.elem_id("verify"))
                fetch = gr.Checkbox(label="Fetch training images of URL-only bundles (tells their hosts someone looked)",
                                    value=settings.default("fetch_references"), elem_id=self.elem_id("fetch_references"))
                views = gr.Radio(settings.VIEWS, value=settings.choice("views"),
                                 label="Query views (multi: also the quarters and the centre)",
                                 elem_id=self.elem_id("views"))
            # Filled by javascript/provenance_guard.js from this generation's info (never from a shared route).
            gr.HTML("", elem_id=f"provenance_guard_panel_{'img2img' if is_img2img else 'txt2img'}")
        self.infotext_fields = []
        components = [enabled, bundle, bundle_path, use_bundle, warn, block, action, fail_mode, verify, fetch,
                      bundle_url, views]
        if _collecting_api_defaults():
            for component in components:  # never drawn: what the API fills in for arguments left out
                component.value = FROM_SETTINGS
        return components

    # hooks ---------------------------------------------------------------------------------------------
    def process(self, p, *args):
        # A failing state first: whatever goes wrong below (arguments of any type from an API caller, a
        # hand-edited config.json), the later hooks find a state and act under the fail mode. The webui
        # swallows exceptions in hooks, so an error here must never leave p without one.
        p._provenance = RunState(action=BLOCK, policy=Policy(fail_mode="closed"),
                                 error="Provenance Guard could not read its settings for this generation")
        try:
            values = parse_args(args)
            if not settings.safe_choice("enabled", values["enabled"]):
                p._provenance = None
                return
            state = run_state(values)
        except Exception as exc:  # noqa: BLE001 - see above: the failing state stays
            log.exception("provenance-guard: the script's arguments or settings cannot be used")
            p._provenance.error += f" ({type(exc).__name__}: {exc}); fix them in Settings > Provenance Guard"
            return
        try:
            from modules import shared

            if getattr(p, "enable_hr", False) and getattr(shared.opts, "save_images_before_highres_fix", False):
                state.warnings.append(HIGHRES_COPY)
                p.comment(f"Provenance Guard: {HIGHRES_COPY}.")
        except ImportError:
            pass
        try:
            state.signing = credentials.run_signing(p, state.warnings)
        except Exception as exc:  # noqa: BLE001 - credentials that were asked for must not silently go missing
            log.exception("provenance-guard: Content Credentials could not be set up")
            if settings.default("credentials") != "off":
                state.signing = credentials.Signing(
                    "required", error=f"Content Credentials could not be set up ({type(exc).__name__}: {exc}); fix "
                                      f"{settings.FIELDS['credentials']} or turn it off")
        p._provenance = state
        for name in INFOTEXT_FIELDS:
            p.extra_generation_params[name] = infotext_value(state, name)
        if settings.safe_choice("memorization", settings.default("memorization"), state.warnings):
            model = getattr(p, "sd_model", None)
            state.family = ("sdxl" if getattr(model, "is_sdxl", False) else
                            "sd2" if getattr(model, "is_sd2", False) else "sd1")

    def process_batch(self, p, *args, **kwargs):
        """A fresh memorization monitor for each batch (its images' scores go to the batch check)."""
        state: RunState | None = getattr(p, "_provenance", None)
        if state is None or state.family is None:
            return
        try:
            steps = int(settings.default("memorization_steps") or DEFAULT_STEPS)
            steps = steps if 1 <= steps <= 1000 else DEFAULT_STEPS
        except (TypeError, ValueError):
            settings.say_once(f"setting {settings.option_name('memorization_steps')} = "
                              f"{settings.default('memorization_steps')!r} is not a whole number; {DEFAULT_STEPS} "
                              f"steps are used")
            steps = DEFAULT_STEPS
        state.monitor = MemorizationMonitor(steps)
        state.monitor.family = state.family
        if float(getattr(p, "cfg_scale", 7.0) or 0.0) <= 1.0:
            state.monitor.no_guidance()

    def process_before_every_sampling(self, p, *args, **kwargs):
        """Forge: on_cfg_denoised never fires there; its ComfyUI-style patcher gets the post-CFG function
        (core.memorization.post_cfg_step). Forge's arguments carry no cond_scale: the step's guidance comes
        from on_cfg_denoiser (cfg_denoiser below), by the webui's own rule. A1111 has no such hook."""
        state: RunState | None = getattr(p, "_provenance", None)
        objects = getattr(getattr(p, "sd_model", None), "forge_objects", None)
        if state is None or state.monitor is None or objects is None:
            return
        unet = objects.unet.clone()

        def record(args):
            monitor = state.monitor  # the current batch's
            if monitor is None:
                return args["denoised"]
            step = getattr(_PENDING, "guidance", None)
            _PENDING.guidance = None
            cfg, skipped = step if step is not None else (_cfg_scale(p), False)
            post_cfg_step(monitor, args, cfg_scale=cfg, skipped=skipped)
            return args["denoised"]

        unet.set_model_sampler_post_cfg_function(record)
        objects.unet = unet

    def postprocess_batch_list(self, p, pp, *args, **kwargs):
        state: RunState | None = getattr(p, "_provenance", None)
        if state is None or not pp.images:
            return
        first = _global_index(p, 0)
        records = [self._generation(p, i) for i in range(len(pp.images))]
        signals = state.monitor.scores(len(pp.images)) if state.monitor is not None else None
        try:
            results = self._check(state, _to_bhwc(pp.images), records, signals)
        except Exception as exc:  # noqa: BLE001 - a hook must not let a failure pass images unchecked
            log.exception("provenance-guard: the check failed")
            results = [failed_result(state.policy, f"internal error: {exc}", rec) for rec in records]
        for i, r in enumerate(results):
            state.record(first + i, r)
            if first + i in state.withheld:
                pp.images[i] = pp.images[i] * 0  # no original survives into any later save

    def _check(self, state: RunState, images, records: list[GenerationRecord], signals=None) -> list[CheckResult]:
        if state.error:
            return [failed_result(state.policy, state.error, rec) for rec in records]
        if state.signing is not None and state.signing.error:  # credentials required and unusable: nothing saved
            closed = replace(state.policy, fail_mode="closed")
            return [failed_result(closed, state.signing.error, rec) for rec in records]
        policy = state.policy
        if policy.memorization_thresholds and "*" in policy.memorization_thresholds:
            policy = replace(policy, memorization_thresholds={state.family: policy.memorization_thresholds["*"]})
        return shared_checker(state.bundle, references=state.references).check(
            images, records=records, policy=policy, signals=signals, family=state.family)

    @staticmethod
    def _generation(p, i: int) -> GenerationRecord:
        def pick(name):
            values = getattr(p, name, None)
            return values[i] if isinstance(values, list) and i < len(values) else values

        return GenerationRecord(prompt=pick("prompts"), negative_prompt=pick("negative_prompts"), seed=pick("seeds"),
                                sampler=getattr(p, "sampler_name", None), steps=getattr(p, "steps", None),
                                cfg=getattr(p, "cfg_scale", None), width=getattr(p, "width", None),
                                height=getattr(p, "height", None), model=getattr(p, "sd_model_name", None),
                                model_hash=getattr(p, "sd_model_hash", None), source=_host())

    @staticmethod
    def _index(p, pp) -> int:
        # Forge gives pp.index (global); A1111 sets p.batch_index (the position in the batch).
        index = getattr(pp, "index", None)
        if index is not None:
            return int(index)
        return _global_index(p, getattr(p, "batch_index", 0) or 0)

    def postprocess_image_after_composite(self, p, pp, *args):
        state: RunState | None = getattr(p, "_provenance", None)
        if state is None:
            return
        try:
            self._final_image(state, p, pp)
        except Exception as exc:  # noqa: BLE001 - the webui would swallow it and save the image as it is
            log.exception("provenance-guard: the final-image hook failed")
            from PIL import Image

            from ..core.check import mark_failed

            index = self._index(p, pp)
            result = state.results.get(index) or failed_result(state.policy, "this image was not checked")
            state.record(index, mark_failed(result, state.policy, f"internal error: {type(exc).__name__}: {exc}"))
            if index in state.withheld:
                pp.image = Image.new("RGB", pp.image.size, "black")
            _put_record(state, pp, index, result)

    def _final_image(self, state: RunState, p, pp) -> None:
        index = self._index(p, pp)
        result = state.results.get(index)
        if result is None:  # the batch hook never ran for this image (should not happen): fail mode
            result = state.record(index, failed_result(state.policy, "this image was not checked",
                                                       self._generation(p, getattr(p, "batch_index", 0) or 0)))
        elif index not in state.withheld and result.checked:
            result = self._recheck_if_changed(state, p, pp, index, result)
        if index in state.withheld:
            signing_error = state.signing.error if state.signing is not None else None
            message = (f"Blocked: {short(signing_error, 300)}" if signing_error and result.error == signing_error
                       else block_message(result))  # not "set the fail mode to open": that would not help
            pp.image = placeholder_image(pp.image.width, pp.image.height, message, short_notices(result))
        elif result.verdict in (WARN, BLOCK):
            p.comment(f"Provenance Guard, image {index + 1}: {summary_line(result)}")
        elif result.verdict == UNCHECKED:
            p.comment(f"Provenance Guard, image {index + 1}: not checked — {short(result.error, 200)}")
        _put_record(state, pp, index, result)

    def _recheck_if_changed(self, state: RunState, p, pp, index: int, result: CheckResult) -> CheckResult:
        """Check the final pixels again when another script, face restoration, the overlay or color
        correction changed them after the batch check."""
        from ..core.images import pixels_sha256, to_pixels

        (final,) = to_pixels([pp.image])
        if isinstance(final, Exception) or pixels_sha256(final) == result.image.get("pixels_sha256"):
            return result
        try:
            (again,) = self._check(state, [final], [result.generation])
        except Exception as exc:  # noqa: BLE001 - as in the batch hook
            log.exception("provenance-guard: the check of the final image failed")
            again = failed_result(state.policy, f"internal error: {exc}", result.generation)
        if result.prompt is not None:  # the sampler's signal belongs to the image, whatever happened to it since
            again.prompt = result.prompt
            apply_prompt(again, state.policy.prompt_action)
        again.warnings.append("checked on the final pixels: they changed after generation (face restoration, "
                              "inpaint overlay, color correction or another script)")
        return state.record(index, again)

    def postprocess_image(self, p, pp, *args):
        # Webuis without postprocess_image_after_composite (A1111 before 1.8) act here instead.
        if not hasattr(scripts.Script, "postprocess_image_after_composite"):
            self.postprocess_image_after_composite(p, pp, *args)

    def postprocess(self, p, processed, *args):
        state: RunState | None = getattr(p, "_provenance", None)
        if state is None:
            return
        ordered = [state.results[i] for i in sorted(state.results)]
        extra = getattr(processed, "extra_generation_params", None)
        if isinstance(extra, dict):
            # The response info's top level is the batch's (the per-image values are in each infotext).
            extra.update(infotext_fields(ordered, batch=True))
            extra["Provenance results"] = json.dumps([result_summary(i, r) for i, r in sorted(state.results.items())],
                                                     ensure_ascii=False)
        if state.withheld:
            processed.comments = (getattr(processed, "comments", "") or "") + \
                f"\nProvenance Guard blocked {len(state.withheld)} image(s); the originals were not saved."


# A1111's CFG callbacks: on_cfg_denoiser gives the step's inputs (x, sigma, the denoiser and through it p),
# on_cfg_denoised right after, in the same thread, the predictions. The first is remembered per thread.
_PENDING = threading.local()


def _cfg_scale(p) -> float:
    """The run's guidance (the highres pass's own where it has one)."""
    try:
        if getattr(p, "is_hr_pass", False) and getattr(p, "hr_cfg", None):
            return float(p.hr_cfg)
        return float(getattr(p, "cfg_scale", 7.0))
    except (TypeError, ValueError):
        return 7.0


def skips_uncond(denoiser, sigma) -> bool:
    """Whether the webui leaves out this step's unconditional prediction: its own rule
    (modules/sd_samplers_cfg_denoiser.py: "Skip Early CFG" for the first steps, NGMS below s_min_uncond),
    read from the same settings, so equal predictions are never taken for a skipped step."""
    try:
        from modules import shared

        opts = shared.opts
        step, total = int(getattr(denoiser, "step", 0) or 0), int(getattr(denoiser, "total_steps", 0) or 0)
        early = float(getattr(opts, "skip_early_cond", 0.0) or 0.0)
        if early > 0 and total > 0 and step / total <= early:
            return True
        s_min = float(getattr(getattr(denoiser, "p", None), "s_min_uncond", 0.0) or 0.0)
        first_sigma = float(sigma.flatten()[0]) if hasattr(sigma, "flatten") else float(sigma)
        return bool((step % 2 or getattr(opts, "s_min_uncond_all", False)) and s_min > 0 and first_sigma < s_min)
    except (ImportError, TypeError, ValueError, IndexError):
        return False


def cfg_denoiser(params) -> None:
    """script_callbacks.on_cfg_denoiser: remember the step's x, sigma and whether the webui skips its
    unconditional prediction, for on_cfg_denoised (A1111) or the post-CFG function (Forge)."""
    denoiser = getattr(params, "denoiser", None)
    p = getattr(denoiser, "p", None)
    state: RunState | None = getattr(p, "_provenance", None)
    monitor = state.monitor if state is not None else None
    if monitor is None or monitor.done:
        _PENDING.step = _PENDING.guidance = None
        return
    skipped = skips_uncond(denoiser, params.sigma)
    _PENDING.guidance = (_cfg_scale(p), skipped)
    if params.text_uncond is None:  # Forge at CFG 1 drops the unconditional prompt (p.uc = None)
        _PENDING.step = None
        return
    _PENDING.step = (monitor, params.x, params.sigma, _rows(params.text_uncond), type(denoiser).__name__, skipped)


def _rows(cond) -> int:
    if isinstance(cond, dict):
        cond = next(iter(cond.values()))
    return int(cond.shape[0])


def cfg_denoised(params) -> None:
    """script_callbacks.on_cfg_denoised: x_out holds, per image, its conditional rows (one per AND part)
    first, then one unconditional row per image (modules/sd_samplers_cfg_denoiser.py). When the webui
    skipped the unconditional pass (Skip Early CFG, NGMS: skips_uncond) those rows are copies of the
    conditional ones: the step is not counted. Equal rows otherwise are a real difference of 0. Timestep
    samplers (DDIM, PLMS, UniPC) predict noise; k-diffusion ones denoised images."""
    import torch

    step = getattr(_PENDING, "step", None)
    _PENDING.step = None
    if step is None:
        return
    monitor, x_in, sigma_in, images, kind, skipped = step
    x_out = params.x
    conds = x_out.shape[0] - images
    if skipped or images < 1 or conds < images or conds % images:
        monitor.skip()  # skipped by the webui, or a layout this reading does not know (edit models, uneven AND)
        return
    first = torch.arange(images, device=x_out.device) * (conds // images)
    cond, uncond = x_out[first], x_out[-images:]
    if kind == "CFGDenoiserTimesteps":
        monitor.add_eps(cond, uncond)
    else:
        monitor.add_denoised(x_in[first], cond, uncond, sigma_in[first])


def _put_record(state: RunState, pp, index: int, result: CheckResult) -> None:
    """The record into image.info (before_image_saved copies it into the PNG); a run that signs remembers it,
    so the saved file is signed with this result (and no file with a record this run did not make)."""
    record = result.dumps()
    pp.image.info["provenance"] = record
    if state.signing is not None:
        state.signing.remember(record, index, result)


def before_image_saved(params) -> None:
    """script_callbacks.on_before_image_saved: put the record into the PNG as a 'provenance' chunk."""
    record = getattr(params.image, "info", {}).get("provenance") if params.image is not None else None
    if record and isinstance(params.pnginfo, dict):
        params.pnginfo["provenance"] = record
    credentials.before_save(params)


image_saved = credentials.image_saved  # script_callbacks.on_image_saved: the signature, the file's last write
