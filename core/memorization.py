"""The prompt side, during sampling: a memorization signal read from the sampler's own CFG predictions.

Wen et al. (ICLR 2024, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models") found that
for a memorized prompt the text-conditional noise prediction differs strongly from the unconditional one
from the very first sampling steps. With classifier-free guidance every sampler computes both, so the signal
costs no extra forward pass: ``MemorizationMonitor`` takes them step by step and gives each image

    score = mean over its first N steps of  RMS(eps(x_t, prompt) - eps(x_t, empty))

(RMS over the latent's elements, so the score does not grow with the resolution). A host hands over either
the two noise predictions (``add_eps``) or, as k-diffusion samplers and ComfyUI have them, the two denoised
estimates with sigma (``add_denoised``): D = x - sigma * eps, so eps_c - eps_u = (D_u - D_c) / sigma, the
same for eps- and v-prediction models. A run without CFG (guidance <= 1) has no unconditional prediction:
its score is unavailable, never 0.

Thresholds depend on the model family (the scale of the predictions differs): THRESHOLDS holds the ones that
were measured, with their source; a family without one gets its score reported and the verdict "unrated"
until a setting or the bundle's manifest (``build.memorization.thresholds``) provides one.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

# Steps averaged: the signal is strongest at the first steps (Wen et al.; bench/q2_memorization.py).
DEFAULT_STEPS = 5

# family -> (threshold, source). Only measured values belong here.
THRESHOLDS: dict[str, tuple[float | None, str]] = {
    # bench/q2_memorization.py, 2026-12-07: the toy's 5-step score at <= 1 % FPR on 389 non-memorized prompts
    # (3 above it); 22 of 27 memorized prompts score above it. A rerun writes bench/out/q2/threshold.json.
    "toy-q2": (0.06956, "bench/q2_memorization.py (toy pixel-space model trained to memorize; 389 non-memorized "
                        "prompts)"),
    "sd1": (None, "not measured here (no Stable Diffusion weights on these machines): set one from your own "
                  "runs of known memorized and ordinary prompts"),
    "sd2": (None, "not measured here: set one from your own runs"),
    "sdxl": (None, "not measured here: set one from your own runs"),
}

PASS, FLAG, UNRATED, UNAVAILABLE = "pass", "flag", "unrated", "unavailable"


@dataclass
class MemorizationScore:
    """One image's signal: score (None when unavailable), the steps it averages, and why when unavailable."""

    score: float | None
    steps: int
    reason: str = ""


@dataclass
class PromptCheck:
    """The prompt section of a result: the sampler's memorization signal and the caption check."""

    memorization_score: float | None = None
    steps: int = 0
    threshold: float | None = None
    family: str | None = None
    verdict: str = UNAVAILABLE
    reason: str = ""
    caption_matches: dict[str, Any] | None = None  # {"rows", "near_duplicates", "bundle"} or None

    def to_json(self) -> dict[str, Any]:
        out = {"memorization_score": None if self.memorization_score is None else round(self.memorization_score, 6),
               "steps": self.steps, "threshold": self.threshold, "family": self.family, "verdict": self.verdict,
               "caption_matches": self.caption_matches}
        if self.reason:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> PromptCheck | None:
        if not d:
            return None
        return cls(memorization_score=d.get("memorization_score"), steps=int(d.get("steps") or 0),
                   threshold=d.get("threshold"), family=d.get("family"), verdict=d.get("verdict", UNAVAILABLE),
                   reason=d.get("reason", ""), caption_matches=d.get("caption_matches"))


def threshold_for(family: str | None, overrides: dict[str, float] | None = None) -> float | None:
    if family and overrides and family in overrides:
        return float(overrides[family])
    return THRESHOLDS.get(family or "", (None, ""))[0]


def prompt_check(score: MemorizationScore | None, family: str | None,
                 overrides: dict[str, float] | None = None) -> PromptCheck:
    """A memorization score judged against its family's threshold."""
    if score is None:
        return PromptCheck(verdict=UNAVAILABLE, family=family, reason="no sampler signal was recorded for this image")
    threshold = threshold_for(family, overrides)
    check = PromptCheck(memorization_score=score.score, steps=score.steps, threshold=threshold, family=family)
    if score.score is None:
        check.verdict, check.reason = UNAVAILABLE, score.reason
    elif threshold is None:
        check.verdict = UNRATED
        check.reason = f"no memorization threshold for model family {family or 'unknown'}: " + \
            THRESHOLDS.get(family or "", (None, "set one in the settings or the bundle's manifest"))[1]
    else:
        check.verdict = FLAG if score.score >= threshold else PASS
    return check


