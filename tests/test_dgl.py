"""Behavioural tests of DGL (docs/methods/dgl.md)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_MFEAT

from mmbalance.testing import build_trainer, first_batch

FAST = {"train.modality_eval": "none"}


def toy(tmp_path, extra=None, name="run", model=None):
    sets = {"dataset.n_modalities": 2, "dataset.num_classes": 3, "dataset.n_samples": 80, "train.batch_size": 8,
            "model.enc_hidden": 8, "model.enc_out": 8, **FAST, **(extra or {})}
    if model:
        sets["model.name"] = model
    return build_trainer("dgl", "synthetic", run_dir=tmp_path / name, sets=sets)


def method_grads(tr, batch):
    model = tr.ctx.raw_model
    model.zero_grad(set_to_none=True)
    tr.method.training_step(tr.ctx, batch).loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def official_two_backward(model, inputs, y, alpha):
    """The released procedure (main_dgl.py:108-122): backward α·Σ L_m with u_m = W·[0,…,z̄_m,…,0] + b
    through the shared head, set every fusion/head gradient to None, backward L_f on detached features."""
    model.zero_grad(set_to_none=True)
    out = model(inputs)
    mods = model.modalities
    z = out.pooled
    loss_u = 0
    for m in mods:
        padded = torch.cat([z[k] if k == m else torch.zeros_like(z[k]) for k in mods], dim=1)
        loss_u = loss_u + F.cross_entropy(model.head(padded), y)
    (alpha * loss_u).backward()
    for p in list(model.head.parameters()) + list(model.fusion.parameters()):
        p.grad = None
    fused = model.head(torch.cat([z[k].detach() for k in mods], dim=1))
    F.cross_entropy(fused, y).backward()
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def test_single_backward_equals_official_two_backward(tmp_path):
    tr = toy(tmp_path, extra={"alpha": 3.0})
    batch = first_batch(tr)
    got = method_grads(tr, batch)
    want = official_two_backward(tr.ctx.raw_model, tr.ctx.inputs(batch), batch["label"], 3.0)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-6, atol=1e-7), n


def test_encoder_routing_and_alpha_zero(tmp_path):
    tr = toy(tmp_path, extra={"alpha": 2.0})
    batch = first_batch(tr)
    model, y = tr.ctx.raw_model, batch["label"]
    got = method_grads(tr, batch)
    w, b = model.head.weight, model.head.bias
    for i, m in enumerate(model.modalities):
        enc = dict(model.encoders[m].named_parameters())
        z = model.encoders[m](batch[m])
        loss = F.cross_entropy(z @ w[:, 8 * i:8 * (i + 1)].detach().t() + b.detach(), y)
        g = torch.autograd.grad(2.0 * loss, list(enc.values()))
        for (n, _), gi in zip(enc.items(), g):
            assert torch.allclose(got[f"encoders.{m}.{n}"], gi, rtol=1e-6, atol=1e-7)
    tr0 = toy(tmp_path, extra={"alpha": 0.0}, name="a0")
    got0 = method_grads(tr0, batch)
    for n, g in got0.items():
        if n.startswith("encoders."):
            assert g is None or torch.count_nonzero(g) == 0, n


def test_head_routing_independent_of_alpha(tmp_path):
    batch = None
    heads = {}
    for alpha in (1.0, 100.0):
        tr = toy(tmp_path, extra={"alpha": alpha}, name=f"a{alpha}")
        batch = batch or first_batch(tr)
        g = method_grads(tr, batch)
        heads[alpha] = (g["head.weight"], g["head.bias"])
    assert torch.equal(heads[1.0][0], heads[100.0][0]) and torch.equal(heads[1.0][1], heads[100.0][1])
    model = tr.ctx.raw_model
    with torch.no_grad():
        z = torch.cat([model.encoders[m](batch[m]) for m in model.modalities], dim=1)
    w, b = model.head.weight.detach().requires_grad_(), model.head.bias.detach().requires_grad_()
    gw, gb = torch.autograd.grad(F.cross_entropy(z @ w.t() + b, batch["label"]), [w, b])
    assert torch.allclose(heads[1.0][0], gw, atol=1e-7) and torch.allclose(heads[1.0][1], gb, atol=1e-7)


def test_zero_pad_keeps_the_full_bias(tmp_path):
    tr = toy(tmp_path)
    model = tr.ctx.raw_model
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.3, -0.2, 0.5]))
    batch = first_batch(tr)
    u = tr.method.uni(tr.ctx, tr.ctx.forward(batch), batch["label"])
    for v in u.values():
        assert torch.allclose(v, model.head.bias.expand_as(v))


def test_transformer_fusion_routing(tmp_path):
    batch = None
    g = {}
    for alpha in (1.0, 7.0):
        tr = toy(tmp_path, extra={"alpha": alpha}, name=f"t{alpha}", model="mlp_transformer_fusion")
        assert tr.method.uni.kind == "linear"
        batch = batch or first_batch(tr)
        g[alpha] = method_grads(tr, batch)
    for n in g[1.0]:
        if n.startswith(("fusion.", "head.")):
            assert torch.equal(g[1.0][n], g[7.0][n]), n
    # weighting the fused loss by 10 leaves the encoder gradients unchanged
    tr = toy(tmp_path, name="t10", model="mlp_transformer_fusion")
    ctx = tr.ctx
    orig = ctx.task.loss
    calls = []

    def weighted(logits, y):
        calls.append(1)
        return orig(logits, y) * (10.0 if len(calls) == 1 else 1.0)  # the first call is the fused loss

    base = method_grads(tr, batch)
    calls.clear()
    ctx.task.loss = weighted
    try:
        heavy = method_grads(tr, batch)
    finally:
        ctx.task.loss = orig
    for n in base:
        if n.startswith("encoders."):
            assert torch.allclose(base[n], heavy[n], rtol=1e-6, atol=1e-8), n
        if n.startswith("head.out_layer"):
            assert not torch.allclose(base[n], heavy[n])


def test_hook_inactive_outside_training_step(tmp_path):
    tr = toy(tmp_path)
    ctx, batch = tr.ctx, first_batch(tr)
    tr.method.training_step(ctx, batch)
    model = ctx.raw_model
    model.eval()
    out = model(ctx.inputs(batch))
    enc = list(model.encoders[model.modalities[0]].parameters())
    g = torch.autograd.grad(out.logits.sum(), enc, allow_unused=True)
    assert any(gi is not None and torch.count_nonzero(gi) > 0 for gi in g)
    assert torch.equal(tr.method.predict(ctx, batch), out.logits)


@pytest.mark.parametrize("dataset,sets", [
    ("synthetic", {"dataset.n_modalities": 6, "dataset.n_samples": 80}),
    ("synthetic-regression", {"dataset.n_samples": 80}),
    ("synthetic-seg", {"dataset.n_samples": 40}),
    ("synthetic", {"dataset.n_samples": 80, "dataset.feature": "sequence"}),
])
def test_runs_end_to_end(run_cli, dataset, sets):
    code, rd, res = run_cli("dgl", dataset, epochs=1, sets={**sets, "train.max_steps_per_epoch": 3})
    assert code == 0 and res["status"] == "ok"


def test_resume_gives_the_same_final_numbers(kill_and_resume):
    sets = {**SMALL_MFEAT, **FAST}
    (_, full), (code, _, resumed) = kill_and_resume("dgl", sets=sets, epochs=3, stop_after=1)
    assert code == 0 and resumed["test"] == full["test"] and resumed["val"] == full["val"]
