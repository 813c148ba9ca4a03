"""The copy-style edits a copy detector must see through: what ``index calibrate`` applies to a sample of a
bundle's references to measure true-pair scores, and what bench/q1_detection.py measures detection on.

Each edit takes an RGB PIL image and returns one: JPEG q50, half size, centre crops keeping 90/75/50 % of
each side, a horizontal flip, a 10 degree rotation (corners filled black), brightness x1.4, grayscale,
20 % white padding, a caption bar of text over the bottom fifth, Gaussian blur sigma 3, and two
combinations (a JPEG q30 thumbnail; a crop of a flipped image).
"""
from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def centre_crop(img: Image.Image, removed: float) -> Image.Image:
    """Remove the given share of each side (half of it on each edge)."""
    w, h = img.size
    dw, dh = int(w * removed / 2), int(h * removed / 2)
    return img.crop((dw, dh, w - dw, h - dh))


def pad(img: Image.Image, share: float = 0.2) -> Image.Image:
    w, h = img.size
    pw, ph = int(w * share / 2), int(h * share / 2)
    out = Image.new("RGB", (w + 2 * pw, h + 2 * ph), "white")
    out.paste(img, (pw, ph))
    return out


def caption_bar(img: Image.Image) -> Image.Image:
    out = img.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    draw.rectangle((0, int(h * 0.8), w, h), fill=(0, 0, 0))
    draw.text((max(2, w // 50), int(h * 0.83)), "SAMPLE CAPTION TEXT OVER THE IMAGE", fill=(255, 255, 255))
    return out


def pad_each_side(img: Image.Image, share: float = 0.5, fill="black") -> Image.Image:
    """Borders of share x the image's size on every side (0.5: the copy is a quarter of the output), in a
    flat colour or, with fill "blur", a blurred stretch of the image (as social media letterboxing does)."""
    w, h = img.size
    pw, ph = int(w * share), int(h * share)
    size = (w + 2 * pw, h + 2 * ph)
    out = img.resize(size).filter(ImageFilter.GaussianBlur(30)) if fill == "blur" else Image.new("RGB", size, fill)
    out.paste(img, (pw, ph))
    return out


def inset(img: Image.Image, area: float = 0.4) -> Image.Image:
    """The image at area x the output's area, off-centre on an unrelated textured background (a copied object
    composited into a new scene)."""
    import numpy as np

    side = 1024
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    background = np.stack([120 + 80 * np.sin(6 * x + 1), 110 + 70 * np.cos(5 * y), 140 + 60 * np.sin(4 * (x + y))], -1)
    background += rng.normal(0, 12, background.shape)
    out = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    scale = (area * side * side / (img.width * img.height)) ** 0.5
    small = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))), Image.LANCZOS)
    out.paste(small, (int((side - small.width) * 0.7), int((side - small.height) * 0.3)))
    return out


EDITS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "jpeg50": lambda i: jpeg(i, 50),
    "half": lambda i: i.resize((max(1, i.width // 2), max(1, i.height // 2)), Image.LANCZOS),
    "crop10": lambda i: centre_crop(i, 0.10),
    "crop25": lambda i: centre_crop(i, 0.25),
    "crop50": lambda i: centre_crop(i, 0.50),
    "flip": ImageOps.mirror,
    "rotate10": lambda i: i.rotate(10, resample=Image.BICUBIC, expand=False, fillcolor=(0, 0, 0)),
    "bright1.4": lambda i: ImageEnhance.Brightness(i).enhance(1.4),
    "grayscale": lambda i: i.convert("L").convert("RGB"),
    "pad20": pad,
    "text": caption_bar,
    "blur3": lambda i: i.filter(ImageFilter.GaussianBlur(3)),
    "jpeg30_third": lambda i: jpeg(i.resize((max(1, i.width // 3), max(1, i.height // 3)), Image.LANCZOS), 30),
    "flip_crop25": lambda i: centre_crop(ImageOps.mirror(i), 0.25),
    "pad25_black": lambda i: pad_each_side(i, 0.5, "black"),
    "pad25_blur": lambda i: pad_each_side(i, 0.5, "blur"),
    "inset40": lambda i: inset(i, 0.4),
}


def apply(name: str, img: Image.Image) -> Image.Image:
    return EDITS[name](img.convert("RGB"))
