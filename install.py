"""Run by A1111/Forge at start-up (launch.py) for extensions installed from URL: installs what is missing
with launch.run_pip, never torch, and nothing at all under --skip-install."""
import importlib.util

import launch

PACKAGES = {  # import name -> pip requirement
    "open_clip": "open_clip_torch>=2.24",
    "faiss": "faiss-cpu>=1.8",
    "pyarrow": "pyarrow>=14",
    "safetensors": "safetensors",
    "huggingface_hub": "huggingface_hub",
    "fsspec": "fsspec",
    "requests": "requests",
}


def main() -> None:
    if getattr(getattr(launch, "args", None), "skip_install", False):
        return
    import os
    import tempfile

    import torch
    import torchvision

    # Dependencies such as open_clip ask for torch; this pins the webui's own so pip never replaces it.
    fd, constraints = tempfile.mkstemp(suffix=".txt", prefix="provenance-guard-")
    with os.fdopen(fd, "w") as f:
        f.write(f"torch=={torch.__version__}\ntorchvision=={torchvision.__version__}\n")
    try:
        for module, requirement in PACKAGES.items():
            if importlib.util.find_spec(module) is None:
                launch.run_pip(f'install "{requirement}" -c "{constraints}"', f"{requirement} for provenance-guard")
    finally:
        os.unlink(constraints)


main()
