"""Stage 2, embed: pixels -> L2-normalised float32 CLIP image embeddings, batched, on the best device.

``get_embedder(spec)`` returns the process-wide ``Embedder`` for a model spec and device: the model is
built once (under a lock) and then shared by every thread; forward passes need no lock because an eval-mode
model in inference mode holds no state between calls.

Preprocessing follows the model's open_clip preprocess config (size, mean, std, interpolation, resize
mode) but runs on tensors on the model's device: PIL images, numpy arrays and ComfyUI tensors all take the
same path, so the same pixels give the same embedding whatever container they came in. Against open_clip's
PIL transform the difference is the resampler alone (torch antialiased bicubic vs Pillow bicubic).
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING
from collections.abc import Sequence

from .config import DEFAULT_BATCH_SIZE, ENV_DEVICE
from .errors import ConfigError, ImageInputError
from .images import ImageInput, Pixels, to_pixels
from .models import ModelSpec, build_model

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch


def resolve_device(device: str = "auto") -> str:
    """'auto' -> cuda, then mps, then cpu (env PROVENANCE_GUARD_DEVICE overrides 'auto')."""
    import os

    import torch

    device = (device or "auto").lower()
    if device == "auto":
        device = os.environ.get(ENV_DEVICE, "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    return device


class Embedder:
    """One loaded model and its preprocessing. Thread-safe; get one with ``get_embedder``."""

    def __init__(self, spec: ModelSpec, model, preprocess_cfg: dict, device: str, precision: str):
        import torch

        self.spec = spec
        self.model = model
        self.device = device
        self.precision = precision
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        size = preprocess_cfg.get("size", getattr(model.visual, "image_size", 224))
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = torch.tensor(preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)),
                                 device=device).view(3, 1, 1)
        self.std = torch.tensor(preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711)),
                                device=device).view(3, 1, 1)
        self.preprocess_cfg = dict(preprocess_cfg)
        self.interpolation = preprocess_cfg.get("interpolation", "bicubic")
        self.resize_mode = preprocess_cfg.get("resize_mode", "shortest")
        self.dim = self._output_dim()
        self._tokenizer = None
        self._tokenizer_lock = threading.Lock()

    def _output_dim(self) -> int:
        import torch

        dim = getattr(self.model.visual, "output_dim", None)
        if isinstance(dim, int):
            return dim
        with torch.inference_mode():
            probe = torch.zeros(1, 3, *self.size, device=self.device, dtype=self.dtype)
            return int(self.model.encode_image(probe).shape[-1])

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """x: 1x3xHxW, uint8 or float 0..1 -> 1x3xSxS float 0..1, following open_clip's resize modes."""
        import torch
        import torch.nn.functional as F

        th, tw = self.size
        h, w = x.shape[-2:]
        mode = self.interpolation if self.interpolation in ("bicubic", "bilinear") else "bicubic"
        # torch resamples uint8 with antialiasing on the CPU ~20x faster than float (and like Pillow
        # rounds to uint8); elsewhere, and for float inputs, the float path.
        if x.dtype == torch.uint8 and x.device.type != "cpu":
            x = x.float().div_(255.0)

        def resize(nh: int, nw: int) -> torch.Tensor:
            if (nh, nw) != (h, w):
                y = F.interpolate(x, size=(nh, nw), mode=mode, antialias=True, align_corners=False)
            else:
                y = x
            return y.float().div_(255.0) if y.dtype == torch.uint8 else y.clamp(0.0, 1.0)

        if self.resize_mode == "squash":
            return resize(th, tw)
        if self.resize_mode == "longest":
            scale = min(th / h, tw / w)
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            y = resize(nh, nw)
            top, left = (th - nh) // 2, (tw - nw) // 2
            return F.pad(y, (left, tw - nw - left, top, th - nh - top))
        # 'shortest', as torchvision.transforms.Resize(int) + CenterCrop
        target = min(th, tw)
        if w <= h:
            nw, nh = target, int(target * h / w)
        else:
            nh, nw = target, int(target * w / h)
        y = resize(nh, nw)
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
        return y[..., top:top + th, left:left + tw]

    def preprocess(self, pixels: Sequence[Pixels]) -> torch.Tensor:
        """Pixels -> model input N x 3 x S x S on the model's device, in the model's dtype."""
        import torch

        out = []
        for p in pixels:
            t = p.tensor.to(self.device, non_blocking=True)
            x = t.permute(2, 0, 1).unsqueeze(0)
            out.append(self._resize(x if x.dtype == torch.uint8 else x.float()))
        batch = torch.cat(out, 0)
        return ((batch - self.mean) / self.std).to(self.dtype)

    def embed_pixels(self, pixels: Sequence[Pixels], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Embed prepared pixels, batch_size images per forward pass -> float32 N x dim, rows of norm 1."""
        import numpy as np
        import torch

        if not pixels:
            return np.zeros((0, self.dim), dtype=np.float32)
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(pixels), max(1, batch_size)):
                x = self.preprocess(pixels[start:start + batch_size])
                feats = self.model.encode_image(x).float()
                chunks.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        return np.concatenate(chunks, 0).astype(np.float32, copy=False)

    def embed(self, images: Sequence[ImageInput] | torch.Tensor | np.ndarray,
              batch_size: int = DEFAULT_BATCH_SIZE, max_pixels: int | None = None) -> np.ndarray:
        """Embed images of any accepted kind (see images.py); raises the first image's ImageInputError."""
        pixels = to_pixels(images, max_pixels)
        for p in pixels:
            if isinstance(p, ImageInputError):
                raise p
        return self.embed_pixels(pixels, batch_size)  # type: ignore[arg-type]

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Text embeddings in the same space (for text queries against an index)."""
        import open_clip
        import torch

        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = open_clip.get_tokenizer(getattr(self.model, "provenance_guard_arch", None)
                                                          or self.spec.arch)
        # open_clip < 2.21 tokenizes to 77 tokens whatever the model's context length.
        context = int(getattr(self.model, "context_length", 0) or 77)
        tokens = self._tokenizer(list(texts), context_length=context).to(self.device)
        with torch.inference_mode():
            feats = self.model.encode_text(tokens).float()
            return torch.nn.functional.normalize(feats, dim=-1).cpu().numpy()


_EMBEDDERS: dict[tuple[str, str], Embedder] = {}
_LOCKS: dict[tuple[str, str], threading.Lock] = {}
_GLOBAL_LOCK = threading.Lock()


def get_embedder(model: str | ModelSpec, device: str = "auto") -> Embedder:
    """The process-wide embedder for (model, device); built on first use, fp16 on a GPU."""
    spec = model if isinstance(model, ModelSpec) else ModelSpec.parse(model)
    dev = resolve_device(device)
    key = (spec.raw, dev)
    with _GLOBAL_LOCK:
        if key in _EMBEDDERS:
            return _EMBEDDERS[key]
        lock = _LOCKS.setdefault(key, threading.Lock())
    with lock:
        if key not in _EMBEDDERS:
            precision = "fp16" if dev.startswith(("cuda", "mps")) else "fp32"
            model_obj, pre = build_model(spec, dev, precision)
            _EMBEDDERS[key] = Embedder(spec, model_obj, pre, dev, precision)
        return _EMBEDDERS[key]


def clear_embedders() -> None:
    """Drop every cached model (a host's 'free memory' button; tests)."""
    with _GLOBAL_LOCK:
        _EMBEDDERS.clear()
