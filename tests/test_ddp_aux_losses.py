"""2-process CPU DDP runs (gloo) of the methods with unimodal losses: replicas stay identical and the
per-rank method statistics (MMPareto's cosines and weights, InfoReg's scores, β, traces) are equal."""
from __future__ import annotations

import json

import pytest
import torch
from test_ddp import assert_identical_ranks, launch_2proc

ARGS = ["--dataset", "mfeat", "--epochs", "2", "--set", "dataset.limit_per_class=20", "--set",
        "train.modality_eval=none", "--quiet"]


def _run(tmp_path, method, extra=()):
    rd = tmp_path / "run"
    proc = launch_2proc(["--method", method, *ARGS, *extra, "--run-dir", str(rd)], tmp_path / "dump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((rd / "result.json").read_text())["world_size"] == 2
    assert_identical_ranks(tmp_path / "dump")
    r0 = torch.load(tmp_path / "dump" / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "dump" / "rank1.pt", weights_only=False)
    return rd, r0, r1


@pytest.mark.ddp
@pytest.mark.parametrize("method,extra", [("multitask", ["--set", "uni_head=linear"]), ("dgl", [])])
def test_replicas_identical_heads_included(tmp_path, method, extra):
    _, r0, r1 = _run(tmp_path, method, extra)
    assert (f"{method}_heads" in r0["extra"]) == (method == "multitask")
