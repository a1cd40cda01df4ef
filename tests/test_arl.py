"""Behavioural tests of ARL (docs/methods/arl.md). Oracles: hand-computed constants on one- and two-sample
inputs, and gradients recomputed by autograd with the scaling placed at the encoder output."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_MFEAT
from mmbalance.methods.arl import arl_weights, magnitude_entropy_sums

from mmbalance.testing import build_trainer, first_batch

FAST = {"train.modality_eval": "none"}


def weights_of(u1, u2, T=8.0, floor=0.3):
    sums = magnitude_entropy_sums({"a": torch.tensor(u1), "b": torch.tensor(u2)})
    return arl_weights(sums, T, floor)


# ---------------------------------------------------------------- the coefficient, hand-computed
def test_one_sample_weights_by_hand():
    # u_1 = (2, 0): p = (e²/(e²+1), 1/(e²+1)) = (0.880797, 0.119203), H = 0.365334; u_2 = (0.5, 0): H = 0.662847
    r = weights_of([[2.0, 0.0]], [[0.5, 0.0]])
    assert torch.allclose(r["c"], torch.tensor([0.8, 0.2], dtype=torch.float64), atol=1e-7)
    assert torch.allclose(r["h"], torch.tensor([0.355321, 0.644679], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(r["q"], torch.tensor([0.644679, 0.355321], dtype=torch.float64), atol=1e-6)
    # w = softmax(8·0.2·0.644679, 8·0.8·0.355321): the less confident modality gets the larger multiplier
    assert torch.allclose(r["w"], torch.tensor([0.223990, 0.776010], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(weights_of([[2.0, 0.0]], [[0.5, 0.0]], T=1.0)["w"],
                          torch.tensor([0.461248, 0.538752], dtype=torch.float64), atol=1e-6)


def test_two_samples_and_the_entropy_floor():
    r = weights_of([[2.0, 0.0], [0.0, 1.0]], [[0.5, 0.0], [0.0, 0.0]])
    assert torch.allclose(r["c"], torch.tensor([6 / 7, 1 / 7], dtype=torch.float64), atol=1e-7)
    assert torch.allclose(r["w"], torch.tensor([0.104530, 0.895470], dtype=torch.float64), atol=1e-6)
    # u_1 = (20, 0) has entropy ≈ 0: H̃_1 clamps to 0.3, H̃_2 stays 1.0 (no renormalisation)
    r = weights_of([[20.0, 0.0]], [[0.0, 0.0]])
    assert torch.allclose(r["h"], torch.tensor([0.3, 1.0], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(r["q"], torch.tensor([1 / 1.3, 0.3 / 1.3], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(r["w"], torch.tensor([0.136325, 0.863675], dtype=torch.float64), atol=1e-6)


def test_swapping_modalities_swaps_the_weights():
    a, b = [[2.0, 0.0], [0.3, 1.0]], [[0.5, 0.1], [0.0, 0.7]]
    w_ab, w_ba = weights_of(a, b)["w"], weights_of(b, a)["w"]
    assert torch.allclose(w_ab, w_ba.flip(0), atol=1e-12)
    assert not torch.allclose(w_ab, w_ab.flip(0), atol=1e-3)


def test_global_sums_not_averaged_ratios():
    """w of a batch equals w from the SUM of its halves' sums (what the all-reduce gives); the mean of the
    halves' own w differs (averaging per-rank ratios is wrong, README distributed rule 1)."""
    u1 = torch.tensor([[3.0, 0.0], [0.1, 0.0], [0.0, 2.5], [0.2, 0.1]])
    u2 = torch.tensor([[0.5, 0.0], [0.0, 4.0], [0.3, 0.2], [1.0, 0.0]])
    whole = magnitude_entropy_sums({"a": u1, "b": u2})
    halves = [magnitude_entropy_sums({"a": u1[s], "b": u2[s]}) for s in (slice(0, 2), slice(2, 4))]
    assert torch.allclose(halves[0] + halves[1], whole, atol=1e-6)
    w = arl_weights(whole, 8.0, 0.3)["w"]
    avg = (arl_weights(halves[0], 8.0, 0.3)["w"] + arl_weights(halves[1], 8.0, 0.3)["w"]) / 2
    assert (w - avg).abs().max() > 0.05


