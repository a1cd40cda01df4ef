"""Behavioural tests of InfoReg (docs/methods/inforeg.md)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SMALL_MFEAT
from mmbalance.methods.inforeg import fisher_increment, regulation_strength, window_statistic
from torch import nn

from mmbalance.testing import build_trainer, first_batch

FAST = {"train.modality_eval": "none"}


def test_window_statistic_closed_forms():
    assert window_statistic([]) == 1.0
    assert window_statistic([1.0, 2.0]) == pytest.approx(0.666667, abs=1e-6)
    assert window_statistic([j + 1.0 for j in range(11)]) == pytest.approx(0.153846, abs=1e-6)  # on
    assert window_statistic([5.0] * 10) == pytest.approx(0.1)  # k_10: on
    assert window_statistic([5.0] * 11) == 0.0  # k_11: off
    assert window_statistic([0.0, 0.0]) == 0.0


def test_beta_closed_forms():
    c = torch.tensor([0.95, 0.1], dtype=torch.float64)
    b = regulation_strength(torch.tensor([40.0, 20.0]), c)
    assert float(b[0]) == pytest.approx(2.582368, abs=1e-6) and b[1] == 0
    b = regulation_strength(torch.tensor([20.5, 20.0]), c)
    assert float(b[0]) == pytest.approx(1.508060, abs=1e-6) and b[1] == 0
    b = regulation_strength(torch.tensor([20.0, 20.5]), c)  # the second modality leads (4df625a never regulates it)
    assert b[0] == 0 and float(b[1]) == pytest.approx(0.158743, abs=1e-6)
    assert torch.count_nonzero(regulation_strength(torch.tensor([20.0, 20.0]), c)) == 0  # tie: no edit
    assert torch.count_nonzero(regulation_strength(torch.tensor([40.0, 20.0]), c, False)) == 0  # window off
    b = regulation_strength(torch.tensor([1.0, 3.0, 2.5]), torch.full((3,), 0.95, dtype=torch.float64))
    assert b[0] == 0 and b[2] == 0 and float(b[1]) == pytest.approx(0.95 * math.exp(math.tanh(0.5)))


def toy(tmp_path, extra=None, name="run", m=2):
    sets = {"dataset.n_modalities": m, "dataset.num_classes": 3, "dataset.n_samples": 80, "train.batch_size": 16,
            "model.enc_hidden": 8, "model.enc_out": 8, "train.momentum": 0.0, "train.weight_decay": 0.0,
            **FAST, **(extra or {})}
    return build_trainer("inforeg", "synthetic", run_dir=tmp_path / name, sets=sets)


def grads(tr):
    named = list(tr.ctx.raw_model.named_parameters())
    return {n: p.grad.clone() for n, p in named if p.grad is not None}


def test_rank_constants_follow_the_cumulative_scores(tmp_path):
    tr = toy(tmp_path)
    meth = tr.method
    meth.cum_scores = torch.tensor([100.0, 80.0], dtype=torch.float64)
    c = meth.constants()
    assert c.tolist() == [0.95, 0.1]
    b = regulation_strength(torch.tensor([20.0, 25.0]), c)  # modality 2 leads this batch: it gets c_low
    assert float(b[1]) == pytest.approx(0.1 * math.exp(math.tanh(5.0)))


def test_proximal_pull_only_on_the_dominant_encoder(tmp_path):
    tr = toy(tmp_path)
    ctx, meth = tr.ctx, tr.method
    model = ctx.raw_model
    a, v = model.modalities
    meth.on_epoch_start(ctx)
    assert meth.any_active  # k_0 = 1
    batch = first_batch(tr)
    # first step of the epoch: θ = θ^(e), so the edit is exactly zero
    meth.training_step(ctx, batch).loss.backward()
    before = grads(tr)
    meth.after_backward(ctx)
    after = grads(tr)
    assert all(torch.equal(before[n], after[n]) for n in before)
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    heads_before = None
    # second step, with β = (0, 0.7): only encoder v is pulled towards its epoch-start weights
    meth.training_step(ctx, batch).loss.backward()
    meth.beta = torch.tensor([0.0, 0.7], dtype=torch.float64)
    before = grads(tr)
    heads_before = [p.grad.clone() for p in model.head.parameters()]
    meth.after_backward(ctx)
    after = grads(tr)
    snap = dict(zip([n for n, _ in model.encoders[v].named_parameters()], meth.snapshot[v]))
    for n, p in model.encoders[v].named_parameters():
        key = f"encoders.{v}.{n}"
        torch.testing.assert_close(after[key] - before[key], 0.7 * (p.detach() - snap[n]), rtol=0, atol=1e-7)
        assert not torch.equal(p.detach(), snap[n])
    for n in before:
        if not n.startswith(f"encoders.{v}."):
            assert torch.equal(before[n], after[n]), n
    assert all(torch.equal(h, p.grad) for h, p in zip(heads_before, model.head.parameters()))


def test_window_off_no_edit_but_fisher_accumulates(tmp_path):
    tr = toy(tmp_path)
    ctx, meth = tr.ctx, tr.method
    meth.traces = [[5.0, 5.0]] * 11  # k_11 = 0
    meth.on_epoch_start(ctx)
    assert not meth.any_active and meth.k[0] == 0
    with torch.no_grad():  # move away from the snapshot: an edit would show
        for p in ctx.raw_model.encoders.parameters():
            p.add_(0.1)
    meth.training_step(ctx, first_batch(tr)).loss.backward()
    assert torch.count_nonzero(meth.beta) == 0
    before = grads(tr)
    meth.after_backward(ctx)
    assert all(torch.equal(before[n], p) for n, p in grads(tr).items())
    assert (meth.fisher > 0).all()


def test_fisher_trace_identity_over_two_steps(tmp_path):
    tr = toy(tmp_path)
    ctx, meth = tr.ctx, tr.method
    model = ctx.raw_model
    meth.traces = [[5.0, 5.0]] * 11  # window off: the gradients are the ones set below
    meth.on_epoch_start(ctx)
    meth.beta = torch.zeros(2, dtype=torch.float64)
    torch.manual_seed(1)
    want = {m: 0.0 for m in model.modalities}
    for _ in range(2):
        for m in model.modalities:
            for p in model.encoders[m].parameters():
                p.grad = torch.randn_like(p)
                if p.dim() >= 2:  # Linear weights only: biases are excluded
                    want[m] += float((p.grad.double() ** 2).mean())
        meth.after_backward(ctx)
    meth.on_epoch_end(ctx)
    assert meth.traces[-1] == pytest.approx([want[m] for m in model.modalities], rel=1e-6)  # float32 sums
    assert len([p for p in model.encoders[model.modalities[0]].parameters() if p.dim() >= 2]) == 2


def test_unused_layer_does_not_crash(tmp_path):
    assert float(fisher_increment([None, torch.ones(2, 2)])) == 1.0
    tr = toy(tmp_path, extra={"train.max_steps_per_epoch": 2}, name="unused")
    model = tr.ctx.raw_model
    m0 = model.modalities[0]
    unused = nn.Linear(3, 3)  # a Conv/Linear weight of the encoder that forward never uses: grad None
    tr.method.weights[m0].append(unused.weight)
    tr.fit()
    assert math.isfinite(tr.method.traces[-1][0])


@pytest.mark.parametrize("dataset,sets", [
    ("synthetic", {"dataset.n_modalities": 6, "dataset.n_samples": 80}),
    ("synthetic-regression", {"dataset.n_samples": 80}),
    ("synthetic-seg", {"dataset.n_samples": 40}),
    ("synthetic", {"dataset.n_samples": 80, "dataset.feature": "sequence", "window_source": "per_modality"}),
    ("mfeat-pix-mor", {**SMALL_MFEAT, "constants": "fixed", "c_fixed": [0.5, 0.2], "gap": "mean"}),
])
def test_runs_end_to_end(run_cli, dataset, sets):
    code, rd, res = run_cli("inforeg", dataset, epochs=2, sets={**sets, "train.max_steps_per_epoch": 3, **FAST})
    assert code == 0 and res["status"] == "ok"
    row = json.loads((rd / "metrics.jsonl").read_text().splitlines()[-1])
    for m in res["modalities"]:
        assert math.isfinite(row[f"method/trace/{m}"]) and f"method/k/{m}" in row


def test_official_preset_constants(tmp_path):
    tr = build_trainer("inforeg_official", "synthetic", run_dir=tmp_path / "o", sets={"dataset.n_samples": 60, **FAST})
    assert tr.method.constants().tolist() == [0.95, 0.1, 0.1]  # first modality high (released audio/visual)


def test_resume_gives_the_same_final_numbers(kill_and_resume):
    # threshold 0.6: the window closes after a few epochs, so a lost trace history changes the run
    sets = {**SMALL_MFEAT, **FAST, "threshold": 0.6}
    (rd_full, full), (code, rd, resumed) = kill_and_resume("inforeg", sets=sets, epochs=4, stop_after=2)
    assert code == 0 and resumed["test"] == full["test"] and resumed["val"] == full["val"]
    k = [json.loads(x)["method/k/fac"] for x in (rd_full / "metrics.jsonl").read_text().splitlines()]
    assert k[0] == 1.0 and min(k[2:]) <= 0.6  # the window did close: the history mattered
