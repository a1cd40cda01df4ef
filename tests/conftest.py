"""Shared fixtures. Tests run on CPU; progress bars off."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MMBALANCE_NO_PROGRESS", "1")
# Tiny models: one thread is faster and avoids oversubscription in the 2-process DDP tests.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

# Small mfeat for fast tests: 20 rows per class (14/2/4 per class train/val/test).
SMALL_MFEAT = {"dataset.limit_per_class": 20}


@pytest.fixture
def run_cli(tmp_path):
    """Run the CLI in-process; returns (exit_code, run_dir, result dict or None)."""
    from mmbalance.run import main
    from mmbalance.testing import cli_args

    def _run(method="baseline", dataset="mfeat", *, seed=0, epochs=1, sets=None, extra=None, run_dir=None):
        rd = Path(run_dir) if run_dir else tmp_path / f"{dataset}-{method.replace(':', '-')}-s{seed}"
        extra = list(extra or [])
        if "--resume" not in extra:  # tests re-use folders; a real user's re-run is refused instead
            extra.append("--overwrite")
        code = main(cli_args(method, dataset, seed=seed, epochs=epochs, run_dir=rd, sets=sets, extra=extra))
        res = rd / "result.json"
        return code, rd, (json.loads(res.read_text()) if res.is_file() else None)

    return _run


@pytest.fixture
def kill_and_resume(run_cli, tmp_path, monkeypatch):
    """Train ``method`` once uninterrupted (``tmp_path/full``) and once killed after ``stop_after`` epochs
    (the engine's MMBALANCE_STOP_AFTER_EPOCHS hook) then resumed (``tmp_path/killed``).
    Returns ``((full_dir, full_result), (exit_code, resumed_dir, resumed_result))``."""

    def _run(method, *, sets, epochs, stop_after, dataset="mfeat"):
        _, full_dir, full = run_cli(method, dataset, sets=sets, epochs=epochs, run_dir=tmp_path / "full")
        monkeypatch.setenv("MMBALANCE_STOP_AFTER_EPOCHS", str(stop_after))
        with pytest.raises(KeyboardInterrupt):
            run_cli(method, dataset, sets=sets, epochs=epochs, run_dir=tmp_path / "killed")
        monkeypatch.delenv("MMBALANCE_STOP_AFTER_EPOCHS")
        resumed = run_cli(method, dataset, sets=sets, epochs=epochs, run_dir=tmp_path / "killed", extra=["--resume"])
        return (full_dir, full), resumed

    return _run
