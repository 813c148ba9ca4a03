"""P2: image -> embedding throughput of the core vs bare open_clip on the same model and batch.

anchor = open_clip's own path: preprocess = the model's PIL transform, per image; torch.stack; encode_image;
         L2-normalise (what a script calling open_clip directly does);
core   = Embedder.embed(images): our tensor preprocessing + the same encode_image.
Both get the same PIL images (decoded once, outside the timing) and the same batch size, on the same model.
Models: the tiny CLIP of the demo and a random-init ViT-B-32 (same compute as the real one). Prints
images/s for each and the ratio core / anchor. Target >= 0.9.

    .venv/bin/python bench/p2_embed_throughput.py [--batch 32] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))


def random_vit_b32(folder: Path) -> str:
    """ViT-B-32 with random weights saved as a checkpoint, loaded as ARCH//file (the user's file path)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    path = folder / "vit-b-32-random.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return f"ViT-B-32/{path}"


def images(n: int):
    from provenance_guard.demo import sample_image

    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
             "camera", "coins", "retina", "colorwheel", "moon", "brick", "grass", "gravel"]
    base = [sample_image(nm).convert("RGB") for nm in names]
    return [base[i % len(base)] for i in range(n)]


def bench(model_spec: str, batch: int, repeats: int) -> tuple[float, float, float]:
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from provenance_guard.core.embed import get_embedder

    emb = get_embedder(model_spec, "cpu")
    transform = image_transform_v2(PreprocessCfg(**emb.model.visual.preprocess_cfg), is_train=False)
    imgs = images(batch)

    def anchor():
        with torch.inference_mode():
            x = torch.stack([transform(im) for im in imgs])
            return torch.nn.functional.normalize(emb.model.encode_image(x), dim=-1).numpy()

    def core():
        return emb.embed(imgs, batch_size=batch)

    a_times, c_times = [], []
    anchor(), core()
    for _ in range(repeats):  # interleaved, so drift hits both alike
        t0 = time.perf_counter()
        anchor()
        t1 = time.perf_counter()
        core()
        t2 = time.perf_counter()
        a_times.append(t1 - t0)
        c_times.append(t2 - t1)
    a, c = statistics.median(a_times), statistics.median(c_times)
    agree = float((anchor() * core()).sum(1).min())
    return batch / a, batch / c, agree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from provenance_guard.demo import make_tiny_model

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, CPU; batch {args.batch}, "
          f"scikit-image photos of 300x451 to 1411x1411 px")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, spec in (("tiny CLIP", make_tiny_model(tmp / "tiny")), ("ViT-B-32 (random init)",
                                                                         random_vit_b32(tmp))):
            a, c, agree = bench(spec, args.batch, args.repeats)
            print(f"{label:<24} anchor open_clip {a:8.1f} img/s   core {c:8.1f} img/s   "
                  f"ratio {c / a:.2f} (target >= 0.9); min cosine between the two paths {agree:.4f}")


if __name__ == "__main__":
    main()
