"""Content Credentials (C2PA) in ComfyUI: the files Save Image, SaveAnimatedWEBP, SaveAnimatedPNG and SaveVideo write
are signed in place right after ComfyUI writes them, with the Provenance Check of their pixels; and a
"Save Image (Content Credentials)" node for workflows that want it explicit.

The hook: the save nodes' own function (``FUNCTION``) is wrapped on their classes once at start-up
(``wrap_savers``), so the signature is the last write of every file they save, whoever queued the prompt
(the UI, the API with or without a client id, a cached re-save), and existing workflows run unchanged. The
other candidates fall short: the "executed" websocket message is only sent when a client id came with the
prompt, and a replacement save node would need every workflow edited. Preview Image (a Save Image writing
to the temp folder) is not signed.

Which check belongs to which saved image: every Provenance Check remembers its results by the sha256 of the
pixels it checked (``remember``; the last ``MAX_REMEMBERED`` images of this ComfyUI process); the wrapper
hashes the images the save node receives the same way and signs each file with the result of exactly those
pixels. Nothing a client sends (EXTRA_PNGINFO, a PNG's own chunks) decides what is signed; pixels no check
saw (an upscale after the check) are never signed as checked. A blocked image that still reaches a save
(on_match warn, replace) carries its block verdict; an unchecked one (fail mode open) says unchecked. An
animation is signed with the check of its most serious frame, and only when every frame was checked. The
input image of img2img / inpaint / a loaded image (the one LoadImage upstream of the saved pixels) is the
manifest's parentOf ingredient.

Configuration: ``ComfyUI/user/provenance_guard.json`` (beside the optional "enforce" object):
``{"credentials": {"mode": "off" | "on" | "required", "folder": "/path/to/keys", "prompts": true}}``.
folder empty or left out: $PROVENANCE_GUARD_CREDENTIALS. prompts false leaves prompts out (privacy). A file
that does not validate refuses every prompt (__init__.register_with_comfyui), as enforcement does.
- on: a key that cannot be used, c2pa-python missing, or an image no check saw: said once in the log, the
  file is saved unsigned.
- required: a prompt that saves images is refused (400) while the key cannot be used; an image no check saw
  fails the save before anything is written; a file whose signing fails is removed and the prompt fails;
  SaveWEBM (WebM, which C2PA cannot sign) is refused. Nothing is saved unsigned by the nodes signed here
  (other packs' savers are theirs). SaveVideo's MP4 is signed like an animation (its frames' checks).
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, ProvenanceError

log = logging.getLogger("provenance_guard")

SECTION = "credentials"
MODES = ("off", "on", "required")
DEFAULTS: dict[str, Any] = {"mode": "off", "folder": "", "prompts": True}
# Save nodes signed after they write: class name -> whether all its images go into one file (an animation).
SIGNED_NODES = {"SaveImage": False, "SaveAnimatedWEBP": True, "SaveAnimatedPNG": True}
# Video savers that are v3 nodes (classmethod ``execute``): SaveVideo writes MP4 by default, which C2PA signs;
# SaveWEBM writes WebM, which C2PA has no binding for: refused under "required", saved unsigned under "on".
SIGNED_VIDEO_NODES = ("SaveVideo",)
VIDEO_NODES = ("SaveWEBM",)
SAVE_CLASS = "ProvenanceSaveImage"
WRAPPED = "__provenance_guard_signs__"
ORIGINAL = "__provenance_guard_original__"
MAX_REMEMBERED = 4096
# Inputs that carry the saved pixels (or their latent) upstream, for finding the loaded input image; a
# ControlNet image or a style reference reaches the sampler through conditioning, which is not followed.
PIXEL_INPUTS = ("images", "image", "pixels", "samples", "latent_image", "latent")
LOAD_IMAGE = "LoadImage"
FIX = 'see "credentials" in ComfyUI/user/provenance_guard.json (docs/hosts.md, "Content Credentials")'


class CredentialsConfigError(ConfigError):
    """The "credentials" object of provenance_guard.json cannot be used; every prompt is refused."""


def load_config(user_dir: str | None) -> dict[str, Any]:
    """The validated "credentials" object (DEFAULTS when there is none), or CredentialsConfigError."""
    from .enforce import CONFIG_FILE, read_user_config

    path = os.path.join(user_dir, CONFIG_FILE) if user_dir else None
    data = read_user_config(path)
    if data is None or SECTION not in data:
        return dict(DEFAULTS)
    section = data[SECTION]
    if not isinstance(section, dict):
        raise CredentialsConfigError(f'{path}: "credentials" must be an object such as {{"mode": "on", "folder": '
                                     f'"/path/to/keys"}}, not {section!r}')
    unknown = sorted(set(section) - set(DEFAULTS))
    if unknown:
        raise CredentialsConfigError(f'{path}: unknown key(s) {unknown} under "credentials"; the keys are '
                                     f"{sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **section}
    if cfg["mode"] not in MODES:
        raise CredentialsConfigError(f'{path}: "credentials" "mode" must be "off", "on" or "required", not '
                                     f"{cfg['mode']!r}")
    if not isinstance(cfg["folder"], str):
        raise CredentialsConfigError(f'{path}: "credentials" "folder" must be the path of a folder holding signer.pem '
                                     f"and signer.key (or \"\" for $PROVENANCE_GUARD_CREDENTIALS), not {cfg['folder']!r}")
    if not isinstance(cfg["prompts"], bool):
        raise CredentialsConfigError(f'{path}: "credentials" "prompts" must be true or false, not {cfg["prompts"]!r}')
    return {"mode": cfg["mode"], "folder": cfg["folder"].strip(), "prompts": cfg["prompts"], "file": path}


# said once ------------------------------------------------------------------------------------------------

_said: set = set()
_said_lock = threading.Lock()


def say_once(message: str, level: int = logging.WARNING) -> bool:
    with _said_lock:
        if message in _said:
            return False
        _said.add(message)
    log.log(level, "provenance-guard: %s", message)
    return True


# keys -----------------------------------------------------------------------------------------------------

_keys: dict[str, tuple[tuple, Any]] = {}  # folder -> (signer.pem/signer.key stamps, Credentials)
_keys_lock = threading.Lock()


@dataclass
class Signing:
    mode: str
    folder: str = ""
    prompts: bool = True
    file: str | None = None

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Signing:
        return cls(cfg["mode"], cfg.get("folder") or "", cfg.get("prompts", True) is not False, cfg.get("file"))

    def credentials(self):
        """The loaded signing credentials (reloaded when signer.pem or signer.key change), or CredentialsError
        saying what to do."""
        from ..core import credentials as cr

        reason = cr.unavailable()
        if reason:
            raise cr.CredentialsUnavailable(reason)
        folder = cr.credentials_folder(self.folder or None)
        if folder is None:
            raise cr.CredentialsError(f'no signing key: set "folder" under "credentials" in '
                                      f"{self.file or 'ComfyUI/user/provenance_guard.json'} (or "
                                      f"${cr.ENV_CREDENTIALS}) to a folder holding signer.pem and signer.key (make "
                                      f"one with 'provenance-guard credentials init DIR')")
        stamp = tuple(_stamp(folder / name) for name in (cr.SIGNER_FILE, cr.KEY_FILE))
        with _keys_lock:
            cached = _keys.get(str(folder))
            if cached is not None and cached[0] == stamp:
                return cached[1]
        loaded = cr.load_credentials(folder)
        with _keys_lock:
            _keys[str(folder)] = (stamp, loaded)
        return loaded

    def problem(self) -> str | None:
        try:
            self.credentials()
        except ProvenanceError as exc:
            return str(exc)
        return None


def _stamp(path: Path):
    try:
        st = path.stat()
        return st.st_mtime_ns, st.st_size
    except OSError:
        return None


_config: dict[str, Any] = dict(DEFAULTS)
_active: Signing | None = None  # the automatic post-save signing (None: mode off)


def configure(user_dir: str | None) -> Signing | None:
    """Read the configuration (CredentialsConfigError when it cannot be used) and say once what it means."""
    global _config, _active
    cfg = load_config(user_dir)
    _config = cfg
    _active = Signing.from_config(cfg) if cfg["mode"] != "off" else None
    if _active is None:
        return None
    problem = _active.problem()
    if problem is None:
        log.info("provenance-guard: Content Credentials %s: the files Save Image, SaveAnimatedWEBP and "
                 "SaveAnimatedPNG write are signed with the check of their pixels", _active.mode)
    elif _active.mode == "required":
        say_once(f"Content Credentials are required but cannot be written: {problem}. Every prompt that saves "
                 f"images is refused until that is fixed")
    else:
        say_once(f"images are saved without Content Credentials: {problem}" if not problem.startswith(
            "Content Credentials are off") else f"{problem}; images are saved unsigned")
    return _active


def active() -> Signing | None:
    return _active


# which check belongs to which pixels ----------------------------------------------------------------------

_checked: OrderedDict[str, Any] = OrderedDict()  # pixels sha256 -> CheckResult
_checked_lock = threading.Lock()


def remember(results, images=None) -> None:
    """Remember each result by the sha256 of its pixels (a Provenance Check's own), or, with images (a
    tensor of the same length), by those images' pixels (what the check hands on instead: a blacked-out
    image carries its block)."""
    digests = _digests(images) if images is not None else [
        (getattr(r, "image", None) or {}).get("pixels_sha256") for r in results]
    with _checked_lock:
        for digest, result in zip(digests, results, strict=False):  # as before: what was checked
            if digest and result is not None:
                _checked[digest] = result
                _checked.move_to_end(digest)
        while len(_checked) > MAX_REMEMBERED:
            _checked.popitem(last=False)


def checked(digest: str | None):
    with _checked_lock:
        return _checked.get(digest) if digest else None


def _digests(images) -> list[str | None]:
    from ..core.images import pixels_sha256, to_pixels

    return [None if isinstance(p, Exception) else pixels_sha256(p) for p in to_pixels(images)]


def worst(results: list):
    """The most serious result of an animation's frames (block, warn, unchecked, pass; then the score)."""
    order = {"block": 3, "warn": 2, "unchecked": 1, "pass": 0}
    return max(results, key=lambda r: (order.get(r.verdict, 1), r.max_score if r.max_score is not None else -2.0))