class MemorizationMonitor:
    """Accumulates the CFG difference of a batch over its first ``steps`` sampling steps. Thread-safe; a host
    makes one per generation (or calls reset()). Costs one subtraction and one norm per step: no forward pass."""

    def __init__(self, steps: int = DEFAULT_STEPS):
        if steps < 1:
            from .errors import ConfigError

            raise ConfigError(f"memorization steps {steps}: give a whole number >= 1")
        self.steps = steps
        self.family: str | None = None  # the model family the host found (for the threshold)
        self.threshold: float | None = None  # the host's own threshold for this run (None: table/bundle)
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._sums: torch.Tensor | None = None
            self._counts = 0
            self._seen = 0
            self._no_cfg = False
            self._skipped = 0

    @property
    def done(self) -> bool:
        return self._seen >= self.steps

    def no_guidance(self) -> None:
        """Tell the monitor this run samples without CFG (guidance <= 1): the score is unavailable."""
        with self._lock:
            self._no_cfg = True
            self._seen += 1

    def skip(self) -> None:
        """A step whose unconditional prediction was not computed (A1111's skip_early_cond or NGMS, told by
        the webui's own rule, never guessed from equal predictions): not counted."""
        with self._lock:
            self._skipped += 1

    def add_eps(self, eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> None:
        """One step's noise predictions, [B, ...] each (the same images in the same order)."""
        if self.done:
            return
        diff = (eps_cond.detach().float() - eps_uncond.detach().float()).flatten(1)
        self._add(diff.pow(2).mean(dim=1).sqrt())

    def add_denoised(self, x: torch.Tensor, denoised_cond: torch.Tensor, denoised_uncond: torch.Tensor,
                     sigma: torch.Tensor) -> None:
        """One step's denoised estimates with the noise level: eps_c - eps_u = (D_u - D_c) / sigma."""
        if self.done:
            return
        import torch

        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=denoised_cond.device).flatten()
        if sigma.numel() == 1:
            sigma = sigma.expand(denoised_cond.shape[0])
        diff = (denoised_uncond.detach().float() - denoised_cond.detach().float()).flatten(1)
        diff = diff / sigma[: diff.shape[0]].clamp_min(1e-8)[:, None]
        self._add(diff.pow(2).mean(dim=1).sqrt())

    def _add(self, rms: torch.Tensor) -> None:
        # Kept on the sampler's device: reading it back (a GPU sync) waits for scores().
        with self._lock:
            if self._sums is None or self._sums.shape != rms.shape:
                self._sums, self._counts = rms.clone(), 1
            else:
                self._sums += rms
                self._counts += 1
            self._seen += 1

    def scores(self, images: int | None = None) -> list[MemorizationScore]:
        """One score per image of the batch (``images`` of them when the monitor saw none)."""
        with self._lock:
            if self._no_cfg:
                n = images or (len(self._sums) if self._sums is not None else 1)
                return [MemorizationScore(None, 0, "sampled without classifier-free guidance (CFG <= 1): the "
                                                   "signal needs the unconditional prediction")] * n
            if self._sums is None:
                reason = ("the sampler skipped the unconditional prediction at every observed step" if self._skipped
                          else "no sampling step was observed")
                return [MemorizationScore(None, 0, reason)] * (images or 1)
            return [MemorizationScore(float(s) / self._counts, self._counts) for s in self._sums.cpu().tolist()]


def post_cfg_step(monitor: MemorizationMonitor, args: dict[str, Any], cfg_scale: float | None = None,
                  skipped: bool = False) -> None:
    """One sampling step as a ComfyUI-style post-CFG function sees it (ComfyUI's node, Forge's UNet patcher).

    ``args`` holds cond_denoised, uncond_denoised, sigma, input and uncond (None when the sampler computed no
    unconditional prediction). ComfyUI's args carry the guidance as cond_scale; Forge's do not, so its host
    passes ``cfg_scale`` (p.cfg_scale), and ``skipped`` for a step the webui ran without guidance by its own rule
    (Skip Early CFG, NGMS: its uncond_denoised is then zeros, not a prediction). Guidance <= 1: the run has no
    CFG (score unavailable). Guidance > 1 with no unconditional prediction: that step was skipped (not
    counted). Equal predictions (a UNet whose
    output ignores the prompt) are a real step with a difference of 0, counted as such."""
    if monitor.done:
        return
    scale = args.get("cond_scale", cfg_scale)
    try:
        scale = None if scale is None else float(scale)
    except (TypeError, ValueError):
        scale = None
    if scale is not None and scale <= 1.0:
        monitor.no_guidance()
    elif skipped or args.get("uncond") is None or args.get("uncond_denoised") is None:
        if scale is None:
            monitor.no_guidance()
        else:
            monitor.skip()
    else:
        monitor.add_denoised(args["input"], args["cond_denoised"], args["uncond_denoised"], args["sigma"])


def score_text(check: PromptCheck | None) -> str | None:
    """The memorization signal in a few words for an infotext or a node's report ("0.0123 unrated"), or
    None when no signal was recorded."""
    if check is None:
        return None
    if check.memorization_score is None:
        return f"{check.verdict}"
    rated = "" if check.threshold is None else f" (threshold {check.threshold:.4g})"
    return f"{check.memorization_score:.4f} {check.verdict}{rated}"


@dataclass
class RunStore:
    """Monitors by run id (ComfyUI's prompt id), least recently created out, so a Provenance Check can read
    what the sampler of the same run recorded."""

    capacity: int = 64
    _runs: dict[str, MemorizationMonitor] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def monitor(self, run: str, steps: int = DEFAULT_STEPS) -> MemorizationMonitor:
        with self._lock:
            if run not in self._runs:
                self._runs[run] = MemorizationMonitor(steps)
                while len(self._runs) > self.capacity:
                    self._runs.pop(next(iter(self._runs)))
            return self._runs[run]

    def get(self, run: str) -> MemorizationMonitor | None:
        with self._lock:
            return self._runs.get(run)


RUNS = RunStore()
