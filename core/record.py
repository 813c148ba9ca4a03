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
from typing import Any

from .errors import ImageInputError
from .result import CheckResult, GenerationRecord

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RECORD_KEY = "provenance"
SIDECAR_SUFFIX = ".provenance.json"


# PNG chunks ---------------------------------------------------------------------------------------------

# A compressed text chunk inflates to at most this (Pillow's own MAX_TEXT_CHUNK): a 1 MB zTXt bomb would
# otherwise inflate to 2 GB. Uncompressed chunks are bounded by the file; all text read from one file is
# bounded by MAX_TEXT_TOTAL.
MAX_TEXT_CHUNK = 1 << 20
MAX_TEXT_TOTAL = 16 << 20
_TEXT_TYPES = (b"tEXt", b"zTXt", b"iTXt")


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


def _iter_text_chunks(fp):
    """(type, body) of each text chunk of an open PNG file, seeking past image data; bodies over the budget
    are skipped unread."""
    if fp.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
        return
    budget = MAX_TEXT_TOTAL
    while True:
        head = fp.read(8)
        if len(head) < 8:
            return
        (length,) = struct.unpack(">I", head[:4])
        ctype = head[4:]
        if ctype in _TEXT_TYPES and length <= budget:
            body = fp.read(length)
            if len(body) < length:
                return
            budget -= length
            yield ctype, body
            fp.seek(4, os.SEEK_CUR)
        elif ctype == b"IEND":
            return
        else:
            fp.seek(length + 4, os.SEEK_CUR)


def _inflate(data: bytes) -> bytes | None:
    """zlib data inflated, or None when it is damaged or would inflate beyond MAX_TEXT_CHUNK."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_TEXT_CHUNK + 1)
    except zlib.error:
        return None
    return None if len(out) > MAX_TEXT_CHUNK or inflater.unconsumed_tail else out


def _text_of(ctype: bytes, body: bytes) -> tuple[str, str] | None:
    try:
        if ctype == b"tEXt":
            key, _, text = body.partition(b"\0")
            return key.decode("latin-1"), text.decode("latin-1")
        if ctype == b"zTXt":
            key, _, rest = body.partition(b"\0")
            inflated = _inflate(rest[1:])
            return None if inflated is None else (key.decode("latin-1"), inflated.decode("latin-1"))
        key, _, rest = body.partition(b"\0")
        compressed = rest[0]
        _lang, _, rest = rest[2:].partition(b"\0")
        _tkey, _, text = rest.partition(b"\0")
        if compressed:
            text = _inflate(text)
            if text is None:
                return None
        return key.decode("latin-1"), text.decode("utf-8")
    except (UnicodeDecodeError, IndexError):
        return None


def png_text_chunks(source: bytes | str | os.PathLike) -> dict[str, str]:
    """Every tEXt, zTXt and iTXt chunk of a PNG (bytes or a file path) as {key: text}, later chunks winning.
    Memory is bounded: compressed chunks inflate to MAX_TEXT_CHUNK at most (larger ones are skipped, as are
    damaged ones, so one bad chunk hides no other), and at most MAX_TEXT_TOTAL bytes of text are read."""
    out: dict[str, str] = {}
    if isinstance(source, (bytes, bytearray)):
        if not source.startswith(PNG_SIGNATURE):
            return {}
        chunks = ((ctype, body) for ctype, body, _, _ in _iter_chunks(bytes(source)) if ctype in _TEXT_TYPES)
        fp = None
    else:
        try:
            fp = open(source, "rb")  # noqa: SIM115 - closed in the finally below, after its chunks are read
        except OSError:
            return {}
        chunks = _iter_text_chunks(fp)
    try:
        for ctype, body in chunks:
            entry = _text_of(ctype, body)
            if entry is not None:
                out[entry[0]] = entry[1]
    finally:
        if fp is not None:
            fp.close()
    return out


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body) & 0xFFFFFFFF)


def _itxt(key: str, text: str) -> bytes:
    raw = text.encode("utf-8")
    packed = zlib.compress(raw, 9)
    # Compress only when it pays (an uncompressed record stays greppable), and never beyond what readers
    # inflate (ours and Pillow's refuse compressed text over MAX_TEXT_CHUNK).
    compress = len(packed) < len(raw) * 0.7 and len(raw) <= MAX_TEXT_CHUNK
    body = key.encode("latin-1") + b"\0" + (b"\x01\x00" + b"\0\0" + packed if compress
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


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (os.umask can only be read by
    setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes) -> None:
    """Replace path with data in one rename. A new file gets the mode any file written by this process
    gets (0666 less the umask); a replaced one keeps its mode."""
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            mode = os.stat(path).st_mode & 0o777
        except FileNotFoundError:
            mode = 0o666 & ~current_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# provenance records -------------------------------------------------------------------------------------

def sidecar_path(image: str | Path) -> Path:
    image = Path(image)
    return image.with_name(image.name + SIDECAR_SUFFIX)


def write_record(image: str | Path, result: CheckResult, png: bool = True, sidecar: bool = False) -> list[Path]:
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


def read_record(image: str | Path) -> CheckResult | None:
    """The record in the PNG chunk, else in the sidecar, else None. A batch record yields the entry whose
    pixels_sha256 is this image's."""
    image = Path(image)
    text = png_text_chunks(image).get(RECORD_KEY) if image.is_file() else None
    if text is None and sidecar_path(image).is_file() and sidecar_path(image).stat().st_size <= MAX_TEXT_TOTAL:
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


