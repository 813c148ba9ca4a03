"""The pipeline: images -> embed -> search + re-rank (every bundle) -> merge -> verdict -> CheckResult.

``Checker`` is what every surface holds: the CLI and the server build one per (bundles, model, device);
the ComfyUI node and the A1111 script, which check run after run, take ``shared_checker``'s, opened anew
when a new version of its bundle is published (a takedown applies to the next run). Bundles and models
open on first use (or with ``open()``), once; a failure to open is not remembered, so a bundle repaired on
disk is picked up by the next call. Under the fail mode, any failure becomes a result (``unchecked`` or
``block``) rather than an exception, so a host never loses its UI over a check.
"""
from __future__ import annotations

import functools
import logging
import math
import operator
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING
from collections.abc import Sequence

from .bundle import Bundle, manifest_stamp, utc_now
from .config import DEFAULT_BATCH_SIZE
from .embed import Embedder, get_embedder
from .errors import ConfigError, DimensionMismatchError, ImageInputError, ProvenanceError
from .images import ImageInput, Pixels, pixels_sha256, to_pixels, views
from .logs import quiet_third_party
from .models import ModelSpec
from .captions import lookup as lookup_caption
from .memorization import MemorizationScore, PromptCheck, prompt_check
from .policy import NOT_A_COPY, VIEWS, Policy, apply_prompt, apply_verification, verdict_for, worst
from .references import ReferenceOptions, ReferenceResolver
from .result import BundleThresholds, CheckResult, GenerationRecord, Match
from .remote import RemoteBundle, is_remote
from .search import row_squares, search

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

BundleLike = str | Path | Bundle
# A bundle this small that holds its reference pixels locally (a studio's own images) gets its top match
# verified whatever the score: comparing one image is cheap, and a copy CLIP scores low is still a copy.
SMALL_BUNDLE_ROWS = 100_000
log = logging.getLogger("provenance_guard")


_SCORE = operator.attrgetter("score")
# A row whose squared norm is this close to 1 is unit already (float32 rounding of a normalized row).
UNIT_SLACK = 1e-6


@functools.cache
def _tool_version() -> str:
    from .. import __version__

    return __version__


def model_override_problem(bundle_model: str, override: str) -> str | None:
    """Why override may not stand in for the bundle's model, or None when it may.

    An override names the same weights in another place (a local file, a folder, a hub copy); a different
    architecture or pretrained tag would give embeddings in another space, where every score is noise.
    """
    if override == bundle_model:
        return None
    want, got = ModelSpec.parse(bundle_model), ModelSpec.parse(override)

    def base(arch: str | None) -> str | None:
        return arch[: -len("-quickgelu")] if arch and arch.endswith("-quickgelu") else arch

    if want.arch and got.arch and base(want.arch) != base(got.arch):
        return f"architecture {got.arch} differs from the bundle's {want.arch}"
    if want.kind == "tag" and got.kind == "tag" and want.source != got.source:
        return f"pretrained weights {got.source!r} differ from the bundle's {want.source!r}"
    return None


