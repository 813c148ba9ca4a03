"""The provenance-guard command: check images, build/inspect/verify bundles, run the demo.

Exit codes (check): 0 no image reached --fail-on; 1 at least one did; 2 usage or configuration error (bad
option, a missing input, bundle missing or broken, model not loadable or not the bundle's); 3 at least one
image could not be checked.
"""
from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from pathlib import Path
from collections.abc import Sequence

from . import __version__
from .core.config import DEFAULT_BATCH_SIZE, DEFAULT_BLOCK, DEFAULT_TOP_K, DEFAULT_WARN
from .core.errors import EXIT_CONFIG, EXIT_FLAGGED, EXIT_OK, EXIT_UNCHECKED, ConfigError, ProvenanceError
from .core.policy import fmt_threshold

DEFAULT_MODEL = "ViT-L-14/openai"
NO_WAIT_HELP = ("when another maintenance run holds the bundle, fail at once (exit 2, naming it) instead of "
                "waiting for it to finish")


def _float01(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a cosine such as 0.95") from None
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not a cosine; give a number between -1 and 1")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def terminal_safe(text: str | None, width: int = 0) -> str:
    """Strip control characters (captions come from the web) and shorten to width."""
    if not text:
        return ""
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in str(text))
    text = " ".join(text.split())
    if width and len(text) > width:
        text = text[: width - 1] + "…"
    return text


def add_verify_options(p: argparse.ArgumentParser, default: str) -> None:
    from .core.policy import VERIFY_MODES

    p.add_argument("--verify", choices=VERIFY_MODES, default=default,
                   help=f"compare candidates with the training image's pixels: confirm (a block found different "
                        f"on pixels becomes warn), escalate (a verified copy blocks), both, or off (default "
                        f"{default})")
    p.add_argument("--verify-from", type=_float01, metavar="SCORE",
                   help="verify candidates from this score (default: each bundle's warn threshold)")
    p.add_argument("--references", metavar="DIR", help="where a bundle's reference image folder is now, if it moved")
    p.add_argument("--fetch-references", action="store_true",
                   help="fetch the reference images of URL-only (LAION) bundles to verify them; this tells each "
                        "image's host that someone looked at it (off by default)")
    p.add_argument("--reference-cache", metavar="DIR",
                   help="where fetched references are kept (default ~/.cache/provenance-guard/references)")
    p.add_argument("--reference-cache-mb", type=float, default=512.0, help="size cap of that cache (default 512)")


def reference_options(args):
    from .core.references import ReferenceOptions

    return ReferenceOptions(root=args.references, fetch=args.fetch_references, cache_dir=args.reference_cache,
                            cache_bytes=int(args.reference_cache_mb * 2**20))


DESCRIPTION = ("Tells whether a generated image comes too close to a known training image: CLIP embeddings, "
               "a FAISS index of training images (a bundle), exact cosine scores, verification on pixels.")