def _pixels_digest(image: Path) -> str | None:
    from .images import pixels_sha256, to_pixels

    (p,) = to_pixels([image])
    return None if isinstance(p, Exception) else pixels_sha256(p)


# generation records ---------------------------------------------------------------------------------------

# A1111's own pattern (modules/infotext_utils.py re_param), with keys bounded at 64 characters: unbounded, a
# long line without a colon took seconds (quadratic backtracking) on every image a batch check reads.
_A1111_FIELD = re.compile(r'\s*([\w ][\w \-/]{0,63}?):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


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
            "ImageOnlyCheckpointLoader", "DiffusersLoader")
_MAX_GRAPH_NODES = 10_000


def parse_comfyui_prompt(prompt: str | dict,  # noqa: C901 - one walk of a graph whose node kinds each differ
                         from_node: str | None = None) -> GenerationRecord:
    """ComfyUI API graph (the hidden PROMPT, or the PNG ``prompt`` chunk) -> GenerationRecord.

    With ``from_node`` (the id of the node that checks the image) the record describes the sampler that
    node's images come from, found by walking the graph upstream from it, and the model loader upstream of
    that sampler; without it (a saved PNG), the graph's first sampler. Prompt texts are followed through
    conditioning nodes to their text encoders. KSampler(Advanced) and SamplerCustom(Advanced) graphs are
    read (seed, steps, cfg, sampler and scheduler through their RandomNoise/CFGGuider/KSamplerSelect/
    BasicScheduler inputs)."""
    graph = json.loads(prompt) if isinstance(prompt, str) else prompt
    rec = GenerationRecord(source="comfyui")
    if not isinstance(graph, dict) or len(graph) > _MAX_GRAPH_NODES:
        return rec
    graph = {str(k): v for k, v in graph.items() if isinstance(v, dict)}

    def node(ref) -> dict | None:
        if isinstance(ref, list) and ref:
            return graph.get(str(ref[0]))
        return None

    def inputs_of(n: dict | None) -> dict:
        inp = n.get("inputs") if n else None
        return inp if isinstance(inp, dict) else {}

    def upstream(start: str, through: tuple[str, ...] | None = None):
        """Node ids upstream of start, nearest first (breadth first), following only the input names in
        through when given."""
        seen, queue = {start}, [start]
        while queue:
            current = queue.pop(0)
            for key, value in inputs_of(graph.get(current)).items():
                if through is not None and key not in through:
                    continue
                if isinstance(value, list) and value and str(value[0]) in graph and str(value[0]) not in seen:
                    seen.add(str(value[0]))
                    queue.append(str(value[0]))
                    yield str(value[0])

    def text_of(ref, depth: int = 0) -> str | None:
        n = node(ref)
        if not n or depth > 16:
            return None
        inputs = inputs_of(n)
        for key in ("text", "text_g", "prompt", "string", "value"):
            v = inputs.get(key)
            if isinstance(v, str):
                return v
            if isinstance(v, list):
                return text_of(v, depth + 1)
        for key in ("conditioning", "conditioning_1", "conditioning_to", "positive"):
            if key in inputs:
                return text_of(inputs[key], depth + 1)
        return None

    def value(inputs: dict, key: str, kind, via: tuple[str, ...] = ()):
        """inputs[key] when it is a kind, else the same key on the node an input of via links to."""
        v = inputs.get(key)
        if isinstance(v, kind) and not isinstance(v, bool):
            return v
        for link in via:
            found = inputs_of(node(inputs.get(link))).get(key)
            if isinstance(found, kind) and not isinstance(found, bool):
                return found
        return None

    if from_node is not None and str(from_node) in graph:
        sampler_id = next((i for i in upstream(str(from_node)) if graph[i].get("class_type") in _SAMPLERS), None)
    else:
        sampler_id = next((i for i, n in sorted(graph.items()) if n.get("class_type") in _SAMPLERS), None)
    if sampler_id is None:
        return rec
    inp = inputs_of(graph[sampler_id])
    rec.extra["sampler_node"] = sampler_id
    guider = inputs_of(node(inp.get("guider")))
    seed = value(inp, "seed", int)
    rec.seed = seed if seed is not None else value(inp, "noise_seed", int, via=("noise",))
    rec.steps = value(inp, "steps", int, via=("sigmas",))
    cfg = value(inp, "cfg", (int, float))
    cfg = cfg if cfg is not None else value(guider, "cfg", (int, float))
    rec.cfg = float(cfg) if cfg is not None else None
    rec.sampler = value(inp, "sampler_name", str, via=("sampler",))
    rec.scheduler = value(inp, "scheduler", str, via=("sigmas",))
    conditioning = inp if "positive" in inp else guider
    rec.prompt = text_of(conditioning.get("positive"))
    rec.negative_prompt = text_of(conditioning.get("negative"))
    model_from = sampler_id if "model" in inp else next(
        (i for i in upstream(sampler_id) if "model" in inputs_of(graph[i])), sampler_id)
    loader_id = next((i for i in upstream(model_from, through=("model", "unet", "guider"))
                      if graph[i].get("class_type") in _LOADERS), None)
    if loader_id is None:
        loader_id = next((i for i in upstream(sampler_id) if graph[i].get("class_type") in _LOADERS), None)
    if loader_id is not None:
        linp = inputs_of(graph[loader_id])
        name = linp.get("ckpt_name", linp.get("unet_name", linp.get("model_path")))
        rec.model = name if isinstance(name, str) else None
    return rec


