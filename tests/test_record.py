"""Records: the PNG 'provenance' chunk and sidecar round-trip; A1111 and ComfyUI parameters are read."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from provenance_guard.core.check import Checker
from provenance_guard.core.record import (parse_a1111_parameters, parse_comfyui_prompt, png_text_chunks,
                                          read_generation, read_record, sidecar_path, with_png_text, write_record)
from provenance_guard.demo import sample_image

A1111_TEXT = (
    "masterpiece, an astronaut riding a horse, <lora:foo:0.8>\n"
    "second line of prompt\n"
    "Negative prompt: lowres, bad hands\n"
    'Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567890, Size: 512x768, '
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "foo: abc123, bar: def456", Version: v1.10.1'
)

COMFY_PROMPT = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 156680208700286, "steps": 20, "cfg": 8.0,
                                               "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                                               "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                                               "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "beautiful scenery nature glass bottle",
                                                     "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


def test_a1111_parameters():
    rec = parse_a1111_parameters(A1111_TEXT)
    assert rec.prompt == "masterpiece, an astronaut riding a horse, <lora:foo:0.8>\nsecond line of prompt"
    assert rec.negative_prompt == "lowres, bad hands"
    assert (rec.steps, rec.sampler, rec.scheduler, rec.cfg, rec.seed) == (28, "DPM++ 2M", "Karras", 6.5, 1234567890)
    assert (rec.width, rec.height, rec.model_hash, rec.model) == (512, 768, "6ce0161689", "v1-5-pruned-emaonly")
    assert rec.extra["Lora hashes"] == "foo: abc123, bar: def456" and rec.extra["Version"] == "v1.10.1"
    assert rec.source == "a1111"


def test_a1111_without_negative_or_params():
    rec = parse_a1111_parameters("just a prompt")
    assert rec.prompt == "just a prompt" and rec.seed is None and rec.negative_prompt is None


def test_comfyui_prompt():
    rec = parse_comfyui_prompt(json.dumps(COMFY_PROMPT))
    assert rec.prompt == "beautiful scenery nature glass bottle" and rec.negative_prompt == "text, watermark"
    assert (rec.seed, rec.steps, rec.cfg, rec.sampler, rec.scheduler) == (156680208700286, 20, 8.0, "euler", "normal")
    assert rec.model == "v1-5-pruned-emaonly.safetensors" and rec.source == "comfyui"


def test_comfyui_garbage_is_harmless():
    assert parse_comfyui_prompt("[1, 2]").prompt is None
    assert parse_comfyui_prompt({"1": "x", "2": {"class_type": "KSampler", "inputs": {"positive": ["99", 0]}}}).prompt is None


def _png_with(tmp_path, **chunks):
    info = PngImagePlugin.PngInfo()
    for k, v in chunks.items():
        info.add_text(k, v)
    path = tmp_path / "gen.png"
    sample_image("astronaut").convert("RGB").resize((64, 64)).save(path, pnginfo=info)
    return path


def test_read_generation_from_png_chunks(tmp_path):
    assert read_generation(_png_with(tmp_path, parameters=A1111_TEXT)).seed == 1234567890
    path = _png_with(tmp_path, prompt=json.dumps(COMFY_PROMPT), workflow="{}")
    assert read_generation(path).prompt == "beautiful scenery nature glass bottle"
    assert read_generation(_png_with(tmp_path, Software="x")) is None


def test_read_generation_from_jpeg_exif(tmp_path):
    img = sample_image("astronaut").convert("RGB").resize((64, 64))
    exif = Image.Exif()
    exif[0x8769] = {0x9286: b"UNICODE\0" + A1111_TEXT.encode("utf-16-be")}  # how Pillow 9.5 and 13 both write it
    path = tmp_path / "gen.jpg"
    img.save(path, exif=exif)
    assert read_generation(path).steps == 28


@pytest.fixture
def result(built_bundle):
    (r,) = Checker(built_bundle, device="cpu").check([sample_image("chelsea")])
    return r


def test_png_chunk_round_trip_keeps_pixels_and_other_chunks(tmp_path, result):
    path = _png_with(tmp_path, parameters=A1111_TEXT)
    before = np.asarray(Image.open(path))
    assert write_record(path, result) == [path]
    after = Image.open(path)
    np.testing.assert_array_equal(np.asarray(after), before)
    chunks = png_text_chunks(path.read_bytes())
    assert chunks["parameters"] == A1111_TEXT and "provenance" in chunks
    assert after.text["provenance"] == chunks["provenance"]  # Pillow reads our iTXt too
    back = read_record(path)
    assert back.verdict == result.verdict == "block"
    assert back.matches[0].caption == result.matches[0].caption
    assert back.to_json() == json.loads(result.dumps())
    # Writing again replaces the chunk instead of adding a second one.
    write_record(path, result)
    assert path.read_bytes().count(b"iTXtprovenance") == 1


def test_caption_with_unicode_and_html_round_trips(tmp_path, result):
    result.matches[0].caption = "<script>alert('x')</script> café 猫 " * 20
    path = _png_with(tmp_path)
    write_record(path, result)
    assert read_record(path).matches[0].caption == result.matches[0].caption


def test_sidecar_and_non_png(tmp_path, result):
    jpg = tmp_path / "out.jpg"
    sample_image("coffee").convert("RGB").save(jpg)
    data = jpg.read_bytes()
    assert write_record(jpg, result) == [sidecar_path(jpg)]  # no PNG chunk possible: sidecar instead
    assert jpg.read_bytes() == data and sidecar_path(jpg).name == "out.jpg.provenance.json"
    assert read_record(jpg).verdict == "block"
    png = _png_with(tmp_path)
    assert write_record(png, result, png=True, sidecar=True) == [png, sidecar_path(png)]


def test_truncated_png_is_refused(result):
    from provenance_guard.core.errors import ImageInputError

    with pytest.raises(ImageInputError):
        with_png_text(b"\x89PNG\r\n\x1a\n" + b"\0\0\0\0IHDR", "k", "v")