EXIT_CODES = """exit codes:
  0  done; no image reached --fail-on (check), or the command succeeded
  1  check: at least one image reached --fail-on or failed --require-credentials/--sign; audit verify:
     the log is broken; credentials verify: an image is not valid (or not trusted, with --trust)
  2  usage or configuration: a bad option, a missing input, a bundle missing or damaged, a model that
     cannot be loaded or is not the bundle's (said in one line, before anything heavy is loaded)
  3  check: at least one image could not be checked (listed as 'unchecked')
130 interrupted (Ctrl-C)"""
# Help for options that repeat across commands (an option's own help, where it has one, wins).
COMMON_HELP = {
    "device": "where the model runs: auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps",
    "batch_size": "images per forward pass of the model",
    "no_progress": "no progress output (on a terminal a bar; elsewhere, as in CI logs, a line on stderr every "
                   "30 s or 10%%; $PROVENANCE_GUARD_PROGRESS_S sets the seconds)",
    "json": "print JSON instead of text",
    "bundle": "a bundle folder (made by 'provenance-guard index build')",
    "description": "a line saying what the bundle holds, kept in its manifest",
    "overwrite": "replace an existing bundle at --out (atomically: readers see the old one or the new one)",
    "out": "the folder to write",
    "model": "open_clip model spec (ARCH/TAG, ARCH//path/to/weights, local-dir:/path, hf-hub:org/repo)",
    "warn": "warn at this exact cosine or above",
    "block": "block at this exact cosine or above",
    "port": "port to listen on (0: any free port, printed at start)",
    "max_request_mb": "largest request body accepted, in MB (413 beyond it)",
    "log_level": "the server's log level: critical, error, warning, info, debug",
    "fail_mode": "an image that cannot be checked: open = 'unchecked', closed = 'block'",
    "a": "the first bundle",
    "b": "the second bundle",
    "file": "the audit log (JSON lines)",
    "text": "the prompt",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default shown, unless its help already says it; descriptions and epilogs as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def _finish_help(parser: argparse.ArgumentParser) -> None:
    """Give every parser the formatter, and every option without help the common one."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:  # argparse's documented way to walk a parser's arguments has no public name
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _finish_help(child)
        elif action.help is None and action.dest in COMMON_HELP:
            action.help = COMMON_HELP[action.dest]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="provenance-guard", description=DESCRIPTION, epilog=EXIT_CODES,
                                formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"provenance-guard {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="check images against one or more bundles", epilog=EXIT_CODES,
                       description="Check images against one or more bundles: a table (or JSON) of verdicts and "
                                   "matches; records, an HTML report and an audit log on request.")
    c.add_argument("images", nargs="+", help="image files or folders (png, jpg, jpeg, webp)")
    c.add_argument("--index", action="append", required=True, metavar="BUNDLE",
                   help="a bundle folder; repeat to check against several (matches merge by score)")
    c.add_argument("--model", help="load the bundle's model from another place (a local file or folder); "
                                   "default: the model in the bundle's manifest")
    c.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, mps")
    c.add_argument("--warn", type=_float01, help="warn at this exact cosine or above (default: the bundle's)")
    c.add_argument("--block", type=_float01, help="block at this exact cosine or above (default: the bundle's)")
    c.add_argument("--top-k", type=_positive, default=DEFAULT_TOP_K, help="matches per image")
    c.add_argument("--fail-on", choices=("warn", "block"), default="block",
                   help="exit 1 when an image reaches this verdict (default block)")
    c.add_argument("--fail-mode", choices=("open", "closed"), default="open",
                   help="an image that cannot be checked: open = 'unchecked', closed = 'block' (default open)")
    c.add_argument("--recursive", "-r", action="store_true", help="descend into folders")
    c.add_argument("--json", action="store_true", help="print one JSON object per image (schema v1) instead")
    c.add_argument("--write-record", choices=("none", "png", "sidecar", "both"), default="none",
                   help="write the result into the PNG 'provenance' chunk and/or IMAGE.provenance.json")
    c.add_argument("--show", type=int, default=3, help="matches listed per image in the table (default 3)")
    c.add_argument("--report", metavar="HTML", help="write a self-contained HTML report of the flagged images")
    c.add_argument("--report-all", action="store_true", help="list passing images in the report too")
    c.add_argument("--jsonl", metavar="FILE", help="write one result per line (schema v1) to FILE")
    c.add_argument("--audit-log", metavar="FILE",
                   help="append one line per check to this append-only log (default: $PROVENANCE_GUARD_AUDIT_LOG)")
    c.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE)
    c.add_argument("--no-progress", action="store_true")
    add_verify_options(c, default="confirm+escalate")
    c.add_argument("--views", choices=("whole", "multi"), default=None,
                   help="multi: query with the whole image, its four quarters and its centre (finds a training "
                        "image copied into part of a larger output; about 6x the embedding work); whole: one query "
                        "(default: multi when --verify is on, whole with --verify off)")
    cc = c.add_argument_group("Content Credentials (C2PA; needs 'provenance-guard[c2pa]')")
    cc.add_argument("--sign", action="store_true",
                    help="sign each image that does not reach --fail-on in place (atomically), with this check's "
                         "assertion; blocked images are never signed. A key that cannot be used stops the run "
                         "before anything is checked")
    cc.add_argument("--credentials", metavar="DIR",
                    help="folder with signer.pem and signer.key (default: $PROVENANCE_GUARD_CREDENTIALS); make one "
                         "with 'provenance-guard credentials init DIR'")
    cc.add_argument("--tsa-url", metavar="URL", help="an RFC 3161 timestamp authority for signatures (default: none)")
    cc.add_argument("--no-prompts-in-credentials", action="store_true",
                    help="leave prompt and negative prompt out of the signed generation assertion (privacy)")
    cc.add_argument("--require-credentials", action="store_true",
                    help="fail (exit 1) an image whose Content Credentials are absent, invalid, untrusted (with "
                         "--trust), carry no provenance-guard check, say block, or disagree with this check")
    cc.add_argument("--trust", metavar="ROOT.pem", help="the trust anchor(s) --require-credentials checks against")

    ix = sub.add_parser("index", help="build, inspect and verify bundles")
    isub = ix.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="build a bundle from a folder of images or from LAION-layout embeddings")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of reference images (recursive): an exact bundle")
    src.add_argument("--embeddings", help="folder or fsspec URL holding img_emb/ and metadata/ (LAION layout)")
    b.add_argument("--out", required=True, help="bundle folder to create")
    b.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"open_clip model spec that made (--embeddings) or makes (--images) the vectors "
                        f"(default {DEFAULT_MODEL}); checks refuse any other model")
    b.add_argument("--device", default="auto")
    b.add_argument("--id", dest="bundle_id", help="bundle id (default: the folder name)")
    b.add_argument("--bundle-version", help="bundle version (default: the build time, UTC)")
    b.add_argument("--description", default="")
    b.add_argument("--warn", type=_float01, default=DEFAULT_WARN)
    b.add_argument("--block", type=_float01, default=DEFAULT_BLOCK)
    b.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE)
    b.add_argument("--overwrite", action="store_true", help="replace an existing bundle (atomically)")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--max-memory", default="4G",
                   help="memory the index may take when the bundle is searched: it chooses the index type "
                        "(--embeddings). It does not bound the build process, whose peak is reported at the end "
                        "(with a note when it passes this budget)")
    b.add_argument("--index-key", help="FAISS factory string instead of the automatic choice (--embeddings)")
    b.add_argument("--rerank", choices=("float16", "int8", "none"), default="float16",
                   help="re-rank vectors stored for exact scores (--embeddings; default float16)")
    b.add_argument("--max-rerank-memory", help="budget for re-rank vectors: float16, else int8, else none")
    b.add_argument("--target-recall", type=_float01, default=0.999,
                   help="near-duplicate recall@1 to tune nprobe for (--embeddings; default 0.999)")
    b.add_argument("--target-latency-ms", type=float, help="or: the largest nprobe within this median latency")
    b.add_argument("--ray-address", help="spread the work over Ray: local, auto or ray://head:10001")
    b.add_argument("--no-wait", action="store_true", help=NO_WAIT_HELP)

    e = isub.add_parser("embed", help="embed images (webdataset tars or folders) into LAION-layout shards")
    e.add_argument("inputs", nargs="+", help="img2dataset .tar shards, folders of them, or folders of images")
    e.add_argument("--out", required=True, help="folder to write img_emb/ and metadata/ into (resumable)")
    e.add_argument("--model", default=DEFAULT_MODEL)
    e.add_argument("--device", default="auto")
    e.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE)
    e.add_argument("--shard-size", type=_positive, default=10_000, help="images per shard for folder inputs")
    e.add_argument("--ray-address", help="embed with Ray Data actors: local, auto or ray://head:10001")
    e.add_argument("--no-progress", action="store_true")

    r = isub.add_parser("remove", help="take rows out of a bundle (opt-outs, takedowns) without a rebuild")
    r.add_argument("bundle")
    rsrc = r.add_mutually_exclusive_group(required=True)
    rsrc.add_argument("--ids", help="file of row ids, one per line")
    rsrc.add_argument("--urls", help="file of urls, one per line")
    rsrc.add_argument("--hashes", help="file of hashes, one per line (matched against hash/sha256/md5 columns)")
    r.add_argument("--reason", default="", help="recorded in the manifest's history")
    r.add_argument("--no-wait", action="store_true", help=NO_WAIT_HELP)

    a = isub.add_parser("append", help="add rows from new embedding shards, reusing the trained quantizer")
    a.add_argument("bundle")
    a.add_argument("--embeddings", required=True, help="LAION-layout folder of the new rows (same model)")
    a.add_argument("--model", help="the model that made them (refused unless it is the bundle's)")
    a.add_argument("--no-wait", action="store_true", help=NO_WAIT_HELP)
    a.add_argument("--no-progress", action="store_true")

    mg = isub.add_parser("merge", help="join two bundles built separately into a new one")
    mg.add_argument("a")
    mg.add_argument("b")
    mg.add_argument("--out", required=True)
    mg.add_argument("--overwrite", action="store_true")
    mg.add_argument("--no-wait", action="store_true", help=NO_WAIT_HELP)

    cal = isub.add_parser("calibrate", help="measure warn/block thresholds on the bundle's own references")
    cal.add_argument("bundle")
    cal.add_argument("--negatives", metavar="DIR", help="images known not to be copies of anything in the bundle")
    cal.add_argument("--positives", metavar="DIR",
                     help="known copy pairs NAME.gen.png + NAME.ref.png (for a bundle without reference pixels)")
    cal.add_argument("--target-fpr", type=float, default=0.001, help="false-positive rate to set block at "
                                                                     "(default 0.001; warn at ten times it)")
    cal.add_argument("--sample", type=_positive, default=50, help="references to edit and measure (default 50)")
    cal.add_argument("--references", metavar="DIR", help="where the bundle's image folder is now, if it moved")
    cal.add_argument("--plot", metavar="PNG", help="where to write the score plot (default: BUNDLE.calibration.png "
                                                   "beside the bundle)")
    cal.add_argument("--views", choices=("whole", "multi"), default="multi",
                     help="the queries the thresholds are measured for, as 'check --views' makes them: multi (the "
                          "whole image, its quarters and its centre; check's default with --verify on, and what "
                          "the hosts' views setting 'multi' runs) or whole (one query: the hosts' default and "
                          "check --verify off). Multi-view queries give wrong rows more chances, so their "
                          "thresholds sit higher (default: multi)")
    cal.add_argument("--device", default="auto")
    cal.add_argument("--no-wait", action="store_true", help=NO_WAIT_HELP)

    cap = isub.add_parser("captions", help="add the caption index (for the prompt check) to a bundle built without one")
    cap.add_argument("bundle")
    cap.add_argument("--no-wait", action="store_true", help=NO_WAIT_HELP)
    cap.add_argument("--no-progress", action="store_true")

    fpr = isub.add_parser("fingerprint", help="store the model fingerprint a bundle built from embedding shards lacks "
                                              "(run where the weights are)")
    fpr.add_argument("bundle")
    fpr.add_argument("--model", help="where the bundle's model weights are (default: the bundle's own model spec)")
    fpr.add_argument("--device", default="auto")
    fpr.add_argument("--no-wait", action="store_true", help="fail at once when another change holds the bundle")

    i = isub.add_parser("info", help="show what a bundle holds")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true", help="print the manifest")
    v = isub.add_parser("verify", help="open a bundle and check the sha256 of every file")
    v.add_argument("bundle")

    pl = isub.add_parser("pull", help="download a published bundle into models/provenance/ (resumable, every file's "
                                      "sha256 verified, installed in one step)", epilog=EXIT_CODES,
                         description="Download a bundle published with 'index publish' from plain HTTP(S) hosting or "
                                     "a Hugging Face dataset. Files are verified one by one against the publish "
                                     "file's sha256; an interrupted pull resumes when run again; the bundle appears "
                                     "at DIR/NAME only once it is complete and opens.")
    pl.add_argument("url", help="the published folder (https://host/path/), its provenance-bundle.json, or "
                                "hf://datasets/OWNER/NAME[@REVISION][/SUBDIR] (or https://huggingface.co/datasets/"
                                "OWNER/NAME); any address you name is allowed, private ones included")
    pl.add_argument("--to", metavar="DIR", default="models/provenance",
                    help="folder to install into, as DIR/NAME (default: models/provenance under the current folder)")
    pl.add_argument("--name", help="install as DIR/NAME (default: the name in the publish file)")
    pl.add_argument("--replace", action="store_true",
                    help="replace a different bundle already at DIR/NAME (atomically: readers see the old one or "
                         "the new one)")
    pl.add_argument("--no-progress", action="store_true",
                    help="no progress bar, and no progress lines (printed every 10 s or 10%% when not on a terminal)")
    pl.add_argument("--no-wait", action="store_true", help=NO_WAIT_HELP)

    pb = isub.add_parser("publish", help="write DIR/provenance-bundle.json (every file's size and sha256) so a static "
                                         "host or a Hugging Face dataset can serve the bundle to 'index pull'",
                         epilog=EXIT_CODES,
                         description="Check a bundle folder against its manifest and write the publish file 'index "
                                     "pull' reads, then print how to serve the folder.")
    pb.add_argument("bundle", metavar="DIR", help="the bundle folder to publish")
    pb.add_argument("--name", help="the folder name pulls install it as (default: DIR's own name)")
    pb.add_argument("--no-wait", action="store_true", help=NO_WAIT_HELP)

    sv = sub.add_parser("serve", help="serve bundles over HTTP: clip-retrieval's API with exact scores, /v1/check")
    sv.add_argument("--index", action="append", required=True, metavar="NAME=BUNDLE",
                    help="a bundle to serve under NAME (repeat for several; NAME defaults to the folder name)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=1234)
    sv.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN'; visible in ps: prefer "
                                                   "--token-file or $PROVENANCE_GUARD_TOKEN; required beyond loopback")
    sv.add_argument("--token-file", help="read the token from this file (first line)")
    sv.add_argument("--allow-image-url", action="store_true",
                    help="let /knn-service fetch image_url queries (public addresses only; size and time capped)")
    sv.add_argument("--allow-image-url-loopback", action="store_true", help=argparse.SUPPRESS)
    sv.add_argument("--max-decode-mb", type=float, default=2048.0,
                    help="decoded image memory all requests may hold at once; beyond it requests wait, then get "
                         "503 with Retry-After (default 2048)")
    sv.add_argument("--openapi", action="store_true", help="serve the OpenAPI schema at /openapi.json")
    sv.add_argument("--workers", type=_positive, default=1,
                    help="server processes on the one port, run by uvicorn's process manager (default 1; one "
                         "per CPU core serves the most requests): each maps the bundles, shared through the "
                         "page cache, and loads its own model for image checks. SIGHUP restarts them one by "
                         "one, SIGTTIN/SIGTTOU add or remove one")
    sv.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                    help="close a connection that has not sent a request's headers within S seconds of opening "
                         "or of its last answer (default 10)")
    sv.add_argument("--body-timeout", type=float, default=60.0, metavar="S",
                    help="a request body must arrive within S seconds, else 408 (default 60)")
    sv.add_argument("--max-connections", type=_positive, default=1000,
                    help="open connections per worker process beyond which requests get 503 (default 1000)")
    add_verify_options(sv, default="confirm+escalate")
    sv.add_argument("--max-request-mb", type=float, default=20.0)
    sv.add_argument("--max-images", type=_positive, default=64, help="images per /v1/check request")
    sv.add_argument("--max-batch", type=_positive, default=32, help="images per forward pass across requests")
    sv.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    sv.add_argument("--device", default="auto", help="where the model runs: auto (a CUDA GPU when there is one), "
                                                       "cpu, cuda or cuda:N")
    sv.add_argument("--model", help="load the bundles' model from another place (a local file or folder holding "
                                    "the same weights; checked against each bundle's fingerprint at start). "
                                    "Default: each bundle's own model spec")
    sv.add_argument("--embeddings-only", action="store_true",
                    help="load no model: serve embedding queries only, refuse image and text queries. Without "
                         "it the model is loaded before the port listens, and a model that cannot load stops "
                         "the server (exit 2)")
    sv.add_argument("--audit-log", help="append one line per checked image (default: $PROVENANCE_GUARD_AUDIT_LOG)")
    sv.add_argument("--warn", type=_float01)
    sv.add_argument("--block", type=_float01)
    sv.add_argument("--fail-mode", choices=("open", "closed"), default="open")
    sv.add_argument("--log-level", default="info")

    pr = sub.add_parser("prompt", help="before generating: is this prompt a training caption, of duplicated images?")
    pr.add_argument("text", help="the prompt")
    pr.add_argument("--index", action="append", required=True, metavar="BUNDLE", help="a bundle with a caption index")
    pr.add_argument("--json", action="store_true")

    au = sub.add_parser("audit", help="verify an audit log")
    ausub = au.add_subparsers(dest="audit_command", required=True)
    av = ausub.add_parser("verify", help="check the chain of an audit log; exit 1 at the first broken line")
    av.add_argument("file")
    av.add_argument("--allow-unchained", action="store_true",
                    help="accept a log with no chain at all (written before chaining); a stripped chain still fails")
    av.add_argument("--signer", metavar="SIGNER.pem",
                    help="the studio's signer.pem: every entry must carry a valid signature of its key (entries "
                         "written before signing began pass only with --allow-unchained)")
    av.add_argument("--expect-last", metavar="SHA256",
                    help="the last line's sha256 kept elsewhere (printed by an earlier verify): catches an edited "
                         "last line and lines cut off or added at the end")

    rc = sub.add_parser("record", help="read the provenance record stored in an image")
    rcsub = rc.add_subparsers(dest="record_command", required=True)
    rs = rcsub.add_parser("show", help="print the record an image carries (its PNG chunk or .provenance.json "
                                       "sidecar) and which host wrote it; exit 2 when an image has none")
    rs.add_argument("images", nargs="+", metavar="IMAGE")
    rs.add_argument("--json", action="store_true", help="print each record as stored (one JSON object a line)")

    cr = sub.add_parser("credentials", help="Content Credentials (C2PA): make signing keys, verify signed images")
    crsub = cr.add_subparsers(dest="credentials_command", required=True, metavar="COMMAND")
    ci = crsub.add_parser("init", help="make a local studio root (root.pem) and a signing key (signer.pem, signer.key)")
    ci.add_argument("folder", help="where to write root.pem, signer.pem and signer.key (0600)")
    ci.add_argument("--organization", default="provenance-guard studio", help="the name in the certificates")
    ci.add_argument("--days", type=_positive, default=730, help="how long the signing certificate is valid")
    ci.add_argument("--overwrite", action="store_true", help="replace keys already in the folder")
    cv = crsub.add_parser("verify", help="check the Content Credentials of images", epilog=EXIT_CODES)
    cv.add_argument("images", nargs="+", help="image files (png, jpg, jpeg, webp)")
    cv.add_argument("--trust", metavar="ROOT.pem", help="trust anchor(s): an image is trusted only when its signer "
                                                        "chains to one of them")
    cv.add_argument("--json", action="store_true", help="print one JSON object per image")

    d = sub.add_parser("demo", help="the main job on built-in samples: build a bundle, check, write records")
    d.add_argument("--out", default="demo-out", help="working folder (default ./demo-out)")
    d.add_argument("--model", help="open_clip model spec; default: a tiny CLIP built locally (no download)")
    d.add_argument("--device", default="auto")
    _finish_help(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check":
            return cmd_check(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "audit":
            return cmd_audit_verify(args)
        if args.command == "prompt":
            return cmd_prompt(args)
        if args.command == "record":
            return cmd_record_show(args)
        if args.command == "credentials":
            return cmd_credentials_init(args) if args.credentials_command == "init" else cmd_credentials_verify(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(Path(args.out), model=args.model, device=args.device)
        return {"build": cmd_build, "info": cmd_info, "verify": cmd_verify, "embed": cmd_embed,
                "remove": cmd_remove, "append": cmd_append, "merge": cmd_merge,
                "calibrate": cmd_calibrate, "captions": cmd_captions,
                "fingerprint": cmd_fingerprint, "pull": cmd_pull, "publish": cmd_publish}[args.index_command](args)
    except ProvenanceError as exc:
        print(f"provenance-guard: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("provenance-guard: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def collect_inputs(inputs: Sequence[str], recursive: bool) -> list[tuple[Path, str | None]]:
    """(path, problem) for every image to check: folders expanded; an input that is not a checkable image (a
    missing path, a .gif, a folder without images) comes with the problem, to be reported as that input's
    result, so one bad input never stops the others."""
    from .core.images import IMAGE_SUFFIXES, find_images

    out: list[tuple[Path, str | None]] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = find_images(p, recursive=recursive)
            if not found:
                out.append((p, f"{p}: a folder without .png, .jpg, .jpeg or .webp files"
                               + ("" if recursive else " (add --recursive to descend into sub-folders)")))
            out.extend((f, None) for f in found)
        elif p.is_file():
            out.append((p, None if p.suffix.lower() in IMAGE_SUFFIXES else
                        f"{p}: not a .png, .jpg, .jpeg or .webp file; convert it to one of those to check it"))
        else:
            out.append((p, f"{p}: no such file or folder"))
    return out


def _file_sha256(path: Path) -> str | None:
    from .core.bundle import sha256_file

    try:
        return sha256_file(path)
    except OSError:
        return None


def cmd_check(args) -> int:  # noqa: C901 - the gate's options, each applied where the run reaches it
    from .core.progress import heartbeat, progress

    from .core import html_report
    from .core.audit import AuditLog, audit_entry, from_env
    from .core.check import Checker, failed_result, mark_failed
    from .core.policy import Policy, reaches
    from .core.record import read_generation, write_record

    inputs = collect_inputs(args.images, args.recursive)
    # What was named on the command line and cannot be checked is a usage mistake: said before any model loads.
    named = {str(Path(raw).expanduser()) for raw in args.images}
    mistakes = [problem for path, problem in inputs if problem is not None and str(path) in named]
    if mistakes:
        more = f" (and {len(mistakes) - 3} more)" if len(mistakes) > 3 else ""
        raise ConfigError("; ".join(terminal_safe(m, 200) for m in mistakes[:3]) + more)
    policy = Policy(warn=args.warn, block=args.block, fail_mode=args.fail_mode, top_k=args.top_k,
                    verify=args.verify, verify_from=args.verify_from,
                    views=args.views or ("whole" if args.verify == "off" else "multi"))
    ref_options = reference_options(args)
    signing, trust = _credentials_setup(args)
    audit = AuditLog(args.audit_log, _audit_signer(args)) if args.audit_log else from_env()
    checker = Checker(args.index, model=args.model, device=args.device, policy=policy, batch_size=args.batch_size,
                      references=ref_options)
    bundles = checker.open()
    with heartbeat("loading the model", enabled=not args.no_progress):
        checker.embedders()
    jsonl = open(args.jsonl, "w", encoding="utf-8") if args.jsonl else None  # noqa: SIM115 - closed after the run
    by_id = {b.id: b for b in bundles if hasattr(b, "manifest")}
    signed_bundles = [{"id": b.id, "version": b.version, **({"manifest_sha256": _file_sha256(b.path / "manifest.json")}
                                                            if hasattr(b, "path") else {})} for b in bundles
                      if hasattr(b, "manifest")] or None
    report_rows: list = []
    if not args.json:
        _print_header(bundles, checker, policy)
    flagged = unchecked = 0
    credential_lines: dict[str, str] = {}
    credential_failures: list[str] = []
    bar = progress(len(inputs), "checking", "img", enabled=not args.no_progress, leave=False)

    def per_image(path: Path, result):
        """The per-image steps after the check; any failure here is that image's failure (fail mode)."""
        result.image["source"] = str(path)
        try:
            digest = _file_sha256(path)
            if digest:
                result.image["sha256"] = digest
            png = args.write_record in ("png", "both")
            if args.require_credentials or signing is not None or (png and result.checked):
                png = _credentials_before(path, result, args, trust, png, credential_lines, credential_failures)
            if args.write_record != "none" and result.checked:
                write_record(path, result, png=png, sidecar=args.write_record in ("sidecar", "both") or
                             (args.write_record == "png" and not png))
        except Exception as exc:  # noqa: BLE001 - one image's failure is reported as that image's result
            mark_failed(result, policy, f"{path}: the record could not be written ({type(exc).__name__}: {exc})")
        if signing is not None:  # the last write of the file
            _sign_after(path, result, args, signing, signed_bundles, credential_lines, credential_failures)
        return result

    try:
        for start in range(0, len(inputs), args.batch_size):
            chunk = inputs[start:start + args.batch_size]
            good = [path for path, problem in chunk if problem is None]
            records = []
            for path in good:
                try:
                    records.append(read_generation(path))
                except Exception:  # noqa: BLE001 - unreadable parameters leave the record empty, never the run
                    records.append(None)
            try:
                checked = iter(checker.check(good, records))
            except Exception as exc:  # noqa: BLE001 - an unexpected failure of one batch fails its images only
                checked = iter([failed_result(policy, f"internal error: {type(exc).__name__}: {exc}", rec)
                                for rec in records])
            entries = []
            for path, problem in chunk:
                result = failed_result(policy, problem) if problem else next(checked)
                result = per_image(path, result)
                unchecked += not result.checked
                flagged += reaches(result.verdict, args.fail_on)
                entries.append(audit_entry(result))
                if jsonl:
                    jsonl.write(result.dumps() + "\n")
                if args.report and (args.report_all or result.verdict != "pass"):
                    refs = {(m.bundle_id, m.row_id): ref for m in result.matches[:html_report.TOP]
                            if m.bundle_id in by_id and html_report.at_or_above_warn(result, m)
                            for ref in [html_report.local_reference(by_id[m.bundle_id], m, ref_options)] if ref}
                    report_rows.append(html_report.ReportRow(result, path if not problem else None, refs,
                                                             credential_lines.get(str(path))))
                elif args.report:
                    report_rows.append(html_report.ReportRow(result, None, credentials=credential_lines.get(str(path))))
                bar.clear()
                if args.json:
                    print(result.dumps(), flush=True)
                else:
                    _print_result(path, result, args.show)
            if audit:
                audit.append(entries)
            bar.update(len(chunk))
    finally:
        bar.close()
        if jsonl:
            jsonl.close()
    if args.report:
        html_report.write(args.report, report_rows, len(inputs), include_passing=args.report_all)
    if not args.json:
        print(f"\n{len(inputs)} image(s): {flagged} reached '{args.fail_on}', {unchecked} could not be checked"
              + (f", {len(credential_failures)} failed on Content Credentials" if credential_failures else "")
              + (f"; report: {args.report}" if args.report else ""))
    if unchecked:
        return EXIT_UNCHECKED
    return EXIT_FLAGGED if flagged or credential_failures else EXIT_OK


def _audit_signer(args):
    """The studio key that signs --audit-log's entries: --credentials or $PROVENANCE_GUARD_CREDENTIALS, if any."""
    from .core.audit import AuditSigner
    from .core.credentials import credentials_folder

    folder = credentials_folder(args.credentials)
    return AuditSigner.from_folder(folder) if folder else None


def _credentials_setup(args):
    """(credentials to sign with or None, trust anchors PEM or None), checked before anything heavy loads: a
    key that cannot sign stops the run (nothing is left unsigned that was to be signed)."""
    from .core import credentials as cr

    if not (args.sign or args.require_credentials):
        if args.trust:
            raise ConfigError("--trust needs --require-credentials (it names the roots credentials are checked "
                              "against)")
        return None, None
    trust = _trust_anchors(args.trust)
    signing = None
    if args.sign:
        folder = cr.credentials_folder(args.credentials)
        if folder is None:
            raise ConfigError(f"--sign needs the signing key: --credentials DIR or ${cr.ENV_CREDENTIALS} (make one "
                              f"with 'provenance-guard credentials init DIR')")
        signing = cr.load_credentials(folder, args.tsa_url)
    return signing, trust


def _credentials_before(path: Path, result, args, trust, png: bool, lines: dict, failures: list) -> bool:
    """--require-credentials: read the image's manifest before anything is written to it. Returns whether the
    record may still go into the PNG: not into a file whose credentials it would break, unless it is signed
    again afterwards."""
    from .core import credentials as cr

    status = None
    if args.require_credentials or (png and not args.sign and cr.unavailable() is None):
        status = cr.verify_file(path, trust)
        result.image["credentials"] = status.to_json()
        lines[str(path)] = cr.describe(status)
    if args.require_credentials and result.checked:
        problem = cr.credential_problem(status, result.verdict, require_trust=trust is not None)
        if problem:
            result.warnings.append(f"Content Credentials: {problem}")
            failures.append(str(path))
    if png and status is not None and status.state != "absent" and not args.sign:
        result.warnings.append("the record went into the sidecar: a PNG chunk would break the image's Content "
                               "Credentials")
        return False
    return png


def _sign_after(path: Path, result, args, signing, bundles, lines: dict, failures: list) -> None:
    """--sign: the image's manifest with this check's assertion, unless it reached --fail-on or was not
    checked (a blocked image is never signed as passed)."""
    from . import __version__
    from .core import credentials as cr
    from .core.policy import reaches

    if not result.checked or reaches(result.verdict, args.fail_on):
        lines[str(path)] = f"not signed ({result.verdict})"
        return
    try:
        cr.sign_file(path, signing, cr.manifest_for(result, f"provenance-guard check {__version__}", path.name,
                                                    include_prompts=not args.no_prompts_in_credentials,
                                                    bundles=bundles))
    except ProvenanceError as exc:
        result.warnings.append(f"Content Credentials: {exc}")
        failures.append(str(path))
        lines[str(path)] = f"signing failed: {exc}"
        return
    digest = _file_sha256(path)
    if digest:
        result.image["sha256"] = digest  # the signed file's
    result.image["credentials"] = {"state": "signed", "signer": signing.subject}
    lines[str(path)] = f"signed by {signing.subject}"


def _trust_anchors(path: str | None) -> bytes | None:
    """--trust's PEM roots (None without it), after checking that credentials can be read here at all."""
    from .core import credentials as cr

    reason = cr.unavailable()
    if reason:
        raise ConfigError(reason)
    if not path:
        return None
    try:
        trust = Path(path).expanduser().read_bytes()[: cr.MAX_PEM_BYTES]
    except OSError as exc:
        raise ConfigError(f"--trust {path}: {exc.strerror}; give the root.pem verifiers trust") from None
    if b"-----BEGIN CERTIFICATE" not in trust:
        raise ConfigError(f"--trust {path} holds no PEM certificate; give the studio's root.pem")
    return trust


def cmd_credentials_init(args) -> int:
    from .core.credentials import init_credentials

    rep = init_credentials(args.folder, args.organization, args.days, args.overwrite)
    print(f"wrote {rep.root} (give this to verifiers: --trust {rep.root}), {rep.signer} and {rep.key} (keep it "
          f"secret; mode 0600)\nsigner: {rep.subject}\nsign with: provenance-guard check IMAGES --index BUNDLE "
          f"--sign --credentials {rep.folder}")
    return EXIT_OK


def cmd_credentials_verify(args) -> int:
    from .core import credentials as cr

    trust = _trust_anchors(args.trust)
    bad = 0
    for raw in args.images:
        status = cr.verify_file(Path(raw).expanduser(), trust)
        ok = status.state == "trusted" if trust is not None else status.ok
        bad += not ok
        if args.json:
            print(json.dumps(status.to_json(), ensure_ascii=False), flush=True)
        else:
            print(f"{terminal_safe(raw)}  {terminal_safe(cr.describe(status), 400)}", flush=True)
    return EXIT_FLAGGED if bad else EXIT_OK


def _print_header(bundles, checker, policy) -> None:
    for r in checker.remote:
        print(f"remote index {r.url} (checked through the index server)")
    for b in bundles:
        warn, block = policy.thresholds(b.manifest.warn, b.manifest.block)
        scores = "exact cosine" if b.exact else "approximate (no re-rank vectors)"
        used = checker.model_for(b)
        model = b.model if used == b.model else f"{b.model}, checked with {used}"
        fp = "" if (b.manifest.build or {}).get("model_fingerprint") else " (no model fingerprint: the weights are known by name only)"
        print(f"bundle {b.id} v{b.version}: {b.count:,} rows, {b.manifest.index_factory}, model "
              f"{model}{fp}; warn >= {fmt_threshold(warn)}, block >= {fmt_threshold(block)} ({scores})")
    print()


def _print_result(path: Path, result, show: int) -> None:
    score = "-" if result.max_score is None else f"{result.max_score:.4f}"
    print(f"{terminal_safe(str(path))}  {result.verdict.upper()}  max {score}")
    for n, m in enumerate(result.matches[:max(0, show)], 1):
        print(f"   {n}. {m.score:.4f} {m.verdict:<5} {terminal_safe(m.bundle_id)} row {m.row_id}  "
              f"{terminal_safe(m.url, 60)}  {terminal_safe(m.caption, 60)!r}")
    for w in result.warnings:
        print(f"   ! {terminal_safe(w)}")
    sys.stdout.flush()  # a CI log shows each result as it comes, not a buffer's worth at the end


def cmd_build(args) -> int:
    if args.embeddings:
        from .index_builder.build import BuildOptions, build_from_embeddings
        from .index_builder.choose import parse_size

        opts = BuildOptions(
            model=args.model, max_memory=parse_size(args.max_memory), index_key=args.index_key,
            rerank=None if args.rerank == "none" else args.rerank,
            max_rerank_memory=parse_size(args.max_rerank_memory) if args.max_rerank_memory else None,
            target_recall=args.target_recall, target_latency_ms=args.target_latency_ms, bundle_id=args.bundle_id,
            bundle_version=args.bundle_version, description=args.description, warn=args.warn, block=args.block,
            overwrite=args.overwrite, ray_address=args.ray_address, progress=not args.no_progress,
            wait=not args.no_wait)
        report = build_from_embeddings(args.embeddings, args.out, opts)
        for line in report.lines():
            print(line)
        return EXIT_OK
    from .index_builder.images import build_from_images

    report = build_from_images(args.images, args.out, args.model, device=args.device, batch_size=args.batch_size,
                               bundle_id=args.bundle_id, bundle_version=args.bundle_version,
                               description=args.description, warn=args.warn, block=args.block,
                               overwrite=args.overwrite, progress=not args.no_progress, wait=not args.no_wait)
    print(f"built {report.out}: {report.rows} rows in {report.seconds:.1f} s")
    if report.text.get("repaired") or report.text.get("truncated"):
        print(f"  captions: {report.text.get('repaired', 0)} repaired (invalid UTF-8, NUL or BOM), "
              f"{report.text.get('truncated', 0)} cut at 4,096 characters")
    for s in report.skipped:
        print(f"  skipped: {terminal_safe(s)}")
    return EXIT_OK


def cmd_embed(args) -> int:
    from .index_builder.embed_images import embed_to_shards

    report = embed_to_shards(args.inputs, args.out, args.model, device=args.device, batch_size=args.batch_size,
                             shard_size=args.shard_size, ray_address=args.ray_address, progress=not args.no_progress)
    print(f"wrote {report.shards} shards ({report.rows:,} rows) to {report.out}"
          + (f"; {report.resumed} were already done" if report.resumed else ""))
    for s in report.skipped:
        print(f"  skipped: {terminal_safe(s)}")
    print(f"next: provenance-guard index build --embeddings {report.out} --model {args.model} --out BUNDLE")
    return EXIT_OK


def _lines(path: str) -> list[str]:
    try:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from exc


def cmd_remove(args) -> int:
    from .index_builder.maintain import remove_rows

    if args.ids:
        try:
            ids = [int(x) for x in _lines(args.ids)]
        except ValueError as exc:
            raise ConfigError(f"{args.ids}: every line must be a row id (a whole number): {exc}") from exc
        report = remove_rows(args.bundle, ids=ids, reason=args.reason, wait=not args.no_wait)
    elif args.urls:
        report = remove_rows(args.bundle, urls=_lines(args.urls), reason=args.reason, wait=not args.no_wait)
    else:
        report = remove_rows(args.bundle, hashes=_lines(args.hashes), reason=args.reason, wait=not args.no_wait)
    print(f"removed {report.changed} rows from {report.out}: version {report.version}, {report.rows:,} rows remain"
          + (f"; {report.note}" if report.note else ""))
    return EXIT_OK


def cmd_append(args) -> int:
    from .index_builder.maintain import append_rows

    report = append_rows(args.bundle, args.embeddings, args.model, wait=not args.no_wait,
                         progress=not args.no_progress)
    print(f"appended {report.changed:,} rows to {report.out}: version {report.version}, {report.rows:,} rows")
    return EXIT_OK


def cmd_merge(args) -> int:
    from .index_builder.maintain import merge_bundles

    report = merge_bundles(args.a, args.b, args.out, overwrite=args.overwrite, wait=not args.no_wait)
    print(f"merged into {report.out}: {report.rows:,} rows, version {report.version} ({report.note})")
    return EXIT_OK


def cmd_prompt(args) -> int:
    """The caption check: exit 1 when the prompt is the caption of near-duplicate training images."""
    from .core.bundle import Bundle
    from .core.captions import lookup, normalise

    found_any = flagged = False
    out = []
    for path in args.index:
        bundle = Bundle.open(path)
        match = lookup(bundle, args.text)
        if match is None:
            out.append({"bundle": bundle.id, "caption_index": False})
            if not args.json:
                print(f"{terminal_safe(bundle.id)}: no caption index (built before there was one); add it with "
                      f"'provenance-guard index captions {terminal_safe(str(path))}'")
            continue
        found_any = True
        flagged = flagged or match.near_duplicates > 0
        out.append(match.to_json())
        if not args.json:
            print(f"{terminal_safe(bundle.id)}: {match.rows} row(s) carry this caption; {match.near_duplicates} of "
                  f"them show near-duplicate images of one another" +
                  (f" (rows {', '.join(map(str, match.examples))})" if match.examples else ""))
    if args.json:
        print(json.dumps({"prompt": args.text, "normalised": normalise(args.text), "bundles": out}))
    elif found_any and flagged:
        print("this prompt is the training caption of duplicated images, which diffusion models tend to "
              "memorize: expect copies; change the wording")
    return EXIT_FLAGGED if flagged else EXIT_OK


def cmd_captions(args) -> int:
    from .index_builder.maintain import add_caption_index

    report = add_caption_index(args.bundle, wait=not args.no_wait, progress=not args.no_progress)
    print(f"caption index written to {report.out}: version {report.version}")
    return EXIT_OK


def cmd_calibrate(args) -> int:
    from .index_builder.calibrate import calibrate

    report = calibrate(args.bundle, negatives=args.negatives, positives=args.positives, target_fpr=args.target_fpr,
                       sample=args.sample, references=args.references, device=args.device, plot=args.plot,
                       wait=not args.no_wait, views=args.views)
    for line in report.lines():
        print(terminal_safe(line))
    return EXIT_OK


def cmd_serve(args) -> int:
    try:
        import prometheus_client  # noqa: F401
        import threadpoolctl  # noqa: F401
        import uvicorn  # noqa: F401

        from .index_server.processes import serve
    except ModuleNotFoundError as exc:
        raise ConfigError(f"the index server needs {exc.name}, which is not installed: pip install "
                          f"'provenance-guard[server]' (or, in a clone, pip install '.[server]')") from exc
    config = server_config(args)
    print(f"serving {', '.join(f'{n}={p}' for n, p in config.indices.items())} on http://{args.host}:{args.port}"
          + (" (token required)" if config.token else "")
          + (f", {config.workers} worker processes" if config.workers > 1 else ""), file=sys.stderr, flush=True)
    serve(config, args.host, args.port, log_level=args.log_level)
    return EXIT_OK


def server_config_from_argv(argv: Sequence[str]):
    """serve's arguments (as in $PROVENANCE_GUARD_SERVE_ARGS, for gunicorn's workers) -> ServerConfig."""
    return server_config(build_parser().parse_args(["serve", *argv]))


def server_config(args):
    """The ServerConfig of serve's parsed arguments."""
    import os

    from .index_server.config import ServerConfig

    indices = {}
    for item in args.index:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        if not name or name in indices:
            raise ConfigError(f"--index {item!r}: give NAME=BUNDLE with a unique NAME")
        indices[name] = path
    token = args.token or os.environ.get("PROVENANCE_GUARD_TOKEN")
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, UnicodeDecodeError, IndexError) as exc:
            raise ConfigError(f"--token-file {args.token_file}: cannot read a token from it ({exc}); put the token "
                              f"on its first line") from exc
        if not token:
            raise ConfigError(f"--token-file {args.token_file}: its first line is empty; put the token there")
    for option, seconds in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout)):
        if not 0 < seconds <= 3600:
            raise ConfigError(f"{option} {seconds:g}: give seconds above 0, at most 3600")
    return ServerConfig(indices=indices, token=token, allow_image_url=args.allow_image_url,
                        allow_loopback_fetch=args.allow_image_url_loopback, openapi=args.openapi,
                        max_decode_memory=int(args.max_decode_mb * 2**20),
                        max_request_bytes=int(args.max_request_mb * 2**20),
                        max_images_per_request=args.max_images, max_batch=args.max_batch,
                        batch_wait_ms=args.batch_wait_ms, device=args.device,
                        audit_log=args.audit_log or os.environ.get("PROVENANCE_GUARD_AUDIT_LOG"),
                        warn=args.warn, block=args.block, fail_mode=args.fail_mode, verify=args.verify,
                        verify_from=args.verify_from, references=reference_options(args),
                        workers=args.workers, model=args.model, embeddings_only=args.embeddings_only,
                        header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                        max_connections=args.max_connections)


