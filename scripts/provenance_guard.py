"""The script A1111/Forge loads from this extension (by file path, not as a package): it only makes the
extension folder importable as `provenance_guard` and hands over to a1111_extension/."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _package():
    loaded = sys.modules.get("provenance_guard")
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location("provenance_guard", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules["provenance_guard"] = module
    spec.loader.exec_module(module)
    return module


_package()

from modules import script_callbacks  # noqa: E402

from provenance_guard.a1111_extension import script as _glue  # noqa: E402
from provenance_guard.a1111_extension import settings as _settings  # noqa: E402

ProvenanceGuardScript = _glue.ProvenanceGuardScript
script_callbacks.on_ui_settings(_settings.on_ui_settings)
script_callbacks.on_before_image_saved(_glue.before_image_saved)
script_callbacks.on_image_saved(_glue.image_saved)
script_callbacks.on_cfg_denoiser(_glue.cfg_denoiser)
script_callbacks.on_cfg_denoised(_glue.cfg_denoised)
