"""The "Provenance Guard" settings section (shared.opts): the defaults a studio sets once, with the widgets
the webui draws for them (sliders for thresholds, radios for choices), and the bundle list.

The webui's settings page draws str, int and bool options by itself and refuses to start on any other type
without a component (a float threshold without one crashed A1111 and hung Forge at start), so every option
names its component. Values are validated where they are used (script.run_state): a setting edited into
config.json or posted through the API that is not one of the choices fails the check under the fail mode.
"""
from __future__ import annotations

import os
from typing import Any

SECTION = ("provenance_guard", "Provenance Guard")
CATEGORY = "postprocessing"
ACTIONS = ["warn", "block"]
FAIL_MODES = ["open", "closed"]
VERIFY_MODES = ["confirm", "off", "escalate", "confirm+escalate"]
DEFAULTS: dict[str, Any] = {
    "enabled": False, "bundle": "", "bundle_path": "", "use_bundle_thresholds": True, "warn": 0.90,
    "block": 0.95, "action": "warn", "fail_mode": "open", "verify": "confirm", "fetch_references": False,
    "references": "", "memorization": True, "memorization_steps": 5, "memorization_threshold": 0.0,
    "prompt_action": "warn",
}
LABELS = {
    "enabled": "Check every generated image by default",
    "bundle": "Default bundle (a folder under models/provenance)",
    "bundle_path": "Default bundle path or index server URL (overrides the folder)",
    "use_bundle_thresholds": "Use the bundle's own thresholds",
    "warn": "Warn at similarity (exact cosine)",
    "block": "Block at similarity (exact cosine)",
    "action": "On a match",
    "fail_mode": "If a check cannot run: open (pass, marked unchecked) or closed (block)",
    "verify": "Verify matches on the training image's pixels: confirm (a block found different becomes warn), "
              "escalate (a verified copy blocks), both, or off",
    "fetch_references": "Fetch training images of URL-only (LAION) bundles to verify them (tells each image's "
                        "host that someone looked at it)",
    "references": "Folder of the bundle's reference images, if it moved",
    "memorization": "Read the memorization signal from the sampler's CFG predictions (no extra compute)",
    "memorization_steps": "Sampling steps the memorization signal averages",
    "memorization_threshold": "Memorization threshold for this model (0: the built-in table, which has none for "
                              "Stable Diffusion: the score is then shown, unrated)",
    "prompt_action": "How far a flagged prompt alone raises an image's verdict",
}
PROMPT_ACTIONS = ["warn", "pass", "block"]
CHOICES = {"action": ACTIONS, "fail_mode": FAIL_MODES, "verify": VERIFY_MODES, "prompt_action": PROMPT_ACTIONS}


def option_name(key: str) -> str:
    return f"provenance_guard_{key}"


def default(key: str) -> Any:
    try:
        from modules import shared

        return getattr(shared.opts, option_name(key), DEFAULTS[key])
    except ImportError:
        return DEFAULTS[key]


def choice(key: str) -> str:
    """A choice setting's value, or its default where the stored value is not one of the choices (a UI
    widget cannot show it; the run itself still refuses it)."""
    value = default(key)
    return value if value in CHOICES[key] else DEFAULTS[key]


def models_dir() -> str:
    from modules import paths

    return os.path.join(paths.models_path, "provenance")


def bundle_choices() -> list[str]:
    root = models_dir()
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "manifest.json")))


def options() -> dict[str, Any]:
    """key -> shared.OptionInfo, each with the component the webui draws it with."""
    import gradio as gr
    from modules import shared

    def info(key: str, component=None, args=None, **kw):
        return shared.OptionInfo(DEFAULTS[key], LABELS[key], component, args, **kw)

    threshold = {"minimum": -1.0, "maximum": 1.0, "step": 0.001}
    return {
        "enabled": info("enabled"),
        "bundle": info("bundle", gr.Dropdown, lambda: {"choices": bundle_choices(), "allow_custom_value": True}),
        "bundle_path": info("bundle_path"),
        "use_bundle_thresholds": info("use_bundle_thresholds"),
        "warn": info("warn", gr.Slider, threshold),
        "block": info("block", gr.Slider, threshold),
        "action": info("action", gr.Radio, {"choices": ACTIONS}),
        "fail_mode": info("fail_mode", gr.Radio, {"choices": FAIL_MODES}),
        "verify": info("verify", gr.Radio, {"choices": VERIFY_MODES}),
        "fetch_references": info("fetch_references"),
        "references": info("references"),
        "memorization": info("memorization"),
        "memorization_steps": info("memorization_steps", gr.Slider, {"minimum": 1, "maximum": 50, "step": 1}),
        "memorization_threshold": info("memorization_threshold", gr.Number, {"precision": 6}),
        "prompt_action": info("prompt_action", gr.Radio, {"choices": PROMPT_ACTIONS}),
    }


def on_ui_settings() -> None:
    """script_callbacks.on_ui_settings: register the section, under the Postprocessing category."""
    from modules import shared

    items = {option_name(k): v for k, v in options().items()}
    if hasattr(shared, "options_section"):  # A1111 >= 1.7 and Forge: (id, label, category)
        items = shared.options_section(SECTION + (CATEGORY,), items)
    else:
        for item in items.values():
            item.section = SECTION
    for key, item in items.items():
        shared.opts.add_option(key, item)
