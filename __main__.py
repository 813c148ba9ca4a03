"""``python -m provenance_guard`` is the ``provenance-guard`` command."""
import sys

from .cli import main

sys.exit(main())
