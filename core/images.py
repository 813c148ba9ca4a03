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
truncated), so an in-graph tensor is checked exactly as the PNG it will be saved as. Images over the pixel cap (config.max_pixels) are refused
before they are decoded, so a decompression bomb costs no memory.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Union

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

    tensor: "torch.Tensor"
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


def open_image(data: Union[str, os.PathLike, bytes], cap: int | None = None) -> "Image.Image":
    """Open an encoded image lazily and refuse it before decoding if it is over the pixel cap."""
    from PIL import Image, UnidentifiedImageError

    cap = _default_max_pixels() if cap is None else cap
    source = "<bytes>" if isinstance(data, (bytes, bytearray)) else str(data)
    try:
        fp = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else open(data, "rb")
    except OSError as exc:
        raise ImageInputError(f"{source}: cannot be opened ({exc.strerror or exc}); check the path") from exc
    try:
        img = Image.open(fp)
        _check_pixels(img.width, img.height, source, cap)
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageInputError(
            f"{source}: Pillow refused it as a possible decompression bomb ({exc}); "
            f"downscale it before checking"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageInputError(f"{source}: not an image Pillow can read; give a PNG, JPEG or WebP file") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageInputError(f"{source}: the image data is damaged or truncated ({exc}); re-export it") from exc
    finally:
        fp.close()
    return img


def _composite_on_white(rgb: "np.ndarray", alpha: "np.ndarray") -> "np.ndarray":
    """rgb float HxWx3 and alpha float HxW, both 0..1 -> float HxWx3."""
    a = alpha[..., None]
    return rgb * a + (1.0 - a)


def _pil_to_array(img: "Image.Image") -> "np.ndarray":
    """PIL image of any mode -> HxWx3 uint8, or float32 in 0..1 where the mode holds more than 8 bits."""
    import numpy as np

    mode = img.mode
    if mode in ("RGB",):
        return np.asarray(img)
    if mode in ("L", "1"):
        return np.asarray(img.convert("L"))[..., None].repeat(3, axis=2)
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float32)
        if mode == "F":
            arr = arr / 255.0 if arr.size and arr.max() > 1.0 else arr
        elif mode == "I" and not (arr.size and arr.max() > 255):
            arr = arr / 255.0
        else:
            arr = arr / 65535.0
        return np.clip(arr, 0.0, 1.0)[..., None].repeat(3, axis=2)
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        return _pil_to_array(img)
    if mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "RGBa"):
        arr = np.asarray(img.convert("RGBA"))
        if arr[..., 3].min() == 255:
            return np.ascontiguousarray(arr[..., :3])
        rgb = arr[..., :3].astype(np.float32) / 255.0
        return _composite_on_white(rgb, arr[..., 3].astype(np.float32) / 255.0).astype(np.float32)
    return np.asarray(img.convert("RGB"))


def _array_to_rgb(arr: "np.ndarray", source: str) -> "np.ndarray":
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


def _tensor_images(t: "torch.Tensor", source: str) -> list["torch.Tensor"]:
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


def _to_uint8(t: "torch.Tensor") -> "torch.Tensor":
    import torch

    if t.dtype == torch.uint8:
        return t
    # As ComfyUI's SaveImage: np.clip(255. * i, 0, 255).astype(np.uint8) (truncation, not rounding).
    return (t.float() * 255.0).clamp_(0.0, 255.0).to(torch.uint8)


def to_pixels(inputs: Iterable[ImageInput] | "torch.Tensor" | "np.ndarray", max_pixels: int | None = None,
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
    return out


def pixels_sha256(p: Pixels) -> str:
    """sha256 of the 8-bit RGB pixels (HxWx3, row-major): the same for an in-graph tensor and the PNG it is
    saved as, so a record can be matched to its image after saving."""
    import hashlib

    return hashlib.sha256(p.tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def find_images(root: Union[str, Path], recursive: bool = True) -> list[Path]:
    """Image files (png, jpg, jpeg, webp; any case) under root, sorted, so row order is reproducible."""
    root = Path(root)
    if root.is_file():
        return [root]
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
