"""Stage 6, act: the provenance record in and beside image files, and the generation record they carry.

- ``write_record(path, result)`` puts the result JSON into a PNG ``provenance`` iTXt chunk (the pixels and
  every other chunk are kept byte for byte; the file is replaced atomically) and/or a sidecar
  ``<image>.provenance.json``; ``read_record`` reads either back.
- ``read_generation(path)`` reads what the host stored: A1111's ``parameters`` text (PNG chunk, or EXIF
  UserComment in JPEG/WebP) and ComfyUI's ``prompt`` graph (PNG chunk), so a record links prompt ->
  output -> matches.
"""
from __future__ import annotations

import json
import os
import re
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any, Optional, Union

from .errors import ImageInputError
from .result import CheckResult, GenerationRecord

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RECORD_KEY = "provenance"
SIDECAR_SUFFIX = ".provenance.json"


# PNG chunks ---------------------------------------------------------------------------------------------

def _iter_chunks(data: bytes):
    """(type, body, start, end) of each chunk; stops at IEND or at a damaged chunk."""
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        ctype = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > len(data):
            return
        yield ctype, data[pos + 8:pos + 8 + length], pos, end
        if ctype == b"IEND":
            return
        pos = end


def png_text_chunks(data: bytes) -> dict[str, str]:
    """Every tEXt, zTXt and iTXt chunk of a PNG as {key: text} (later chunks win)."""
    if not data.startswith(PNG_SIGNATURE):
        return {}
    out: dict[str, str] = {}
    for ctype, body, _, _ in _iter_chunks(data):
        try:
            if ctype == b"tEXt":
                key, _, text = body.partition(b"\0")
                out[key.decode("latin-1")] = text.decode("latin-1")
            elif ctype == b"zTXt":
                key, _, rest = body.partition(b"\0")
                out[key.decode("latin-1")] = zlib.decompress(rest[1:]).decode("latin-1")
            elif ctype == b"iTXt":
                key, _, rest = body.partition(b"\0")
                compressed, _method = rest[0], rest[1]
                _lang, _, rest = rest[2:].partition(b"\0")
                _tkey, _, text = rest.partition(b"\0")
                text = zlib.decompress(text) if compressed else text
                out[key.decode("latin-1")] = text.decode("utf-8")
        except (zlib.error, UnicodeDecodeError, IndexError):
            continue  # one damaged text chunk must not hide the others
    return out


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body) & 0xFFFFFFFF)


def _itxt(key: str, text: str) -> bytes:
    raw = text.encode("utf-8")
    packed = zlib.compress(raw, 9)
    # Compress only when it pays; an uncompressed record stays greppable.
    body = key.encode("latin-1") + b"\0" + (b"\x01\x00" + b"\0\0" + packed if len(packed) < len(raw) * 0.7
                                            else b"\x00\x00" + b"\0\0" + raw)
    return _chunk(b"iTXt", body)


def with_png_text(data: bytes, key: str, text: str) -> bytes:
    """PNG bytes with one text chunk ``key`` set to ``text`` (any old chunk of that key removed)."""
    if not data.startswith(PNG_SIGNATURE):
        raise ImageInputError("not a PNG file: a provenance chunk can only go into a PNG; use the sidecar")
    parts = [PNG_SIGNATURE]
    wrote = False
    for ctype, body, start, end in _iter_chunks(data):
        if ctype in (b"tEXt", b"zTXt", b"iTXt") and body.split(b"\0", 1)[0] == key.encode("latin-1"):
            continue
        if ctype == b"IEND":
            parts.append(_itxt(key, text))
            wrote = True
        parts.append(data[start:end])
    if not wrote:
        raise ImageInputError("the PNG has no IEND chunk (truncated file); re-save the image")
    return b"".join(parts)


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, os.stat(path).st_mode & 0o777)
        except FileNotFoundError:
            pass
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# provenance records -------------------------------------------------------------------------------------

def sidecar_path(image: Union[str, Path]) -> Path:
    image = Path(image)
    return image.with_name(image.name + SIDECAR_SUFFIX)


