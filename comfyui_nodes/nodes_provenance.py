"""ComfyUI node: Provenance Check (category "provenance").

Checks every image of the batch against a bundle from models/provenance/ (or a path), and acts on the
images whose verdict is block, as on_match says:
  warn    pass every image through; flags, scores and the report say which matched;
  block   the matching images are dropped from the output; when none is left the output is ComfyUI's
          ExecutionBlocker, so a downstream Save Image writes nothing and the prompt still ends cleanly;
  replace the matching images come back black, as diffusers' safety checker does;
  error   the prompt fails with a message naming the closest match.
A check that cannot run follows the fail mode: open -> unchecked (passed through, with a warning),
closed -> withheld whatever on_match says (with warn it is dropped, as block does: core.policy.host_action).
The record goes into EXTRA_PNGINFO, so Save Image writes a "provenance"
PNG chunk beside "prompt" and "workflow". Models and bundles are cached across runs. Each result is also
remembered by its pixels (credentials.remember), so the files a save node writes from them can be signed
with Content Credentials.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import replace

from . import credentials
from .enforce import ProvenanceGuardRefusal
from .nodes_memorization import NODE_CLASS_MAPPINGS as MEMORIZATION_NODES
from .nodes_memorization import NODE_DISPLAY_NAME_MAPPINGS as MEMORIZATION_NAMES

CATEGORY = "provenance"
FOLDER = "provenance"
NO_BUNDLE = "(no bundle in models/provenance)"
ON_MATCH = ["warn", "block", "replace", "error"]
VERIFY_MODES = ["confirm", "off", "escalate", "confirm+escalate"]  # the first is the node's default
VIEWS = ["whole", "multi"]  # core.policy.VIEWS, the node's default first
CHUNK = 16  # images per forward pass, and per progress-bar step, in large batches


def bundle_folders() -> list[str]:
    """Bundle folders (holding manifest.json) under every registered models/provenance path."""
    try:
        import folder_paths

        roots = folder_paths.get_folder_paths(FOLDER)
    except (ImportError, KeyError):
        return []
    found = []
    for root in roots:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            if "manifest.json" in filenames:
                found.append(os.path.relpath(dirpath, root).replace(os.sep, "/"))
                dirnames[:] = []  # a bundle's own folder holds no further bundles
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # skip builds in progress
    return sorted(set(found))


def resolve_bundle(bundle: str, bundle_path: str = "", bundle_url: str = "") -> str:
    """The bundle to check against: bundle_path (a folder path or a studio's index server URL), else
    bundle_url's download (pulled once into the first models/provenance folder, in the background: until it
    is there this raises ConfigError and the fail mode decides), else the folder picked from the list."""
    from ..core.errors import ConfigError

    if bundle_url.strip():
        if bundle_path.strip():
            raise ConfigError("both bundle_path and bundle_url are set; clear one of them")
        from ..core.pull import bundle_from_url

        try:
            import folder_paths

            roots = folder_paths.get_folder_paths(FOLDER)
        except (ImportError, KeyError):
            roots = []
        if not roots:
            raise ConfigError("bundle_url needs ComfyUI's models/provenance folder, which is not registered")
        return bundle_from_url(bundle_url.strip(), roots[0])
    if bundle_path.strip():
        return bundle_path.strip()
    if bundle == NO_BUNDLE or not bundle:
        raise ConfigError("no bundle: put a bundle folder (made by 'provenance-guard index build') into "
                          "ComfyUI/models/provenance/, or give bundle_path")
    import folder_paths

    for root in folder_paths.get_folder_paths(FOLDER):
        candidate = os.path.join(root, bundle)
        if os.path.isfile(os.path.join(candidate, "manifest.json")):
            return candidate
    raise ConfigError(f"bundle {bundle!r} is no longer in models/provenance; refresh the node or pick another")


def _device() -> str:
    try:
        import comfy.model_management as mm

        return str(mm.get_torch_device())
    except (ImportError, AttributeError):
        return "auto"


def _interrupt_point() -> None:
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


def _progress(total: int, node_id):
    try:
        import comfy.utils

        return comfy.utils.ProgressBar(total, node_id=node_id)
    except (ImportError, TypeError):
        return None


def _blocker(message: str):
    from comfy_execution.graph_utils import ExecutionBlocker

    return ExecutionBlocker(message)


def _sampler_monitor(record):
    """The Memorization Monitor's record of this run for the sampler these images come from, or None."""
    from .nodes_memorization import RUNS, executing, run_key

    sampler = (record.extra or {}).get("sampler_node") if record is not None else None
    prompt_id, _ = executing()
    return RUNS.get(run_key(prompt_id, sampler)) if prompt_id and sampler else None


