"""The demo behind the README's first command, and the tiny local model it (and the tests) can use.

``provenance-guard demo`` runs the main job end to end on an embedded default, with no server and no
download: reference photos from scikit-image -> a bundle; sample "generated" outputs (edited copies of
references and unrelated photos) -> check -> table -> records written into the outputs.

Without ``--model``, it embeds with a tiny CLIP (a ViT with 2 layers of width 64) whose weights are a
fixed random initialisation, built here and loaded as a ``local-dir:`` model, the path a user's own model
folder takes. Random weights do not know what a cat is, but they still map an image and its edits
(re-encoding, resizing) to nearly the same vector and different photos to different ones, which is all
the demo needs; its thresholds are set for that model (see DEMO_WARN/DEMO_BLOCK). Give
``--model ViT-L-14/openai`` to run it with LAION-5B's model (downloads ~900 MB once).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

TINY_MODEL_CFG = {
    "embed_dim": 64,
    # Average pooling keeps a random-weight ViT's embedding dependent on the image content; with the
    # class token all images collapse towards one direction.
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32,
                   "pool_type": "avg"},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

# Exact cosines for the tiny random model: its edits of an image stay >= 0.999 and distinct photos
# <= ~0.97 (measured in tests/test_core.py), so these sit in the gap. Real CLIP models use the defaults.
DEMO_WARN = 0.985
DEMO_BLOCK = 0.995

REFERENCES = {
    "astronaut": "Astronaut Eileen Collins, NASA portrait",
    "coffee": "A cup of coffee on a saucer, seen from above",
    "chelsea": "Chelsea the cat, close-up",
    "rocket": "Falcon 9 rocket on the launch pad",
    "hubble_deep_field": "Hubble eXtreme Deep Field, galaxies <b>in deep space</b>",
    "immunohistochemistry": "Immunohistochemistry stain of colon tissue",
}
UNRELATED = ("camera", "coins", "retina", "logo", "colorwheel")


def tiny_model_cfg() -> dict:
    """TINY_MODEL_CFG in the installed open_clip's terms: open_clip < 2.21 (A1111's and Forge's pin) names
    average pooling ``global_average_pool``, later releases ``pool_type: avg``."""
    import dataclasses

    from open_clip.model import CLIPVisionCfg

    cfg = json.loads(json.dumps(TINY_MODEL_CFG))
    if "pool_type" not in {f.name for f in dataclasses.fields(CLIPVisionCfg)}:
        del cfg["vision_cfg"]["pool_type"]
        cfg["vision_cfg"]["global_average_pool"] = True
    return cfg


def make_tiny_model(folder: Path, seed: int = 0) -> str:
    """Write a tiny open_clip model (config + safetensors weights) to folder; returns its spec."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "open_clip_model.safetensors"
    if not weights.is_file():
        cfg = tiny_model_cfg()
        torch.manual_seed(seed)
        model = open_clip.model.CLIP(**json.loads(json.dumps(cfg)))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        config = {"model_cfg": cfg,
                  "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                     "std": [0.26862954, 0.26130258, 0.27577711],
                                     "interpolation": "bicubic", "resize_mode": "shortest"}}
        (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return f"local-dir:{folder.resolve()}"


def sample_image(name: str):
    """A scikit-image sample photo as a PIL image (shipped inside scikit-image; no download)."""
    import skimage.data
    from PIL import Image

    arr = getattr(skimage.data, name)()
    if arr.dtype == bool:
        arr = arr.astype("uint8") * 255
    return Image.fromarray(arr)


def write_references(folder: Path) -> list[Path]:
    """Reference set: one PNG per REFERENCES entry plus an img2dataset-style caption .txt beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, caption in REFERENCES.items():
        path = folder / f"{name}.png"
        sample_image(name).convert("RGB").save(path)
        (folder / f"{name}.txt").write_text(caption, encoding="utf-8")
        paths.append(path)
    return paths


def write_outputs(folder: Path) -> dict[str, str]:
    """Sample 'generated' images: edited copies of references and unrelated photos -> {file: what it is}."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    made = {}

    astronaut = sample_image("astronaut").convert("RGB")
    buf = io.BytesIO()
    astronaut.save(buf, "JPEG", quality=70)
    (folder / "astronaut_jpeg70.jpg").write_bytes(buf.getvalue())
    made["astronaut_jpeg70.jpg"] = "copy of a reference, JPEG quality 70"

    coffee = sample_image("coffee").convert("RGB")
    coffee.resize((coffee.width // 2, coffee.height // 2), Image.LANCZOS).save(folder / "coffee_half.png")
    made["coffee_half.png"] = "copy of a reference, resized to half"

    chelsea = sample_image("chelsea").convert("RGB")
    chelsea.save(folder / "chelsea_copy.png")
    made["chelsea_copy.png"] = "exact copy of a reference"

    for name in UNRELATED:
        img = sample_image(name)
        img.save(folder / f"{name}.png")
        made[f"{name}.png"] = "unrelated photo"
    return made


def run_demo(out: Path, model: str | None = None, device: str = "auto") -> int:
    """Build the sample bundle, check the sample outputs, print the table, write the records."""
    import importlib.util

    from .cli import main as cli_main
    from .core.config import DEFAULT_BLOCK, DEFAULT_WARN
    from .core.errors import ConfigError

    if importlib.util.find_spec("skimage") is None:
        raise ConfigError("the demo's sample photos ship with scikit-image, which this install lacks: "
                          "pip install scikit-image (or pip install 'provenance-guard[demo]'), then run the demo "
                          "again; checking your own images needs nothing more")
    out = Path(out)
    if model is None:
        model = make_tiny_model(out / "tiny-clip")
        warn, block = DEMO_WARN, DEMO_BLOCK
        print(f"demo model: a tiny CLIP with fixed random weights, built locally in {out / 'tiny-clip'} "
              f"(no download); thresholds warn {warn} / block {block} are set for it.\n"
              f"For real checks use --model ViT-L-14/openai (the model of the LAION-5B embeddings).\n")
    else:
        warn, block = DEFAULT_WARN, DEFAULT_BLOCK
    refs = out / "references"
    write_references(refs)
    outputs = write_outputs(out / "outputs")
    print(f"references: {len(REFERENCES)} photos in {refs}; outputs to check: {len(outputs)} in {out / 'outputs'}")
    for name, what in outputs.items():
        print(f"  {name:<24} {what}")
    print()
    code = cli_main(["index", "build", "--images", str(refs), "--out", str(out / "bundle"), "--model", model,
                     "--id", "demo-references", "--warn", str(warn), "--block", str(block), "--overwrite",
                     "--device", device, "--no-progress"])
    if code:
        return code
    print()
    code = cli_main(["check", str(out / "outputs"), "--index", str(out / "bundle"), "--device", device,
                     "--write-record", "both", "--show", "1", "--no-progress"])
    print(f"\nrecords: a 'provenance' chunk in each PNG and IMAGE.provenance.json beside every output "
          f"in {out / 'outputs'} (the check above exited {code}, as a gate would: "
          f"{'some images reached block' if code == 1 else 'see its exit codes'}; the demo judges it below)")
    return _judge(out / "outputs", outputs)


def _judge(folder: Path, outputs: dict[str, str]) -> int:
    """0 when every copy was blocked and every unrelated photo passed, as the records show; else 1."""
    from .core.record import read_record

    wrong = []
    for name, what in outputs.items():
        record = read_record(folder / name)
        expected = "pass" if what == "unrelated photo" else "block"
        if record is None or record.verdict != expected:
            wrong.append(f"{name}: {record.verdict if record else 'no record'} (expected {expected})")
    if wrong:
        print("demo: unexpected verdicts: " + "; ".join(wrong))
        return 1
    print("demo: as expected, every edited copy was blocked and every unrelated photo passed")
    return 0