def write_record(image: Union[str, Path], result: CheckResult, png: bool = True, sidecar: bool = False) -> list[Path]:
    """Write the record into the PNG (when it is one and png=True) and/or a sidecar; returns files written.

    A non-PNG image gets the sidecar even when only png was asked for, so a record is never dropped.
    """
    image = Path(image)
    text = result.dumps()
    written = []
    data = image.read_bytes() if png else b""
    if png and data.startswith(PNG_SIGNATURE):
        atomic_write(image, with_png_text(data, RECORD_KEY, text))
        written.append(image)
    elif png:
        sidecar = True
    if sidecar:
        path = sidecar_path(image)
        atomic_write(path, json.dumps(result.to_json(), ensure_ascii=False, indent=2).encode("utf-8"))
        written.append(path)
    return written


BATCH_SCHEMA = "provenance-guard/check-batch"


def batch_record(results: list[CheckResult]) -> dict[str, Any]:
    """The record of a batch whose images share one set of PNG chunks (ComfyUI's EXTRA_PNGINFO): one result
    as it is; several as {"schema": check-batch, "records": [...]}, each naming its pixels' sha256."""
    if len(results) == 1:
        return results[0].to_json()
    return {"schema": BATCH_SCHEMA, "schema_version": 1, "records": [r.to_json() for r in results]}


def read_record(image: Union[str, Path]) -> Optional[CheckResult]:
    """The record in the PNG chunk, else in the sidecar, else None. A batch record yields the entry whose
    pixels_sha256 is this image's."""
    image = Path(image)
    text = png_text_chunks(image.read_bytes()).get(RECORD_KEY) if image.is_file() else None
    if text is None and sidecar_path(image).is_file():
        text = sidecar_path(image).read_text(encoding="utf-8")
    if not text:
        return None
    data = json.loads(text)
    if isinstance(data, dict) and data.get("schema") == BATCH_SCHEMA:
        records = data.get("records") or []
        digest = _pixels_digest(image)
        chosen = next((r for r in records if (r.get("image") or {}).get("pixels_sha256") == digest), None)
        return CheckResult.from_json(chosen) if chosen else None
    return CheckResult.from_json(data)


def _pixels_digest(image: Path) -> Optional[str]:
    from .images import pixels_sha256, to_pixels

    (p,) = to_pixels([image])
    return None if isinstance(p, Exception) else pixels_sha256(p)


# generation records ---------------------------------------------------------------------------------------

