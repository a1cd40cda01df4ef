"""Behavioural tests of MMCosine (docs/methods/mmcosine.md): hand-computed cosine logits, the
normalisation axis, norm invariance, gradient orthogonality, the frozen and ignored bias, head slices,
``late`` = ``shared`` on a concat-linear model, mixed precision, NCE guard, refusal, resume, 2-process DDP."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_MFEAT
from mmbalance.methods.mmcosine import cosine_logits, nce_loss
from test_ddp import assert_identical_ranks, launch_2proc

from mmbalance.testing import build_trainer, first_batch

SETS = {**SMALL_MFEAT, "train.modality_eval": "none"}


def test_forward_closed_form():
    """§7.1: z_a = (3, 4), W_a = [[1, 0], [0, 2]] → u_a = (6, 8); z_v = (1, 0), W_v = [[0, 5], [−3, 0]] →
    u_v = (0, −10); o = (6, −2): CE(y=0) = log(1 + e^−8) = 0.000335, CE(y=1) = 8.000335."""
    za, Wa = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    zv, Wv = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0], [-3.0, 0.0]])
    ua, uv = cosine_logits(za, Wa, 10), cosine_logits(zv, Wv, 10)
    assert torch.allclose(ua, torch.tensor([[6.0, 8.0]])) and torch.allclose(uv, torch.tensor([[0.0, -10.0]]))
    o = ua + uv
    assert F.cross_entropy(o, torch.tensor([0])).item() == pytest.approx(0.000335, abs=1e-6)
    assert F.cross_entropy(o, torch.tensor([1])).item() == pytest.approx(8.000335, abs=1e-5)


def test_normalisation_is_per_class_row():
    """§7.2: per-row (per-class) normalisation gives (9.4868, 8.9443) → class 0; per-column would give
    (7.3006, 8.4853) → class 1."""
    u = cosine_logits(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 1.0], [0.0, 3.0]]), 10)
    assert torch.allclose(u, torch.tensor([[9.4868, 8.9443]]), atol=1e-4) and u.argmax().item() == 0


def test_norm_invariance_and_gradient_orthogonality():
    """§7.3/§7.4: scaling z by 7 and W's rows by 0.1 and 5 leaves the loss unchanged; the gradients are
    orthogonal to z (per sample) and to W[c] (per class); ∂L/∂z_a = (2.2392, −1.6794) in §7.1 with y = 1."""
    za = torch.tensor([[3.0, 4.0]], requires_grad=True)
    Wa = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    zv, Wv = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0], [-3.0, 0.0]])
    loss = F.cross_entropy(cosine_logits(za, Wa, 10) + cosine_logits(zv, Wv, 10), torch.tensor([1]))
    loss.backward()
    assert torch.allclose(za.grad, torch.tensor([[2.2392, -1.6794]]), atol=1e-4)
    assert abs((za.grad * za).sum().item()) < 1e-5
    assert torch.allclose((Wa.grad * Wa).sum(1), torch.zeros(2), atol=1e-5)
    g = torch.Generator().manual_seed(0)
    z, W, y = torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g), torch.tensor([0, 1, 2, 3])
    base = F.cross_entropy(cosine_logits(z, W, 10), y)
    scaled = F.cross_entropy(cosine_logits(7 * z, W * torch.tensor([[0.1], [5], [1], [1], [1]]), 10), y)
    assert abs(base.item() - scaled.item()) < 1e-6


def test_shared_head_bias_is_frozen_ignored_and_slices_are_the_column_blocks(tmp_path):
    """§7.5/§7.6 on mfeat (M = 3, three 64-wide blocks): after 5 SGD steps with weight decay the head
    bias is bitwise its initial value and in no optimizer group; +100 on one class's bias does not change
    ``predict``; each u_m is the cosine against the hand-sliced block W[:, 64k:64(k+1)]."""
    sets = {**SETS, "train.max_steps_per_epoch": 5, "train.weight_decay": 1e-3}
    tr = build_trainer("mmcosine", "mfeat", run_dir=tmp_path / "r", epochs=1, sets=sets)
    ctx, meth = tr.ctx, tr.method
    layer = ctx.raw_model.final_layer()
    assert meth.head == "shared"
    b0, w0 = layer.bias.detach().clone(), layer.weight.detach().clone()
    assert all(p is not layer.bias for g in ctx.optimizer.param_groups for p in g["params"])
    tr.fit()
    assert torch.equal(layer.bias, b0) and not torch.equal(layer.weight, w0)
    batch = first_batch(tr)
    ctx.raw_model.eval()
    before = meth.predict(ctx, batch)
    with torch.no_grad():
        layer.bias[3] += 100
    assert torch.equal(meth.predict(ctx, batch), before)
    with torch.no_grad():
        out = ctx.raw_model(ctx.inputs(batch))
        u = meth.unimodal_cosine(ctx, out.features, out.pooled, None)
    for k, m in enumerate(ctx.modalities):
        z, W = out.pooled[m], layer.weight[:, 64 * k:64 * (k + 1)]
        want = 10 * (z / z.norm(dim=1, keepdim=True)) @ (W / W.norm(dim=1, keepdim=True)).t()
        assert torch.allclose(u[m], want, atol=1e-5), m
    assert torch.allclose(before, sum(u.values()), atol=1e-5)
    # predict with two modalities absent is modality 0's own cosine logits, not a neutral-input sum
    alone = meth.predict(ctx, batch, absent=tuple(ctx.modalities[1:]))
    assert torch.allclose(alone, u[ctx.modalities[0]], atol=1e-6)


@pytest.mark.parametrize("head", ["shared", "late"])
def test_training_loss_is_ce_of_the_summed_hand_cosines(tmp_path, head):
    """The training step's loss (one block-normalised product) equals CE(Σ_m s·ẑ_m·Ŵ_mᵀ, y) computed by
    hand per modality, for the shared head's blocks and for the late heads."""
    tr = build_trainer("mmcosine", "mfeat", run_dir=tmp_path / head, epochs=1, sets={**SETS, "head": head})
    ctx = tr.ctx
    batch = first_batch(tr)
    loss = tr.method.training_step(ctx, batch).loss
    with torch.no_grad():
        out = ctx.raw_model(ctx.inputs(batch))
    o = 0
    for k, m in enumerate(ctx.modalities):
        W = (ctx.raw_model.final_layer().weight[:, 64 * k:64 * (k + 1)] if head == "shared"
             else ctx.modules["mmcosine_heads"].weight[m])
        z = out.pooled[m]
        o = o + 10 * (z / z.norm(dim=1, keepdim=True)) @ (W / W.norm(dim=1, keepdim=True)).t()
    assert torch.allclose(loss, F.cross_entropy(o, batch["label"]), atol=1e-5)