# signing the saved files ----------------------------------------------------------------------------------

def software() -> str:
    try:
        import comfyui_version

        return f"ComfyUI {comfyui_version.__version__}"
    except (ImportError, AttributeError):
        return "ComfyUI"


def _executing_node() -> str | None:
    from .nodes_memorization import executing

    return executing()[1]


def parent_of(prompt: Any, node_id: str | None) -> str | None:
    """The file of the one LoadImage whose pixels reach node_id (through image and latent inputs only), when
    there is exactly one and it is a PNG, JPEG or WebP; else None."""
    if not isinstance(prompt, dict) or node_id is None or str(node_id) not in prompt:
        return None
    graph = {str(k): v for k, v in prompt.items() if isinstance(v, dict)}
    seen, queue, loaded = {str(node_id)}, [str(node_id)], set()
    while queue and len(seen) < 10_000:
        node = graph.get(queue.pop(0)) or {}
        if node.get("class_type") == LOAD_IMAGE:
            image = (node.get("inputs") or {}).get("image")
            if isinstance(image, str) and image:
                loaded.add(image)
            continue
        for key, value in (node.get("inputs") or {}).items():
            if key in PIXEL_INPUTS and isinstance(value, list) and value and str(value[0]) in graph \
                    and str(value[0]) not in seen:
                seen.add(str(value[0]))
                queue.append(str(value[0]))
    if len(loaded) != 1:
        return None
    from ..core.credentials import MIME

    try:
        import folder_paths

        path = folder_paths.get_annotated_filepath(next(iter(loaded)))
    except Exception:  # noqa: BLE001 - no ingredient is better than a failed save
        return None
    return path if os.path.isfile(path) and Path(path).suffix.lower() in MIME else None


