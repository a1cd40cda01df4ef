"""Performance work must not change numbers: a short CPU run per method (small mfeat, 2 epochs, fixed seed)
is compared against final-parameter summaries, per-epoch train losses and val/test metrics recorded
BEFORE the speed-ups (tests/golden/perf_golden.json). Re-record only for an intended numeric change:
``MMBALANCE_RECORD_GOLDEN=1 python -m pytest -q tests/test_perf_golden.py``."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden" / "perf_golden.json"
METHODS = ["baseline", "cggm", "agm", "ogm_ge", "greedy", "mmpareto", "pmr", "mslr", "inforeg", "dgl",
           "gblending", "qmf", "multitask", "mrd", "ume", "umt", "mla"]
SETS = {"dataset.limit_per_class": 10, "train.modality_eval": "none", "train.diagnostics": "none"}


def _summary(method: str, tmp: Path) -> dict | None:
    from mmbalance.errors import MethodNotApplicable
    from mmbalance.testing import build_trainer

    try:
        tr = build_trainer(method, "mfeat", run_dir=tmp / method, epochs=2, sets=SETS)
    except MethodNotApplicable:
        return None
    result = tr.fit()
    params = [p.detach().double() for p in tr.ctx.model.parameters()]
    flat = torch.cat([p.reshape(-1) for p in params])
    rows = [json.loads(x) for x in (tmp / method / "metrics.jsonl").read_text().splitlines()]
    return {"param_sum": float(flat.sum()), "param_sq": float((flat * flat).sum()),
            "param_w": float((flat * torch.arange(len(flat), dtype=torch.float64).remainder(7)).sum()),
            "train_loss": [r["train_loss"] for r in rows],
            "val": {k: v for k, v in result["val"].items() if isinstance(v, float)},
            "test": {k: v for k, v in result["test"].items() if isinstance(v, float)}}


def _close(a: float, b: float, tol: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


if os.environ.get("MMBALANCE_RECORD_GOLDEN"):
    def test_record_golden(tmp_path):
        out = {m: _summary(m, tmp_path) for m in METHODS}
        GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
else:
    @pytest.mark.parametrize("method", METHODS)
    def test_numbers_unchanged_by_speedups(method, tmp_path):
        golden = json.loads(GOLDEN.read_text())[method]
        got = _summary(method, tmp_path)
        if golden is None:
            assert got is None
            return
        for k in ("param_sum", "param_sq", "param_w"):
            assert _close(got[k], golden[k]), (k, got[k], golden[k])
        assert len(got["train_loss"]) == len(golden["train_loss"])
        assert all(_close(a, b) for a, b in zip(got["train_loss"], golden["train_loss"])), got["train_loss"]
        for split in ("val", "test"):
            for k, v in golden[split].items():
                assert _close(got[split][k], v), (split, k, got[split][k], v)