_A1111_FIELD = re.compile(r'\s*([\w ][\w \-/]*?):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111_parameters(text: str) -> GenerationRecord:
    """A1111/Forge infotext -> GenerationRecord (prompt, 'Negative prompt:', then 'Steps: ..., Seed: ...')."""
    lines = text.strip().split("\n")
    params_line = ""
    if lines and re.search(r"(^|, )Steps: ", lines[-1]):
        params_line = lines.pop()
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    fields: dict[str, str] = {}
    for key, value in _A1111_FIELD.findall(params_line):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = value[1:-1]
        fields[key.strip()] = value

    def num(key: str, kind):
        try:
            return kind(fields.pop(key)) if key in fields else None
        except ValueError:
            return None

    width = height = None
    if "Size" in fields:
        m = re.match(r"(\d+)x(\d+)", fields.pop("Size"))
        if m:
            width, height = int(m.group(1)), int(m.group(2))
    return GenerationRecord(
        prompt="\n".join(prompt_lines).strip() or None,
        negative_prompt="\n".join(negative_lines).strip() or None,
        seed=num("Seed", int), steps=num("Steps", int), cfg=num("CFG scale", float),
        sampler=fields.pop("Sampler", None), scheduler=fields.pop("Schedule type", None),
        model=fields.pop("Model", None), model_hash=fields.pop("Model hash", None),
        width=width, height=height, source="a1111", extra=fields,
    )


_SAMPLERS = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")
_LOADERS = ("CheckpointLoaderSimple", "CheckpointLoader", "UNETLoader", "unCLIPCheckpointLoader",
            "ImageOnlyCheckpointLoader")


def parse_comfyui_prompt(prompt: Union[str, dict]) -> GenerationRecord:
    """ComfyUI API graph (the PNG ``prompt`` chunk) -> GenerationRecord of its first sampler."""
    graph = json.loads(prompt) if isinstance(prompt, str) else prompt
    if not isinstance(graph, dict):
        return GenerationRecord(source="comfyui")

    def node(ref) -> Optional[dict]:
        if isinstance(ref, list) and ref:
            return graph.get(str(ref[0]))
        return None

    def text_of(ref, depth: int = 0) -> Optional[str]:
        n = node(ref)
        if not n or depth > 8:
            return None
        inputs = n.get("inputs", {})
        for key in ("text", "text_g", "prompt", "string", "value"):
            v = inputs.get(key)
            if isinstance(v, str):
                return v
            if isinstance(v, list):
                return text_of(v, depth + 1)
        for key in ("conditioning", "conditioning_1", "positive"):
            if key in inputs:
                return text_of(inputs[key], depth + 1)
        return None

    sampler = next((n for _, n in sorted(graph.items(), key=lambda kv: str(kv[0]))
                    if isinstance(n, dict) and n.get("class_type") in _SAMPLERS), None)
    loader = next((n for n in graph.values() if isinstance(n, dict) and n.get("class_type") in _LOADERS), None)
    rec = GenerationRecord(source="comfyui")
    if sampler:
        inp = sampler.get("inputs", {})
        seed = inp.get("seed", inp.get("noise_seed"))
        rec.seed = seed if isinstance(seed, int) else None
        rec.steps = inp.get("steps") if isinstance(inp.get("steps"), int) else None
        rec.cfg = float(inp["cfg"]) if isinstance(inp.get("cfg"), (int, float)) else None
        rec.sampler = inp.get("sampler_name") if isinstance(inp.get("sampler_name"), str) else None
        rec.scheduler = inp.get("scheduler") if isinstance(inp.get("scheduler"), str) else None
        rec.prompt = text_of(inp.get("positive"))
        rec.negative_prompt = text_of(inp.get("negative"))
    if loader:
        inp = loader.get("inputs", {})
        name = inp.get("ckpt_name", inp.get("unet_name"))
        rec.model = name if isinstance(name, str) else None
    return rec


def _exif_user_comment(path: Path) -> Optional[str]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            exif = img.getexif().get_ifd(0x8769)
    except (OSError, SyntaxError, ValueError):
        return None
    raw = exif.get(0x9286)
    if isinstance(raw, bytes):
        if raw.startswith(b"UNICODE\0"):
            body = raw[8:]
            for enc in ("utf-16-be", "utf-16-le"):
                try:
                    text = body.decode(enc)
                    if text.isprintable() or "\n" in text:
                        return text
                except UnicodeDecodeError:
                    continue
            return None
        return raw.split(b"\0", 1)[-1].decode("utf-8", "replace") if raw.startswith(b"ASCII") else None
    return raw if isinstance(raw, str) else None


def read_generation(image: Union[str, Path]) -> Optional[GenerationRecord]:
    """The generation parameters A1111/Forge or ComfyUI stored in the image file, or None."""
    image = Path(image)
    try:
        data = image.read_bytes()
    except OSError:
        return None
    if data.startswith(PNG_SIGNATURE):
        chunks = png_text_chunks(data)
        if "parameters" in chunks:
            return parse_a1111_parameters(chunks["parameters"])
        if "prompt" in chunks:
            try:
                return parse_comfyui_prompt(chunks["prompt"])
            except (json.JSONDecodeError, TypeError, AttributeError):
                return None
        return None
    text = _exif_user_comment(image)
    return parse_a1111_parameters(text) if text and "Steps: " in text else None


def record_from_mapping(data: Optional[dict[str, Any]]) -> Optional[GenerationRecord]:
    """A caller's dict (prompt, seed, ...) -> GenerationRecord, with source 'caller' unless given."""
    if not data:
        return None
    rec = GenerationRecord.from_json(dict(data))
    if rec is not None and not rec.source:
        rec.source = "caller"
    return rec
