"""ComfyUI glue: the node mappings, the web extension folder, and start-up registration (the
models/provenance folder; studio enforcement when configured, refusing every prompt when it is configured
but cannot run; Content Credentials on the saved files when configured, credentials.py). Everything the
check itself does is in core/; importing this package loads neither torch nor faiss nor any model."""
from __future__ import annotations

import logging
import os

from .nodes_provenance import FOLDER, NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./comfyui_nodes/web"  # relative to the repository root, which ComfyUI loads

_registered = False


def register_with_comfyui() -> None:
    """Register models/provenance with folder_paths and, if configured, studio enforcement. Outside ComfyUI
    (no folder_paths module) this does nothing; it runs once."""
    global _registered
    if _registered:
        return
    try:
        import folder_paths
    except ImportError:
        return
    _registered = True
    default = os.path.join(folder_paths.models_dir, FOLDER)
    folder_paths.add_model_folder_path(FOLDER, default)
    os.makedirs(default, exist_ok=True)
    from server import PromptServer

    from . import enforce

    try:
        config = enforce.load_config(folder_paths.get_user_directory())
        if config:
            enforce.register(PromptServer.instance, config, _node_classes())
    except Exception as exc:  # noqa: BLE001 - configured but unusable: refuse every prompt, never run unchecked
        reason = (f"Provenance Guard studio enforcement is configured but cannot run: {exc}. Every prompt is refused "
                  f"until it is fixed (then restart ComfyUI)")
        logging.getLogger("provenance_guard").error("provenance-guard: %s", reason)
        PromptServer.instance.add_on_prompt_handler(enforce.refuse_all(reason))
    from . import credentials

    try:
        if credentials.configure(folder_paths.get_user_directory()) is not None:
            credentials.wrap_savers(_node_classes())
            PromptServer.instance.add_on_prompt_handler(credentials.prompt_handler)
    except Exception as exc:  # noqa: BLE001 - configured but unusable: refuse every prompt, never save unsigned
        reason = (f"Provenance Guard Content Credentials are configured but cannot be used: {exc}. Every prompt is "
                  f"refused until it is fixed (then restart ComfyUI)")
        logging.getLogger("provenance_guard").error("provenance-guard: %s", reason)
        PromptServer.instance.add_on_prompt_handler(enforce.refuse_all(reason))
    PromptServer.instance.add_on_prompt_handler(enforce.record_slot)


def _node_classes() -> dict:
    """ComfyUI's NODE_CLASS_MAPPINGS: the dict itself, which keeps gaining the packs loaded after this one."""
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "register_with_comfyui"]
