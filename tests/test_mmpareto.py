"""Behavioural tests of MMPareto (docs/methods/mmpareto.md)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_MFEAT
from mmbalance.methods.mmpareto import pareto_integrate
from torch import nn

from mmbalance.testing import build_trainer, first_batch

FAST = {"train.modality_eval": "none"}
T = torch.tensor


def integrate(a, b, c=None):
    out, st = pareto_integrate([T(x, dtype=torch.float32) for x in a], [T(x, dtype=torch.float32) for x in b], 1.5, c)
    return [o.tolist() for o in out], {k: float(v) for k, v in st.items()}


# ---------------------------------------------------------------- closed forms (γ = 1.5)
def test_conflict_min_norm_and_rescale():
    out, st = integrate([[1.0, 0.0]], [[-1.0, 1.0]])
    assert st["cos"] == pytest.approx(-0.707107, abs=1e-6) and st["c"] == pytest.approx(0.6) and st["conflict"] == 1
    # ĝ = 2·(0.6·(1,0) + 0.4·(−1,1)) = (0.4, 0.8); ‖s‖ = 1 > ‖ĝ‖ = 0.894427 → γ·ĝ/‖ĝ‖
    assert out[0] == pytest.approx([0.670820, 1.341641], abs=1e-6)


def test_no_conflict_is_one_and_a_half_times_the_sum():
    out, st = integrate([[1.0, 0.0]], [[1.0, 1.0]])
    assert st["c"] == 0.5 and st["conflict"] == 0
    assert out[0] == pytest.approx([3.0, 1.5])


def test_zero_unimodal_gradient_takes_the_conflict_branch():
    out, st = integrate([[1.0, 2.0]], [[0.0, 0.0]])
    assert st["cos"] == 0 and st["conflict"] == 1 and st["c"] == pytest.approx(0.001)
    assert out[0] == pytest.approx([1.5, 3.0], abs=1e-6)


def test_rescale_is_per_tensor():
    out, st = integrate([[1.0, 0.0], [0.0, 0.0]], [[-1.0, 0.0], [0.0, 1.0]])
    assert st["cos"] == pytest.approx(-1 / math.sqrt(2), abs=1e-6) and st["c"] == pytest.approx(0.6)
    assert out[0] == pytest.approx([0.6, 0.0], abs=1e-6)  # ‖s_A‖ = 0: not rescaled
    assert out[1] == pytest.approx([0.0, 1.5], abs=1e-6)  # ‖s_B‖ = ‖ĝ_B‖ = 0.8·… → γ·ĝ_B·‖s_B‖/‖ĝ_B‖


def test_zero_integrated_gradient_gives_zero_not_nan():
    out, _ = integrate([[2.0, 0.0]], [[-3.0, 0.0]], c=0.6)
    assert out[0] == [0.0, 0.0]


# ---------------------------------------------------------------- end to end
def toy(tmp_path, m=2, extra=None, name="run", classes=4):
    sets = {"dataset.n_modalities": m, "dataset.num_classes": classes, "dataset.n_samples": 80,
            "train.batch_size": 16, "model.enc_hidden": 8, "model.enc_out": 8, **FAST, **(extra or {})}
    return build_trainer("mmpareto", "synthetic", run_dir=tmp_path / name, sets=sets)


def step_grads(tr, batch):
    ctx = tr.ctx
    for p in list(ctx.raw_model.parameters()) + list(ctx.modules["mmpareto_heads"].parameters()):
        p.grad = None
    out = tr.method.training_step(ctx, batch)
    out.loss.backward()
    plain = {n: p.grad.clone() for n, p in ctx.raw_model.named_parameters()}
    tr.method.after_backward(ctx)
    return plain, {n: p.grad.clone() for n, p in ctx.raw_model.named_parameters()}


def test_subtract_equals_separate_gradients(tmp_path):
    a = toy(tmp_path, name="a")
    b = toy(tmp_path, name="b", extra={"grad_mode": "separate"})
    batch = first_batch(a)
    plain_a, got_a = step_grads(a, batch)
    plain_b, got_b = step_grads(b, batch)
    for n in got_a:
        if n.startswith("encoders."):
            torch.testing.assert_close(got_a[n], got_b[n], rtol=1e-6, atol=1e-7)
            assert not torch.equal(got_a[n], plain_a[n])  # the encoders were edited
        else:  # fused head: the plain multitask gradient, bitwise
            assert torch.equal(got_a[n], plain_a[n]) and torch.equal(got_a[n], plain_b[n]), n
    # the multitask gradient of the head, computed independently
    model, y = a.ctx.raw_model, batch["label"]
    out = model(a.ctx.inputs(batch))
    g = torch.autograd.grad(F.cross_entropy(out.logits, y), [model.head.weight])[0]
    torch.testing.assert_close(got_a["head.weight"], g, rtol=1e-6, atol=1e-8)


def test_branch_check_detects_a_real_conflict(tmp_path):
    """u_a = −o with a linear encoder and non-negative inputs: every per-sample feature gradient of L_a
    is a negative multiple of L_mm's, so cos_a < 0 (a clone-of-accumulated-gradients bug reports 1)."""
    tr = toy(tmp_path, classes=2)
    ctx, model = tr.ctx, tr.ctx.raw_model
    a, v = model.modalities
    d_in = ctx.data.input_shapes[a][-1]
    torch.manual_seed(3)
    model.encoders[a] = nn.Linear(d_in, 8)
    tr.method.collect_parameters(model)
    heads = ctx.modules["mmpareto_heads"].heads
    with torch.no_grad():
        model.head.weight[:, 8:].zero_()
        model.head.bias.zero_()
        heads[a].out.weight.copy_(-model.head.weight[:, :8])
        heads[a].out.bias.zero_()
    batch = dict(first_batch(tr))
    batch[a] = batch[a].abs()
    batch["label"] = torch.zeros_like(batch["label"])
    step_grads(tr, batch)
    tr.method.on_epoch_end(ctx)
    st = tr.method.last
    assert st[f"cos/{a}"] < 0 and st[f"conflict/{a}"] == 1 and st[f"c/{a}"] != 0.5


