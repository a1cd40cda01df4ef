"""Behavioural tests of the multitask reference row (docs/methods/multitask.md)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_MFEAT

from mmbalance.errors import ConfigError
from mmbalance.testing import build_trainer, first_batch

FAST = {"train.modality_eval": "none"}


def toy(tmp_path, method="multitask", m=2, extra=None, name="run"):
    sets = {"dataset.n_modalities": m, "dataset.num_classes": 3, "dataset.n_samples": 80, "train.batch_size": 16,
            "model.enc_hidden": 8, "model.enc_out": 8, **FAST, **(extra or {})}
    return build_trainer(method, "synthetic", run_dir=tmp_path / name, sets=sets)


def hand_slices(model, pooled):
    """u_m = z̄_m·W_mᵀ + b/M, written out from the head's weight columns (independent of the method)."""
    w, b = model.head.weight, model.head.bias
    d = model.feature_dims[model.modalities[0]]
    M = len(model.modalities)
    return {m: pooled[m] @ w[:, i * d:(i + 1) * d].t() + b / M for i, m in enumerate(model.modalities)}


@pytest.mark.parametrize("m,gamma", [(2, 1.0), (3, 4.0)])
def test_loss_is_fused_plus_gamma_times_unimodal(tmp_path, m, gamma):
    tr = toy(tmp_path, m=m, extra={"gamma": gamma})
    ctx, batch = tr.ctx, first_batch(tr)
    torch.manual_seed(5)
    got = tr.method.training_step(ctx, batch).loss
    torch.manual_seed(5)
    out = ctx.raw_model(ctx.inputs(batch))
    y = batch["label"]
    u = hand_slices(ctx.raw_model, out.pooled)
    want = F.cross_entropy(out.logits, y) + gamma * sum(F.cross_entropy(v, y) for v in u.values())
    assert float(got) == pytest.approx(float(want), abs=1e-6)


def test_gradient_is_sum_of_separate_gradients(tmp_path):
    tr = toy(tmp_path, extra={"gamma": 2.5})
    ctx, batch, y = tr.ctx, first_batch(tr), None
    model = ctx.raw_model
    params = [p for p in model.parameters()]
    y = batch["label"]
    out = model(ctx.inputs(batch))
    g_fused = torch.autograd.grad(F.cross_entropy(out.logits, y), params, allow_unused=True)
    out = model(ctx.inputs(batch))
    u = hand_slices(model, out.pooled)
    g_uni = torch.autograd.grad(sum(F.cross_entropy(v, y) for v in u.values()), params, allow_unused=True)
    tr.method.training_step(ctx, batch).loss.backward()
    for p, a, b in zip(params, g_fused, g_uni):
        want = (a if a is not None else 0) + 2.5 * (b if b is not None else 0)
        assert torch.allclose(p.grad, want, rtol=1e-6, atol=1e-7)


def test_gamma_zero_is_bitwise_baseline(tmp_path):
    a = toy(tmp_path, extra={"gamma": 0.0}, name="a")
    b = toy(tmp_path, method="baseline", name="b")
    batch = first_batch(a)
    a.method.training_step(a.ctx, batch).loss.backward()
    b.method.training_step(b.ctx, batch).loss.backward()
    for (n, p), q in zip(a.ctx.raw_model.named_parameters(), b.ctx.raw_model.parameters()):
        assert torch.equal(p, q), n  # same initial weights (method modules use their own seed stream)
        assert torch.equal(p.grad, q.grad), n


def test_slices_sum_to_fused_logits_with_bias_share(tmp_path):
    tr = toy(tmp_path, m=3)
    ctx, batch = tr.ctx, first_batch(tr)
    assert tr.method.uni.kind == "shared_slice" and "multitask_heads" not in ctx.modules
    out = ctx.raw_model(ctx.inputs(batch))
    u = tr.method.uni(ctx, out, batch["label"])
    assert torch.allclose(sum(u.values()), out.logits, atol=1e-6)
    with torch.no_grad():
        ctx.raw_model.head.weight.zero_()
    u = tr.method.uni(ctx, ctx.raw_model(ctx.inputs(batch)), batch["label"])
    for v in u.values():
        assert torch.allclose(v, (ctx.raw_model.head.bias / 3).expand_as(v), atol=1e-7)


