"""mmbalance: a fair benchmark for balanced multimodal learning.

`mmbalance.methods` lives in the top-level ``methods/`` folder and `mmbalance.datasets` in the
top-level ``datasets/`` folder (installed there by setuptools ``package-dir``). In a source checkout
that is not installed (or installed in editable mode), we append the repository root to this
package's ``__path__`` so that both sub-packages resolve from the checkout as well.
``datasets/`` has no ``__init__.py`` and is never importable as a top-level ``datasets``.
"""
from __future__ import annotations

from pathlib import Path as _Path

__version__ = "0.1.0"


def _bridge_source_checkout() -> None:
    here = _Path(__file__).resolve().parent
    root = here.parent
    installed_methods = here / "methods"
    if (root / "pyproject.toml").is_file() and (root / "methods").is_dir() and not installed_methods.exists():
        if str(root) not in __path__:  # type: ignore[name-defined]
            __path__.append(str(root))  # type: ignore[name-defined]


_bridge_source_checkout()
