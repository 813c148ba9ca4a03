"""The ``provenance-guard`` command: check images, build/inspect/verify bundles, run the demo.

Exit codes (check): 0 no image reached --fail-on; 1 at least one did; 2 usage or configuration error (bad
option, bundle missing or broken, model not loadable); 3 at least one image could not be checked.
"""
from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from .core.config import DEFAULT_BATCH_SIZE, DEFAULT_BLOCK, DEFAULT_TOP_K, DEFAULT_WARN
from .core.errors import EXIT_CONFIG, EXIT_FLAGGED, EXIT_OK, EXIT_UNCHECKED, ConfigError, ProvenanceError

DEFAULT_MODEL = "ViT-L-14/openai"


def _float01(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a cosine such as 0.95")
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not a cosine; give a number between -1 and 1")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def terminal_safe(text: Optional[str], width: int = 0) -> str:
    """Strip control characters (captions come from the web) and shorten to width."""
    if not text:
        return ""
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in str(text))
    text = " ".join(text.split())
    if width and len(text) > width:
        text = text[: width - 1] + "…"
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="provenance-guard", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"provenance-guard {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="check images against one or more bundles")
    c.add_argument("images", nargs="+", help="image files or folders (png, jpg, jpeg, webp)")
    c.add_argument("--index", action="append", required=True, metavar="BUNDLE",
                   help="a bundle folder; repeat to check against several (matches merge by score)")
    c.add_argument("--model", help="load the bundle's model from another place (a local file or folder); "
                                   "default: the model in the bundle's manifest")
    c.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, mps")
    c.add_argument("--warn", type=_float01, help="warn at this exact cosine or above (default: the bundle's)")
    c.add_argument("--block", type=_float01, help="block at this exact cosine or above (default: the bundle's)")
    c.add_argument("--top-k", type=_positive, default=DEFAULT_TOP_K, help="matches per image (default 10)")
    c.add_argument("--fail-on", choices=("warn", "block"), default="block",
                   help="exit 1 when an image reaches this verdict (default block)")
    c.add_argument("--fail-mode", choices=("open", "closed"), default="open",
                   help="an image that cannot be checked: open = 'unchecked', closed = 'block' (default open)")
    c.add_argument("--recursive", "-r", action="store_true", help="descend into folders")
    c.add_argument("--json", action="store_true", help="print one JSON object per image (schema v1) instead")
    c.add_argument("--write-record", choices=("none", "png", "sidecar", "both"), default="none",
                   help="write the result into the PNG 'provenance' chunk and/or IMAGE.provenance.json")
    c.add_argument("--show", type=int, default=3, help="matches listed per image in the table (default 3)")
    c.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE)
    c.add_argument("--no-progress", action="store_true")

    ix = sub.add_parser("index", help="build, inspect and verify bundles")
    isub = ix.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="build a bundle")
    b.add_argument("--images", required=True, help="folder of reference images (recursive)")
    b.add_argument("--out", required=True, help="bundle folder to create")
    b.add_argument("--model", default=DEFAULT_MODEL, help=f"open_clip model spec (default {DEFAULT_MODEL})")
    b.add_argument("--device", default="auto")
    b.add_argument("--id", dest="bundle_id", help="bundle id (default: the folder name)")
    b.add_argument("--bundle-version", help="bundle version (default: the build time, UTC)")
    b.add_argument("--description", default="")
    b.add_argument("--warn", type=_float01, default=DEFAULT_WARN)
    b.add_argument("--block", type=_float01, default=DEFAULT_BLOCK)
    b.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE)
    b.add_argument("--overwrite", action="store_true", help="replace an existing bundle (atomically)")
    b.add_argument("--no-progress", action="store_true")
    i = isub.add_parser("info", help="show what a bundle holds")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true", help="print the manifest")
    v = isub.add_parser("verify", help="open a bundle and check the sha256 of every file")
    v.add_argument("bundle")

    d = sub.add_parser("demo", help="the main job on built-in samples: build a bundle, check, write records")
    d.add_argument("--out", default="demo-out", help="working folder (default ./demo-out)")
    d.add_argument("--model", help="open_clip model spec; default: a tiny CLIP built locally (no download)")
    d.add_argument("--device", default="auto")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check":
            return cmd_check(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(Path(args.out), model=args.model, device=args.device)
        if args.index_command == "build":
            return cmd_build(args)
        if args.index_command == "info":
            return cmd_info(args)
        return cmd_verify(args)
    except ProvenanceError as exc:
        print(f"provenance-guard: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("provenance-guard: interrupted", file=sys.stderr)
        return 130


def collect_images(inputs: Sequence[str], recursive: bool) -> list[Path]:
    from .core.images import IMAGE_SUFFIXES, find_images

    paths: list[Path] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = find_images(p, recursive=recursive)
            if not found:
                raise ConfigError(f"{p}: no .png, .jpg, .jpeg or .webp files"
                                  + ("" if recursive else " (add --recursive to descend into sub-folders)"))
            paths.extend(found)
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise ConfigError(f"{p}: not a .png, .jpg, .jpeg or .webp file")
            paths.append(p)
        else:
            raise ConfigError(f"{p}: no such file or folder")
    return paths


def cmd_check(args) -> int:
    from tqdm import tqdm

    from .core.check import Checker
    from .core.policy import Policy, reaches
    from .core.record import read_generation, write_record

    paths = collect_images(args.images, args.recursive)
    policy = Policy(warn=args.warn, block=args.block, fail_mode=args.fail_mode, top_k=args.top_k)
    checker = Checker(args.index, model=args.model, device=args.device, policy=policy, batch_size=args.batch_size)
    bundles = checker.open()
    checker.embedders()
    if not args.json:
        _print_header(bundles, checker, policy)
    flagged = unchecked = 0
    bar = tqdm(total=len(paths), unit="img", desc="checking", file=sys.stderr,
               disable=True if args.no_progress else None, leave=False)
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start:start + args.batch_size]
        records = [read_generation(p) for p in chunk]
        results = checker.check(chunk, records)
        for path, result in zip(chunk, results):
            result.image["source"] = str(path)
            if args.write_record != "none" and result.checked:
                write_record(path, result, png=args.write_record in ("png", "both"),
                             sidecar=args.write_record in ("sidecar", "both"))
            unchecked += not result.checked
            flagged += reaches(result.verdict, args.fail_on)
            bar.clear()
            if args.json:
                print(result.dumps(), flush=True)
            else:
                _print_result(path, result, args.show)
        bar.update(len(chunk))
    bar.close()
    if not args.json:
        print(f"\n{len(paths)} image(s): {flagged} reached '{args.fail_on}', {unchecked} could not be checked")
    if unchecked:
        return EXIT_UNCHECKED
    return EXIT_FLAGGED if flagged else EXIT_OK


def _print_header(bundles, checker, policy) -> None:
    for b in bundles:
        warn, block = policy.thresholds(b.manifest.warn, b.manifest.block)
        scores = "exact cosine" if b.exact else "approximate (no re-rank vectors)"
        print(f"bundle {b.id} v{b.version}: {b.count:,} rows, {b.manifest.index_factory}, model "
              f"{checker.model_for(b)}; warn >= {warn:.3f}, block >= {block:.3f} ({scores})")
    print()


def _print_result(path: Path, result, show: int) -> None:
    score = "-" if result.max_score is None else f"{result.max_score:.4f}"
    print(f"{terminal_safe(str(path))}  {result.verdict.upper()}  max {score}")
    for n, m in enumerate(result.matches[:max(0, show)], 1):
        print(f"   {n}. {m.score:.4f} {m.verdict:<5} {terminal_safe(m.bundle_id)} row {m.row_id}  "
              f"{terminal_safe(m.url, 60)}  {terminal_safe(m.caption, 60)!r}")
    for w in result.warnings:
        print(f"   ! {terminal_safe(w)}")


def cmd_build(args) -> int:
    from .index_builder.images import build_from_images

    report = build_from_images(args.images, args.out, args.model, device=args.device, batch_size=args.batch_size,
                               bundle_id=args.bundle_id, bundle_version=args.bundle_version,
                               description=args.description, warn=args.warn, block=args.block,
                               overwrite=args.overwrite, progress=not args.no_progress)
    print(f"built {report.out}: {report.rows} rows in {report.seconds:.1f} s")
    for s in report.skipped:
        print(f"  skipped: {terminal_safe(s)}")
    return EXIT_OK


def cmd_info(args) -> int:
    from .core.bundle import Bundle

    bundle = Bundle.open(args.bundle)
    m = bundle.manifest
    if args.json:
        print(json.dumps(m.to_json(), indent=2))
        return EXIT_OK
    print(f"bundle      {m.bundle_id}  version {m.bundle_version}")
    if m.description:
        print(f"description {terminal_safe(m.description)}")
    print(f"model       {m.model}  ({m.dim}-d, {'L2-normalised' if m.normalized else 'raw'}, {m.metric})")
    print(f"rows        {m.count:,}")
    print(f"index       {m.index_factory}" + (f" (inverted lists on disk: {m.ivfdata_file})" if m.ivfdata_file else ""))
    params = ", ".join(f"{k}={v}" for k, v in m.search_params.items()) or "none (exhaustive)"
    print(f"search      {params}")
    print(f"scores      {'exact cosine' if m.exact else 'approximate (no re-rank vectors)'}")
    print(f"thresholds  warn >= {m.warn:.3f}, block >= {m.block:.3f}")
    print(f"built       {m.build.get('created', '?')} by {m.build.get('tool', '?')}")
    print("files")
    for name, size, _digest in bundle.files_table():
        print(f"  {name:<20} {size:>16,} bytes")
    return EXIT_OK


def cmd_verify(args) -> int:
    from .core.bundle import Bundle

    bundle = Bundle.open(args.bundle)
    problems = bundle.verify()
    if problems:
        for p in problems:
            print(f"FAILED {p}", file=sys.stderr)
        print(f"provenance-guard: error: bundle {bundle.path} is damaged; copy it again or rebuild it",
              file=sys.stderr)
        return EXIT_CONFIG
    print(f"OK {bundle.path}: {len(bundle.manifest.files)} files match their sha256, {bundle.count:,} rows")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