class Checker:
    """Checks images against one or more bundles. Safe to share between threads."""

    def __init__(self, bundles: BundleLike | Sequence[BundleLike], *, model: str | None = None,
                 device: str = "auto", policy: Policy | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_pixels: int | None = None, token: str | None = None, announce: bool = False,
                 references: ReferenceOptions | None = None):
        if isinstance(bundles, (str, Path, Bundle)):
            bundles = [bundles]
        if not bundles:
            raise ConfigError("no bundle given; pass --index BUNDLE (a folder made by 'provenance-guard index build')")
        self._sources = [b for b in bundles if not is_remote(b)]
        self.remote = [RemoteBundle(b, token=token) for b in bundles if is_remote(b)]
        self.model_override = model
        self.device = device
        self.policy = policy or Policy()
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self._bundles: list[Bundle] | None = None
        self._lock = threading.Lock()
        # Hosts log one line of their own (model, device, bundle) when the model first loads.
        self.announce, self._announced = announce, False
        self.references = ReferenceResolver(references or ReferenceOptions())

    # opening --------------------------------------------------------------------------------------------
    def open(self) -> list[Bundle]:
        """Open every local bundle (raises the first BundleError); later calls return the opened bundles.
        Remote bundles (self.remote) are reached per check."""
        with self._lock:
            if self._bundles is None:
                opened = [b if isinstance(b, Bundle) else Bundle.open(b) for b in self._sources]
                if self.model_override:
                    for b in opened:
                        problem = model_override_problem(b.model, self.model_override)
                        if problem:
                            raise ConfigError(
                                f"model {self.model_override!r} cannot check bundle {b.id}: {problem}; its "
                                f"vectors were made with {b.model}: leave the model unset, or point at a local "
                                f"copy of those weights"
                            )
                self._bundles = opened
            return self._bundles

    def model_for(self, bundle: Bundle) -> str:
        return self.model_override or bundle.model

    def embedders(self) -> dict[str, Embedder]:
        """Load (once per process) the model of every local bundle; raises ModelLoadError on failure."""
        from .fingerprint import check_model

        loaded = {spec: get_embedder(spec, self.device) for spec in {self.model_for(b) for b in self.open()}}
        for b in self._bundles or []:  # weights are known by what they do: refused before any image
            e = loaded[self.model_for(b)]
            if isinstance(getattr(e, "dim", None), int) and e.dim != b.dim:
                raise DimensionMismatchError.model_for(e.spec.raw, e.dim, b)
            check_model(b, e)
        if self.announce and not self._announced:
            self._announced = True
            for b in self._bundles or []:
                e = loaded[self.model_for(b)]
                log.info("provenance-guard: checking with %s on %s (%s) against bundle %s v%s, %s rows, at %s",
                         e.spec.raw, e.device, e.precision, b.id, b.version, f"{b.live_count:,}", b.path)
        return loaded

    # checking -------------------------------------------------------------------------------------------
    def check(self, images: Sequence[ImageInput] | torch.Tensor | np.ndarray,  # noqa: C901 - the pipeline, in order
              records: Sequence[GenerationRecord | None] | None = None,
              policy: Policy | None = None,
              embedder: Embedder | None = None,
              signals: Sequence[MemorizationScore | None] | None = None,
              family: str | None = None) -> list[CheckResult]:
        """One result per image, in order. A batch goes through each model in one forward pass.

        ``embedder`` replaces the bundles' model (e.g. a host's already-loaded CLIP vision model that the
        caller has verified to be the bundle's model). ``signals``: the sampler's memorization score of each
        image (core.memorization), judged for the model ``family``; with them, or with a prompt in the
        records, each result gets its prompt section (the signal and the caption check), which
        policy.prompt_action combines into the verdict.
        """
        t0 = time.perf_counter()
        policy = policy or self.policy
        pixels = to_pixels(images, self.max_pixels)
        records = list(records) if records is not None else [None] * len(pixels)
        if len(records) != len(pixels):
            raise ConfigError(f"{len(records)} generation records given for {len(pixels)} images")
        good = [i for i, p in enumerate(pixels) if isinstance(p, Pixels)]
        results: list[CheckResult | None] = [None] * len(pixels)
        for i, p in enumerate(pixels):
            if isinstance(p, ImageInputError):
                results[i] = self._failure(policy, str(p), records[i], {"source": f"image {i}"})
        if good:
            batch = [pixels[i] for i in good]
            # Multi-view: every image's views in one batch, searched together, folded back per image below.
            parts = view_queries(batch, policy.views)
            queries = [v for image_views in parts for _, v in image_views]
            try:
                bundles = self.open()
                per_image: list[list[Match]] = [[] for _ in good]
                timings: dict[str, float] = {}
                models: dict[str, str] = {}
                thresholds = self._thresholds(bundles, policy)
                if bundles:
                    if embedder is not None:
                        from .fingerprint import check_model

                        for b in bundles:
                            check_model(b, embedder)
                        vectors = {embedder.spec.raw: embedder.embed_pixels(queries, self.batch_size)}
                        models = {b.id: embedder.spec.raw for b in bundles}
                    else:
                        vectors = {spec: e.embed_pixels(queries, self.batch_size)
                                   for spec, e in self.embedders().items()}
                        models = {b.id: self.model_for(b) for b in bundles}
                    timings["embed"] = (time.perf_counter() - t0) * 1e3
                    per_image = fold_views(self._search_all(bundles, models, vectors, policy, timings), parts,
                                            policy.top_k)
                for remote in self.remote:
                    t_remote = time.perf_counter()
                    found, remote_thresholds = remote.search(batch, policy)
                    timings["remote"] = timings.get("remote", 0.0) + (time.perf_counter() - t_remote) * 1e3
                    thresholds += remote_thresholds
                    models[remote.id] = f"remote {remote.url}"
                    for slot, matches in enumerate(found):
                        per_image[slot].extend(matches)
                if self.remote:
                    for matches in per_image:
                        matches.sort(key=lambda m: -m.score)
                        del matches[policy.top_k:]
                if policy.verify != "off" and bundles:
                    t_verify = time.perf_counter()
                    for slot, matches in enumerate(per_image):
                        self._verify(batch[slot], matches, bundles, policy, dict(parts[slot]))
                    timings["verify"] = (time.perf_counter() - t_verify) * 1e3
            except ProvenanceError as exc:
                for i in good:
                    results[i] = self._failure(policy, str(exc), records[i], _image_info(pixels[i]))
            else:
                timings["total"] = (time.perf_counter() - t0) * 1e3
                timings["batch_images"] = len(good)
                model_names = " + ".join(sorted(set(models.values())))
                for slot, i in enumerate(good):
                    results[i] = self._result(per_image[slot], thresholds, policy, records[i],
                                              _image_info(pixels[i]), model_names, timings, policy.views)
        if signals is not None or any(r is not None and r.prompt for r in records):
            for i, result in enumerate(results):
                signal = signals[i] if signals is not None and i < len(signals) else None
                result.prompt = self.prompt_section(records[i], signal, family, policy, signals is not None)
                apply_prompt(result, policy.prompt_action)
        return results  # type: ignore[return-value]

    def prompt_section(self, record: GenerationRecord | None, signal: MemorizationScore | None,
                       family: str | None, policy: Policy, monitored: bool = True) -> PromptCheck:
        """The prompt side of a result: the memorization signal judged for its family, and whether the prompt
        is a training caption (and of how many near-duplicate images) in the first bundle with a caption
        index."""
        overrides = dict(policy.memorization_thresholds or {})
        for b in self._bundles or []:
            overrides = {**b.manifest.build.get("memorization", {}).get("thresholds", {}), **overrides}
        section = (prompt_check(signal, family, overrides) if monitored or signal is not None
                   else PromptCheck(verdict="unavailable", family=family,
                                    reason="the sampler was not monitored (ComfyUI: Memorization Monitor node; "
                                           "A1111/Forge: the extension's setting)"))
        text = record.prompt if record is not None else None
        if text:
            for b in self._bundles or []:
                found = lookup_caption(b, text)
                if found is not None:
                    section.caption_matches = found.to_json()
                    break
            else:
                if self._bundles:
                    section.caption_matches = {"bundle": None, "rows": None, "near_duplicates": None,
                                               "note": "no bundle has a caption index: 'provenance-guard index "
                                                       "captions BUNDLE' adds one"}
        return section

    def check_embeddings(self, vectors: np.ndarray, records: Sequence[GenerationRecord | None] | None = None,
                         policy: Policy | None = None, model: str | None = None) -> list[CheckResult]:
        """Check precomputed embeddings (rows) made with ``model`` (default: the bundles' model). Rows are
        scaled to unit length (a flat index scores inner products, which are cosines only between unit rows)."""
        import numpy as np

        t0 = time.perf_counter()
        policy = policy or self.policy
        # Few numpy calls: each costs a check tens of microseconds when the caches are cold (as after a search).
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim < 2:
            vectors = vectors.reshape(1, -1)
        records = list(records) if records is not None else [None] * len(vectors)
        try:
            if vectors.ndim != 2:
                raise ImageInputError(f"embeddings came as a {vectors.ndim}-d array: give one row per image "
                                      f"(an array of shape images x dimension)")
            squares = row_squares(vectors)
            if not all(math.isfinite(x) and x > 0 for x in squares):
                raise ImageInputError("an embedding is zero or holds a number that is not finite: give each "
                                      "image's embedding as the model produced it")
            if any(abs(x - 1.0) > UNIT_SLACK for x in squares):
                vectors = vectors / np.sqrt(np.asarray(squares, dtype=np.float32))[:, None]
                squares = None  # the scaled rows' own are computed where needed
            bundles = self.open()
            if self.remote:
                raise ConfigError("precomputed embeddings can only be checked against local bundles; the index "
                                  "server takes them at POST /knn-service (embedding_input)")
            spec = model or self.model_override
            models = {b.id: spec or b.model for b in bundles}
            timings: dict[str, float] = {}
            per_image = self._search_all(bundles, models, {m: vectors for m in set(models.values())}, policy, timings,
                                         None if squares is None else {m: squares for m in set(models.values())})
            thresholds = self._thresholds(bundles, policy)
        except ProvenanceError as exc:
            return [self._failure(policy, str(exc), r, {"source": "embedding"}) for r in records]
        timings["total"] = (time.perf_counter() - t0) * 1e3
        return [self._result(per_image[n], thresholds, policy, records[n], {"source": "embedding"},
                             " + ".join(sorted(set(models.values()))), timings, "whole") for n in range(len(vectors))]

    def _search_all(self, bundles: list[Bundle], models: dict[str, str], vectors: dict[str, np.ndarray],
                    policy: Policy, timings: dict[str, float],
                    squares: dict[str, list[float]] | None = None) -> list[list[Match]]:
        """Matches of every image across all bundles, merged by score, top-k, each with its verdict.
        squares: each model's rows' squared norms, where the caller has them."""
        n = len(next(iter(vectors.values())))
        merged: list[list[Match]] = [[] for _ in range(n)]
        for b in bundles:
            q = vectors[models[b.id]]
            if q.shape[1] != b.dim:
                raise DimensionMismatchError.model_for(models[b.id], q.shape[1], b)
            out = search(b, q, policy.top_k, squares=(squares or {}).get(models[b.id]))
            for key, ms in out.timings_ms.items():
                timings[key] = timings.get(key, 0.0) + ms
            warn, block = policy.thresholds(b.manifest.warn, b.manifest.block)
            for slot, matches in enumerate(out.matches):
                for m in matches:
                    m.verdict = verdict_for(m.score, warn, block)
                merged[slot].extend(matches)
        for slot in range(n):
            merged[slot].sort(key=_SCORE, reverse=True)  # stable: equal scores keep their order
            del merged[slot][policy.top_k:]
        return merged

    def _verify(self, pixels: Pixels, matches: list[Match], bundles: list[Bundle], policy: Policy,
                parts: dict | None = None) -> None:
        """Stage 4b: compare the image with the reference pixels of its candidates (matches at or above
        verify_from, and the top match of a small bundle with local references), then adjust their verdicts
        by the verify mode (policy.apply_verification). A candidate a view found is compared with that view
        (``parts``: view name -> its Pixels)."""
        from PIL import Image

        from .references import image_roots
        from .verify import (REFERENCE_FEATURES, evidence_picture, generated_features, opencv_missing, unavailable,
                             verify)

        by_id = {b.id: b for b in bundles}
        candidates = []
        for n, m in enumerate(matches):
            bundle = by_id.get(m.bundle_id)
            if bundle is None:
                continue
            start = policy.verify_from if policy.verify_from is not None else policy.thresholds(
                bundle.manifest.warn, bundle.manifest.block)[0]
            small = bundle.count <= SMALL_BUNDLE_ROWS and image_roots(bundle, self.references.options.root)
            first_of_bundle = all(o.bundle_id != m.bundle_id for o in matches[:n])
            if m.score >= start or (small and first_of_bundle):
                candidates.append((m, bundle))
        if not candidates:
            return
        missing = opencv_missing()
        seen: dict = {}  # view name -> (PIL image, features), made once per view

        def generated(view: str | None):
            if view not in seen:
                part = (parts or {}).get(view) or pixels
                image = Image.fromarray(part.tensor.detach().cpu().numpy())
                seen[view] = (image, None if missing else generated_features(image))
            return seen[view]

        for m, bundle in candidates:
            ref = self.references.resolve(bundle, m)
            if missing or not ref.available:
                m.verification = unavailable(missing or ref.reason, ref.label)
            else:
                image, gen = generated(m.view)
                features = REFERENCE_FEATURES.get(f"{bundle.id}:{m.row_id}:{ref.source}", ref.image)
                m.verification = verify(gen, features, bundle.verify_thresholds, ref.label)
                m.verification.evidence = evidence_picture(None if policy.strict else image, ref.image,
                                                            m.verification)
            apply_verification(m, policy.verify)

    def _thresholds(self, bundles: list[Bundle], policy: Policy) -> list[BundleThresholds]:
        out = []
        for b in bundles:
            warn, block = policy.thresholds(b.manifest.warn, b.manifest.block)
            out.append(BundleThresholds(b.id, b.version, warn, block, b.exact))
        return out

    def _result(self, matches: list[Match], thresholds: list[BundleThresholds], policy: Policy,
                record: GenerationRecord | None, image: dict, model: str, timings: dict,
                views: str) -> CheckResult:
        warnings = []
        approximate = [t.bundle_id for t in thresholds if not t.exact]
        if approximate:
            warnings.append("scores from " + ", ".join(approximate) +
                            " are index approximations: those bundles store no vectors for exact re-ranking")
        for m in matches:
            v = m.verification
            if v is not None and v.status == "unavailable" and m.verdict != "pass":
                warnings.append(f"{m.bundle_id}#{m.row_id} ({m.verdict}) is unverified: {v.reason}")
            elif m.clip_verdict == "block" and m.verdict == "warn":
                warnings.append(f"{m.bundle_id}#{m.row_id}: {NOT_A_COPY}")
        return CheckResult(
            verdict=worst(m.verdict for m in matches), max_score=matches[0].score if matches else None,
            matches=matches, model=model, thresholds=thresholds, fail_mode=policy.fail_mode,
            image=image, generation=record, warnings=warnings, timings_ms=dict(timings), checked_at=utc_now(),
            tool_version=_tool_version(),
            verify=({"mode": policy.verify, "from": policy.verify_from} if policy.verify != "off" else None),
            views=views,
        )

    def _failure(self, policy: Policy, message: str, record: GenerationRecord | None, image: dict) -> CheckResult:
        thresholds = []
        if self._bundles is not None:
            try:
                thresholds = self._thresholds(self._bundles, policy)
            except ConfigError:
                thresholds = []
        return failed_result(policy, message, record, image, self.model_override, thresholds)


