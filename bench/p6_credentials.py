"""P6: the cost of Content Credentials per saved image, against the save the host already pays.

anchor = Pillow saving the same 1024x1024 image (PNG at Pillow's default compression, as A1111 and ComfyUI
         save; JPEG q90), the write every host makes anyway;
ours   = core.credentials.sign_file on that saved file: manifest built, signed (ES256, no thumbnail), embedded,
         the file replaced in one rename.
Images: a photo (scikit-image's astronaut, resized to 1024x1024: compresses as generated images do) and
noise (incompressible: the worst case for hashing). Prints the median ms of each and the ratio ours /
anchor. Target: signing <= 30 ms per 1024x1024 PNG on the CI-class CPU. Keeps nothing (a temp folder).

    .venv/bin/python bench/p6_credentials.py [--repeats 15]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()

    import numpy as np
    from PIL import Image

    from provenance_guard.core import credentials as cr
    from provenance_guard.core.result import BundleThresholds, CheckResult
    from provenance_guard.demo import sample_image

    reason = cr.unavailable()
    if reason:
        print(reason)
        return 2
    images = {"photo": sample_image("astronaut").convert("RGB").resize((1024, 1024), Image.BICUBIC),
              "noise": Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), np.uint8))}
    result = CheckResult(verdict="pass", max_score=0.4, matches=[], model="bench",
                         thresholds=[BundleThresholds("b", "v", 0.9, 0.95)], fail_mode="open")
    print(f"P6 Content Credentials, {platform.processor() or platform.machine()}, {args.repeats} repeats, median ms")
    with tempfile.TemporaryDirectory(prefix="pg-p6-") as tmp:
        creds = cr.load_credentials(cr.init_credentials(Path(tmp) / "keys").folder)
        for name, image in images.items():
            for fmt, suffix, kw in (("PNG", ".png", {}), ("JPEG", ".jpg", {"quality": 90})):
                path = Path(tmp) / f"{name}{suffix}"
                saves, signs = [], []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    image.save(path, fmt, **kw)
                    saves.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    cr.sign_file(path, creds, cr.manifest_for(result, "bench", path.name))
                    signs.append(time.perf_counter() - t0)
                save_ms, sign_ms = 1000 * statistics.median(saves), 1000 * statistics.median(signs)
                print(f"  {name:5s} {fmt:4s} {path.stat().st_size / 1e6:5.2f} MB: Pillow save {save_ms:7.1f}  "
                      f"sign {sign_ms:7.1f}  ratio {sign_ms / save_ms:5.2f}"
                      + ("  (target <= 30 ms)" if fmt == "PNG" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
