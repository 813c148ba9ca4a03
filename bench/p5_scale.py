"""P5: scale. 10M x 768 float16 vectors (generated shards on disk, ~15 GB) built under a 4 GB budget;
peak RSS of the build (its own process, os.wait4); and the time to open a bundle at 1M and at 10M rows,
each in a fresh process (median of 5). Targets: build peak RSS <= 4 GB; open < 1 s for both.
The 10M shards and bundle (~32 GB) are deleted at the end unless --keep is given.

    .venv/bin/python bench/p5_scale.py [--rows 10000000] [--budget 4G] [--small bench/out/p3-ours] [--keep]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
OUT = HERE / "out"


def open_seconds(bundle: Path, repeats: int = 5) -> float:
    code = ("import time, sys; t = time.perf_counter(); from provenance_guard.core.bundle import Bundle; "
            "b = Bundle.open(sys.argv[1]); print(time.perf_counter() - t, b.count)")
    times = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True, check=True)
        times.append(float(out.stdout.split()[0]))
    return statistics.median(times)


def main() -> None:
    from p3_build_vs_autofaiss import make_shards, run_measured

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--budget", default="4G")
    ap.add_argument("--small", default=str(OUT / "p3-ours"), help="a 1M bundle to time opening")
    ap.add_argument("--cap-minutes", type=float, default=180)
    ap.add_argument("--keep", action="store_true", help="keep the generated shards and bundle for another run")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    shards = OUT / f"p5-shards-{args.rows}"
    t0 = time.perf_counter()
    make_shards(shards, args.rows)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.rows:,} x 768 float16 shards "
          f"({sum(f.stat().st_size for f in shards.rglob('*.npy')) / 2**30:.1f} GiB, made in "
          f"{time.perf_counter() - t0:.0f} s), budget {args.budget}", flush=True)
    out = OUT / "p5-bundle"
    shutil.rmtree(out.parent / f".{out.name}.build", ignore_errors=True)
    cmd = [sys.executable, "-m", "provenance_guard", "index", "build", "--embeddings", str(shards), "--model",
           "ViT-L-14/openai", "--out", str(out), "--max-memory", args.budget, "--overwrite", "--no-progress"]
    wall, rss, capped, code = run_measured(cmd, args.cap_minutes * 60, OUT / "p5-build.log")
    print(f"build: {wall:.0f} s, peak RSS {rss / 2**30:.2f} GiB, exit {code}" + (" (capped)" if capped else ""))
    print("       " + " | ".join((OUT / "p5-build.log").read_text().strip().splitlines()[-4:]), flush=True)
    for label, path in (("1M", Path(args.small)), (f"{args.rows // 1_000_000}M", out)):
        if (path / "manifest.json").is_file():
            print(f"open {label}: {open_seconds(path) * 1e3:.1f} ms (median of 5 fresh processes)")
    print(f"P5 peak RSS {rss / 2**30:.2f} GiB (target <= 4 GiB)")
    if not args.keep:
        for path in (shards, out):
            shutil.rmtree(path, ignore_errors=True)
        print(f"deleted {shards.name} and {out.name} (--keep keeps them)")


if __name__ == "__main__":
    main()