@dataclass
class Plan:
    """What one save call signs: per file, the result to sign it with (None: left unsigned)."""

    signing: Signing
    where: str
    required: bool
    credentials: Any = None
    results: list = field(default_factory=list)
    parent: str | None = None
    include_prompts: bool = True

    @classmethod
    def make(cls, signing: Signing, images, where: str, animated: bool, required: bool, prompt=None,
             include_prompts: bool = True) -> Plan:
        """Before anything is written: the credentials and each image's check. Under required, RuntimeError
        when either is missing (nothing is saved)."""
        plan = cls(signing, where, required, include_prompts=include_prompts and signing.prompts)
        try:
            plan.credentials = signing.credentials()
        except ProvenanceError as exc:
            if required:
                raise RuntimeError(f"Provenance Guard: Content Credentials are required but cannot be written: {exc}. "
                                   f"Nothing was saved by {where}") from None
            say_once(f"images are saved without Content Credentials: {exc}" if not str(exc).startswith(
                "Content Credentials are off") else f"{exc}; images are saved unsigned")
            return plan
        results = [checked(d) for d in (_digests(images) if images is not None else [])]
        missing = [i for i, r in enumerate(results) if r is None]
        if missing and required:
            raise RuntimeError(
                f"Provenance Guard: Content Credentials are required, and image(s) {', '.join(str(i) for i in missing)} "
                f"reaching {where} were not checked by a Provenance Check in this ComfyUI (or changed after it); put "
                f"one right in front of the save (studio enforcement does that for every output), or set the "
                f"credentials \"mode\" to \"on\" ({FIX}). Nothing was saved")
        if missing:
            say_once(f"images no Provenance Check saw are saved without Content Credentials ({where}); put a "
                     f"Provenance Check right in front of the save node to sign them")
        if animated:
            results = [None if missing or not results else worst(results)]
        plan.results = results
        plan.parent = parent_of(prompt, _executing_node())
        return plan

    def sign(self, out: Any, output_dir: str) -> None:
        """Sign the files the save node reported (its ui images), in order."""
        from ..core import credentials as cr

        if self.credentials is None:
            return
        entries = ((out or {}).get("ui") or {}).get("images") if isinstance(out, dict) else None
        paths = [os.path.join(output_dir, str(e.get("subfolder") or ""), str(e["filename"]))
                 for e in (entries or []) if isinstance(e, dict) and e.get("filename")]
        if len(paths) != len(self.results):
            message = (f"{self.where} reported {len(paths)} file(s) for {len(self.results)} signed output(s); they "
                       f"cannot be paired, so none is signed")
            if self.required:
                _remove(paths)
                raise RuntimeError(f"Provenance Guard: Content Credentials are required: {message}; the files were "
                                   f"removed")
            say_once(message)
            return
        for n, (path, result) in enumerate(zip(paths, self.results, strict=False)):  # as the saver wrote them
            if result is None:
                continue
            try:
                manifest = cr.manifest_for(result, software(), os.path.basename(path),
                                           include_prompts=self.include_prompts)
                cr.sign_file(path, self.credentials, manifest, parent=self.parent)
            except (ProvenanceError, OSError, ValueError) as exc:
                if self.required:
                    _remove(paths[n:])  # this file and the ones not signed yet
                    raise RuntimeError(f"Provenance Guard: Content Credentials are required and could not be "
                                       f"written: {exc}. The unsigned file(s) of {self.where} were removed") from None
                say_once(f"an image was saved without Content Credentials ({self.where}): {exc}")


