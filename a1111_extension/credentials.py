"""Content Credentials (C2PA) in A1111/Forge: each image the extension checked is signed in place after the
webui has saved it, with the manifest of that image's own check (core.credentials).

A manifest binds the file's bytes, so the signature is the last write: the webui writes the file with its
infotext (and, in Forge, stealth infotext in the alpha channel) and the ``provenance`` chunk, then
``script_callbacks.on_image_saved`` runs and ``image_saved`` here signs the file (a temporary file beside
it, then a rename; a failure leaves the file as the webui wrote it).

Which image is which: ``postprocess_image_after_composite`` puts each image's record into ``image.info``
and, when the run signs, remembers that exact record text in the run's ``Signing``; a saved file is signed
only when its record is one this run made (never a record that arrived with an uploaded image, never a file
the extension did not check). Under "required" a file this run saved that no check belongs to (a grid, a
"before face restoration / color correction / highres fix" copy) becomes a placeholder saying why. A
blocked placeholder carries its own block verdict; nothing is signed as passed that did not pass.

Settings (Settings > Provenance Guard): ``credentials`` off | on | required, ``credentials_folder`` (empty:
$PROVENANCE_GUARD_CREDENTIALS), ``credentials_prompts``. Under "on" a key that cannot be used, or c2pa-python
missing, is said once and images are saved unsigned. Under "required" (also what an unusable value counts
as: settings.SAFE) a run that cannot sign blocks every image (``Signing.error``: nothing real is saved
unsigned), and a file whose signing fails is replaced by a placeholder.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from ..core.result import CheckResult
from . import settings

log = logging.getLogger("provenance_guard")

MODES = settings.CREDENTIAL_MODES
SIGNED_FORMATS = ("png", "jpg", "jpeg", "webp")
SEEN = "_provenance_guard_before_save_ns"  # set on ImageSaveParams by before_image_saved
MTIME_SLACK_NS = 2_000_000_000  # filesystems with coarse timestamps


@dataclass
class Signing:
    """One run's Content Credentials: what signs, and the records of the images it may sign."""

    mode: str
    credentials: Any = None  # core.credentials.Credentials; None when the run cannot sign
    include_prompts: bool = True
    error: str | None = None  # "required" and unusable: every image of the run is blocked with this
    software: str = ""
    records: dict[str, tuple[int, CheckResult]] = field(default_factory=dict)  # record text -> (index, result)

    def remember(self, record: str, index: int, result: CheckResult) -> None:
        if self.credentials is not None:
            self.records[record] = (index, result)


def software() -> str:
    """The host as the manifest's softwareAgent names it."""
    import sys

    name = "Forge" if "modules_forge" in sys.modules else "AUTOMATIC1111 stable-diffusion-webui"
    try:
        from modules import launch_utils

        tag = str(launch_utils.git_tag() or "").strip()
    except Exception:  # noqa: BLE001 - a version is a nicety; the webui's own helper may be missing
        tag = ""
    return f"{name} {tag}".strip() if tag and tag != "<none>" else name


def _problem() -> tuple[str | None, Any]:
    """(None, credentials) when the run can sign, else (one line saying why not and what to do, None)."""
    from ..core import credentials as cr
    from ..core.errors import ProvenanceError

    reason = cr.unavailable()
    if reason:
        return reason, None
    value = settings.default("credentials_folder")
    if value is not None and not isinstance(value, str):
        return (f"setting {settings.option_name('credentials_folder')} = {value!r} is not a folder path; fix "
                f"{settings.FIELDS['credentials_folder']}"), None
    folder = cr.credentials_folder((value or "").strip() or None)
    if folder is None:
        return (f"no signing key: set {settings.FIELDS['credentials_folder']} (or ${cr.ENV_CREDENTIALS}) to a folder "
                f"holding signer.pem and signer.key (make one with 'provenance-guard credentials init DIR')"), None
    fmt = _samples_format()
    if fmt not in SIGNED_FORMATS:
        return (f"the webui saves {fmt} files (Settings > Saving images > File format), and Content Credentials are "
                f"written into png, jpg and webp files here; choose one of those"), None
    try:
        return None, cr.load_credentials(folder)
    except ProvenanceError as exc:
        return f"{exc} ({settings.FIELDS['credentials_folder']})", None


