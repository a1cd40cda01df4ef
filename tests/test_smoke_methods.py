"""Every registered method × {mfeat (small), synthetic 3-modality regression}: one epoch through the
CLI, finite losses, the three run files; a method that refuses a task says why (exit 2, nothing written)."""
from __future__ import annotations

import json
import math

import pytest
from conftest import SMALL_MFEAT

from mmbalance.registry import list_methods

DATASETS = {
    "mfeat": SMALL_MFEAT,
    "synthetic-regression": {"dataset.n_samples": 120},
    "avdigits": {"dataset.limit_per_class": 20},
}


def _method_names() -> list[str]:
    return [m if m != "unimodal" else "unimodal:m0" for m in list_methods()]


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("method", _method_names())
def test_one_epoch(method, dataset, tmp_path, capsys):
    from mmbalance.run import main
    from mmbalance.testing import cli_args

    if method == "unimodal:m0" and dataset == "mfeat":
        method = "unimodal:fou"
    if method == "unimodal:m0" and dataset == "avdigits":
        method = "unimodal:audio"
    rd = tmp_path / "run"
    sets = dict(DATASETS[dataset])
    if method.startswith("reconboost"):  # one stage = e1 + e2 passes: the smallest stage, 2 epochs
        sets.update({"e1": 1, "e2": 1})
    epochs = 2 if method.startswith("reconboost") else 1
    code = main(cli_args(method, dataset, epochs=epochs, run_dir=rd, sets=sets,
                         extra=["--output-dir", str(tmp_path)]))
    if code == 2:
        err = capsys.readouterr().err
        assert "not applicable" in err and dataset in err, err
        assert not rd.exists()
        return
    assert code == 0, capsys.readouterr().err
    result = json.loads((rd / "result.json").read_text())
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert result["status"] == "ok" and (rd / "config.json").is_file() and rows
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    assert all(isinstance(v, float) and math.isfinite(v) for v in result["test"].values() if isinstance(v, float))
    # imbalance diagnostics for every method (engine-level, on by default)
    diag = result["diagnostics"]
    mods = result["modalities"]
    assert {"probe", "shapley", "permutation", "dynamics_final", "seconds"} <= set(diag)
    assert set(diag["probe"]["test"]) == set(mods) and set(diag["shapley"]["test"]["phi"]) == set(mods)
    assert set(diag["permutation"]["test"]["drop"]) == set(mods)
    assert result["timings"]["diagnostics_seconds"] > 0
    assert all("diag" in r and set(r["diag"]["conf"]) == set(mods) for r in rows)