def test_segmentation_sums_are_per_image_pixel_means():
    u = torch.zeros(2, 2, 1, 2)
    u[0, 0, 0, 0] = 2.0  # image 0: pixel magnitudes (2, 0) → mean 1; image 1: all zero
    s = magnitude_entropy_sums({"a": u, "b": torch.zeros(2, 2, 1, 2)})
    h2 = -(0.880797 * math.log(0.880797) + 0.119203 * math.log(0.119203))
    assert torch.allclose(s, torch.tensor([1.0, 0.0, (h2 + math.log(2)) / 2 + math.log(2), 4 * math.log(2) / 2]),
                          atol=1e-5)


# ---------------------------------------------------------------- the method inside a step
def toy(tmp_path, name="run", method="arl", **extra):
    sets = {"dataset.n_modalities": 2, "dataset.num_classes": 3, "dataset.n_samples": 80, "train.batch_size": 8,
            "model.enc_hidden": 8, "model.enc_out": 8, **FAST, **extra}
    return build_trainer(method, "synthetic", run_dir=tmp_path / name, sets=sets)


def step_grads(tr, batch, epoch, edit=True):
    ctx, model = tr.ctx, tr.ctx.raw_model
    ctx.epoch = epoch
    model.zero_grad(set_to_none=True)
    out = tr.method.training_step(ctx, batch)
    out.loss.backward()
    if edit:
        tr.method.after_backward(ctx)
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def hand_loss_and_weights(model, batch, gamma, T=8.0):
    """L = L_f + γ·(L_1 + L_2) with u_m = W_m·z̄_m + b (zero-padded concat head, full bias); w by the
    official M = 2 formula softmax(T·c̃_2·q_1, T·c̃_1·q_2), with the scaling placed at the encoder output."""
    y = batch["label"]
    m1, m2 = model.modalities
    z = {m: model.encoders[m](batch[m]) for m in (m1, m2)}
    W, b = model.head.weight, model.head.bias
    u = {m1: z[m1] @ W[:, :8].t() + b, m2: z[m2] @ W[:, 8:].t() + b}
    with torch.no_grad():
        c = {m: u[m].abs().sum() for m in u}
        ent = {m: -(u[m].softmax(-1) * (u[m].softmax(-1) + 1e-16).log()).sum() for m in u}
        ct = {m: c[m] / (c[m1] + c[m2]) for m in u}
        ht = {m: max(float(ent[m] / (ent[m1] + ent[m2])), 0.3) for m in u}
        q = {m: (1 / ht[m]) / (1 / ht[m1] + 1 / ht[m2]) for m in u}
        w = torch.softmax(torch.tensor([T * float(ct[m2]) * q[m1], T * float(ct[m1]) * q[m2]]), 0)

    class GradScale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, s):
            ctx.s = s
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g * ctx.s, None

    zs = {m1: GradScale.apply(z[m1], 1 + float(w[0])), m2: GradScale.apply(z[m2], 1 + float(w[1]))}
    fused = torch.cat([zs[m1], zs[m2]], 1) @ W.t() + b
    us = {m1: zs[m1] @ W[:, :8].t() + b, m2: zs[m2] @ W[:, 8:].t() + b}
    loss = F.cross_entropy(fused, y) + gamma * (F.cross_entropy(us[m1], y) + F.cross_entropy(us[m2], y))
    model.zero_grad(set_to_none=True)
    loss.backward()
    return w, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_step_matches_gradscale_at_the_encoder_output(tmp_path):
    """Scope and value: every encoder parameter (biases included) carries (1 + w_m)× its gradient, the
    head's gradient is bitwise the unscaled one, and all of it equals autograd with GradScale at z_m."""
    tr = toy(tmp_path, gamma=3.0)
    batch = first_batch(tr)
    model = tr.ctx.raw_model
    _, plain = step_grads(tr, batch, epoch=6, edit=False)
    _, got = step_grads(tr, batch, epoch=6)
    w, want = hand_loss_and_weights(model, batch, gamma=3.0)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-5, atol=1e-7), n
    for k, m in enumerate(model.modalities):
        for n, _ in model.encoders[m].named_parameters():
            key = f"encoders.{m}.{n}"
            assert torch.allclose(got[key], plain[key] * (1 + w[k]).float(), rtol=1e-6, atol=1e-8), key
    assert torch.equal(got["head.weight"], plain["head.weight"]) and torch.equal(got["head.bias"], plain["head.bias"])
    assert not torch.allclose(w, torch.full_like(w, 0.5))  # the computed weights are applied, not ω = 0.5