_SHARED: dict[tuple, tuple[tuple | None, Checker]] = {}
_SHARED_LOCK = threading.Lock()


def shared_checker(bundle: str, *, model: str | None = None, device: str = "auto",
                   references: ReferenceOptions | None = None) -> Checker:
    """The process's Checker for one bundle (folder or server URL), for hosts that check run after run.

    The bundle stays open between runs; when a new version is published at its path (``index remove``
    after a takedown, ``append``, a rebuild) the next call opens that one, so no restart is needed. Models
    stay loaded either way (``get_embedder``)."""
    key = (str(bundle), model or "", device, references or ReferenceOptions())
    stamp = manifest_stamp(str(bundle))
    quiet_third_party()
    with _SHARED_LOCK:
        cached = _SHARED.get(key)
        if cached is None or cached[0] != stamp:
            _SHARED[key] = (stamp, Checker(str(bundle), model=model, device=device, announce=cached is None,
                                           references=references))
        return _SHARED[key][1]


def failed_result(policy: Policy, message: str, record: GenerationRecord | None = None,
                  image: dict | None = None, model: str | None = None,
                  thresholds: list[BundleThresholds] | None = None) -> CheckResult:
    """The result of a check that could not run: 'unchecked' (fail mode open) or 'block' (closed)."""
    verdict = policy.failure_verdict()
    action = "blocked (fail mode closed)" if verdict == "block" else "not checked (fail mode open)"
    return CheckResult(
        verdict=verdict, max_score=None, matches=[], model=model, thresholds=list(thresholds or []),
        fail_mode=policy.fail_mode, image=dict(image or {}), generation=record,
        warnings=[f"image {action}: {message}"], error=message, checked_at=utc_now(), tool_version=_tool_version(),
    )