def _samples_format() -> str:
    try:
        from modules import shared

        return str(getattr(shared.opts, "samples_format", "png") or "png").lower().lstrip(".")
    except ImportError:
        return "png"


def run_signing(p, warnings: list) -> Signing | None:
    """The run's Signing (None: credentials off, or "on" and they cannot be used, said once)."""
    mode = settings.safe_choice("credentials", settings.default("credentials"), warnings)
    if mode == "off":
        return None
    prompts = settings.safe_choice("credentials_prompts", settings.default("credentials_prompts"), warnings)
    problem, credentials = _problem()
    if problem is None:
        return Signing(mode, credentials, prompts, software=software())
    if mode == "required":
        error = (f"Content Credentials are required ({settings.FIELDS['credentials']}) but cannot be written: "
                 f"{problem}. Every image is blocked until that is fixed (or the setting is 'on' or 'off')")
        return Signing(mode, None, prompts, error=error)
    message = (f"images are saved without Content Credentials: {problem}"
               f" ({settings.FIELDS['credentials']} is 'on'; 'required' would block them instead)")
    if problem.startswith("Content Credentials are off"):
        message = f"{problem} ({settings.FIELDS['credentials']} is 'on'; images are saved unsigned)"
    if settings.say_once(message) and hasattr(p, "comment"):
        p.comment(f"Provenance Guard: {message}.")
    return None


def before_save(params) -> None:
    """Called from on_before_image_saved: when this save began (the file written afterwards is newer)."""
    try:
        setattr(params, SEEN, time.time_ns())
    except AttributeError:
        pass


def image_saved(params) -> None:
    """script_callbacks.on_image_saved: sign the file just written, when it holds an image this run checked
    and signs. Never raises into the webui."""
    state = getattr(getattr(params, "p", None), "_provenance", None)
    signing: Signing | None = getattr(state, "signing", None)
    if signing is None or signing.credentials is None:
        return
    pnginfo = params.pnginfo if isinstance(getattr(params, "pnginfo", None), dict) else {}
    record = pnginfo.get("provenance") or (getattr(params.image, "info", None) or {}).get("provenance")
    entry = signing.records.get(record) if isinstance(record, str) else None
    if entry is None:  # a grid, a copy the webui saved before the check: no check of its own to sign with
        if signing.mode == "required":
            _unsigned_extra(params)
        return
    index, result = entry
    path = saved_path(params)
    for target in [path] + _jpeg_copy(path, params):
        try:
            if target is None:
                raise OSError(f"the file the webui wrote for {os.path.basename(str(params.filename))} cannot be "
                              f"found")
            sign(target, signing, result, parent_image(params.p, index))
        except Exception as exc:  # noqa: BLE001 - the webui swallows callback errors; the file is handled here
            _failed(signing, params, target, index, result, exc)


def _jpeg_copy(path: str | None, params) -> list[str]:
    """The downscaled JPEG copy the webui writes beside a large PNG in the same save ("Save copy of large
    images as JPG"), when there is one written since this save began: the same image, signed the same way."""
    if path is None or not path.lower().endswith(".png"):
        return []
    copy = os.path.splitext(path)[0] + ".jpg"
    began = getattr(params, SEEN, None)
    try:
        mtime = os.stat(copy).st_mtime_ns
    except OSError:
        return []
    return [copy] if began is not None and mtime >= began - MTIME_SLACK_NS else []


def sign(path: str, signing: Signing, result: CheckResult, parent=None) -> None:
    from ..core import credentials as cr

    manifest = cr.manifest_for(result, signing.software or software(), os.path.basename(path),
                               include_prompts=signing.include_prompts)
    if parent is None:
        cr.sign_file(path, signing.credentials, manifest)
        return
    with tempfile.TemporaryDirectory(prefix="provenance-guard-input-") as tmp:
        parent_path = os.path.join(tmp, "input.png")
        parent.save(parent_path, format="PNG")
        cr.sign_file(path, signing.credentials, manifest, parent=parent_path)


