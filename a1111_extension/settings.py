"""The "Provenance Guard" settings section (shared.opts): the defaults a studio sets once, with the widgets
the webui draws for them (sliders for thresholds, radios for choices), and the bundle list.

The webui's settings page draws str, int and bool options by itself and refuses to start on any other type
without a component (a float threshold without one crashed A1111 and hung Forge at start), so every option
names its component. On every page load the webui refreshes each option with
``gr.update(value=..., **component_args)``: under gradio 3 (A1111) one keyword that the component's update()
does not take makes the whole refresh fail (HTTP 500, every field "Error", and Apply then writes the stale
values back), so component_args keeps only the keywords the installed gradio takes (``update_args``).

Values are validated where they are used: a safety setting (fail mode, action, verify, views, prompt action,
Content Credentials, the on/off switches) edited into config.json or posted through the API that is not one
of its choices counts as its safe value (``SAFE``: what studio enforcement runs with), and the run says so
once (``safe_choice``).

Content Credentials (``credentials``: off | on | required; a1111_extension/credentials.py): the safe value of
an unusable one is "required". Someone who typed a value meant to sign; "on" would save images unsigned
without a word when the key is missing, "required" fails closed with one line naming the field to fix (and
signs as usual when the key is there). Prompts in the credentials (``credentials_prompts``) are a privacy
choice: an unusable value leaves them out.
"""
from __future__ import annotations

import inspect
import logging
import os
import threading
from typing import Any
from collections.abc import Callable

log = logging.getLogger("provenance_guard")

SECTION = ("provenance_guard", "Provenance Guard")
CATEGORY = "postprocessing"
ACTIONS = ["warn", "block"]
FAIL_MODES = ["open", "closed"]
VERIFY_MODES = ["confirm", "off", "escalate", "confirm+escalate"]
DEFAULTS: dict[str, Any] = {
    "enabled": False, "bundle": "", "bundle_path": "", "bundle_url": "", "use_bundle_thresholds": True, "warn": 0.90,
    "block": 0.95, "action": "warn", "fail_mode": "open", "verify": "confirm", "fetch_references": False,
    "references": "", "memorization": True, "memorization_steps": 5, "memorization_threshold": 0.0,
    "prompt_action": "warn", "strict": False, "credentials": "off", "credentials_folder": "",
    "credentials_prompts": True, "views": "whole",
}
LABELS = {
    "enabled": "Check every generated image by default",
    "bundle": "Default bundle (a folder under models/provenance)",
    "bundle_path": "Default bundle folder path, or a studio's index server URL (http://host:port/NAME), the way to "
                   "check against a studio's index without a copy (overrides the folder)",
    "bundle_url": "Default bundle URL: a published bundle (https://host/path/ or hf://datasets/OWNER/NAME), "
                  "downloaded once into models/provenance and reused (overrides the folder; checks fail under the "
                  "fail mode while it downloads)",
    "use_bundle_thresholds": "Use the bundle's own thresholds",
    "warn": "Warn at similarity (exact cosine)",
    "block": "Block at similarity (exact cosine)",
    "action": "On a match",
    "fail_mode": "If a check cannot run: open (pass, marked unchecked) or closed (block)",
    "verify": "Verify matches on the training image's pixels: confirm (a block found different becomes warn), "
              "escalate (a verified copy blocks), both, or off",
    "views": "Query views: whole (the image alone) or multi (also its four quarters and its centre, each verified "
             "against the part that found it: finds a training image copied into part of a larger image, for six "
             "times the embedding work)",
    "fetch_references": "Fetch training images of URL-only (LAION) bundles to verify them (tells each image's "
                        "host that someone looked at it)",
    "references": "Folder of the bundle's reference images, if it moved",
    "memorization": "Read the memorization signal from the sampler's CFG predictions (no extra compute)",
    "memorization_steps": "Sampling steps the memorization signal averages",
    "memorization_threshold": "Memorization threshold for this model (0: the built-in table, which has none for "
                              "Stable Diffusion: the score is then shown, unrated)",
    "prompt_action": "How far a flagged prompt alone raises an image's verdict",
    "strict": "Strict (studios): a blocked image's pixels are never shown, not even beside its training image",
    "credentials": "Content Credentials (C2PA): sign each checked image's saved file with its check. on: a key that "
                   "cannot be used is said once and images are saved unsigned; required: nothing is saved unsigned "
                   "(without a usable key every image is blocked)",
    "credentials_folder": "Content Credentials signing key folder (signer.pem and signer.key, made by "
                          "'provenance-guard credentials init DIR'; empty: $PROVENANCE_GUARD_CREDENTIALS)",
    "credentials_prompts": "Put the prompt and negative prompt into the signed Content Credentials (off: left out, "
                           "for privacy)",
}
PROMPT_ACTIONS = ["warn", "pass", "block"]
CREDENTIAL_MODES = ["off", "on", "required"]
VIEWS = ["whole", "multi"]  # core.policy.VIEWS, the webui's default first
CHOICES = {"action": ACTIONS, "fail_mode": FAIL_MODES, "verify": VERIFY_MODES, "prompt_action": PROMPT_ACTIONS,
           "credentials": CREDENTIAL_MODES, "views": VIEWS}