def test_late_equals_shared_with_copied_blocks(tmp_path):
    """§7.7: ``late`` replaces fusion/head by Identity with bias-free cosine heads; with the late weights
    copied from the shared head's column blocks, both give the same o_cos."""
    shared = build_trainer("mmcosine", "mfeat", run_dir=tmp_path / "s", epochs=1, sets=SETS)
    late = build_trainer("mmcosine", "mfeat", run_dir=tmp_path / "l", epochs=1, sets={**SETS, "head": "late"})
    heads = late.ctx.modules["mmcosine_heads"]
    assert isinstance(late.ctx.raw_model.fusion, torch.nn.Identity) and isinstance(late.ctx.raw_model.head, torch.nn.Identity)
    assert all(n.startswith("weight.") for n, _ in heads.named_parameters())  # no bias
    W = shared.ctx.raw_model.final_layer().weight
    with torch.no_grad():
        for k, m in enumerate(late.ctx.modalities):
            heads.weight[m].copy_(W[:, 64 * k:64 * (k + 1)])
    batch = first_batch(shared)
    assert torch.allclose(shared.method.predict(shared.ctx, batch), late.method.predict(late.ctx, batch), atol=1e-5)


def test_bf16_and_zero_features_stay_finite():
    """§7.8: under bf16 autocast o_cos is float32 and finite; an all-zero feature row gives u = 0 and a
    finite gradient."""
    z = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], requires_grad=True)
    W = torch.randn(4, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = cosine_logits(z.bfloat16(), W, 10)
    assert u.dtype == torch.float32 and torch.isfinite(u).all() and torch.equal(u[0], torch.zeros(4))
    F.cross_entropy(u, torch.tensor([0, 1])).backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(W.grad).all()


def test_nce_rows_without_negatives_are_finite():
    """§6.2.5: a batch whose labels are all equal has no negatives: the official 0/0 is not reproduced."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    assert torch.isfinite(nce_loss(a, b, torch.zeros(4, dtype=torch.long)))
    # identical features, each sample its own class: P_ii = softmax of (1, cos…)/τ, positives on the diagonal
    e = torch.eye(3)
    p = torch.softmax(e / 0.1, 1)[0, 0]
    want = -torch.log(p) + -torch.log(1 - (1 - p) / 2)  # negatives share the rest equally
    assert torch.allclose(nce_loss(e, e, torch.arange(3)), want, atol=1e-5)


def test_regression_is_refused_naming_the_reason(run_cli, capsys):
    code, rd, _ = run_cli("mmcosine", "synthetic-regression", sets={"dataset.n_samples": 60})
    err = capsys.readouterr().err
    assert code == 2 and "regression" in err and "class vectors" in err and not rd.exists()


def test_resume_gives_the_same_final_numbers(kill_and_resume):
    (_, full), (code, _, resumed) = kill_and_resume("mmcosine", sets=SETS, epochs=2, stop_after=1)
    assert code == 0 and resumed["test"] == full["test"] and resumed["val"] == full["val"]


@pytest.mark.ddp
def test_two_process_no_unused_parameter_error_and_identical_ranks(tmp_path):
    """§7.11: the frozen bias is not a DDP parameter (no unused-parameter error with the default
    find_unused_parameters=False), the replicas stay identical, and the bias is its initial value."""
    init = build_trainer("mmcosine", "mfeat", run_dir=tmp_path / "init", epochs=1, sets=SETS)
    b0 = init.ctx.raw_model.final_layer().bias.detach().clone()
    proc = launch_2proc(["--method", "mmcosine", "--dataset", "mfeat", "--epochs", "1", "--set",
                         "dataset.limit_per_class=20", "--set", "train.modality_eval=none", "--run-dir",
                         str(tmp_path / "run"), "--quiet"], tmp_path / "dump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_identical_ranks(tmp_path / "dump")
    r0 = torch.load(tmp_path / "dump" / "rank0.pt", weights_only=False)
    bias_key = next(k for k in r0["model"] if k.startswith("head") and k.endswith("bias"))
    assert torch.equal(r0["model"][bias_key], b0)
