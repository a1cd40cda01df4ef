"""Packaging: HF `datasets` is never shadowed; mmbalance.methods/datasets import from the checkout."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_import_datasets_is_hugging_face_from_repo_root():
    # Run with the repo root as working directory (as `python -m` and pytest do).
    code = ("import datasets, mmbalance.methods.baseline as b, mmbalance.datasets.mfeat as m;"
            "print(datasets.__file__); print(hasattr(datasets, 'load_dataset')); print(b.__file__); print(m.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\n")
    assert "site-packages" in out[0] and out[1] == "True"
    assert Path(out[2]).resolve() == (REPO / "methods" / "baseline.py").resolve()
    assert Path(out[3]).resolve() == (REPO / "datasets" / "mfeat.py").resolve()


def test_datasets_folder_has_no_init():
    assert not (REPO / "datasets" / "__init__.py").exists()
    assert (REPO / "methods" / "__init__.py").exists()


def test_help_does_not_import_heavy_packages():
    code = ("import sys, mmbalance.run as r; r.build_parser();"
            "print(sorted(m for m in ('torch', 'transformers', 'timm', 'segmentation_models_pytorch', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
