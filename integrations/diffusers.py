"""diffusers integration: the check on a pipeline's outputs and the memorization signal from its own CFG batch.

Two ways in (the issue named ``provenance_guard.diffusers``; that name would shadow the diffusers package
when the repository root is on sys.path, so it lives here, ``provenance_guard.integrations.diffusers``):

- ``guard(pipe, index=..., policy=...)`` wraps a pipeline. A forward hook on its UNet (or transformer) reads
  each sampling step's CFG batch as diffusers builds it ([unconditional, conditional] halves) and feeds a
  core.memorization monitor; v-prediction outputs are turned into noise differences with the scheduler's
  alphas (eps_c - eps_u = sqrt(alpha_bar_t) * (v_c - v_u)), x0 ("sample") predictions likewise. Each call
  checks the output images: the returned output gains ``provenance`` (one CheckResult per image, with its
  prompt section) and ``provenance_flagged`` (one bool per image), and blocked images come back black, as
  the safety checker does.
- ``ProvenanceSafetyChecker`` fits the ``safety_checker`` slot of StableDiffusionPipeline (called as
  ``safety_checker(images=..., clip_input=...)``, returning ``(images, has_nsfw_concept)``), so existing code
  adopts the output check in one line: ``pipe.safety_checker = ProvenanceSafetyChecker(index=...)`` (with a
  ``feature_extractor``: ``use_safety_checker`` sets both). Its flags then mean "withheld as too close to a
  training image"; its last results are on ``.last_results``.

With ``credentials`` (a folder holding signer.pem and signer.key, or core.credentials.Credentials), the
output also gains ``save_with_credentials(i, path)``: image i saved (PNG, JPEG or WebP by the path's
extension, with the provenance record in a PNG), then signed in place as a C2PA manifest carrying its own
check (a blocked image's says block) and generation. Credentials that cannot sign fail at guard().
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from ..core.check import Checker
from ..core.memorization import DEFAULT_STEPS, MemorizationMonitor
from ..core.policy import Policy, host_action
from ..core.result import CheckResult, GenerationRecord

# Pipeline classes -> the families of core.memorization.THRESHOLDS.
FAMILIES = {"StableDiffusionPipeline": "sd1", "StableDiffusionImg2ImgPipeline": "sd1",
            "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl"}


def _to_images(images, signed: bool = False) -> tuple[Any, str]:
    """The pipeline's images as one [B,H,W,C] float tensor in 0..1 for the checker, and their kind. A tensor
    is [B,3,H,W]: in [-1, 1] when ``signed`` (the decoded image the safety checker gets), else in [0, 1]
    (output_type "pt")."""
    import numpy as np
    import torch

    if torch.is_tensor(images):
        x = images.detach().float()
        return ((x / 2 + 0.5) if signed else x).clamp(0, 1).permute(0, 2, 3, 1).cpu(), "tensor"
    if isinstance(images, np.ndarray):  # [B,H,W,3] in [0, 1]
        return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)), "numpy"
    return list(images), "pil"


def _black(images, kind: str, flags: list[bool]):
    from PIL import Image

    if kind in ("tensor", "numpy"):
        for i, flagged in enumerate(flags):
            if flagged:
                images[i] = 0
        return images
    return [Image.new(img.mode, img.size) if flagged else img for img, flagged in zip(images, flags, strict=True)]


class ProvenanceSafetyChecker:
    """A safety_checker for StableDiffusionPipeline that withholds images too close to a training image."""

    def __init__(self, index, policy: Policy | None = None, *, model: str | None = None,
                 device: str = "auto", references=None):
        self.checker = Checker(index, model=model, device=device, references=references)
        self.policy = policy or Policy(verify="confirm")
        self.last_results: list[CheckResult] = []

    def __call__(self, images, clip_input=None, **_) -> tuple[Any, list[bool]]:
        pixels, kind = _to_images(images, signed=True)
        results = self.checker.check(pixels, policy=self.policy)
        flags = [host_action(r, "block") != "pass" for r in results]
        self.last_results = results
        return _black(images, kind, flags), flags


def use_safety_checker(pipe, checker: ProvenanceSafetyChecker):
    """Put checker into pipe's safety_checker slot, with the CLIP image processor the slot's caller needs
    (built from its defaults: no download)."""
    if getattr(pipe, "feature_extractor", None) is None:
        from transformers import CLIPImageProcessor

        pipe.feature_extractor = CLIPImageProcessor()
    pipe.safety_checker = checker
    return pipe


class _CfgReader:
    """The forward hook on a pipeline's denoiser: one step of its CFG batch -> the monitor."""

    def __init__(self, pipe, steps: int):
        self.pipe = pipe
        self.monitor = MemorizationMonitor(steps)
        self.active = False
        self.lock = threading.Lock()

    def __call__(self, module, args, kwargs, output):
        import torch

        if not self.active or self.monitor.done:
            return None
        if not bool(getattr(self.pipe, "do_classifier_free_guidance", False)):
            self.monitor.no_guidance()
            return None
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        if not torch.is_tensor(out) or out.shape[0] % 2:
            self.monitor.skip()
            return None
        uncond, cond = out.chunk(2)  # diffusers concatenates [negative, positive]
        kind = getattr(self.pipe.scheduler.config, "prediction_type", "epsilon")
        if kind == "epsilon":
            self.monitor.add_eps(cond, uncond)
            return None
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        alphas = getattr(self.pipe.scheduler, "alphas_cumprod", None)
        if timestep is None or alphas is None:
            self.monitor.skip()
            return None
        t = int(torch.as_tensor(timestep).flatten()[0])
        alpha = float(alphas[t].sqrt())
        sigma = float((1 - alphas[t]).sqrt())
        if kind == "v_prediction":
            self.monitor.add_eps(alpha * cond, alpha * uncond)
        else:  # "sample": x0 predictions; eps = (x_t - alpha * x0) / sigma
            self.monitor.add_eps(-alpha / max(sigma, 1e-8) * cond, -alpha / max(sigma, 1e-8) * uncond)
        return None


