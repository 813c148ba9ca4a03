"""Results as dataclasses, and their JSON form (schema ``provenance-guard/check-result``, version 1).

The JSON form is the contract of every surface: ``check --json`` prints one object per line, the PNG
``provenance`` chunk and the ``.provenance.json`` sidecar hold one, the server answers with them. The
schema is in core/schema/check-result.v1.json; fields are only ever added within a version.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .memorization import PromptCheck
    from .verify import Verification

SCHEMA = "provenance-guard/check-result"
SCHEMA_VERSION = 1


@dataclass
class Match:
    """One training/reference row close to the image. ``score`` is the exact cosine when ``exact``."""

    score: float
    exact: bool
    bundle_id: str
    bundle_version: str
    row_id: int
    url: str | None = None
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    verdict: str = "pass"
    verification: Verification | None = None  # the pixel comparison with the reference, when one ran
    clip_verdict: str | None = None  # the verdict of the score alone, when verification changed it
    view: str | None = None  # the part of the image that found it (multi-view queries; None: the whole)

    def to_json(self) -> dict[str, Any]:
        out = {
            "score": round(float(self.score), 6), "exact": self.exact, "verdict": self.verdict,
            "bundle": self.bundle_id, "bundle_version": self.bundle_version, "row_id": int(self.row_id),
            "url": self.url, "caption": self.caption, "metadata": _jsonable(self.metadata),
        }
        if self.verification is not None:
            out["verification"] = self.verification.to_json()
        if self.clip_verdict is not None:
            out["clip_verdict"] = self.clip_verdict
        if self.view is not None:
            out["view"] = self.view
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Match:
        from .verify import Verification

        return cls(score=float(d["score"]), exact=bool(d["exact"]), bundle_id=d["bundle"],
                   bundle_version=d["bundle_version"], row_id=int(d["row_id"]), url=d.get("url"),
                   caption=d.get("caption"), metadata=dict(d.get("metadata") or {}), verdict=d.get("verdict", "pass"),
                   verification=Verification.from_json(d["verification"]) if d.get("verification") else None,
                   clip_verdict=d.get("clip_verdict"), view=d.get("view"))


@dataclass
class GenerationRecord:
    """What produced the image, as the host knows it (A1111 infotext, ComfyUI graph, or the caller)."""

    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    sampler: str | None = None
    scheduler: str | None = None
    steps: int | None = None
    cfg: float | None = None
    model: str | None = None
    model_hash: str | None = None
    width: int | None = None
    height: int | None = None
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, {}, "")}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> GenerationRecord | None:
        if not d:
            return None
        known = {f.name for f in fields(cls)}
        extra = dict(d.get("extra") or {})
        extra.update({k: v for k, v in d.items() if k not in known})
        return cls(**{k: v for k, v in d.items() if k in known and k != "extra"}, extra=extra)


@dataclass
class BundleThresholds:
    bundle_id: str
    bundle_version: str
    warn: float
    block: float
    exact: bool = True


@dataclass
class CheckResult:
    """The outcome for one image."""

    verdict: str
    max_score: float | None
    matches: list[Match]
    model: str | None
    thresholds: list[BundleThresholds]
    fail_mode: str
    image: dict[str, Any] = field(default_factory=dict)
    generation: GenerationRecord | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    checked_at: str = ""
    tool_version: str = ""
    verify: dict[str, Any] | None = None  # {"mode", "from"}: how matches were verified on pixels, when they were
    prompt: PromptCheck | None = None  # the prompt side: memorization signal and caption check
    # The queries that searched for matches (core.policy.VIEWS): "whole" (the image alone) or "multi" (also its
    # 2 x 2 grid and centre); None where no search ran (a failed check) or the result predates the field.
    views: str | None = None

    @property
    def exact(self) -> bool:
        return all(t.exact for t in self.thresholds) if self.thresholds else True

    @property
    def checked(self) -> bool:
        return self.error is None

    @property
    def top(self) -> Match | None:
        return self.matches[0] if self.matches else None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "verdict": self.verdict,
            "max_score": None if self.max_score is None else round(float(self.max_score), 6),
            "scores": "exact" if self.exact else "approximate",
            "matches": [m.to_json() for m in self.matches],
            "thresholds": [{"bundle": t.bundle_id, "bundle_version": t.bundle_version, "warn": t.warn,
                            "block": t.block, "scores": "exact" if t.exact else "approximate"}
                           for t in self.thresholds],
            "model": self.model,
            "fail_mode": self.fail_mode,
            "image": _jsonable(self.image),
            "generation": self.generation.to_json() if self.generation else None,
            "warnings": list(self.warnings),
            "error": self.error,
            "timings_ms": {k: round(float(v), 3) for k, v in self.timings_ms.items()},
            "checked_at": self.checked_at,
            "tool": {"name": "provenance-guard", "version": self.tool_version},
            **({"verify": self.verify} if self.verify else {}),
            **({"views": self.views} if self.views else {}),
            **({"prompt": self.prompt.to_json()} if self.prompt else {}),
        }

    def dumps(self, **kw) -> str:
        return json.dumps(self.to_json(), ensure_ascii=False, **kw)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CheckResult:
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} object")
        if int(d.get("schema_version", 0)) > SCHEMA_VERSION:
            raise ValueError(f"{SCHEMA} version {d.get('schema_version')} is newer than this release reads "
                             f"({SCHEMA_VERSION}); upgrade provenance-guard")
        return cls(
            verdict=d["verdict"], max_score=d.get("max_score"),
            matches=[Match.from_json(m) for m in d.get("matches", [])], model=d.get("model"),
            thresholds=[BundleThresholds(t["bundle"], t["bundle_version"], t["warn"], t["block"],
                                         t.get("scores", "exact") == "exact") for t in d.get("thresholds", [])],
            fail_mode=d.get("fail_mode", "open"), image=dict(d.get("image") or {}),
            generation=GenerationRecord.from_json(d.get("generation")), warnings=list(d.get("warnings", [])),
            error=d.get("error"), timings_ms=dict(d.get("timings_ms") or {}), checked_at=d.get("checked_at", ""),
            tool_version=(d.get("tool") or {}).get("version", ""), verify=d.get("verify"),
            prompt=_prompt_from_json(d.get("prompt")), views=d.get("views"),
        )


def _prompt_from_json(d):
    from .memorization import PromptCheck

    return PromptCheck.from_json(d)


def _jsonable(value: Any) -> Any:
    """Metadata columns can hold numpy/arrow scalars, bytes, dates: make them JSON values."""
    import datetime as _dt
    import math

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (_dt.date, _dt.datetime)):
        return value.isoformat()
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return str(value)