def sampler_signals(record, images: int):
    """(memorization scores, model family) that a Memorization Monitor recorded for the sampler these images
    come from in this run; (None, None) when none was recorded."""
    from ..core.memorization import MemorizationScore

    monitor = _sampler_monitor(record)
    if monitor is None:
        return None, None
    scores = monitor.scores(images)
    if len(scores) != images:
        why = (f"the sampler's batch held {len(scores)} latents but {images} images reached this check: they "
               f"cannot be paired")
        scores = [MemorizationScore(None, 0, why)] * images
    return scores, monitor.family


def sampler_threshold(record) -> float | None:
    """The threshold the Memorization Monitor node of these images' sampler was given (None: not set)."""
    return getattr(_sampler_monitor(record), "threshold", None)


def ui_payload(results) -> dict:
    """What the front-end draws on the node (raw strings; the front-end escapes them)."""
    from ..core.report import result_payload, worst_of

    return {"verdict": worst_of(results), "images": [result_payload(r) for r in results]}


class ProvenanceCheck:
    """Provenance Check: is any generated image too close to a known training image?"""

    CATEGORY = CATEGORY
    FUNCTION = "check"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "BOOLEAN", "FLOAT", "STRING")
    RETURN_NAMES = ("images", "flagged", "max_similarity", "report")
    OUTPUT_IS_LIST = (False, True, True, False)
    OUTPUT_TOOLTIPS = ("the images, as on_match leaves them", "per image: verdict reached block",
                       "per image: best exact cosine (-1 when unchecked)", "the verdicts and matches as text")
    DESCRIPTION = ("Embeds each image with CLIP, searches a LAION/reference bundle, and warns, blocks, blacks out "
                   "or fails on images too close to a known training image.")

    @classmethod
    def INPUT_TYPES(cls):
        bundles = bundle_folders() or [NO_BUNDLE]
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "the generated images"}),
                "bundle": (bundles, {"tooltip": "a bundle folder under models/provenance"}),
                "on_match": (ON_MATCH, {"default": "warn", "tooltip": "what to do with images whose verdict is block"}),
                "fail_mode": (["open", "closed"], {"default": "open",
                                                   "tooltip": "a check that cannot run: open = pass with a warning, "
                                                              "closed = treat as block"}),
                "use_bundle_thresholds": ("BOOLEAN", {"default": True,
                                                      "tooltip": "use the thresholds in the bundle's manifest"}),
                "warn": ("FLOAT", {"default": 0.90, "min": -1.0, "max": 1.0, "step": 0.005}),
                "block": ("FLOAT", {"default": 0.95, "min": -1.0, "max": 1.0, "step": 0.005}),
                "top_k": ("INT", {"default": 5, "min": 1, "max": 100}),
            },
            "optional": {
                "clip_vision": ("CLIP_VISION", {"tooltip": "embed with this loaded CLIP vision model when it is "
                                                           "the bundle's model"}),
                "model_override": ("STRING", {"default": "", "tooltip": "load the bundle's model from a local "
                                                                        "file or folder (open_clip spec)"}),
                "bundle_path": ("STRING", {"default": "", "tooltip": (
                    "a bundle folder path, or a studio's index server URL (http://host:port/NAME): checks through "
                    "the studio's server, no local copy; overrides the list")}),
                "verify": (VERIFY_MODES, {"default": "confirm", "tooltip": (
                    "compare candidates with the training image's pixels: confirm = a block found different on "
                    "pixels becomes warn; escalate = a verified copy blocks even below the block threshold")}),
                "fetch_references": ("BOOLEAN", {"default": False, "tooltip": (
                    "fetch the training images of URL-only (LAION) bundles to verify them; this tells each "
                    "image's host that someone looked at it")}),
                "references": ("STRING", {"default": "", "tooltip": "where the bundle's reference image folder "
                                                                    "is now, if it moved"}),
                "prompt_action": (["warn", "pass", "block"], {"default": "warn", "tooltip": (
                    "how far a flagged prompt alone raises an image's verdict (a Memorization Monitor signal over "
                    "its threshold, or the training caption of duplicated images)")}),
                "strict": ("BOOLEAN", {"default": False, "tooltip": (
                    "never show a checked image's pixels in the evidence picture (the training image and its "
                    "matched region only); studio enforcement turns it on")}),
                # Saved workflows give widget values by position, so new inputs go at the end.
                "bundle_url": ("STRING", {"default": "", "tooltip": (
                    "a published bundle's URL (https://host/path/ or hf://datasets/OWNER/NAME): downloaded once "
                    "into models/provenance and reused; until the download is done the check fails under "
                    "fail_mode; overrides the list")}),
                "views": (VIEWS, {"default": "whole", "tooltip": (
                    "whole: query with the image alone; multi: also with its four quarters and its centre, each "
                    "candidate verified against the part that found it (finds a training image copied into part of "
                    "a larger image, for six times the embedding work)")}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, bundle=None, bundle_path="", use_bundle_thresholds=True, warn=0.9, block=0.95, top_k=5,
                   on_match="warn", fail_mode="open", model_override="", verify="confirm", fetch_references=False,
                   references="", prompt_action="warn", strict=False, bundle_url="", views="whole", **_):
        """Re-run when the bundle on disk changes (a new version after a takedown), never NaN; while a
        bundle_url is still downloading, every run (the check it failed must not be reused from the cache)."""
        try:
            path = resolve_bundle(bundle or "", bundle_path or "", bundle_url or "")
            stamp = os.stat(os.path.join(path, "manifest.json")).st_mtime_ns if os.path.isdir(path) else path
        except Exception as exc:  # noqa: BLE001 - IS_CHANGED must not raise: ComfyUI would store NaN
            from ..core.pull import BundleNotReady

            stamp = f"not ready {time.time_ns()}" if isinstance(exc, BundleNotReady) else "unresolved"
        return json.dumps([str(stamp), bundle, bundle_path, use_bundle_thresholds, warn, block, top_k, on_match,
                           fail_mode, model_override, verify, fetch_references, references, prompt_action, strict,
                           bundle_url, views])

    def check(self, images, bundle, on_match="warn", fail_mode="open", use_bundle_thresholds=True, warn=0.90,
              block=0.95, top_k=5, clip_vision=None, model_override="", bundle_path="", verify="confirm",
              fetch_references=False, references="", prompt_action="warn", strict=False, bundle_url="", views="whole",
              prompt=None, extra_pnginfo=None, unique_id=None):
        from ..core.check import failed_result, shared_checker
        from ..core.errors import ConfigError, ProvenanceError
        from ..core.policy import Policy, host_action
        from ..core.record import parse_comfyui_prompt
        from ..core.report import block_message, is_flagged, text_report
        from ..core.result import CheckResult

        from ..core.references import ReferenceOptions

        policy = Policy(warn=None if use_bundle_thresholds else warn, block=None if use_bundle_thresholds else block,
                        fail_mode=fail_mode, top_k=int(top_k), verify=verify, prompt_action=prompt_action,
                        strict=strict is True, views=views)
        reference_options = ReferenceOptions(root=(references or "").strip() or None, fetch=bool(fetch_references),
                                             root_hint="the node's references input (the folder's path)",
                                             fetch_hint="the node's fetch_references input")
        # prompt -> output: the sampler, prompts and model this node's images come from, traced in the graph.
        try:
            record = parse_comfyui_prompt(prompt, from_node=unique_id) if isinstance(prompt, dict) else None
        except (ValueError, TypeError, AttributeError, RecursionError):
            record = None
        records = [record] * len(images)
        signals, family = sampler_signals(record, len(images))
        threshold = sampler_threshold(record)
        if threshold is not None and family:  # the Monitor node's threshold, over the bundle's and the table's
            policy = replace(policy, memorization_thresholds={family: threshold})
        results: list[CheckResult] = []
        try:
            if not isinstance(bundle_url, str):
                raise ConfigError(f"bundle_url {bundle_url!r} is not text")
            checker = shared_checker(resolve_bundle(bundle, bundle_path, bundle_url), model=model_override or None,
                                     device=_device(), references=reference_options)
            embedder = None
            if clip_vision is not None:
                from .clip_vision import ComfyClipVisionEmbedder

                embedder = ComfyClipVisionEmbedder(clip_vision, checker.open()[0].model)
            bar = _progress(len(images), unique_id) if len(images) > CHUNK else None
            for start in range(0, len(images), CHUNK):
                _interrupt_point()
                results += checker.check(images[start:start + CHUNK], records=records[start:start + CHUNK],
                                         policy=policy, embedder=embedder, family=family,
                                         signals=None if signals is None else signals[start:start + CHUNK])
                if bar is not None:
                    bar.update(min(CHUNK, len(images) - start))
        except ConfigError as exc:
            from ..core.images import pixels_sha256, to_pixels

            results = [failed_result(policy, str(exc), record, model=model_override or None,
                                     image={} if isinstance(p, Exception) else {"pixels_sha256": pixels_sha256(p)})
                       for p in to_pixels(images)]
        except ProvenanceError as exc:
            raise RuntimeError(f"Provenance Check: {exc}") from exc
        for i, r in enumerate(results):
            r.image["source"] = f"ComfyUI node {unique_id} image {i}"
        # Under fail mode closed an image that could not be checked is withheld even when on_match is warn.
        actions = [host_action(r, on_match, blocking="block") for r in results]
        flagged = [is_flagged(r) for r in results]
        report = text_report(results)
        ui = {"provenance": [ui_payload(results)]}

        if "error" in actions:
            first = results[actions.index("error")]
            raise RuntimeError(f"Provenance Check: {block_message(first)}")

        out = images
        kept = [i for i, a in enumerate(actions) if a != "block"]
        credentials.remember(results)
        if "replace" in actions:
            out = images.clone()
            for i, a in enumerate(actions):
                if a == "replace":
                    out[i] = 0.0
            replaced = [i for i, a in enumerate(actions) if a == "replace"]
            credentials.remember([results[i] for i in replaced], out[replaced])  # the black image carries its block
        if len(kept) < len(images):
            out = out[kept] if kept else _blocker(
                "Provenance Check blocked every image: " + block_message(results[actions.index("block")]))
        self._record(extra_pnginfo, [results[i] for i in kept])
        scores = [-1.0 if r.max_score is None else float(r.max_score) for r in results]
        return {"ui": ui, "result": (out, flagged, scores, report)}

    @staticmethod
    def _record(extra_pnginfo, results) -> None:
        """Put the record where Save Image writes its PNG text chunks (one chunk per key, JSON-encoded)."""
        if not isinstance(extra_pnginfo, dict) or not results:
            return
        from ..core.record import batch_record

        extra_pnginfo["provenance"] = batch_record(results)


NODE_CLASS_MAPPINGS = {"ProvenanceCheck": ProvenanceCheck, "ProvenanceGuardRefusal": ProvenanceGuardRefusal,
                       **MEMORIZATION_NODES, **credentials.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {"ProvenanceCheck": "Provenance Check",
                              "ProvenanceGuardRefusal": "Provenance Guard (refused prompt)", **MEMORIZATION_NAMES,
                              **credentials.NODE_DISPLAY_NAME_MAPPINGS}