class GuardedPipeline:
    """A diffusers pipeline whose every call is checked (see guard()). Other attributes are the pipeline's."""

    def __init__(self, pipe, index, policy: Policy | None = None, *, model: str | None = None,
                 device: str = "auto", steps: int = DEFAULT_STEPS, family: str | None = None, references=None,
                 credentials=None, include_prompts: bool = True):
        self.pipe = pipe
        self.credentials = _credentials(credentials)
        self.include_prompts = include_prompts
        self.checker = Checker(index, model=model, device=device, references=references)
        self.policy = policy or Policy(verify="confirm")
        self.family = family or FAMILIES.get(type(pipe).__name__)
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if denoiser is None:
            from ..core.errors import ConfigError

            raise ConfigError(f"{type(pipe).__name__} has neither a unet nor a transformer to read the CFG batch from")
        self._reader = _CfgReader(pipe, steps)
        self._handle = denoiser.register_forward_hook(self._reader, with_kwargs=True)

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def remove(self) -> None:
        """Take the hook off the pipeline's denoiser."""
        self._handle.remove()

    def __call__(self, *args, **kwargs):
        with self._reader.lock:  # one monitored call at a time: the hook's monitor is the call's
            self._reader.monitor.reset()
            self._reader.active = True
            kwargs["return_dict"] = True
            try:
                output = self.pipe(*args, **kwargs)
            finally:
                self._reader.active = False
            pixels, kind = _to_images(output.images)
            count = len(pixels)
            records = self._records(args, kwargs, count)
            results = self.checker.check(pixels, records=records, policy=self.policy,
                                         signals=self._reader.monitor.scores(count), family=self.family)
        flags = [host_action(r, "block") != "pass" for r in results]
        output.images = _black(output.images, kind, flags)
        output.provenance = results
        output.provenance_flagged = flags
        if self.credentials is not None:
            output.save_with_credentials = lambda i, path: self.save_with_credentials(output, i, path)
        return output

    def save_with_credentials(self, output, i: int, path) -> Path:
        """Save output.images[i] at path (the record in a PNG), then sign it with its own check's assertion."""
        from .. import __version__
        from ..core import credentials as cr
        from ..core.record import write_record

        if self.credentials is None:
            raise cr.CredentialsError("this pipeline was guarded without credentials: guard(pipe, index, "
                                      "credentials='DIR')")
        path = Path(path)
        cr.mime_of(path)  # a format credentials can be written into, before anything is saved
        image, result = output.images[i], output.provenance[i]
        if not hasattr(image, "save"):
            raise cr.CredentialsError("save_with_credentials saves PIL images: call the pipeline with "
                                      "output_type='pil'")
        image.save(path)
        if path.suffix.lower() == ".png":
            write_record(path, result, png=True, sidecar=False)
        cr.sign_file(path, self.credentials, cr.manifest_for(result, f"diffusers pipeline {type(self.pipe).__name__} "
                                                                     f"(provenance-guard {__version__})", path.name,
                                                             include_prompts=self.include_prompts))
        return path

    def _records(self, args, kwargs, count: int) -> list[GenerationRecord]:
        prompt = kwargs.get("prompt", args[0] if args else None)
        negative = kwargs.get("negative_prompt")
        prompts = prompt if isinstance(prompt, list) else [prompt]
        per_prompt = max(1, count // max(1, len(prompts)))
        out = []
        for i in range(count):
            p = prompts[min(len(prompts) - 1, i // per_prompt)] if prompts else None
            n = negative[min(len(negative) - 1, i // per_prompt)] if isinstance(negative, list) else negative
            out.append(GenerationRecord(prompt=p, negative_prompt=n, steps=kwargs.get("num_inference_steps"),
                                        cfg=kwargs.get("guidance_scale"), sampler=type(self.pipe.scheduler).__name__,
                                        model=getattr(self.pipe.config, "_name_or_path", None) or None,
                                        width=kwargs.get("width"), height=kwargs.get("height"), source="diffusers"))
        return out


def _credentials(value):
    """None, a Credentials, or a folder (str/Path) loaded and checked now: credentials that cannot sign fail
    closed here, before any image is made."""
    if value is None:
        return None
    from ..core import credentials as cr

    if isinstance(value, cr.Credentials):
        return value
    reason = cr.unavailable()
    if reason:
        raise cr.CredentialsUnavailable(reason)
    return cr.load_credentials(value)


def guard(pipe, index: str | Sequence[str], policy: Policy | None = None, **kwargs) -> GuardedPipeline:
    """Check every output of pipe against index (see the module docstring); returns the guarded pipeline."""
    return GuardedPipeline(pipe, index, policy, **kwargs)