@pytest.mark.parametrize("dataset,sets,kind", [
    ("synthetic", {"dataset.n_samples": 60}, "shared_slice"),
    ("synthetic", {"dataset.n_samples": 60, "model.name": "mlp_transformer_fusion"}, "linear"),
    ("synthetic", {"dataset.n_samples": 60, "model.head": "mlp"}, "linear"),
    ("synthetic-regression", {"dataset.n_samples": 60}, "linear"),
    ("synthetic-seg", {"dataset.n_samples": 40}, "pixel"),
])
def test_auto_resolution(tmp_path, dataset, sets, kind):
    tr = build_trainer("multitask", dataset, run_dir=tmp_path / "r", sets={**sets, **FAST})
    assert tr.method.uni.kind == kind
    ctx, batch = tr.ctx, first_batch(tr)
    u = tr.method.uni(ctx, ctx.forward(batch), batch["label"])
    out = ctx.forward(batch)
    for v in u.values():
        assert v.shape == out.logits.shape  # [B, C], [B, 1] or [B, C, H, W] at the label's size
    if dataset == "synthetic-seg":
        assert tuple(next(iter(u.values())).shape[-2:]) == tuple(batch["label"].shape[-2:])


def test_shared_slice_refused_where_not_exact(tmp_path):
    with pytest.raises(ConfigError, match="shared_slice"):
        build_trainer("multitask", "synthetic", run_dir=tmp_path / "a",
                      sets={"model.name": "mlp_transformer_fusion", "uni_head": "shared_slice", **FAST})
    with pytest.raises(ConfigError, match="partial sum"):
        build_trainer("multitask", "synthetic-regression", run_dir=tmp_path / "b",
                      sets={"uni_head": "shared_slice", **FAST})
    with pytest.raises(ConfigError, match="pixel"):
        build_trainer("multitask", "synthetic-seg", run_dir=tmp_path / "c", sets={"uni_head": "linear", **FAST})


def test_predict_is_the_fused_output(tmp_path):
    tr = toy(tmp_path, extra={"uni_head": "linear"})
    ctx, batch = tr.ctx, first_batch(tr)
    ctx.model.eval()
    assert torch.equal(tr.method.predict(ctx, batch), ctx.raw_model(ctx.inputs(batch)).logits)


def test_light_heads_join_the_main_optimizer(tmp_path, run_cli):
    tr = toy(tmp_path, extra={"uni_head": "linear"})
    ctx = tr.ctx
    groups = {g["name"]: g for g in ctx.optimizer.param_groups}
    assert "multitask_heads" in groups and ctx.extra["multitask_heads"].optimizer is None
    heads = ctx.modules["multitask_heads"]
    before = [p.detach().clone() for p in heads.parameters()]
    batch = first_batch(tr)
    tr.method.training_step(ctx, batch).loss.backward()
    tr._set_lrs(0.5)
    assert groups["multitask_heads"]["lr"] == groups["model"]["lr"] == 0.5 * groups["model"]["base_lr"]
    ctx.optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, heads.parameters()))


def test_single_modality_refused(run_cli):
    code, rd, _ = run_cli("multitask", "synthetic", sets={"dataset.n_modalities": 1, "dataset.n_samples": 40})
    assert code == 2 and not rd.exists()


def test_gamma_per_modality_length_checked(tmp_path):
    with pytest.raises(ConfigError, match="gamma_per_modality"):
        toy(tmp_path, extra={"gamma_per_modality": [1.0, 2.0, 3.0]})


def test_resume_gives_the_same_final_numbers(kill_and_resume):
    sets = {**SMALL_MFEAT, **FAST, "uni_head": "linear"}
    (_, full), (code, rd, resumed) = kill_and_resume("multitask", sets=sets, epochs=3, stop_after=1)
    assert code == 0 and resumed["test"] == full["test"] and resumed["val"] == full["val"]
    row = json.loads((rd / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"multitask/loss_fused", "multitask/loss_fac", "multitask/metric_fou"} <= set(row)