def cmd_fingerprint(args) -> int:
    """Embed the probe images with the bundle's model and store the fingerprint (a new manifest version)."""
    from .core.bundle import Bundle
    from .core.check import model_override_problem
    from .core.embed import get_embedder
    from .core.fingerprint import KEY, fingerprint, mismatch
    from .index_builder.maintain import update_manifest

    bundle = Bundle.open(args.bundle)
    spec = args.model or bundle.model
    problem = model_override_problem(bundle.model, spec)
    if problem:
        raise ConfigError(f"--model {spec}: {problem}; give the weights bundle {bundle.id} was built with")
    embedder = get_embedder(spec, args.device)
    if embedder.dim != bundle.dim:
        raise ConfigError(f"--model {spec} gives {embedder.dim}-d embeddings, bundle {bundle.id} holds {bundle.dim}-d")
    stored = (bundle.manifest.build or {}).get(KEY)
    if stored is not None:
        problem = mismatch(stored, embedder)
        if problem:
            raise ConfigError(f"bundle {bundle.id} already has a fingerprint, of other weights than {spec} ({problem}); "
                              f"it is kept")
        print(f"bundle {bundle.id} already has a fingerprint, and {spec} matches it")
        return EXIT_OK
    # The name and dimension are checked above; that these weights made the vectors rests on the user's word.
    fp = fingerprint(embedder)
    bundle.close()

    def change(m, _folder):
        if m.build.get(KEY) is not None:  # stored by another run since we looked: never replaced
            raise ConfigError(f"bundle {bundle.id} got a fingerprint while this one was being made; run again to "
                              f"compare {spec} with it")
        m.build[KEY] = fp
        return {"op": "fingerprint", "model": spec}

    report = update_manifest(args.bundle, change, wait=not args.no_wait, operation="index fingerprint")
    print(f"bundle {bundle.id} v{report.version}: model fingerprint of {spec} stored; checks with other weights are "
          f"refused from now on")
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
    removed = m.count - bundle.live_count
    print(f"rows        {bundle.live_count:,} searchable" +
          (f" ({m.count:,} stored, {removed:,} removed: never returned)" if removed else ""))
    print(f"index       {m.index_factory}" + (f" (inverted lists on disk: {m.ivfdata_file})" if m.ivfdata_file else ""))
    params = ", ".join(f"{k}={v}" for k, v in m.search_params.items()) or "none (exhaustive)"
    print(f"search      {params}")
    print(f"scores      {'exact cosine' if m.exact else 'approximate (no re-rank vectors)'}")
    print(f"thresholds  warn >= {fmt_threshold(m.warn)}, block >= {fmt_threshold(m.block)}")
    print(f"built       {m.build.get('created', '?')} by {m.build.get('tool', '?')}")
    recall = m.build.get("recall")
    if isinstance(recall, dict) and recall:
        parts = [f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {terminal_safe(str(v))}"
                 for k, v in recall.items() if k in ("near_dup_r1", "near_dup_r10", "held_out_r1", "held_out_r10",
                                                     "nprobe", "latency_ms") and v is not None]
        print(f"recall      {', '.join(parts)} (measured at build)")
    fp = m.build.get("model_fingerprint")
    print(f"fingerprint {'stored: checks with other weights are refused' if fp else 'none: the model is known by name only (index fingerprint adds one)'}")
    history = m.build.get("history")
    if isinstance(history, list) and history:
        print("history")
        for entry in history[-20:]:
            if isinstance(entry, dict):
                what = ", ".join(f"{k}={terminal_safe(str(v), 60)}" for k, v in entry.items() if k not in ("op", "at"))
                print(f"  {terminal_safe(str(entry.get('at', '?')), 30)}  {terminal_safe(str(entry.get('op', '?')), 20)}"
                      f"  {what}")
        if len(history) > 20:
            print(f"  ... {len(history) - 20} earlier entries (--json shows all)")
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
    removed = bundle.count - bundle.live_count
    print(f"OK {bundle.path}: {len(bundle.manifest.files)} files match their sha256, {bundle.live_count:,} searchable "
          f"rows" + (f" ({bundle.count:,} stored, {removed:,} removed)" if removed else ""))
    return EXIT_OK