@pytest.mark.parametrize("m", [2, 3])
def test_one_extra_gradient_call_per_step(tmp_path, m, monkeypatch):
    tr = toy(tmp_path, m=m)
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    tr.method.training_step(tr.ctx, first_batch(tr))
    assert len(calls) == 1


def test_three_modalities_conflict_on_one_only(tmp_path):
    """Modality 1: s = −½·g^mm (g^u = −1.5·g^mm, conflict); modalities 2, 3: s = 2·g^mm (no conflict):
    their encoders get exactly 1.5·s, and c = ½."""
    tr = toy(tmp_path, m=3)
    meth, ctx = tr.method, tr.ctx
    torch.manual_seed(0)
    g_mm = {m: [torch.randn_like(p) for p in meth.params[m]] for m in ctx.modalities}
    s = {}
    for i, m in enumerate(ctx.modalities):
        s[m] = [(-0.5 if i == 0 else 2.0) * g for g in g_mm[m]]
        for p, sp in zip(meth.params[m], s[m]):
            p.grad = sp.clone()
    meth._g_mm = torch.cat([g.reshape(-1) for m in ctx.modalities for g in g_mm[m]])
    meth.after_backward(ctx)
    meth.on_epoch_end(ctx)
    m1, m2, m3 = ctx.modalities
    assert meth.last[f"conflict/{m1}"] == 1 and meth.last[f"c/{m2}"] == 0.5 and meth.last[f"c/{m3}"] == 0.5
    for m in (m2, m3):
        for p, sp in zip(meth.params[m], s[m]):
            torch.testing.assert_close(p.grad, 1.5 * sp, rtol=1e-6, atol=0)
    for p in meth.params[m1]:  # opposite collinear gradients: no common descent direction → 0
        assert torch.count_nonzero(p.grad) == 0


def test_fp16_scaled_extra_gradient_matches_float32(tmp_path):
    from test_precision import SCALE, emulate_fp16

    sets = {**SMALL_MFEAT, **FAST, "train.max_steps_per_epoch": 3, "train.momentum": 0.0, "train.weight_decay": 0.0}
    ref = build_trainer("mmpareto", run_dir=tmp_path / "ref", epochs=1, sets=sets)
    before = [p.detach().clone() for p in ref.ctx.raw_model.parameters()]
    ref.fit()
    tr = build_trainer("mmpareto", run_dir=tmp_path / "fp16", epochs=1, sets=sets)
    seen = []
    real = tr.method.after_backward
    tr.method.after_backward = lambda ctx: seen.append(float(tr.method._g_mm.abs().max())) or real(ctx)
    emulate_fp16(tr, torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000))
    tr.fit()
    for b, w, g in zip(before, ref.ctx.raw_model.parameters(), tr.ctx.raw_model.parameters()):
        torch.testing.assert_close(g - b, w.detach() - b, rtol=1e-4, atol=1e-7)
    assert seen and max(seen) < 10  # g^mm is unscaled (a scaled buffer would be ~1024× larger)


@pytest.mark.parametrize("dataset,sets", [
    ("synthetic", {"dataset.n_modalities": 6, "dataset.n_samples": 80}),
    ("synthetic-regression", {"dataset.n_samples": 80}),
    ("synthetic-seg", {"dataset.n_samples": 40}),
    ("synthetic", {"dataset.n_samples": 80, "dataset.feature": "sequence"}),
    ("synthetic", {"dataset.n_samples": 80, "uni_head": "shared_slice"}),
])
def test_runs_end_to_end(run_cli, dataset, sets):
    code, rd, res = run_cli("mmpareto", dataset, epochs=1, sets={**sets, "train.max_steps_per_epoch": 3})
    assert code == 0 and res["status"] == "ok"
    assert all(math.isfinite(v) for v in res["method_metrics"].values())


def test_resume_gives_the_same_final_numbers(kill_and_resume):
    sets = {**SMALL_MFEAT, **FAST}
    (_, full), (code, _, resumed) = kill_and_resume("mmpareto", sets=sets, epochs=3, stop_after=1)
    assert code == 0 and resumed["test"] == full["test"] and resumed["val"] == full["val"]
