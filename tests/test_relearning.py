"""Behavioural tests of Diagnosing & Re-learning (docs/methods/relearning.md): purity, α, the soft
re-initialisation, the schedule, timing against validation, data isolation, determinism, regression
bins, resume, 2-process DDP per-rank α."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SMALL_MFEAT
from mmbalance.methods.relearning import (
    auto_reinit_every,
    diagnosis_epochs,
    purity,
    regression_bins,
    reinit_alpha,
    soft_reinit_,
)
from test_ddp import launch_2proc

from mmbalance.testing import build_trainer

FAST = {**SMALL_MFEAT, "train.modality_eval": "none", "train.diagnostics": "none", "reinit_every": 1}


def test_purity_hand_examples():
    assert purity(np.array([0, 0, 0, 1, 1, 1]), np.array([0, 0, 1, 1, 2, 2])) == pytest.approx(4 / 6)
    assert purity(np.array([0, 0]), np.array([0, 1])) == 0.5


def test_alpha():
    assert reinit_alpha(0.9 - 0.7, 3.0) == pytest.approx(0.537050, abs=1e-6)


def test_schedule():
    assert diagnosis_epochs(90, 20, 3) == [20, 40, 60]
    assert auto_reinit_every(30) == 7 and diagnosis_epochs(30, 7, 3) == [7, 14, 21]
    assert auto_reinit_every(50) == 11 and auto_reinit_every(80) == 18 and auto_reinit_every(150) == 33


def test_regression_bins_use_training_edges():
    y = np.linspace(0, 1, 100, endpoint=False) + 0.005
    tr, other = regression_bins(y, np.array([-5.0, 0.5, 5.0]))
    assert np.bincount(tr).tolist() == [10] * 10
    assert other.tolist() == [0, 5, 9]


def test_soft_reinit_touches_only_encoder_parameters(tmp_path):
    """θ^(0) = 0, θ = 1, α = 0.5 → every encoder parameter 0.5 exactly; buffers, optimizer momentum,
    fusion and head bitwise unchanged."""
    tr = build_trainer("relearning", "mfeat", run_dir=tmp_path / "r", epochs=1,
                       sets={**FAST, "train.max_steps_per_epoch": 2})
    tr.fit()  # creates momentum buffers
    ctx, method = tr.ctx, tr.method
    model = ctx.raw_model
    for m in ctx.modalities:
        for p in model.encoder_parameters(m):
            p.data.fill_(1.0)
        method.initial[m] = [torch.zeros_like(t) for t in method.initial[m]]
    enc_ids = {id(p) for m in ctx.modalities for p in model.encoder_parameters(m)}
    others = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in enc_ids}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    mom = {id(p): s["momentum_buffer"].clone() for p, s in ctx.optimizer.state.items() if "momentum_buffer" in s}
    assert mom
    method.alpha = {m: 0.5 for m in ctx.modalities}
    method.reinitialise(ctx)
    for m in ctx.modalities:
        for p in model.encoder_parameters(m):
            assert torch.equal(p, torch.full_like(p, 0.5))
    for n, p in model.named_parameters():
        if id(p) not in enc_ids:
            assert torch.equal(p, others[n]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    for p, s in ctx.optimizer.state.items():
        if id(p) in mom:
            assert torch.equal(s["momentum_buffer"], mom[id(p)])


def test_soft_reinit_formula():
    p = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    soft_reinit_([p], [torch.tensor([0.0, 1.0])], 0.25)
    assert torch.allclose(p, torch.tensor([1.5, -0.5]))


def test_reinit_runs_after_validation_of_the_diagnosed_epoch(tmp_path):
    """T = 1: diagnosis after epoch 1 (0-based), applied at the start of epoch 2. The encoders at the
    end of epoch 1 (validated) are untouched; the jump happens before epoch 2's first step."""
    tr = build_trainer("relearning", "mfeat", run_dir=tmp_path / "r", epochs=3,
                       sets={**FAST, "train.max_steps_per_epoch": 1})
    method, ctx = tr.method, tr.ctx
    seen = []
    orig = method.reinitialise

    def spy(c):
        seen.append((c.epoch, [p.detach().clone() for p in c.raw_model.encoder_parameters(c.modalities[0])]))
        orig(c)

    method.reinitialise = spy
    tr.fit()
    assert [e for e, _ in seen] == [2]  # diagnosis_epochs(3, 1, 3) == [1]
    assert method.done == 1 and set(method.alpha) == set(ctx.modalities)
    assert all(0.0 <= a < 1.0 for a in method.alpha.values())


