"""Stage 1, image: turns whatever a host hands over into RGB pixel tensors, one per image.

Accepted inputs (one call may mix them):
- a path or ``bytes`` of an encoded image (PNG, JPEG, WebP, ... anything Pillow decodes);
- a PIL image of any mode: RGB, RGBA, LA, L, 1, P (with or without transparency), I;16, I, F, CMYK, YCbCr;
- a numpy array HxW or HxWxC (C = 1, 2, 3 or 4): uint8 in 0..255, uint16 in 0..65535, bool, or float in 0..1;
  a 4-d array BxHxWxC is a batch;
- a torch tensor HxWxC or BxHxWxC, float in 0..1 or uint8: ComfyUI's IMAGE is float32 [B,H,W,C] and is
  used as it is, on its device, without an encode/decode round trip.

Alpha: transparent pixels are composited over white, which is how a viewer sees a transparent image on a
page; an image and the same image flattened onto white therefore embed the same.
16-bit inputs are scaled by 65535 (mode ``I`` by 65535 when any value exceeds 255, else by 255); float
inputs are clipped to 0..1.

Each output is a torch tensor HxWx3 of uint8, on the input's device; the embedder (embed.py) resizes and
normalises it. Float inputs are brought to 8 bits the way ComfyUI's SaveImage does (x * 255, clipped,
truncated), so an in-graph tensor is checked exactly as the PNG it will be saved as.

Memory is bounded by bytes, not pixels alone: an encoded image over the pixel cap (config.max_pixels) is
refused before it is decoded, one whose decoded form would exceed the byte budget (config.max_decode_bytes)
is decoded at a reduced scale where the format allows (JPEG) or refused, and the conversion to 8-bit RGB
runs over strips of rows in each mode's own depth, never through a full-size float copy.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union
from collections.abc import Iterable

from .config import max_decode_bytes
from .config import max_pixels as _default_max_pixels
from .errors import ImageInputError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
    from PIL import Image

ImageInput = Union["Image.Image", "np.ndarray", "torch.Tensor", str, os.PathLike, bytes]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class Pixels:
    """One image ready for the embedder: ``tensor`` is HxWx3 uint8."""

    tensor: torch.Tensor
    width: int
    height: int
    source: str


def _check_pixels(width: int, height: int, source: str, cap: int) -> None:
    if width * height > cap:
        raise ImageInputError(
            f"{source}: {width}x{height} = {width * height:,} pixels is over the cap of {cap:,}. "
            f"Downscale the image, or raise the cap with PROVENANCE_GUARD_MAX_PIXELS (or max_pixels=) "
            f"if you trust its source."
        )


# Bytes per pixel of each Pillow mode as decoded (what an image costs before any conversion).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2,
               "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4,
               "F": 4}


def decode_bytes(width: int, height: int, mode: str) -> int:
    """What decoding an image of this size and mode takes, in bytes."""
    return int(width) * int(height) * _MODE_BYTES.get(mode, 4)


def _fit_budget(img, source: str, budget: int) -> None:
    """Refuse an image whose decoded form exceeds the byte budget, or have a JPEG decoded at a reduced
    scale (libjpeg scales by 1/2, 1/4, 1/8 while decoding, so the full-size pixels are never held)."""
    cost = decode_bytes(img.width, img.height, img.mode)
    if cost <= budget:
        return
    if img.format == "JPEG":
        import math

        scale = math.ceil(math.sqrt(cost / budget))
        img.draft(img.mode if img.mode in ("RGB", "L") else "RGB", (img.width // scale, img.height // scale))
        if decode_bytes(img.width, img.height, img.mode) <= budget:
            return
    raise ImageInputError(
        f"{source}: {img.width}x{img.height} in mode {img.mode} would take {cost / 2**20:,.0f} MiB to decode, over "
        f"the budget of {budget / 2**20:,.0f} MiB per image. Downscale it, or raise PROVENANCE_GUARD_MAX_DECODE_BYTES "
        f"if you trust its source."
    )


def open_image(data: str | os.PathLike | bytes, cap: int | None = None,
               budget: int | None = None) -> Image.Image:
    """Open an encoded image, refusing it before decoding when it is over the pixel cap or the decode budget
    (a JPEG over the budget is decoded at a reduced scale instead; its size is then the reduced one)."""
    from PIL import Image, UnidentifiedImageError

    cap = _default_max_pixels() if cap is None else cap
    budget = max_decode_bytes() if budget is None else budget
    source = "<bytes>" if isinstance(data, (bytes, bytearray)) else str(data)
    try:
        fp = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else open(data, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ImageInputError(f"{source}: cannot be opened ({exc.strerror or exc}); check the path") from exc
    try:
        img = Image.open(fp)
        _check_pixels(img.width, img.height, source, cap)
        full = (img.width, img.height)
        _fit_budget(img, source, budget)
        img.load()
        if img.size != full:
            img.info["provenance_guard_decoded_from"] = full
    except Image.DecompressionBombError as exc:
        raise ImageInputError(
            f"{source}: Pillow refused it as a possible decompression bomb ({exc}); "
            f"downscale it before checking"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageInputError(f"{source}: not an image Pillow can read; give a PNG, JPEG or WebP file") from exc
    except ImageInputError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageInputError(f"{source}: the image data is damaged or truncated ({exc}); re-export it") from exc
    finally:
        fp.close()
    return img


# Conversion to 8-bit RGB runs over strips of rows of this many bytes, so no full-size float or 16-bit
# copy of a large image is ever made: a 100 MP image costs its decoded form plus its 8-bit RGB form.
_STRIP_BYTES = 16 << 20


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """PIL image of any mode -> HxWx3 uint8 (alpha composited over white; 16-bit and float scaled as the
    module docstring says, truncated as ComfyUI's SaveImage truncates)."""
    import numpy as np

    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    elif img.mode in ("PA", "La"):
        img = img.convert("LA")
    elif img.mode == "RGBa":
        img = img.convert("RGBA")
    mode = img.mode
    width, height = img.size
    if mode in ("RGBA", "LA") and img.getchannel("A").getextrema() == (255, 255):
        img, mode = img.convert("RGB" if mode == "RGBA" else "L"), "RGB" if mode == "RGBA" else "L"
    if mode == "I" or mode == "F":
        lo, hi = img.getextrema()
    out = np.empty((height, width, 3), dtype=np.uint8)
    rows = max(1, _STRIP_BYTES // max(1, width * _MODE_BYTES.get(mode, 4)))
    for top in range(0, height, rows):
        strip = img.crop((0, top, width, min(height, top + rows)))
        if mode in ("RGB", "L", "1", "RGBA", "LA") or mode.startswith("I;16") or mode in ("I", "F"):
            a = np.asarray(strip.convert("L") if mode == "1" else strip)
        else:
            a = np.asarray(strip.convert("RGB"))
        if mode in ("RGBA", "LA"):
            color = a[..., :-1].astype(np.uint16)
            alpha = a[..., -1:].astype(np.uint16)
            a = ((color * alpha + 255 * (255 - alpha)) // 255).astype(np.uint8)
        elif mode.startswith("I;16"):
            a = (a.astype(np.uint32) * 255 // 65535).astype(np.uint8)
        elif mode == "I":
            scale = 65535 if hi > 255 else 255
            a = (np.clip(a, 0, scale).astype(np.int64) * 255 // scale).astype(np.uint8)
        elif mode == "F":
            a = np.clip(a if hi > 1.0 else a * 255.0, 0.0, 255.0).astype(np.uint8)
        out[top:top + a.shape[0]] = a if a.ndim == 3 and a.shape[2] == 3 else (a[..., None] if a.ndim == 2 else a)
    return out


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """rgb float HxWx3 and alpha float HxW, both 0..1 -> float HxWx3."""
    a = alpha[..., None]
    return rgb * a + (1.0 - a)


def _array_to_rgb(arr: np.ndarray, source: str) -> np.ndarray:
    """numpy HxW or HxWxC -> HxWx3 uint8 or float32 0..1."""
    import numpy as np

    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ImageInputError(
            f"{source}: array of shape {tuple(arr.shape)} is not an image; give HxW or HxWxC with C in 1..4 "
            f"(channels last, as ComfyUI and PIL use)"
        )
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype == np.uint8:
        if arr.shape[2] in (2, 4):
            rgb = arr[..., :-1].astype(np.float32) / 255.0
            alpha = arr[..., -1].astype(np.float32) / 255.0
            arr = _composite_on_white(rgb, alpha).astype(np.float32)
        if arr.shape[2] == 1:
            arr = arr.repeat(3, axis=2)
        return arr
    if arr.dtype == np.uint16:
        arr = arr.astype(np.float32) / 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        arr = np.clip(arr.astype(np.float32), 0.0, 1.0)
    else:
        raise ImageInputError(f"{source}: array dtype {arr.dtype} is not supported; give uint8, uint16 or float")
    if arr.shape[2] in (2, 4):
        arr = _composite_on_white(arr[..., :-1], arr[..., -1])
    if arr.shape[2] == 1:
        arr = arr.repeat(3, axis=2)
    return arr.astype(np.float32, copy=False)


def _tensor_images(t: torch.Tensor, source: str) -> list[torch.Tensor]:
    """torch HxWxC or BxHxWxC -> list of HxWx3 tensors on the same device (no copy where possible)."""
    import torch

    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4 or t.shape[-1] not in (1, 2, 3, 4):
        raise ImageInputError(
            f"{source}: tensor of shape {tuple(t.shape)} is not an image batch; give [B,H,W,C] channels last "
            f"in 0..1 (ComfyUI's IMAGE)"
        )
    t = t.detach()
    if t.dtype == torch.uint8:
        pass
    elif t.is_floating_point():
        t = t.float().clamp(0.0, 1.0)
    else:
        raise ImageInputError(f"{source}: tensor dtype {t.dtype} is not supported; give float in 0..1 or uint8")
    channels = t.shape[-1]
    if channels in (2, 4):
        tf = t.float() / 255.0 if t.dtype == torch.uint8 else t
        alpha = tf[..., -1:]
        t = tf[..., :-1] * alpha + (1.0 - alpha)
    if t.shape[-1] == 1:
        t = t.expand(*t.shape[:-1], 3)
    return list(t.unbind(0))


def _to_uint8(t: torch.Tensor) -> torch.Tensor:
    import torch

    if t.dtype == torch.uint8:
        return t
    # As ComfyUI's SaveImage: np.clip(255. * i, 0, 255).astype(np.uint8) (truncation, not rounding).
    return (t.float() * 255.0).clamp_(0.0, 255.0).to(torch.uint8)


def to_pixels(inputs: Iterable[ImageInput] | torch.Tensor | np.ndarray, max_pixels: int | None = None,
              ) -> list[Pixels | ImageInputError]:
    """Flatten inputs into one entry per image: ``Pixels``, or the ``ImageInputError`` that image raised.

    A failing image does not stop the others: the caller decides what an unreadable image means.
    """
    import numpy as np
    import torch
    from PIL import Image

    cap = _default_max_pixels() if max_pixels is None else max_pixels
    if isinstance(inputs, (torch.Tensor, np.ndarray)) and inputs.ndim == 4:
        items: list[Any] = list(inputs) if isinstance(inputs, np.ndarray) else [inputs]
    elif isinstance(inputs, (torch.Tensor, np.ndarray, Image.Image, str, bytes, os.PathLike)):
        items = [inputs]
    else:
        items = list(inputs)

    out: list[Pixels | ImageInputError] = []
    for n, item in enumerate(items):
        source = str(item) if isinstance(item, (str, os.PathLike)) else f"image {n}"
        if isinstance(item, Pixels):
            out.append(item)
            continue
        try:
            if isinstance(item, torch.Tensor):
                images = _tensor_images(item, source)
                for j, t in enumerate(images):
                    _check_pixels(t.shape[1], t.shape[0], source, cap)
                    name = f"{source}[{j}]" if len(images) > 1 else source
                    out.append(Pixels(_to_uint8(t), int(t.shape[1]), int(t.shape[0]), name))
                continue
            if isinstance(item, (str, os.PathLike, bytes, bytearray)):
                item = open_image(item, cap)
            if isinstance(item, Image.Image):
                _check_pixels(item.width, item.height, source, cap)
                arr = _pil_to_array(item)
            elif isinstance(item, np.ndarray):
                _check_pixels(item.shape[1] if item.ndim > 1 else 1, item.shape[0], source, cap)
                arr = _array_to_rgb(item, source)
            else:
                raise ImageInputError(
                    f"{source}: {type(item).__name__} is not an image; give a path, bytes, a PIL image, "
                    f"a numpy array or a torch tensor"
                )
            with warnings.catch_warnings():
                # Pillow's buffers are read-only; nothing downstream writes into the input tensor.
                warnings.simplefilter("ignore", UserWarning)
                t = _to_uint8(torch.from_numpy(np.ascontiguousarray(arr)))
            out.append(Pixels(t, int(arr.shape[1]), int(arr.shape[0]), source))
        except ImageInputError as exc:
            out.append(exc)
        except (Exception, MemoryError) as exc:  # noqa: BLE001 - one image's failure is that image's, never the batch's
            out.append(ImageInputError(f"{source}: could not be read ({type(exc).__name__}: {exc})"))
    return out


def release_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise): after a large image is decoded and
    dropped, or a build phase's sample is gone, resident memory returns to what is in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def pixels_sha256(p: Pixels) -> str:
    """sha256 of the 8-bit RGB pixels (HxWx3, row-major): the same for an in-graph tensor and the PNG it is
    saved as, so a record can be matched to its image after saving."""
    import hashlib

    return hashlib.sha256(p.tensor.detach().cpu().contiguous().numpy().data).hexdigest()


def find_images(root: str | Path, recursive: bool = True) -> list[Path]:
    """Image files (png, jpg, jpeg, webp; any case) under root, sorted, so row order is reproducible."""
    root = Path(root)
    if root.is_file():
        return [root]
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


VIEW_BOXES = {  # name -> (x0, y0, x1, y1) as shares of the image
    "top-left": (0.0, 0.0, 0.5, 0.5), "top-right": (0.5, 0.0, 1.0, 0.5),
    "bottom-left": (0.0, 0.5, 0.5, 1.0), "bottom-right": (0.5, 0.5, 1.0, 1.0), "centre": (0.25, 0.25, 0.75, 0.75),
}


def views(p: Pixels) -> list[tuple[str | None, Pixels]]:
    """The image and its parts a multi-view query embeds: (None, the whole image), then each VIEW_BOXES part
    (a 2 x 2 grid and the centre), as their own Pixels. Each part is a contiguous copy of its region (a
    quarter of the image's bytes, the centre another): torch resizes a contiguous 8-bit image on its fast
    path, a strided slice of a larger one some 20 times slower on a CPU, to the same pixels."""
    out: list[tuple[str | None, Pixels]] = [(None, p)]
    for name, (x0, y0, x1, y1) in VIEW_BOXES.items():
        a, b = int(round(x0 * p.width)), int(round(x1 * p.width))
        c, d = int(round(y0 * p.height)), int(round(y1 * p.height))
        if b - a < 8 or d - c < 8:
            continue
        out.append((name, Pixels(p.tensor[c:d, a:b].contiguous(), b - a, d - c, f"{p.source} [{name}]")))
    return out