def test_warmup_boundary_is_strict(tmp_path):
    tr = toy(tmp_path, gamma=3.0)
    batch = first_batch(tr)
    model, y = tr.ctx.raw_model, batch["label"]
    out5, g5 = step_grads(tr, batch, epoch=5)
    _, g5_plain = step_grads(tr, batch, epoch=5, edit=False)
    for n in g5:
        assert torch.equal(g5[n], g5_plain[n]), n  # nothing scaled at epoch 5
    with torch.no_grad():
        res = model(tr.ctx.inputs(batch))
        W, b = model.head.weight, model.head.bias
        lu = [F.cross_entropy(res.pooled[m] @ W[:, 8 * k:8 * (k + 1)].t() + b, y) for k, m in enumerate(model.modalities)]
        lf = F.cross_entropy(res.logits, y)
    assert torch.allclose(out5.loss, lf + lu[0] + lu[1], atol=1e-6)
    out6, g6 = step_grads(tr, batch, epoch=6)
    assert torch.allclose(out6.loss, lf + 3.0 * (lu[0] + lu[1]), atol=1e-6)
    enc = f"encoders.{model.modalities[0]}.0.weight"
    assert enc in g6 and not torch.allclose(g6[enc], step_grads(tr, batch, epoch=6, edit=False)[1][enc])


def test_released_preset_scales_every_encoder_by_exactly_one_and_a_half(tmp_path):
    tr = toy(tmp_path, method="arl_released")
    assert tr.method.hp.weights == "fixed_half"
    batch = first_batch(tr)
    model = tr.ctx.raw_model
    _, plain = step_grads(tr, batch, epoch=6, edit=False)
    _, got = step_grads(tr, batch, epoch=6)
    for n in got:
        want = plain[n] * 1.5 if n.startswith("encoders.") else plain[n]
        assert torch.equal(got[n], want), n
    assert tr.method.metrics() == {f"mult_{m}": 1.5 for m in model.modalities}


def test_unimodal_outputs_use_the_shared_head_with_full_bias(tmp_path):
    tr = toy(tmp_path)
    assert tr.method.uni.kind == "shared_zero_pad"
    model = tr.ctx.raw_model
    batch = first_batch(tr)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.3, -0.2, 0.5]))
    out = tr.ctx.forward(batch)
    u = tr.method.uni(tr.ctx, out, batch["label"])
    W, b = model.head.weight, model.head.bias
    for k, m in enumerate(model.modalities):
        assert torch.allclose(u[m], out.pooled[m] @ W[:, 8 * k:8 * (k + 1)].t() + b, atol=1e-6)
    # the shared head learns from L_m (not detached): its gradient differs from the fused loss's alone
    g_head = torch.autograd.grad(sum(F.cross_entropy(v, batch["label"]) for v in u.values()), [W, b])
    assert all(g.abs().sum() > 0 for g in g_head)


def test_light_heads_on_transformer_fusion_and_refusal_on_regression(tmp_path, run_cli, capsys):
    tr = toy(tmp_path, **{"model.name": "mlp_transformer_fusion"})
    assert tr.method.uni.kind == "linear"
    _, g = step_grads(tr, first_batch(tr), epoch=6)
    assert all(torch.isfinite(v).all() for v in g.values())
    code, rd, _ = run_cli("arl", "synthetic-regression", sets={"dataset.n_samples": 60})
    assert code == 2 and "regression output has none" in capsys.readouterr().err and not rd.exists()
    code, _, res = run_cli("arl_released", "synthetic-regression", sets={"dataset.n_samples": 60})
    assert code == 0 and res["status"] == "ok"


@pytest.mark.parametrize("start,stop_after", [(0, 1), (1, 2)])
def test_resume_gives_the_same_final_numbers(kill_and_resume, start, stop_after):
    """ARL keeps no state: the warm-up follows ctx.epoch, so a run resumed after the warm-up (start=1,
    killed after epoch 1) must not restart it."""
    sets = {**SMALL_MFEAT, **FAST, "start": start}
    (_, full), (code, _, resumed) = kill_and_resume("arl", sets=sets, epochs=3, stop_after=stop_after)
    assert code == 0 and resumed["test"] == full["test"] and resumed["val"] == full["val"]
    assert resumed["method_metrics"] == full["method_metrics"]
