"""The "Provenance" settings section (shared.opts): the defaults a studio sets once, and the bundle list."""
from __future__ import annotations

import os
from typing import Any

SECTION = ("provenance_guard", "Provenance")
DEFAULTS: dict[str, Any] = {
    "enabled": False, "bundle": "", "bundle_path": "", "use_bundle_thresholds": True, "warn": 0.90,
    "block": 0.95, "action": "warn", "fail_mode": "open",
}
LABELS = {
    "enabled": "Check every generated image by default",
    "bundle": "Default bundle (a folder name under models/provenance)",
    "bundle_path": "Default bundle path or server URL (overrides the folder name)",
    "use_bundle_thresholds": "Use the bundle's own thresholds",
    "warn": "Warn at similarity (exact cosine)",
    "block": "Block at similarity (exact cosine)",
    "action": "On a match: warn or block",
    "fail_mode": "If a check cannot run: open (pass, marked unchecked) or closed (block)",
}


def option_name(key: str) -> str:
    return f"provenance_guard_{key}"


def default(key: str) -> Any:
    try:
        from modules import shared

        return getattr(shared.opts, option_name(key), DEFAULTS[key])
    except ImportError:
        return DEFAULTS[key]


def models_dir() -> str:
    from modules import paths

    return os.path.join(paths.models_path, "provenance")


def bundle_choices() -> list[str]:
    root = models_dir()
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "manifest.json")))


def on_ui_settings() -> None:
    """script_callbacks.on_ui_settings: register the section."""
    from modules import shared

    for key, value in DEFAULTS.items():
        info = shared.OptionInfo(value, LABELS[key], section=SECTION)
        shared.opts.add_option(option_name(key), info)