def _exif_user_comment(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as img:
            exif = img.getexif().get_ifd(0x8769)
    except Exception:  # noqa: BLE001 - damaged files and decompression bombs alike just have no parameters
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


def read_generation(image: str | Path) -> GenerationRecord | None:
    """The generation parameters A1111/Forge or ComfyUI stored in the image file, or None."""
    image = Path(image)
    try:
        with open(image, "rb") as f:
            head = f.read(len(PNG_SIGNATURE))
    except OSError:
        return None
    if head == PNG_SIGNATURE:
        chunks = png_text_chunks(image)
        if "parameters" in chunks:
            return parse_a1111_parameters(chunks["parameters"])
        if "prompt" in chunks:
            try:
                return parse_comfyui_prompt(chunks["prompt"])
            except (ValueError, TypeError, AttributeError, RecursionError):
                return None
        return None
    text = _exif_user_comment(image)
    return parse_a1111_parameters(text) if text and "Steps: " in text else None


def record_from_mapping(data: dict[str, Any] | None) -> GenerationRecord | None:
    """A caller's dict (prompt, seed, ...) -> GenerationRecord, with source 'caller' unless given."""
    if not data:
        return None
    rec = GenerationRecord.from_json(dict(data))
    if rec is not None and not rec.source:
        rec.source = "caller"
    return rec
