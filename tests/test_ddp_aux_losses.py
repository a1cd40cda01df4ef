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
    r0 = torch.load(tmp_path / "dump" / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "dump" / "rank1.pt", weights_only=False)
    return rd, r0, r1


@pytest.mark.ddp
@pytest.mark.parametrize("method,extra", [("multitask", ["--set", "uni_head=linear"]), ("dgl", [])])
def test_replicas_identical_heads_included(tmp_path, method, extra):
    _, r0, r1 = _run(tmp_path, method, extra)
    assert_identical_ranks(tmp_path / "dump")
    assert (f"{method}_heads" in r0["extra"]) == (method == "multitask")


def _same(a, b, key):
    assert a.keys() == b.keys() and a, key
    for k in a:
        assert a[k] == b[k], (key, k, a[k], b[k])


@pytest.mark.ddp
def test_mmpareto_per_rank_cosines_and_weights_equal(tmp_path):
    """cos_m and c_m use g^mm from autograd.grad, which DDP does not reduce: without the manual
    all-reduce each rank would integrate with its own weights."""
    _, r0, r1 = _run(tmp_path, "mmpareto")
    m0, m1 = r0["method_metrics"], r1["method_metrics"]
    assert any(k.startswith("cos/") for k in m0)
    _same(m0, m1, "method_metrics")
    assert_identical_ranks(tmp_path / "dump")  # statistics first: they are what a rank-local bug changes


@pytest.mark.ddp
def test_inforeg_per_rank_scores_beta_and_traces_equal(tmp_path):
    """Scores are SUM-reduced before the leader is chosen: the cumulative scores (which pick the
    sufficient modality), β and the Fisher traces must be equal on both ranks."""
    _, r0, r1 = _run(tmp_path, "inforeg")
    s0, s1 = r0["method_state"], r1["method_state"]
    assert torch.equal(s0["cum_scores"], s1["cum_scores"]) and s0["traces"] == s1["traces"]
    assert len(s0["traces"]) == 2
    _same(r0["method_metrics"], r1["method_metrics"], "method_metrics")
    assert any(v > 0 for k, v in r0["method_metrics"].items() if k.startswith("beta/"))
    assert_identical_ranks(tmp_path / "dump")
