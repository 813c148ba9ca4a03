"""Stage 5, verdict: thresholds on the exact cosine, the fail mode, and the verdict they give.

A score s of a match gives ``block`` when s >= block, ``warn`` when s >= warn, else ``pass``. A check that
cannot run (bundle missing or broken, model not loadable, image unreadable) gives ``unchecked`` under the
``open`` fail mode (the default: an artist's UI keeps working, with a warning) and ``block`` under
``closed`` (a studio's publishing gate: nothing unchecked goes out).

What a host does with a verdict (``host_action``): a host's action on a match is warn (let it through,
annotated) or a blocking one (drop, placeholder, black, error). One rule holds for every host: under fail
mode closed an image that could not be checked is withheld whatever the action, since "closed" promises that
nothing unchecked goes out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import DEFAULT_FAIL_MODE, DEFAULT_TOP_K, FAIL_MODES
from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .result import CheckResult, Match

PASS, WARN, BLOCK, UNCHECKED = "pass", "warn", "block", "unchecked"
# Order of severity for merging verdicts of several matches or bundles.
SEVERITY = {PASS: 0, WARN: 1, BLOCK: 2}


def fmt_threshold(value: float) -> str:
    """A threshold as configured: 0.995 prints 0.995, never a rounding of it (0.99 would misstate a block)."""
    return format(float(value), ".10g")


def validate_thresholds(warn: float, block: float) -> None:
    for name, value in (("warn", warn), ("block", block)):
        if not isinstance(value, (int, float)) or not -1.0 <= float(value) <= 1.0:
            raise ConfigError(f"{name} threshold {value!r} is not a cosine; give a number between -1 and 1 "
                              f"(e.g. --warn 0.90 --block 0.95)")
    if warn > block:
        raise ConfigError(f"warn threshold {warn} is above block threshold {block}; warn must be <= block")


def verdict_for(score: float | None, warn: float, block: float) -> str:
    if score is None:
        return PASS
    if score >= block:
        return BLOCK
    if score >= warn:
        return WARN
    return PASS


def worst(verdicts) -> str:
    """The most severe verdict (block, warn, pass); when none is one of those, the first; PASS for none."""
    verdicts = list(verdicts)
    for v in (BLOCK, WARN, PASS):  # membership tests in C: a check pays no call per match
        if v in verdicts:
            return v
    return verdicts[0] if verdicts else PASS


def reaches(verdict: str, level: str) -> bool:
    """True when verdict is at least as severe as level ('warn' or 'block')."""
    if level not in (WARN, BLOCK):
        raise ConfigError(f"--fail-on {level!r}: give warn or block")
    return SEVERITY.get(verdict, -1) >= SEVERITY[level]


# Verification modes. confirm: a block on the score whose reference was compared and found different becomes
# warn ("semantically close, not a copy"); escalate: a verified copy blocks even below the block threshold.
VERIFY_MODES = ("off", "confirm", "escalate", "confirm+escalate")
# whole: the image is one query; multi: also its four quarters and its centre (core.images.views), so a
# training image copied into a part of a larger output is found (and verified against that part).
VIEWS = ("whole", "multi")
# what each views mode queried, as records and reports say it
VIEWS_MEANING = {"whole": "the whole image as one query", "multi": "the whole image, its 2 x 2 grid and its centre"}


@dataclass(frozen=True)
class Policy:
    """Per-call choices. warn/block of None take each bundle's manifest thresholds. verify: how matches are
    verified on pixels (VERIFY_MODES); verify_from: the score from which candidates are verified (None: each
    bundle's warn threshold; the top match of a small bundle with local references always is)."""

    warn: float | None = None
    block: float | None = None
    fail_mode: str = DEFAULT_FAIL_MODE
    top_k: int = DEFAULT_TOP_K
    verify: str = "off"
    verify_from: float | None = None
    # How far a flagged prompt alone raises the image's verdict: "pass" (never), "warn" or "block".
    prompt_action: str = "warn"
    memorization_thresholds: dict | None = None  # family -> threshold, over the built-in table
    # Strict (studio enforcement, the webuis' strict setting): evidence pictures show the training image with
    # the matched region only, never the checked image's pixels (which may be a blocked copy).
    strict: bool = False
    views: str = "whole"

    def __post_init__(self) -> None:
        if self.fail_mode not in FAIL_MODES:
            raise ConfigError(f"fail mode {self.fail_mode!r}: give 'open' (report unchecked) or 'closed' (block)")
        if self.verify not in VERIFY_MODES:
            raise ConfigError(f"verify {self.verify!r}: give one of {', '.join(VERIFY_MODES)}")
        if self.verify_from is not None:
            validate_thresholds(self.verify_from, self.verify_from)
        if self.prompt_action not in (PASS, WARN, BLOCK):
            raise ConfigError(f"prompt action {self.prompt_action!r}: give pass, warn or block")
        if self.views not in VIEWS:
            raise ConfigError(f"views {self.views!r}: give whole or multi")
        if not isinstance(self.strict, bool):
            raise ConfigError(f"strict {self.strict!r}: give true or false")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"top-k {self.top_k!r}: give a whole number of matches >= 1")
        for value in (self.warn, self.block):
            if value is not None:
                validate_thresholds(value, value)
        if self.warn is not None and self.block is not None:
            validate_thresholds(self.warn, self.block)

    def thresholds(self, manifest_warn: float, manifest_block: float) -> tuple[float, float]:
        warn = manifest_warn if self.warn is None else self.warn
        block = manifest_block if self.block is None else self.block
        if self.warn is not None and self.block is None:
            block = max(block, warn)
        if self.block is not None and self.warn is None:
            warn = min(warn, block)
        validate_thresholds(warn, block)
        return warn, block

    def failure_verdict(self) -> str:
        return BLOCK if self.fail_mode == "closed" else UNCHECKED


