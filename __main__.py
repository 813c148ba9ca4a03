"""``python -m provenance_guard`` is the ``provenance-guard`` command.

A clone that pip did not install (a ComfyUI custom_nodes/ folder, an A1111/Forge extension) runs the same
command as ``python path/to/the/clone ...``: Python then runs this file as a script, so the package is
loaded here from this folder, whatever the folder is called."""
import sys

if __package__:
    from .cli import main
else:
    import importlib.util
    import os

    root = os.path.dirname(os.path.abspath(__file__))
    # Python put the folder itself on sys.path: its modules (cli, core, ...) must not pass for top-level ones.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.util.spec_from_file_location("provenance_guard", os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    package = importlib.util.module_from_spec(spec)
    sys.modules["provenance_guard"] = package
    spec.loader.exec_module(package)
    from provenance_guard.cli import main

    # The server's worker processes are spawned: each runs this file again first (as __mp_main__, which
    # multiprocessing does for a main module without a spec) and so loads this same folder, not whatever
    # copy of the package an import by name would find (or fail to find, in a clone pip did not install).
    __spec__ = None

if __name__ == "__main__":
    sys.exit(main())