def mark_failed(result: CheckResult, policy: Policy, message: str) -> CheckResult:
    """Turn a result into a failed one (a later step for its image failed): the fail mode's verdict, unless
    the check itself already blocked; its matches stay, for the record."""
    failed = failed_result(policy, message)
    if result.verdict != "block":
        result.verdict = failed.verdict
    result.error = message
    result.warnings += failed.warnings
    return result


def view_queries(batch: Sequence[Pixels], mode: str) -> list[list[tuple[str | None, Pixels]]]:
    """Each image's queries under the views mode (core.policy.VIEWS): "whole", the image alone as
    [(None, image)]; "multi", the image and its parts (core.images.views). What a check embeds and searches;
    ``index calibrate`` measures its thresholds on the same queries."""
    if mode not in VIEWS:
        raise ConfigError(f"views {mode!r}: give whole or multi")
    return [views(p) if mode == "multi" else [(None, p)] for p in batch]


def fold_views(found: list[list[Match]], parts: list[list], top_k: int) -> list[list[Match]]:
    """Matches per query (every image's views, in order) -> matches per image: each training row once, at
    the best score any of the image's views gave it, tagged with that view (None: the whole image).
    ``parts``: each image's (view name, ...) pairs, as view_queries gives them."""
    out, at = [], 0
    for image_views in parts:
        best: dict[tuple, Match] = {}
        for (name, _), matches in zip(image_views, found[at:at + len(image_views)], strict=True):
            for m in matches:
                key = (m.bundle_id, m.row_id)
                if key not in best or m.score > best[key].score:
                    m.view = name
                    best[key] = m
        at += len(image_views)
        out.append(sorted(best.values(), key=_SCORE, reverse=True)[:top_k])
    return out


def _image_info(p: Pixels) -> dict:
    return {"source": p.source, "width": p.width, "height": p.height, "pixels_sha256": pixels_sha256(p)}