# What an unusable value of a safety setting counts as: the values studio enforcement runs with (closed,
# block, confirm+escalate, checking and the monitor on, strict evidence, nothing fetched, credentials
# required, prompts kept out of them), and for the views the more thorough query (multi). Thresholds have no
# such value (neither set is surely the stricter): unusable ones fail the check under the fail mode.
SAFE: dict[str, Any] = {"action": "block", "fail_mode": "closed", "verify": "confirm+escalate",
                        "prompt_action": "block", "enabled": True, "memorization": True, "strict": True,
                        "fetch_references": False, "credentials": "required", "credentials_prompts": False,
                        "views": "multi"}
# The Settings field a message names where the command line would name a flag.
FIELDS = {"references": "Settings > Provenance Guard > \"Folder of the bundle's reference images\"",
          "fetch": "Settings > Provenance Guard > \"Fetch training images of URL-only (LAION) bundles\" "
                   "(or the script's own checkbox)",
          "credentials": "Settings > Provenance Guard > \"Content Credentials (C2PA)\"",
          "credentials_folder": "Settings > Provenance Guard > \"Content Credentials signing key folder\""}
_said: set = set()
_said_lock = threading.Lock()


def option_name(key: str) -> str:
    return f"provenance_guard_{key}"


def default(key: str) -> Any:
    try:
        from modules import shared

        return getattr(shared.opts, option_name(key), DEFAULTS[key])
    except ImportError:
        return DEFAULTS[key]


def say_once(message: str) -> bool:
    """Log a warning once per process (an unusable setting is read at every generation); True when it was
    said now."""
    with _said_lock:
        if message in _said:
            return False
        _said.add(message)
    log.warning("provenance-guard: %s", message)
    return True


def unusable(key: str, value: Any) -> str:
    allowed = " or ".join(repr(c) for c in CHOICES[key]) if key in CHOICES else "true or false"
    return (f"setting {option_name(key)} = {value!r} is not {allowed}; it counts as {SAFE[key]!r} (the safe value) "
            f"until it is fixed in Settings > Provenance Guard or config.json")


def safe_choice(key: str, value: Any, warnings: list | None = None) -> Any:
    """value when it is one of the key's choices (a bool for an on/off setting), else the key's safe value,
    said once in the log and added to warnings."""
    ok = value in CHOICES[key] if key in CHOICES else isinstance(value, bool)
    if ok:
        return value
    message = unusable(key, value)
    say_once(message)
    if warnings is not None and message not in warnings:
        warnings.append(message)
    return SAFE[key]


def choice(key: str) -> Any:
    """A safety setting's current value, or its safe value where the stored one is not usable."""
    return safe_choice(key, default(key))


def update_args(component: Any, args: dict[str, Any]) -> dict[str, Any]:
    """The keywords of args that the installed gradio takes both when it builds component and when the
    settings page refreshes it (gradio 3's Component.update() has a fixed list; gradio 4 has no update() and
    gr.update takes any keyword, so everything the constructor takes is kept)."""
    def names(fn: Callable | None) -> set | None:
        if fn is None:
            return None
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            return None
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return None
        return set(params)

    keep = dict(args)
    for allowed in (names(getattr(component, "update", None)), names(getattr(component, "__init__", None))):
        if allowed is not None:
            keep = {k: v for k, v in keep.items() if k in allowed}
    return keep


def models_dir() -> str:
    from modules import paths

    return os.path.join(paths.models_path, "provenance")


def bundle_choices() -> list[str]:
    """Bundle folders in models/provenance; dot folders (a pull or a maintenance run in progress) are not."""
    root = models_dir()
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root)
                  if not d.startswith(".") and os.path.isfile(os.path.join(root, d, "manifest.json")))


def options() -> dict[str, Any]:
    """key -> shared.OptionInfo, each with the component the webui draws it with."""
    import gradio as gr
    from modules import shared

    def info(key: str, component=None, args=None, **kw):
        if component is not None and args is not None:
            given = args
            args = (lambda: update_args(component, given())) if callable(given) else update_args(component, given)
        return shared.OptionInfo(DEFAULTS[key], LABELS[key], component, args, **kw)

    threshold = {"minimum": -1.0, "maximum": 1.0, "step": 0.001}
    return {
        "enabled": info("enabled"),
        "bundle": info("bundle", gr.Dropdown, lambda: {"choices": bundle_choices(), "allow_custom_value": True}),
        "bundle_path": info("bundle_path"),
        "bundle_url": info("bundle_url"),
        "use_bundle_thresholds": info("use_bundle_thresholds"),
        "warn": info("warn", gr.Slider, threshold),
        "block": info("block", gr.Slider, threshold),
        "action": info("action", gr.Radio, {"choices": ACTIONS}),
        "fail_mode": info("fail_mode", gr.Radio, {"choices": FAIL_MODES}),
        "verify": info("verify", gr.Radio, {"choices": VERIFY_MODES}),
        "views": info("views", gr.Radio, {"choices": VIEWS}),
        "fetch_references": info("fetch_references"),
        "references": info("references"),
        "memorization": info("memorization"),
        "memorization_steps": info("memorization_steps", gr.Slider, {"minimum": 1, "maximum": 50, "step": 1}),
        "memorization_threshold": info("memorization_threshold", gr.Number, {"precision": 6}),
        "prompt_action": info("prompt_action", gr.Radio, {"choices": PROMPT_ACTIONS}),
        "strict": info("strict"),
        "credentials": info("credentials", gr.Radio, {"choices": CREDENTIAL_MODES}),
        "credentials_folder": info("credentials_folder"),
        "credentials_prompts": info("credentials_prompts"),
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