def test_diagnosis_reads_only_train_and_heldout(tmp_path):
    tr = build_trainer("relearning", "mfeat", run_dir=tmp_path / "r", epochs=1, sets=FAST)

    class Forbidden:
        def __getattr__(self, name):
            raise AssertionError("validation/test accessed by the method")

        def __len__(self):
            raise AssertionError("validation/test accessed by the method")

    ctx = tr.ctx
    ctx.data.val, ctx.data.test = Forbidden(), Forbidden()
    alpha = tr.method.diagnose(ctx)
    assert set(alpha) == set(ctx.modalities)
    train_idx = torch.cat([b["idx"] for b in tr.loader_train]).unique()
    assert len(train_idx) == len(tr.train_split)  # training batches index the training part only
    assert len(tr.train_split) + len(ctx.heldout) == 140


def test_same_seed_same_alpha(tmp_path):
    a = []
    for name in ("a", "b"):
        tr = build_trainer("relearning", "mfeat", run_dir=tmp_path / name, epochs=1, sets=FAST)
        a.append(tr.method.diagnose(tr.ctx))
    assert a[0] == a[1]


def test_runs_on_regression_and_refuses_segmentation(run_cli, capsys):
    code, _, res = run_cli("relearning", "synthetic-regression", epochs=3,
                           sets={"dataset.n_samples": 200, "reinit_every": 1, "train.diagnostics": "none"})
    assert code == 0 and res["method_metrics"]["diagnoses"] == 1.0
    code, rd, _ = run_cli("relearning", "synthetic-seg", sets={"dataset.n_samples": 30})
    assert code == 2 and "clustering purity" in capsys.readouterr().err and not rd.exists()


@pytest.mark.parametrize("n", [3, 6])
def test_runs_on_synthetic_modalities(run_cli, n):
    code, _, res = run_cli("relearning", "synthetic", epochs=3,
                           sets={"dataset.n_samples": 120, "dataset.n_modalities": n, "reinit_every": 1,
                                 "train.diagnostics": "none", "train.modality_eval": "none"})
    assert code == 0 and len([k for k in res["method_metrics"] if k.startswith("alpha/")]) == n


def test_resume_gives_the_same_final_numbers(kill_and_resume):
    sets = dict(FAST)
    (_, full), (code, _, resumed) = kill_and_resume("relearning", sets=sets, epochs=4, stop_after=2)
    assert code == 0 and resumed["test"] == full["test"] and resumed["val"] == full["val"]
    assert resumed["method_metrics"] == full["method_metrics"] and full["method_metrics"]["diagnoses"] == 2.0


@pytest.mark.ddp
def test_two_process_alpha_identical_and_from_all_samples(tmp_path):
    """α and both purities are identical on both ranks, the replicas stay identical after the re-init
    and further steps, and the purity is computed over the whole split (denominator = all samples, not
    one rank's shard, no padded duplicate)."""
    rd = tmp_path / "run"
    proc = launch_2proc(["--method", "relearning", "--dataset", "mfeat", "--epochs", "3", "--set",
                         "dataset.limit_per_class=20", "--set", "reinit_every=1", "--set", "train.modality_eval=none",
                         "--set", "train.diagnostics=none", "--run-dir", str(rd), "--quiet"], tmp_path / "dump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "dump" / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "dump" / "rank1.pt", weights_only=False)
    s0, s1 = r0["method_state"], r1["method_state"]
    assert s0["done"] == s1["done"] == 1
    assert s0["alpha"] == s1["alpha"] and s0["purities"] == s1["purities"]
    # every rank's shard gathered: the 130 training-part and 10 held-out rows (8% of 140), each once
    assert s0["history"][0]["counts"] == (130, 10)
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    assert json.loads((rd / "result.json").read_text())["world_size"] == 2