def _remove(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("provenance-guard: %s could not be removed (%s); delete it by hand", path, exc.strerror)


def _signing_save(original, name: str, animated: bool):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save(self, *args, **kwargs):
        signing = _active
        if signing is None or getattr(self, "type", "output") != "output":  # off, or Preview Image (temp)
            return original(self, *args, **kwargs)
        try:
            bound = signature.bind_partial(self, *args, **kwargs).arguments
        except TypeError:
            bound = {}
        node = _executing_node()
        plan = Plan.make(signing, bound.get("images"), f"{name} (node {node})" if node else name, animated,
                         signing.mode == "required", bound.get("prompt"))
        out = original(self, *args, **kwargs)
        plan.sign(out, getattr(self, "output_dir", None) or _output_directory())
        return out

    setattr(save, WRAPPED, True)
    setattr(save, ORIGINAL, original)
    return save


def _output_directory() -> str:
    import folder_paths

    return folder_paths.get_output_directory()


def _signing_video_save(original, name: str):
    """SaveVideo's classmethod execute, signing the video file it writes with the check of its frames (every
    frame checked; the most serious frame's result), as the animated savers are."""

    @functools.wraps(original)
    def execute(cls, video, *args, **kwargs):
        signing = _active
        if signing is None:
            return original(cls, video, *args, **kwargs)
        try:
            frames = video.get_components().images
        except Exception:  # noqa: BLE001 - a video type without components: its frames cannot be matched
            frames = None
        hidden = getattr(cls, "hidden", None)
        node = _executing_node()
        where = f"{name} (node {node})" if node else name
        plan = Plan.make(signing, frames, where, True, signing.mode == "required", getattr(hidden, "prompt", None))
        out = original(cls, video, *args, **kwargs)
        ui = getattr(out, "ui", None)
        shown = ui.as_dict() if hasattr(ui, "as_dict") else ui
        entries = [dict(e) for e in ((shown or {}).get("images") or []) if isinstance(e, dict)]
        plan.sign({"ui": {"images": entries}}, _output_directory())
        return out

    setattr(execute, WRAPPED, True)
    setattr(execute, ORIGINAL, original)
    return execute


def wrap_savers(classes: dict) -> list[str]:
    """Wrap the save function of each SIGNED_NODES and SIGNED_VIDEO_NODES class present in classes (once);
    returns the names."""
    done = []
    for name in SIGNED_VIDEO_NODES:
        cls = classes.get(name)
        method = cls.__dict__.get("execute") if isinstance(cls, type) else None
        if isinstance(method, classmethod):
            if not getattr(method.__func__, WRAPPED, False):
                cls.execute = classmethod(_signing_video_save(method.__func__, name))
            done.append(name)
    for name, animated in SIGNED_NODES.items():
        cls = classes.get(name)
        func = getattr(cls, "FUNCTION", None) if cls is not None else None
        original = cls.__dict__.get(func) if isinstance(func, str) else None
        if original is None or not callable(original):
            continue
        if not getattr(original, WRAPPED, False):
            setattr(cls, func, _signing_save(original, name, animated))
        done.append(name)
    return done


def prompt_handler(json_data: dict) -> dict:
    """Under "required": refuse (400) a prompt that saves video, or saves images while the key cannot be
    used, before anything runs."""
    from .enforce import refuse

    signing = _active
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if signing is None or signing.mode != "required" or not isinstance(prompt, dict):
        return json_data
    try:
        classes = {n.get("class_type") for n in prompt.values() if isinstance(n, dict)}
        video = sorted(c for c in classes if c in VIDEO_NODES)
        if video:
            return refuse(json_data, f"Provenance Guard: Content Credentials are required, and {', '.join(video)} "
                                     f"write(s) WebM video, which Content Credentials cannot be written into; save with "
                                     f"SaveVideo (MP4), Save Image or SaveAnimatedWEBP, or set the credentials "
                                     f"\"mode\" to \"on\" ({FIX})")
        if classes & (set(SIGNED_NODES) | set(SIGNED_VIDEO_NODES) | {SAVE_CLASS}):
            problem = signing.problem()
            if problem:
                return refuse(json_data, f"Provenance Guard: Content Credentials are required but cannot be written: "
                                         f"{problem}. Nothing is saved until that is fixed")
    except Exception as exc:  # noqa: BLE001 - ComfyUI would log it and run the prompt
        log.exception("provenance-guard: the Content Credentials prompt check failed")
        return refuse(json_data, f"Provenance Guard: the Content Credentials check of this prompt failed "
                                 f"({type(exc).__name__}: {exc}); the prompt is refused rather than saved unsigned")
    return json_data


# the explicit node ----------------------------------------------------------------------------------------

def explicit_signing() -> Signing:
    """What "Save Image (Content Credentials)" signs with: the configured folder and prompts, always as
    required (the node exists to write signed files)."""
    return Signing("required", _config.get("folder") or "", _config.get("prompts", True) is not False,
                   _config.get("file"))


class ProvenanceSaveImage:
    """Save Image (Content Credentials): saves like Save Image, then signs every file with the Provenance
    Check of its pixels; fails the prompt (nothing saved unsigned) when that cannot be done."""

    CATEGORY = "provenance"
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    DESCRIPTION = ("Saves the images to the output folder as Save Image does and signs each file with Content "
                   "Credentials (C2PA) carrying the Provenance Check of its pixels (put a Provenance Check in front). "
                   "Fails the prompt, saving nothing unsigned, when the signing key cannot be used.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "the images to save; a Provenance Check must have checked them"}),
                "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": "as Save Image's"}),
            },
            "optional": {
                "include_prompts": ("BOOLEAN", {"default": True, "tooltip": (
                    "put the prompt and negative prompt into the signed credentials (\"prompts\": false in "
                    "provenance_guard.json leaves them out whatever this says)")}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix):
        problem = explicit_signing().problem()
        if problem:
            return f"Save Image (Content Credentials) cannot sign: {problem}"
        return True

    def save_images(self, images, filename_prefix="ComfyUI", include_prompts=True, prompt=None, extra_pnginfo=None):
        import nodes

        saver = nodes.SaveImage()
        save = type(saver).save_images
        save = getattr(save, ORIGINAL, save)  # Save Image as ComfyUI has it, not signed a second time
        node = _executing_node()
        plan = Plan.make(explicit_signing(), images, f"Save Image (Content Credentials) (node {node})", False, True,
                         prompt, include_prompts=include_prompts is not False)
        out = save(saver, images, filename_prefix, prompt=prompt, extra_pnginfo=extra_pnginfo)
        plan.sign(out, getattr(saver, "output_dir", None) or _output_directory())
        return out


NODE_CLASS_MAPPINGS = {SAVE_CLASS: ProvenanceSaveImage}
NODE_DISPLAY_NAME_MAPPINGS = {SAVE_CLASS: "Save Image (Content Credentials)"}
