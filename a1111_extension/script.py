"""The always-visible "Provenance Guard" script of txt2img and img2img (A1111 1.6+ and Forge).

Hooks, and why these:
- postprocess_batch_list: the whole batch, as tensors, before anything is saved or face-restored: the one
  forward pass per batch happens here. Blocked images are blacked out in the batch right away, so the
  "save before face restoration / color correction" copies never hold an original either.
- postprocess_image (and Forge's postprocess_image_after_composite): per image, before the saver and the
  gallery get it: a blocked image is replaced by a black placeholder carrying the notice (A1111 swallows
  exceptions raised in hooks, so blocking never relies on raising); the verdict goes into the infotext
  (extra_generation_params, set just before the webui renders that image's infotext) and the record into
  image.info, which the on_before_image_saved callback copies into the PNG's "provenance" chunk.
- postprocess: comments under the gallery, the per-image results in the response info (API), the panel.
Any unexpected error inside a hook is caught and applied as the fail mode: under "closed" the batch is
blocked, under "open" it is marked unchecked.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import modules.scripts as scripts

from ..core.check import failed_result, shared_checker
from ..core.errors import ConfigError, ProvenanceError
from ..core.policy import BLOCK, UNCHECKED, WARN, Policy
from ..core.report import block_message, is_flagged, placeholder_image, result_html, short, summary_line
from ..core.result import CheckResult
from . import settings

log = logging.getLogger("provenance_guard")

ACTIONS = ["warn", "block"]
FAIL_MODES = ["open", "closed"]
# The order of ui()'s components = the order of alwayson_scripts args in the API (README documents it).
ARG_NAMES = ["enabled", "bundle", "bundle_path", "use_bundle_thresholds", "warn", "block", "action", "fail_mode"]

LAST_HTML: dict[str, str] = {}  # tab -> the panel's HTML of the last generation


@dataclass
class RunState:
    """What one generation (one p) carries between hooks."""

    action: str
    policy: Policy
    bundle: str
    results: dict[int, CheckResult] = field(default_factory=dict)  # global image index -> result
    blocked: set[int] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


def parse_args(args) -> dict[str, Any]:
    values = dict(zip(ARG_NAMES, args))
    if len(args) < len(ARG_NAMES):  # older API callers may send fewer args: fill from the settings
        for name in ARG_NAMES[len(args):]:
            values[name] = settings.default(name)
    return values


def resolve_bundle(bundle: str, bundle_path: str) -> str:
    if bundle_path and str(bundle_path).strip():
        return str(bundle_path).strip()
    if not bundle:
        raise ConfigError("no bundle chosen: put a bundle folder (made by 'provenance-guard index build') into "
                          "the webui's models/provenance/ and pick it, or give a path in Settings > Provenance")
    if os.path.isabs(bundle) or "://" in bundle:
        return bundle
    path = os.path.join(settings.models_dir(), bundle)
    if not os.path.isfile(os.path.join(path, "manifest.json")):
        raise ConfigError(f"bundle {bundle!r} is not in {settings.models_dir()}; pick another or give its path")
    return path


def _tab(p) -> str:
    return "img2img" if hasattr(p, "init_images") else "txt2img"


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


class ProvenanceGuardScript(scripts.Script):
    sorting_priority = 90  # after most postprocessing scripts, so the check sees the final pixels

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
                action = gr.Radio(ACTIONS, value=settings.default("action"), label="On a match",
                                  elem_id=self.elem_id("action"))
                fail_mode = gr.Radio(FAIL_MODES, value=settings.default("fail_mode"),
                                     label="If the check cannot run", elem_id=self.elem_id("fail_mode"))
            with gr.Row():
                bundle = gr.Dropdown(settings.bundle_choices(), value=settings.default("bundle") or None,
                                     label="Bundle (models/provenance)", allow_custom_value=True,
                                     elem_id=self.elem_id("bundle"))
                bundle_path = gr.Textbox(value=settings.default("bundle_path"), label="or bundle path / URL",
                                         elem_id=self.elem_id("bundle_path"))
            with gr.Row():
                use_bundle = gr.Checkbox(label="Use the bundle's thresholds",
                                         value=settings.default("use_bundle_thresholds"),
                                         elem_id=self.elem_id("use_bundle_thresholds"))
                warn = gr.Slider(-1.0, 1.0, value=settings.default("warn"), step=0.005, label="Warn at similarity",
                                 elem_id=self.elem_id("warn"))
                block = gr.Slider(-1.0, 1.0, value=settings.default("block"), step=0.005,
                                  label="Block at similarity", elem_id=self.elem_id("block"))
            gr.HTML("", elem_id=f"provenance_guard_panel_{'img2img' if is_img2img else 'txt2img'}")
        self.infotext_fields = []
        return [enabled, bundle, bundle_path, use_bundle, warn, block, action, fail_mode]

    # hooks ---------------------------------------------------------------------------------------------
    def process(self, p, *args):
        values = parse_args(args)
        p._provenance = None
        if not values["enabled"]:
            return
        use_bundle = bool(values["use_bundle_thresholds"])
        try:
            policy = Policy(warn=None if use_bundle else float(values["warn"]),
                            block=None if use_bundle else float(values["block"]), fail_mode=values["fail_mode"])
        except ConfigError as exc:
            policy = Policy(fail_mode="closed" if values["fail_mode"] == "closed" else "open")
            log.error("provenance-guard: %s; using the bundle's thresholds", exc)
        action = values["action"] if values["action"] in ACTIONS else "warn"
        state = RunState(action=action, policy=policy, bundle="")
        try:
            state.bundle = resolve_bundle(values["bundle"], values["bundle_path"])
        except ConfigError as exc:
            state.notes.append(str(exc))
        p._provenance = state
        try:
            from modules import shared

            if action == "block" and getattr(p, "enable_hr", False) and \
                    getattr(shared.opts, "save_images_before_highres_fix", False):
                p.comment("Provenance Guard: 'Save a copy of image before applying highres fix' is on; that copy is "
                          "written before any check can run. Turn it off so blocked images never reach the outputs.")
        except ImportError:
            pass

    def postprocess_batch_list(self, p, pp, *args, **kwargs):
        state: Optional[RunState] = getattr(p, "_provenance", None)
        if state is None or not pp.images:
            return
        first = getattr(p, "iteration", 0) * getattr(p, "batch_size", len(pp.images))
        try:
            results = self._check(state, pp.images, p)
        except Exception as exc:  # noqa: BLE001 - a hook must not let a failure pass images unchecked
            log.exception("provenance-guard: the check failed")
            results = [failed_result(state.policy, f"internal error: {exc}") for _ in pp.images]
        for i, r in enumerate(results):
            state.results[first + i] = r
            if state.action == "block" and is_flagged(r):
                state.blocked.add(first + i)
                pp.images[i] = pp.images[i] * 0  # no original survives into any later save

    def _check(self, state: RunState, images, p) -> list[CheckResult]:
        records = [self._generation(p, i) for i in range(len(images))]
        if not state.bundle:
            return [failed_result(state.policy, state.notes[0] if state.notes else "no bundle", rec)
                    for rec in records]
        return shared_checker(state.bundle).check(_to_bhwc(images), records=records, policy=state.policy)

    @staticmethod
    def _generation(p, i: int):
        from ..core.result import GenerationRecord

        def pick(name):
            values = getattr(p, name, None)
            return values[i] if isinstance(values, list) and i < len(values) else values

        return GenerationRecord(prompt=pick("prompts"), negative_prompt=pick("negative_prompts"), seed=pick("seeds"),
                                sampler=getattr(p, "sampler_name", None), steps=getattr(p, "steps", None),
                                cfg=getattr(p, "cfg_scale", None), width=getattr(p, "width", None),
                                height=getattr(p, "height", None), model=getattr(p, "sd_model_name", None),
                                model_hash=getattr(p, "sd_model_hash", None), source="a1111")

    def _index(self, p, pp) -> int:
        # Forge and A1111 1.10 give pp.index (global); earlier A1111 only sets p.batch_index.
        index = getattr(pp, "index", None)
        if index is not None:
            return int(index)
        return getattr(p, "iteration", 0) * getattr(p, "batch_size", 1) + int(getattr(p, "batch_index", 0))

    def postprocess_image(self, p, pp, *args):
        state: Optional[RunState] = getattr(p, "_provenance", None)
        if state is None:
            return
        index = self._index(p, pp)
        result = state.results.get(index)
        if result is None:  # the batch hook never ran for this image (should not happen): fail mode
            result = failed_result(state.policy, "this image was not checked")
            state.results[index] = result
            if state.action == "block" and is_flagged(result):
                state.blocked.add(index)
        params = p.extra_generation_params
        params["Provenance"] = result.verdict
        params["Provenance similarity"] = None if result.max_score is None else f"{result.max_score:.4f}"
        params["Provenance bundle"] = (f"{result.thresholds[0].bundle_id}@{result.thresholds[0].bundle_version}"
                                       if result.thresholds else None)
        record = result.dumps()
        if index in state.blocked:
            pp.image = placeholder_image(pp.image.width, pp.image.height, block_message(result))
        elif result.verdict in (WARN, BLOCK):
            p.comment(f"Provenance Guard, image {index + 1}: {summary_line(result)}")
        elif result.verdict == UNCHECKED:
            p.comment(f"Provenance Guard, image {index + 1}: not checked — {short(result.error, 200)}")
        pp.image.info["provenance"] = record

    def postprocess_image_after_composite(self, p, pp, *args):
        """Forge: after the inpaint overlay, the placeholder is put back (the overlay may have drawn on it)."""
        state: Optional[RunState] = getattr(p, "_provenance", None)
        if state is None:
            return
        index = self._index(p, pp)
        if index in state.blocked:
            result = state.results[index]
            pp.image = placeholder_image(pp.image.width, pp.image.height, block_message(result))
            pp.image.info["provenance"] = result.dumps()

    def postprocess(self, p, processed, *args):
        state: Optional[RunState] = getattr(p, "_provenance", None)
        if state is None:
            return
        ordered = [state.results[i] for i in sorted(state.results)]
        summary = [{"index": i, "verdict": r.verdict, "max_score": r.max_score,
                    "top": ({"url": r.top.url, "caption": r.top.caption, "score": r.top.score, "bundle": r.top.bundle_id}
                            if r.top else None), "error": r.error} for i, r in sorted(state.results.items())]
        extra = getattr(processed, "extra_generation_params", None)
        if isinstance(extra, dict):
            extra["Provenance results"] = json.dumps(summary, ensure_ascii=False)
        if state.blocked:
            processed.comments = (getattr(processed, "comments", "") or "") + \
                f"\nProvenance Guard blocked {len(state.blocked)} image(s); the originals were not saved."
        LAST_HTML[_tab(p)] = panel_html(ordered)


def panel_html(results: list[CheckResult]) -> str:
    """The panel under the gallery (every text escaped by core.report)."""
    if not results:
        return ""
    body = "".join(f"<div><b>image {n + 1}</b> {result_html(r)}</div>" for n, r in enumerate(results))
    return f'<div class="provenance-guard-panel">{body}</div>'


def before_image_saved(params) -> None:
    """script_callbacks.on_before_image_saved: put the record into the PNG as a 'provenance' chunk."""
    record = getattr(params.image, "info", {}).get("provenance") if params.image is not None else None
    if record and isinstance(params.pnginfo, dict):
        params.pnginfo["provenance"] = record


def add_routes(_demo, app) -> None:
    """script_callbacks.on_app_started: GET /provenance-guard/panel?tab=txt2img -> the last panel HTML."""

    def panel(tab: str = "txt2img"):
        return {"html": LAST_HTML.get(tab, "")}

    app.add_api_route("/provenance-guard/panel", panel, methods=["GET"])
