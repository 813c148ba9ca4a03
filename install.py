"""Run by A1111/Forge at start-up (launch.py) for extensions installed from URL: installs what is missing with
launch.run_pip, and nothing at all under --skip-install.

Versions are read with importlib.metadata (what pip sees: torch "2.14.1", not torch.__version__'s
"2.14.1+cu130"), so nothing heavy is imported at every start. The webui's own torch, torchvision and numpy are
pinned for every install, so pip never replaces them; under numpy 1.x (the webuis pin 1.26.2) pyarrow stays
below 26, the first release that needs numpy 2 (and says so only at import time, so pip cannot tell).
open_clip is never upgraded: the webuis pin 2.20.0 and reinstall it at every start; the extension works with it.
"""
import importlib.metadata as metadata
import os
import re
import tempfile

import launch

# distribution -> (import name, requirement)
PACKAGES = {
    "open_clip_torch": ("open_clip", "open_clip_torch>=2.20"),
    "faiss-cpu": ("faiss", "faiss-cpu>=1.11"),  # 1.11: the memory-mapped re-rank views (core/bundle)
    "pyarrow": ("pyarrow", "pyarrow>=14"),
    "safetensors": ("safetensors", "safetensors"),
    "huggingface_hub": ("huggingface_hub", "huggingface_hub"),
    "fsspec": ("fsspec", "fsspec"),
    "requests": ("requests", "requests"),
    "opencv-python-headless": ("cv2", "opencv-python-headless>=4.5"),  # the webuis ship opencv-python already
}
# Optional: Content Credentials. Its wheel needs glibc 2.28+ (Linux), macOS or Windows; a failed install leaves
# credentials off (the extension says so once) and never stops the webui.
OPTIONAL = {"c2pa-python": ("c2pa", "c2pa-python>=0.38,<0.39")}
PINNED = ("torch", "torchvision", "numpy")
PYARROW_FOR_NUMPY1 = "pyarrow>=14,<26"
# An installed copy older than this is upgraded (importable is not enough: older FAISS lacks what bundles use).
MINIMUM = {"faiss-cpu": (1, 11)}


def installed(dist: str):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def release(version: str) -> tuple:
    """'26.0.1' -> (26, 0, 1); '2.14.1+cu130' -> (2, 14, 1)."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def wanted() -> list:
    """The requirements to install now: missing packages, ones older than MINIMUM, and a pyarrow that cannot
    work beside numpy 1."""
    numpy = installed("numpy")
    numpy1 = numpy is not None and release(numpy) < (2,)
    out = []
    for dist, (module, requirement) in PACKAGES.items():
        if dist == "pyarrow" and numpy1:
            pyarrow = installed("pyarrow")
            if pyarrow is None or release(pyarrow) >= (26,):
                out.append(PYARROW_FOR_NUMPY1)
            continue
        version = installed(dist)
        if not importable(module) or (dist in MINIMUM and version is not None and release(version) < MINIMUM[dist]):
            out.append(requirement)
    return out


def main() -> None:
    if getattr(getattr(launch, "args", None), "skip_install", False):
        return
    todo = wanted()
    if not todo and all(importable(module) for module, _ in OPTIONAL.values()):
        return
    fd, constraints = tempfile.mkstemp(suffix=".txt", prefix="provenance-guard-")
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{dist}=={installed(dist)}\n" for dist in PINNED if installed(dist)))
    try:
        for requirement in todo:
            launch.run_pip(f'install "{requirement}" -c "{constraints}"', f"{requirement} for provenance-guard")
        for dist, (module, requirement) in OPTIONAL.items():
            if not importable(module):
                try:
                    launch.run_pip(f'install "{requirement}" -c "{constraints}"',
                                   f"{requirement} for provenance-guard (Content Credentials)")
                except Exception as exc:  # noqa: BLE001 - optional: credentials stay off, the webui starts
                    print(f"provenance-guard: {dist} could not be installed ({exc}); Content Credentials are off")
    finally:
        os.unlink(constraints)


main()
