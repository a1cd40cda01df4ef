"""Epoch checkpoints every ``train.checkpoint_interval`` seconds (and at the end, and on SIGTERM/SIGINT):
a run killed between two checkpoints resumes from the last one and still reaches the uninterrupted
numbers; a short run writes its checkpoint files once; the setting changes no number and no config hash."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from mmbalance import engine, runfiles
from tests.conftest import SMALL_MFEAT

SETS = {**SMALL_MFEAT, "model.dropout": 0.2, "train.scheduler": "cosine"}


def _rows(rd):
    return [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]


def test_killed_between_checkpoints_resumes_from_the_last_one_to_the_same_numbers(run_cli, tmp_path, monkeypatch):
    _, _, full = run_cli("baseline", sets=SETS, epochs=5, run_dir=tmp_path / "full")
    # a clock that advances 10 s per reading: start 0; epochs 1, 2 end at 10, 20 (not due at 25 s); epoch 3
    # at 30 (due: checkpoint, then 40); epoch 4 at 50 (not due); killed after epoch 4
    monkeypatch.setattr(engine, "_clock", itertools.count(0, 10).__next__)
    monkeypatch.setenv("MMBALANCE_KILL_AFTER_EPOCHS", "4")
    sets = {**SETS, "train.checkpoint_interval": 25}
    with pytest.raises(KeyboardInterrupt):
        run_cli("baseline", sets=sets, epochs=5, run_dir=tmp_path / "killed")
    monkeypatch.delenv("MMBALANCE_KILL_AFTER_EPOCHS")
    rd = tmp_path / "killed"
    last = torch.load(rd / "checkpoints" / "last.pt", weights_only=False)
    assert last["position"]["epoch"] == 3 and len(last["position"]["history"]) == 3
    assert [r["epoch"] for r in _rows(rd)] == [0, 1, 2]  # written with last.pt, not after epoch 4
    best = torch.load(rd / "checkpoints" / "best.pt", weights_only=False)
    assert last["position"]["best"]["epoch"] <= 2 and set(best) == {"model", "extra", "method"}
    code, _, resumed = run_cli("baseline", sets=sets, epochs=5, run_dir=rd, extra=["--resume"])
    assert code == 0 and resumed["val"] == full["val"] and resumed["test"] == full["test"]
    assert resumed["selected"] == full["selected"]
    assert [r["train_loss"] for r in _rows(rd)] == [r["train_loss"] for r in _rows(tmp_path / "full")]


def test_a_short_run_writes_its_checkpoint_files_once_with_the_same_numbers(run_cli, tmp_path, monkeypatch):
    writes: list[str] = []
    save, text = runfiles.atomic_torch_save, runfiles.atomic_write_text
    monkeypatch.setattr(runfiles, "atomic_torch_save", lambda p, path: (writes.append(path.name), save(p, path)))
    monkeypatch.setattr(runfiles, "atomic_write_text", lambda path, t: (writes.append(path.name), text(path, t)))
    _, rd, once = run_cli("baseline", sets=SETS, epochs=4, run_dir=tmp_path / "once")
    assert sorted(writes) == ["best.pt", "config.json", "last.pt", "metrics.jsonl", "result.json"]
    best = torch.load(rd / "checkpoints" / "best.pt", weights_only=False)["model"]
    writes.clear()
    _, rd_every, every = run_cli("baseline", sets={**SETS, "train.checkpoint_interval": 0}, epochs=4,
                                 run_dir=tmp_path / "every")
    assert writes.count("last.pt") == 4 and writes.count("metrics.jsonl") == 4
    assert 1 <= writes.count("best.pt") <= 4
    assert once["val"] == every["val"] and once["test"] == every["test"] and once["selected"] == every["selected"]
    assert once["config_hash"] == every["config_hash"]  # how often files are written is not part of the identity
    best_every = torch.load(rd_every / "checkpoints" / "best.pt", weights_only=False)["model"]
    assert all(torch.equal(best[k], best_every[k]) for k in best)  # the in-memory best is the selected epoch's
    assert [r["epoch"] for r in _rows(rd)] == [0, 1, 2, 3]


def test_killed_before_the_first_checkpoint_leaves_nothing_to_resume_and_reruns_alike(run_cli, tmp_path, monkeypatch,
                                                                                       capsys):
    _, _, full = run_cli("baseline", sets=SETS, epochs=3, run_dir=tmp_path / "full")
    monkeypatch.setenv("MMBALANCE_KILL_AFTER_EPOCHS", "2")
    with pytest.raises(KeyboardInterrupt):
        run_cli("baseline", sets=SETS, epochs=3, run_dir=tmp_path / "k")
    monkeypatch.delenv("MMBALANCE_KILL_AFTER_EPOCHS")
    rd = tmp_path / "k"
    assert not (rd / "checkpoints" / "last.pt").exists() and not (rd / "metrics.jsonl").exists()
    code, _, _ = run_cli("baseline", sets=SETS, epochs=3, run_dir=rd, extra=["--resume"])
    assert code == 2 and "nothing to resume" in capsys.readouterr().err  # the leaderboard then starts it again
    code, _, again = run_cli("baseline", sets=SETS, epochs=3, run_dir=rd)
    assert code == 0 and again["val"] == full["val"] and again["test"] == full["test"]


def test_checkpoint_interval_is_validated(run_cli, capsys):
    code, _, _ = run_cli("baseline", sets={**SMALL_MFEAT, "train.checkpoint_interval": -1})
    assert code == 2 and "checkpoint_interval" in capsys.readouterr().err
