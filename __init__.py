"""provenance-guard: tells, at the moment an image is generated, whether it comes too close to a known
training image (CLIP embedding -> FAISS search over LAION or a studio's references -> exact cosine ->
pass / warn / block, with the matches and a provenance record).

This folder is at once the Python package ``provenance_guard``, a ComfyUI custom node pack (ComfyUI
imports this file and reads NODE_CLASS_MAPPINGS / WEB_DIRECTORY) and an A1111 extension (scripts/).
Importing it is cheap: no torch, faiss or host module is loaded until a check runs.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_COMFYUI = ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY")


def __getattr__(name: str) -> Any:
    # The public API (Checker, Bundle, ...) resolves from core on first use, so importing stays cheap.
    # Dunder lookups (__path__, ...) must fail plainly: a test runner may import this file as a module.
    import importlib

    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _COMFYUI:
        # ComfyUI reads these off this module when it loads custom_nodes/; that is when we register.
        nodes = importlib.import_module(".comfyui_nodes", __name__)
        nodes.register_with_comfyui()
        return getattr(nodes, name)
    try:
        core = importlib.import_module(".core", __name__)
    except ImportError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    if name in core.__all__:
        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