def cmd_pull(args) -> int:
    from .core.pull import pull

    try:
        report = pull(args.url, args.to, args.name, replace=args.replace, progress=not args.no_progress,
                      wait=not args.no_wait)
    except KeyboardInterrupt:
        print("provenance-guard: interrupted; run the same command again to resume the download", file=sys.stderr)
        return 130
    for line in report.lines():
        print(terminal_safe(line))
    return EXIT_OK


def cmd_publish(args) -> int:
    from .core.pull import publish_bundle

    report = publish_bundle(args.bundle, name=args.name, wait=not args.no_wait)
    for line in report.lines():
        print(line)
    return EXIT_OK


HOSTS = {"a1111": "Automatic1111 webui", "forge": "Forge webui", "comfyui": "ComfyUI", "cli": "provenance-guard check",
         "diffusers": "diffusers pipeline", "server": "provenance-guard server"}


def cmd_record_show(args) -> int:
    """Print what each image's stored record says; exit 2 when one has none or it cannot be read."""
    from .core.record import read_record, sidecar_path
    from .core.report import short

    status = EXIT_OK
    for raw in args.images:
        path = Path(raw).expanduser()
        try:
            if not path.is_file():
                raise ConfigError(f"{path}: no such file; give the saved image")
            result = read_record(path)
        except ConfigError as exc:
            print(f"provenance-guard: error: {exc}", file=sys.stderr)
            status = EXIT_CONFIG
            continue
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            print(f"provenance-guard: error: {terminal_safe(str(path))}: its record cannot be read "
                  f"({type(exc).__name__}: {terminal_safe(short(str(exc), 120))}); it may have been damaged or "
                  f"written by another tool", file=sys.stderr)
            status = EXIT_CONFIG
            continue
        if result is None:
            print(f"provenance-guard: error: {path}: no provenance record (no 'provenance' PNG chunk, no "
                  f"{sidecar_path(path).name}); a re-save or a format without text chunks drops it",
                  file=sys.stderr)
            status = EXIT_CONFIG
            continue
        try:
            lines = _record_lines(path, result, args.json)
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
            print(f"provenance-guard: error: {terminal_safe(str(path))}: its record cannot be read ({type(exc).__name__}); "
                  f"it may have been damaged or written by another tool", file=sys.stderr)
            status = EXIT_CONFIG
            continue
        print("\n".join(lines))
    return status


