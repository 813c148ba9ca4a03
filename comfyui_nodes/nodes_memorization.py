"""ComfyUI node: Memorization Monitor (category "provenance"), MODEL -> MODEL.

Patches the model with a post-CFG function (model_options "sampler_post_cfg_function"): at every sampling
step ComfyUI hands it cond_denoised, uncond_denoised, sigma and input, and it feeds the run's
core.memorization monitor, keyed by the prompt id and the sampler node, at no extra forward pass. The
Provenance Check downstream of that sampler (found by tracing the graph) reads the score of each image and
shows it in its report and record. A sampler running at CFG 1 computes no unconditional prediction: the
score is then unavailable. A sampler whose output ComfyUI takes from its cache does not sample: nothing is
recorded for that run.
"""
from __future__ import annotations

from ..core.memorization import DEFAULT_STEPS, RUNS, post_cfg_step

CATEGORY = "provenance"
# ComfyUI's model configs (comfy/supported_models.py) -> the families of core.memorization.THRESHOLDS.
FAMILIES = {"SD15": "sd1", "SD20": "sd2", "SD21UnclipL": "sd2", "SD21UnclipH": "sd2", "SDXL": "sdxl",
            "SDXLRefiner": "sdxl", "SSD1B": "sdxl", "Segmind_Vega": "sdxl"}


def run_key(prompt_id: str, node_id: str) -> str:
    return f"{prompt_id}:{node_id}"


def executing() -> tuple:
    """(prompt id, node id) of what ComfyUI is executing now, or (None, None) outside an execution."""
    try:
        from comfy_execution.utils import get_executing_context

        context = get_executing_context()
        if context is not None:
            return str(context.prompt_id), str(context.node_id)
    except (ImportError, AttributeError):
        pass
    try:
        from server import PromptServer

        return str(getattr(PromptServer.instance, "last_prompt_id", None)), None
    except (ImportError, AttributeError):
        return None, None


def family_of(model) -> str:
    config = getattr(getattr(model, "model", None), "model_config", None)
    return FAMILIES.get(type(config).__name__, type(config).__name__.lower() if config is not None else "unknown")


class MemorizationMonitor:
    """Memorization Monitor: records the sampler's CFG signal (Wen et al. 2024) for Provenance Check."""

    CATEGORY = CATEGORY
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    DESCRIPTION = ("Reads the memorization signal from the sampler's own conditional and unconditional predictions "
                   "(no extra compute) for the Provenance Check downstream.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "the model the sampler uses"}),
            "steps": ("INT", {"default": DEFAULT_STEPS, "min": 1, "max": 50,
                              "tooltip": "first sampling steps averaged (the signal is strongest early)"}),
        }, "optional": {
            "threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.001, "tooltip": (
                "memorization score at or above which the prompt is flagged, for this model (calibrate it with "
                "bench/q2_memorization.py --model); 0: the bundle's or the built-in table's, which has none for "
                "Stable Diffusion (the score is then shown, unrated)")}),
        }}

    def patch(self, model, steps=DEFAULT_STEPS, threshold=0.0):
        import math

        family = family_of(model)
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold) \
                or threshold < 0:
            from ..core.errors import ConfigError

            raise ConfigError(f"Memorization Monitor threshold {threshold!r}: give a number >= 0 (0: the bundle's "
                              f"or the built-in table's)")
        patched = model.clone()

        def record(args):
            prompt_id, node_id = executing()
            if prompt_id is not None:
                monitor = RUNS.monitor(run_key(prompt_id, node_id or ""), int(steps))
                monitor.family = family
                monitor.threshold = float(threshold) if threshold > 0 else None
                post_cfg_step(monitor, args)
            return args["denoised"]

        patched.set_model_sampler_post_cfg_function(record)
        return (patched,)


NODE_CLASS_MAPPINGS = {"ProvenanceMemorizationMonitor": MemorizationMonitor}
NODE_DISPLAY_NAME_MAPPINGS = {"ProvenanceMemorizationMonitor": "Memorization Monitor"}
