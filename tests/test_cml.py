"""Behavioural tests of CML (docs/methods/cml.md). Oracles: hand-computed regulariser values and gradients,
the model's own forward on single samples with the removed modalities absent, the concat head written out
by hand, and the single-process gradient on the concatenated batch for the world-size scaling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_MFEAT
from mmbalance.methods.cml import cml_regulariser, removal_ranks

from mmbalance.interface import StepContext
from mmbalance.testing import build_trainer, first_batch

FAST = {"train.modality_eval": "none"}

# full/reduced confidences, full correct (T, T, F, F), reduced correct (T, F, T, F): Δ = (−0.2, 0.2, 0.4, 0.2)
CONF = [[0.9, 0.6, 0.5, 0.3], [0.7, 0.8, 0.9, 0.5]]
CORRECT = torch.tensor([[True, True, False, False], [True, False, True, False]])


def reg(gate, margin=0.0):
    conf = torch.tensor(CONF, requires_grad=True)
    value = cml_regulariser(conf, CORRECT, gate, margin)
    (grad,) = torch.autograd.grad(value, conf) if value.requires_grad else (torch.zeros_like(conf),)
    return float(value), grad


def test_gates_by_hand():
    cpm, g_cpm = reg("cpm")
    none, _ = reg("none")
    miwae, g_miwae = reg("miwae")
    assert cpm == pytest.approx(0.4, abs=1e-6)  # sample 3 (reduced right, full wrong) gated out
    assert none == pytest.approx(0.8, abs=1e-6)
    assert miwae == pytest.approx(0.4, abs=1e-6)  # 0.2 (full correct) + 0.2 (both wrong)
    assert cpm != pytest.approx(0.6, abs=1e-3)  # BalanceBenchmark's hinge on the batch sum
    assert g_cpm[0, 3] == -1 and g_miwae[0, 3] == 0  # miwae detaches the fuller confidence when both are wrong
    assert g_cpm[1, 1] == 1 and g_cpm[0, 1] == -1  # sign: a rise is penalised, the fuller confidence pushed up
    assert g_cpm[0, 0] == 0 and g_cpm[1, 0] == 0  # a drop costs nothing


def test_margin_by_hand():
    assert reg("cpm", 0.25)[0] == pytest.approx(0.0, abs=1e-6)
    assert reg("none", 0.25)[0] == pytest.approx(0.15, abs=1e-6)  # sample 3 alone: 0.4 − 0.25


def test_segmentation_hinge_is_a_per_image_pixel_mean():
    conf = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]], [[[0.9, 0.5], [0.1, 0.7]]]])  # [levels, images, 2, 2]
    correct = torch.ones(2, 1, 2, 2, dtype=torch.bool)
    assert float(cml_regulariser(conf, correct, "cpm")) == pytest.approx((0.4 + 0.2) / 4, abs=1e-6)


def test_removal_orders_are_nested_and_uniform():
    ranks = removal_ranks(2000, 3, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert sorted(ranks[0].tolist()) == [0, 1, 2]
    removed = [ranks < k for k in range(3)]  # level k: rank < k
    for k in range(2):
        assert bool((removed[k] <= removed[k + 1]).all())  # nested
    for k in range(3):
        assert bool((removed[k].sum(1) == k).all())  # exactly k removed; level M−1 keeps one
    first = (ranks == 0).float().mean(0)
    assert bool(((first - 1 / 3).abs() < 0.03).all()), first


def toy(tmp_path, name="run", **extra):
    sets = {"dataset.n_modalities": 3, "dataset.num_classes": 4, "dataset.n_samples": 80, "train.batch_size": 8,
            "model.enc_hidden": 8, "model.enc_out": 8, **FAST, **extra}
    return build_trainer("cml", "synthetic", run_dir=tmp_path / name, sets=sets)


def test_input_removal_levels_equal_single_sample_forwards_and_loss_by_hand(tmp_path):
    tr = toy(tmp_path, lam=0.0)
    ctx, meth = tr.ctx, tr.method
    batch = first_batch(tr)
    y = batch["label"]
    out = meth.training_step(ctx, batch)
    mods = ctx.modalities
    ranks = meth.last_ranks
    want = []
    for k in range(3):
        rows = []
        for i in range(len(y)):
            absent = tuple(m for j, m in enumerate(mods) if ranks[i, j] < k)
            rows.append(ctx.forward({m: batch[m][i:i + 1] for m in mods}, absent=absent).logits)
        want.append(torch.cat(rows))
    for k in range(3):
        assert torch.allclose(meth.last_levels[k], want[k], atol=1e-6), k
    hand = sum(F.cross_entropy(o, y) for o in want) / 3
    assert torch.allclose(out.loss, hand, atol=1e-6)


def test_feature_removal_is_the_head_minus_the_removed_blocks(tmp_path):
    tr = toy(tmp_path, removal="feature")
    ctx, meth = tr.ctx, tr.method
    batch = first_batch(tr)
    meth.training_step(ctx, batch)
    model = ctx.raw_model
    with torch.no_grad():
        res = model(ctx.inputs(batch))
        W = model.head.weight
        for k in range(1, 3):
            o = res.logits.clone()
            for j, m in enumerate(ctx.modalities):
                gone = (meth.last_ranks[:, j] < k).float()[:, None]
                o = o - gone * (res.pooled[m] @ W[:, 8 * j:8 * (j + 1)].t())  # o − u_m + b/M (BB's formula)
            assert torch.allclose(meth.last_levels[k], o, atol=1e-6), k


def test_regulariser_uses_the_max_class_confidence(tmp_path):
    tr = toy(tmp_path, gate="none")
    ctx, meth = tr.ctx, tr.method
    batch = first_batch(tr)
    out = meth.training_step(ctx, batch)
    y = batch["label"]
    p = [o.softmax(1) for o in meth.last_levels]
    total = 0.0
    for k in range(2):
        for i in range(len(y)):
            total += max(0.0, float(p[k + 1][i].max() - p[k][i].max()))
    assert float(out.logs["cml/reg"]) == pytest.approx(total, abs=1e-5)
    true_class = sum(max(0.0, float(p[k + 1][i, y[i]] - p[k][i, y[i]])) for k in range(2) for i in range(len(y)))
    assert abs(total - true_class) > 1e-3  # the two definitions differ on this batch


def grads(tr, batch, ranks, world, monkeypatch):
    ctx, meth, model = tr.ctx, tr.method, tr.ctx.raw_model
    monkeypatch.setattr(StepContext, "world_size", property(lambda self: world))
    monkeypatch.setattr(meth, "draw_ranks", lambda ctx, n: ranks)
    model.zero_grad(set_to_none=True)
    meth.training_step(ctx, batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_world_size_scaling_equals_the_global_batch_gradient(tmp_path, monkeypatch):
    """DDP averages the ranks' gradients; with L_CML × W the average equals one process's gradient on the
    concatenated batch (the official per-sample sum). Two shards simulated in-process, orders injected."""
    tr = toy(tmp_path, lam=5.0, gate="none")
    batch = first_batch(tr)
    ranks = removal_ranks(8, 3, torch.Generator().manual_seed(3), torch.device("cpu"))
    whole = grads(tr, batch, ranks, 1, monkeypatch)
    halves = [grads(tr, {k: v[s] for k, v in batch.items()}, ranks[s], 2, monkeypatch)
              for s in (slice(0, 4), slice(4, 8))]
    for n in whole:
        assert torch.allclose((halves[0][n] + halves[1][n]) / 2, whole[n], rtol=1e-5, atol=1e-6), n


def test_feature_removal_refused_on_mmtm_models(tmp_path):
    from mmbalance.errors import MethodNotApplicable

    with pytest.raises(MethodNotApplicable, match="removal=input"):
        toy(tmp_path, removal="feature", **{"model.name": "mlp_mmtm"})
    assert toy(tmp_path, name="in", **{"model.name": "mlp_mmtm"}).method.hp.removal == "input"  # input removal runs


def test_resume_gives_the_same_final_numbers(kill_and_resume):
    sets = {**SMALL_MFEAT, **FAST}
    (_, full), (code, _, resumed) = kill_and_resume("cml", sets=sets, epochs=3, stop_after=1)
    assert code == 0 and resumed["test"] == full["test"] and resumed["val"] == full["val"]
    assert resumed["method_metrics"] == full["method_metrics"]
