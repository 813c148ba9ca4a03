"""Stage 1: every input kind and PIL mode becomes the RGB pixels a viewer would see."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from provenance_guard.core.errors import ImageInputError
from provenance_guard.core.images import open_image, to_pixels
from provenance_guard.demo import sample_image


def as_float(p) -> np.ndarray:
    t = p.tensor
    arr = t.float().numpy()
    return arr / 255.0 if t.dtype == torch.uint8 else arr


def one(x):
    (p,) = to_pixels([x])
    assert not isinstance(p, Exception), p
    return p


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return sample_image("astronaut").convert("RGB").resize((64, 48))


def test_rgb_pil_numpy_and_tensor_agree(photo):
    arr = np.asarray(photo)
    a = one(photo).tensor
    b = one(arr).tensor
    c = one(torch.from_numpy(arr.astype(np.float32) / 255.0)[None]).tensor  # as ComfyUI's LoadImage makes it
    assert a.shape == (48, 64, 3) and a.dtype == b.dtype == c.dtype == torch.uint8
    assert torch.equal(a, b) and torch.equal(a, c)


def test_float_is_quantised_like_comfyui_save_image():
    x = np.random.default_rng(0).random((5, 7, 3)).astype(np.float32) * 1.2 - 0.1
    saved = np.clip(255.0 * x, 0, 255).astype(np.uint8)  # ComfyUI nodes.SaveImage
    assert torch.equal(one(torch.from_numpy(x)[None]).tensor, torch.from_numpy(saved))


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "YCbCr", "P", "I;16", "I", "F", "LA", "RGBA"])
def test_every_pil_mode_gives_hxwx3_in_range(photo, mode):
    img = photo.convert(mode) if mode not in ("I;16", "I", "F") else photo.convert("L").convert(mode)
    p = one(img)
    arr = as_float(p)
    assert arr.shape == (48, 64, 3)
    assert arr.min() >= 0.0 and arr.max() <= 1.0
    assert (p.width, p.height) == (64, 48)


def test_sixteen_bit_is_scaled_by_65535():
    arr16 = np.full((8, 8), 65535 // 2, dtype=np.uint16)
    img = Image.fromarray(arr16)
    assert img.mode == "I;16"
    np.testing.assert_allclose(as_float(one(img)), 0.5, atol=1 / 255)
    np.testing.assert_allclose(as_float(one(arr16)), 0.5, atol=1 / 255)


def test_alpha_is_composited_over_white(photo):
    rgba = photo.convert("RGBA")
    alpha = np.zeros((48, 64), dtype=np.uint8)
    alpha[:, :32] = 255  # left half opaque, right half transparent
    rgba.putalpha(Image.fromarray(alpha))
    out = as_float(one(rgba))
    np.testing.assert_allclose(out[:, 32:], 1.0)  # transparent -> white
    np.testing.assert_allclose(out[:, :32], np.asarray(photo)[:, :32] / 255.0, atol=1 / 255)
    # The same image flattened onto white by Pillow gives the same pixels.
    flat = Image.new("RGB", rgba.size, "white")
    flat.paste(rgba, mask=rgba.split()[3])
    np.testing.assert_allclose(out, np.asarray(flat) / 255.0, atol=1 / 255)


def test_palette_with_transparency_and_la(photo):
    p = photo.convert("P")
    p.info["transparency"] = 0
    assert as_float(one(p)).shape == (48, 64, 3)
    la = photo.convert("LA")
    assert as_float(one(la)).shape == (48, 64, 3)


def test_comfyui_batch_tensor_splits_into_images(photo):
    arr = np.asarray(photo).astype(np.float32) / 255.0
    batch = torch.from_numpy(np.stack([arr, arr[::-1].copy(), arr]))  # [B,H,W,C] in 0..1
    pixels = to_pixels(batch)
    assert len(pixels) == 3
    np.testing.assert_allclose(as_float(pixels[1]), arr[::-1], atol=1 / 255)


def test_rgba_tensor_is_composited():
    t = torch.zeros(1, 4, 4, 4)
    t[..., 3] = 0.0  # fully transparent black -> white
    np.testing.assert_allclose(as_float(to_pixels(t)[0]), 1.0)


def test_paths_and_bytes(tmp_path, photo):
    path = tmp_path / "a.png"
    photo.save(path)
    a, b = to_pixels([path, path.read_bytes()])
    np.testing.assert_allclose(as_float(a), as_float(b))


def test_bad_inputs_are_reported_per_image(tmp_path, photo):
    broken = tmp_path / "broken.png"
    buf = io.BytesIO()
    photo.save(buf, "PNG")
    broken.write_bytes(buf.getvalue()[:200])
    out = to_pixels([photo, broken, tmp_path / "missing.png", "not-a-file.txt", np.zeros((2, 2, 7)), 42])
    assert not isinstance(out[0], Exception)
    for err in out[1:]:
        assert isinstance(err, ImageInputError)
    assert "truncated" in str(out[1]) or "damaged" in str(out[1])
    assert "cannot be opened" in str(out[2])


def test_decompression_bomb_refused_before_decoding(tmp_path):
    # 6000 x 6000 of one colour: a few kB on disk, 108 MB once decoded.
    path = tmp_path / "bomb.png"
    Image.new("RGB", (6000, 6000), "black").save(path, optimize=True)
    assert path.stat().st_size < 500_000
    with pytest.raises(ImageInputError, match="over the cap"):
        open_image(path, cap=1_000_000)
    (err,) = to_pixels([path], max_pixels=1_000_000)
    assert isinstance(err, ImageInputError) and "PROVENANCE_GUARD_MAX_PIXELS" in str(err)
    # Arrays and tensors are held to the same cap.
    (err,) = to_pixels([np.zeros((2000, 1000, 3), np.uint8)], max_pixels=1_000_000)
    assert isinstance(err, ImageInputError)


def test_pillow_own_bomb_guard_is_translated(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (400, 400)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageInputError, match="decompression bomb"):
        open_image(path, cap=10**9)


def test_max_pixels_env_override(monkeypatch):
    from provenance_guard.core.config import max_pixels
    from provenance_guard.core.errors import ConfigError

    monkeypatch.setenv("PROVENANCE_GUARD_MAX_PIXELS", "1234")
    assert max_pixels() == 1234
    monkeypatch.setenv("PROVENANCE_GUARD_MAX_PIXELS", "lots")
    with pytest.raises(ConfigError, match="PROVENANCE_GUARD_MAX_PIXELS"):
        max_pixels()