def _record_lines(path: Path, result, as_json: bool) -> list[str]:
    """What record show prints for one record. Every value comes from a file someone else may have written:
    control characters are stripped (terminal_safe) and a value of the wrong type raises (the caller says
    the record cannot be read)."""
    import json

    from .core.memorization import score_text
    from .core.report import match_line

    if as_json:
        return [json.dumps(result.to_json(), ensure_ascii=True)]
    t = terminal_safe
    gen = result.generation
    source = t(str((gen.source if gen is not None else None) or "unknown"), 40)
    score = "-" if result.max_score is None else f"{float(result.max_score):.4f}"
    out = [t(str(path)),
           f"  written by:  {HOSTS.get(source, source)}" + (f" ({source})" if source in HOSTS else "") +
           " (as the record says)",
           f"  verdict:     {t(str(result.verdict), 20)} (max similarity {score}, fail mode {t(str(result.fail_mode), 20)})"]
    if result.error:
        out.append(f"  error:       {t(str(result.error), 200)}")
    for th in result.thresholds:
        out.append(f"  bundle:      {t(str(th.bundle_id), 80)}@{t(str(th.bundle_version), 40)} "
                   f"(warn {float(th.warn)}, block {float(th.block)})")
    if result.model:
        out.append(f"  CLIP model:  {t(str(result.model), 200)}")
    if result.views:
        from .core.policy import VIEWS_MEANING

        meaning = VIEWS_MEANING.get(result.views)
        out.append(f"  views:       {t(str(result.views), 20)}" + (f" ({meaning})" if meaning else ""))
    if result.checked_at:
        out.append(f"  checked at:  {t(str(result.checked_at), 40)}")
    out += [f"  match:       {t(match_line(m), 200)}" for m in result.matches[:5]]
    if gen is not None:
        for name in ("prompt", "negative_prompt", "seed", "sampler", "steps", "cfg", "width", "height", "model",
                     "model_hash"):
            value = getattr(gen, name)
            if value not in (None, ""):
                out.append(f"  {name + ':':<13}{t(str(value), 200)}")
    if result.prompt is not None:
        reason = f" — {t(str(result.prompt.reason), 160)}" if result.prompt.reason else ""
        out.append(f"  memorization: {t(score_text(result.prompt) or '', 80)}{reason}")
    out += [f"  ! {t(str(w), 200)}" for w in result.warnings]
    return out


def cmd_audit_verify(args) -> int:
    from .core.audit import verify

    try:
        cert = Path(args.signer).expanduser().read_bytes()[:1 << 20] if args.signer else None
        result = verify(args.file, allow_unchained=args.allow_unchained, expect_last=args.expect_last,
                        signer_cert=cert)
    except OSError as exc:
        raise ConfigError(f"{exc.filename or args.file}: cannot be read ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise ConfigError(f"--signer {args.signer}: {exc}") from exc
    for note in result.notes:
        print(f"note: {note}")
    if not result.ok:
        print(f"BROKEN {args.file}: line {result.broken_at}: {result.problem}", file=sys.stderr)
        return EXIT_FLAGGED
    kept = "matches --expect-last" if args.expect_last else ("keep it elsewhere and pass it as --expect-last next "
                                                             "time: an edited last line or lines cut off the end "
                                                             "leave a valid chain")
    signed = ", signed by the given key" if result.signed else ""
    print(f"OK {args.file}: {result.lines} lines, chained{signed}; last line sha256 {result.last_sha256} ({kept})")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