NOT_A_COPY = "semantically close, not a copy: the reference was compared on pixels and found different"


def apply_verification(match: Match, mode: str) -> None:
    """Adjust a match's verdict by its verification under mode (see VERIFY_MODES). The score's own verdict
    is kept in match.clip_verdict when it changes. An unavailable reference changes nothing."""
    v = match.verification
    if v is None or mode == "off":
        return
    verdict = match.verdict
    if "confirm" in mode and verdict == BLOCK and v.status == "different":
        verdict = WARN
    if "escalate" in mode and v.status == "copy":
        verdict = BLOCK
    if verdict != match.verdict:
        match.clip_verdict, match.verdict = match.verdict, verdict


def apply_prompt(result: CheckResult, prompt_action: str) -> None:
    """Combine the prompt verdict into the image's: a flagged prompt (memorization signal over its threshold,
    or the caption of duplicated training images) raises the verdict to at most prompt_action."""
    prompt = result.prompt
    if prompt is None or prompt_action == PASS or result.error is not None:
        return
    flagged = prompt.verdict == "flag" or bool(prompt.caption_matches and prompt.caption_matches.get("near_duplicates"))
    if flagged and SEVERITY.get(result.verdict, -1) < SEVERITY[prompt_action]:
        result.verdict = prompt_action
        result.warnings.append(f"the prompt raised the verdict to {prompt_action}: " + (
            f"memorization signal {prompt.memorization_score:.4g} >= {prompt.threshold:g}"
            if prompt.verdict == "flag" else
            f"it is the training caption of {prompt.caption_matches['near_duplicates']} near-duplicate images"))


def host_action(result: CheckResult, action: str, blocking: str = BLOCK) -> str:
    """What a host does with this image: "pass" (let it through, annotated) or its blocking action.

    ``action`` is the host's setting for a match (warn, or one of its blocking actions); ``blocking`` is what
    that host does to withhold an image when its action is warn (A1111's placeholder, ComfyUI's drop)."""
    if result.verdict != BLOCK:
        return "pass"
    if action == WARN:
        return blocking if result.error is not None else "pass"
    return action
