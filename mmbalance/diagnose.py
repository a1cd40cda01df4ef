"""``python -m mmbalance.diagnose RUN_DIR [RUN_DIR ...]`` (see :mod:`mmbalance.diagnostics.cli`)."""
from __future__ import annotations

from .diagnostics.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