def saved_path(params) -> str | None:
    """The file the webui wrote: params.filename, or, under "Add number suffix" for existing names (the webui
    does not update params.filename then), the last of name-1, name-2, ...; only a file written since this
    save began."""
    filename = str(getattr(params, "filename", "") or "")
    if not filename:
        return None
    candidates = [filename]
    try:
        from modules import shared

        replace = getattr(shared.opts, "save_images_replace_action", "Replace")
    except ImportError:
        replace = "Replace"
    if replace != "Replace":
        stem, ext = os.path.splitext(filename)
        n = 1
        while os.path.exists(f"{stem}-{n}{ext}") and n < 10_000:
            candidates.insert(0, f"{stem}-{n}{ext}")
            n += 1
    began = getattr(params, SEEN, None)
    for path in candidates:
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            continue
        if began is None or mtime >= began - MTIME_SLACK_NS:
            return path
    return None


def parent_image(p, index: int):
    """img2img / inpaint: the input image of this image (a PIL image), else None."""
    init = getattr(p, "init_images", None)
    if not isinstance(init, (list, tuple)) or not init:
        return None
    position = index % max(1, int(getattr(p, "batch_size", 1) or 1))
    image = init[position] if position < len(init) else init[0]
    return image if hasattr(image, "save") else None


def _failed(signing: Signing, params, path: str | None, index: int, result: CheckResult, exc: Exception) -> None:
    """Signing a saved file failed. "required": the file becomes a placeholder (nothing real stays unsigned);
    "on": it stays as the webui wrote it, said once."""
    why = str(exc) or type(exc).__name__
    if signing.mode != "required":
        settings.say_once(f"an image was saved without Content Credentials: {why}")
        return
    log.error("provenance-guard: image %d: Content Credentials could not be written (%s); the saved file is "
              "replaced by a placeholder", index + 1, why)
    if path is None:
        return
    placeholder(path, f"Blocked: Content Credentials are required and could not be written ({why[:200]}). "
                      f"Fix {settings.FIELDS['credentials_folder']}.")
    comment = getattr(getattr(params, "p", None), "comment", None)
    if callable(comment):
        comment(f"Provenance Guard, image {index + 1}: Content Credentials could not be written ({why[:200]}); "
                f"the saved file was replaced by a placeholder.")


EXTRA_COPY = ("Not saved: Content Credentials are required, and this file (a grid, or a copy the webui saves "
              "before face restoration, color correction or highres fix) carries no check of its own. Turn "
              "those save options off in Settings > Saving images")


def _unsigned_extra(params) -> None:
    """Under "required", a file this run saved that no check belongs to (a grid, a "save a copy before ..."
    file) becomes a placeholder saying why: nothing real is left unsigned."""
    path = saved_path(params)
    if path is None:
        return
    log.warning("provenance-guard: %s carries no check of its own (a grid or an early copy); Content Credentials "
                "are required, so it is replaced by a placeholder", os.path.basename(path))
    for target in [path] + _jpeg_copy(path, params):
        placeholder(target, EXTRA_COPY)
    settings.say_once("Content Credentials are required: grids and the webui's early copies are saved as "
                      "placeholders (they carry no check of their own); turn those save options off")


def placeholder(path: str, message: str) -> None:
    """Replace the unsigned file at path by a black placeholder of the same size and format, atomically; where
    that cannot be written, remove the file (an unsigned file must not stay)."""
    try:
        _write_placeholder(path, message)
    except Exception:  # noqa: BLE001 - last resort: the unsigned file must not stay
        log.exception("provenance-guard: the placeholder could not be written; removing %s", path)
        try:
            os.unlink(path)
        except OSError:
            log.error("provenance-guard: %s could not be removed; delete it by hand", path)


def _write_placeholder(path: str, message: str) -> None:
    from PIL import Image

    from ..core.report import SHORT_FAILURE_NOTICES, placeholder_image

    with Image.open(path) as im:
        size, fmt = im.size, im.format or "PNG"
    img = placeholder_image(size[0], size[1], message, SHORT_FAILURE_NOTICES)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".placeholder")
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format=fmt)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
