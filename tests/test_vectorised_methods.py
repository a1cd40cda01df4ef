"""The vectorised CGGM and AGM pieces (issue 14) against independent references: the closed-form L_gm
gradient against autograd, the grouped classifiers against the heads one by one, the batched coalition
forward against the passes one by one (train and eval flags, BatchNorm, dropout), ``StepContext.log_many``
against per-key logging, and the resume of a checkpoint written before the change."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_MFEAT
from mmbalance.methods.agm import AGM, AGMHParams, ScaledSum, mode_sensitive, train_invariant
from mmbalance.methods.cggm import (
    CGGM,
    CGGMClassifiers,
    convert_optimizer_state,
    direction_loss_and_grad,
    with_gradient,
)
from torch import nn

from mmbalance.interface import StepContext
from mmbalance.models.base import MultimodalModel
from mmbalance.models.encoders import MLPEncoder
from mmbalance.models.fusion import ConcatFusion
from mmbalance.models.heads import MLPHead, UnimodalHead
from mmbalance.testing import build_trainer, first_batch


# ----------------------------------------------------------------------------- CGGM: L_gm in closed form
def autograd_lgm(wf, wis, b, pairing):
    """Reference: Eq. 12 through F.cosine_similarity and autograd (the code this replaced)."""
    wf = wf.clone().requires_grad_(True)
    cos = torch.stack([F.cosine_similarity(w.reshape(1, -1), (wf if s is None else wf[:, s]).reshape(1, -1))[0]
                       for w, s in zip(wis, pairing)])
    bb = b.to(cos.dtype)
    lgm = (bb.abs().sum() - (bb * cos).sum()) / len(wis)
    return lgm.detach(), torch.autograd.grad(lgm, wf)[0]


@pytest.mark.parametrize("layout", ["full", "block", "block_unordered", "block_unequal"])
def test_direction_gradient_closed_form_matches_autograd(layout):
    g = torch.Generator().manual_seed(3)
    C, M = 5, 3
    if layout == "full":
        wf = torch.randn(C, 7, generator=g)
        pairing = [None] * M
        wis = [torch.randn(C, 7, generator=g) for _ in range(M)]
    elif layout == "block":  # consecutive equal blocks: the [C, M, d] view
        wf = torch.randn(C, 12, generator=g)
        pairing = [slice(0, 4), slice(4, 8), slice(8, 12)]
        wis = [torch.randn(C, 4, generator=g) for _ in range(M)]
    elif layout == "block_unordered":  # equal widths, not in modality order: the general path
        wf = torch.randn(C, 12, generator=g)
        pairing = [slice(8, 12), slice(0, 4), slice(4, 8)]
        wis = [torch.randn(C, 4, generator=g) for _ in range(M)]
    else:  # blocks of different widths
        wf = torch.randn(C, 9, generator=g)
        pairing = [slice(0, 2), slice(2, 5), slice(5, 9)]
        wis = [torch.randn(C, s.stop - s.start, generator=g) for s in pairing]
    b = torch.tensor([0.7, -0.4, 1.9], dtype=torch.float64)
    value, grad = direction_loss_and_grad(wf, wis, b, pairing)
    ref_value, ref_grad = autograd_lgm(wf, wis, b, pairing)
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    # the surrogate carries exactly that gradient and that value, whatever W_F becomes afterwards
    p = wf.clone().requires_grad_(True)
    term = with_gradient(value, p, grad)
    assert float(term) == float(value)
    with torch.no_grad():
        p.add_(1.0)
    torch.testing.assert_close(torch.autograd.grad(term, p)[0], ref_grad, rtol=1e-5, atol=1e-7)


def test_direction_gradient_of_a_stacked_weight_tensor():
    """w_i passed as one [M, C, d] tensor gives what the list gives."""
    g = torch.Generator().manual_seed(4)
    wf, wis = torch.randn(3, 10, generator=g), torch.randn(2, 3, 5, generator=g)
    b = torch.tensor([0.3, 1.2], dtype=torch.float64)
    pairing = [slice(0, 5), slice(5, 10)]
    v1, g1 = direction_loss_and_grad(wf, wis, b, pairing)
    v2, g2 = direction_loss_and_grad(wf, list(wis.unbind(0)), b, pairing)
    assert torch.equal(v1, v2) and torch.equal(g1, g2)


# ----------------------------------------------------------------------------- CGGM: grouped classifiers
def per_head_state(heads):
    return {f"heads.{m}.{n}": v.detach().clone() for m, h in heads.items() for n, v in h.state_dict().items()}


def test_grouped_classifiers_equal_the_heads_one_by_one():
    torch.manual_seed(0)
    heads = {m: UnimodalHead("vector", 8, 4, "cggm") for m in ("a", "b", "c")}
    ref = copy.deepcopy(heads)
    clf = CGGMClassifiers(heads)
    assert clf.grouped is not None
    assert set(clf.state_dict()) == {"grouped.weight0", "grouped.bias0", "grouped.weight1", "grouped.bias1"}
    feats = {m: torch.randn(6, 8) for m in heads}
    stacked = clf(feats, stacked=True)
    for k, m in enumerate(heads):
        torch.testing.assert_close(stacked[k], ref[m](feats[m]), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(clf.heads[m](feats[m]), ref[m](feats[m]), rtol=1e-6, atol=1e-6)  # the views
        assert torch.equal(clf.heads[m].final_layer().weight, ref[m].out.weight)
    # gradients: the stacked parameters get each head's own gradient (transposed, stacked)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    sum(F.cross_entropy(stacked[k], y) for k in range(3)).backward()
    sum(F.cross_entropy(ref[m](feats[m]), y) for m in ref).backward()
    g = clf.grouped
    for k, m in enumerate(ref):
        torch.testing.assert_close(g.weight0.grad[k], ref[m].body[0].weight.grad.t(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g.bias0.grad[k, 0], ref[m].body[0].bias.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g.weight1.grad[k], ref[m].out.weight.grad.t(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g.bias1.grad[k, 0], ref[m].out.bias.grad, rtol=1e-5, atol=1e-7)


def test_per_head_checkpoints_load_into_the_grouped_layout():
    """A classifier state_dict and an optimizer state of the per-head layout (before the grouping) load
    into the grouped module and its optimizer: same outputs, and the next optimizer step is the same."""
    torch.manual_seed(1)
    heads = {m: UnimodalHead("vector", 8, 4, "cggm") for m in ("a", "b", "c")}
    ref = copy.deepcopy(heads)
    feats, y = {m: torch.randn(6, 8) for m in heads}, torch.tensor([0, 1, 2, 3, 0, 1])
    ref_params = [p for h in ref.values() for p in h.parameters()]
    ref_opt = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=True)
    for _ in range(2):
        ref_opt.zero_grad()
        sum(F.cross_entropy(ref[m](feats[m]), y) for m in ref).backward()
        ref_opt.step()
    clf = CGGMClassifiers({m: UnimodalHead("vector", 8, 4, "cggm") for m in heads})  # other initial values
    clf.load_state_dict(per_head_state(ref))
    assert clf.loaded_old_layout
    for m in heads:
        torch.testing.assert_close(clf(feats)[m], ref[m](feats[m]), rtol=1e-6, atol=1e-6)
    opt = torch.optim.SGD(list(clf.parameters()), lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=True)
    opt.load_state_dict(convert_optimizer_state(ref_opt.state_dict(), 3, 2))
    for o, fwd in ((ref_opt, lambda: sum(F.cross_entropy(ref[m](feats[m]), y) for m in ref)),
                   (opt, lambda: sum(F.cross_entropy(v, y) for v in clf(feats).values()))):
        o.zero_grad()
        fwd().backward()
        o.step()
    for m in heads:
        torch.testing.assert_close(clf.heads[m](feats[m]), ref[m](feats[m]), rtol=1e-5, atol=1e-6)


def test_resume_of_a_per_head_run_folder(run_cli, tmp_path, monkeypatch):
    """A run killed after epoch 1 whose checkpoint has the per-head classifier layout (as written before
    the grouping) resumes to the numbers of an uninterrupted run."""
    sets = {**SMALL_MFEAT, "train.modality_eval": "none", "train.diagnostics": "none"}
    code, full_dir, full = run_cli("cggm", epochs=2, sets=sets, run_dir=tmp_path / "full")
    assert code == 0
    monkeypatch.setenv("MMBALANCE_STOP_AFTER_EPOCHS", "1")
    with pytest.raises(KeyboardInterrupt):
        run_cli("cggm", epochs=2, sets=sets, run_dir=tmp_path / "cut")
    monkeypatch.delenv("MMBALANCE_STOP_AFTER_EPOCHS")
    last = tmp_path / "cut" / "checkpoints" / "last.pt"
    ck = torch.load(last, weights_only=False)
    g = ck["weights"]["extra"][CGGM.MODULE]
    names = ["fac", "fou", "mor"]
    old = {}
    for k, m in enumerate(names):  # back to heads.<m>.body.0 / heads.<m>.out, W [out, in]
        for j, layer in enumerate(("body.0", "out")):
            old[f"heads.{m}.{layer}.weight"] = g[f"grouped.weight{j}"][k].t().clone()
            old[f"heads.{m}.{layer}.bias"] = g[f"grouped.bias{j}"][k, 0].clone()
    ck["weights"]["extra"][CGGM.MODULE] = old
    st = ck["extra_optimizers"][CGGM.MODULE]
    new_state = st["state"]
    per_head = {}
    for k in range(3):
        for i in range(4):
            entry = {key: (v[k].t().clone() if i % 2 == 0 else v[k, 0].clone()) if isinstance(v, torch.Tensor) and v.dim() else v
                     for key, v in new_state[i].items()}
            per_head[k * 4 + i] = entry
    ck["extra_optimizers"][CGGM.MODULE] = {"state": per_head, "param_groups": [{**st["param_groups"][0],
                                                                              "params": list(range(12))}]}
    torch.save(ck, last)
    code, _, resumed = run_cli("cggm", epochs=2, sets=sets, run_dir=tmp_path / "cut", extra=["--resume"])
    assert code == 0 and resumed["status"] == "ok"
    for split in ("val", "test"):
        for key, v in full[split].items():
            if isinstance(v, float):
                assert resumed[split][key] == pytest.approx(v, rel=1e-6, abs=1e-9), (split, key)


def test_heads_of_other_shapes_are_not_grouped():
    seq = {m: UnimodalHead("sequence", 10, 4, "cggm", num_heads=2) for m in ("a", "b")}
    clf = CGGMClassifiers(seq)
    assert clf.grouped is None and set(clf.heads) == {"a", "b"}
    assert all(k.startswith("heads.") for k in clf.state_dict())  # the per-head layout, unchanged
    mixed = {"a": UnimodalHead("vector", 8, 4, "cggm"), "b": UnimodalHead("vector", 6, 4, "cggm")}
    assert CGGMClassifiers(mixed).grouped is None


def test_mfeat_step_uses_the_grouped_classifiers_and_matches_the_per_head_losses(tmp_path):
    tr = build_trainer("cggm", "mfeat", run_dir=tmp_path / "r", sets=SMALL_MFEAT)
    ctx, meth, batch = tr.ctx, tr.method, first_batch(tr)
    assert meth._stacked
    out = meth.training_step(ctx, batch)
    heads = ctx.accelerator.unwrap_model(ctx.modules[CGGM.MODULE]).heads
    y = batch["label"]
    with torch.no_grad():
        ref = sum(F.cross_entropy(heads[m](out.output.features[m]), y) for m in meth.modalities)
        hits = [(heads[m](out.output.features[m]).argmax(1) == y).sum().item() for m in meth.modalities]
    assert float(out.logs["cggm/aux_loss"]) == pytest.approx(float(ref), rel=1e-6)
    assert meth._parts[0].tolist() == hits and meth._parts[1].tolist() == [len(y)] * 3


def test_resume_from_a_checkpoint_of_the_earlier_layout(tmp_path):
    """Before this change the stale-term snapshot held the weights (w_f, w_i, b); such a checkpoint
    still resumes to the same term (value and gradient) as the new (value, gradient) snapshot."""
    tr = build_trainer("cggm", "mfeat", run_dir=tmp_path / "r", sets=SMALL_MFEAT)
    ctx, meth, batch = tr.ctx, tr.method, first_batch(tr)
    out = meth.training_step(ctx, batch)
    out.loss.backward()
    wf = ctx.raw_model.final_layer().weight
    heads = ctx.accelerator.unwrap_model(ctx.modules[CGGM.MODULE]).heads
    old_snap = {"w_f": wf.detach().clone(), "w_i": [heads[m].final_layer().weight.detach().clone()
                                                     for m in meth.modalities]}
    meth.after_backward(ctx)
    old_snap["b"] = meth._b.clone()
    new_state = meth.state_dict()
    old_state = {**new_state, "lgm_snapshot": old_snap}
    with torch.no_grad():
        wf.add_(0.1)  # the optimizer moves W_F before the resumed step
    terms = []
    for state in (new_state, old_state):
        fresh = CGGM(meth.hp)
        for attr in ("modalities", "pairing", "_raw_model", "_raw_classifiers", "_scoped"):
            setattr(fresh, attr, getattr(meth, attr))
        fresh.load_state_dict(state)
        fresh.on_epoch_start(ctx)
        terms.append((float(fresh.lgm_prev), torch.autograd.grad(fresh.lgm_prev, wf)[0]))
    assert terms[0][0] == pytest.approx(terms[1][0], abs=1e-7) == pytest.approx(float(meth.lgm_prev), abs=1e-7)
    torch.testing.assert_close(terms[0][1], terms[1][1], rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- StepContext.log_many
def test_log_many_gives_the_per_key_means():
    ctx = StepContext.__new__(StepContext)
    ctx._logs, ctx._vec_logs = {}, {}
    ctx.log("x/a", torch.tensor(1.0))  # the same key through log() and log_many() is merged
    ctx.log_many(("x/a", "x/b"), torch.tensor([3.0, 10.0]))
    ctx.log_many(("x/a", "x/b"), torch.tensor([5.0, 20.0], dtype=torch.float64))
    ctx.log_many(("x/c",), torch.tensor([2.5]))
    out = ctx.pop_logs()
    assert out == {"x/a": pytest.approx(3.0), "x/b": pytest.approx(15.0), "x/c": pytest.approx(2.5)}
    assert ctx.pop_logs() == {}


# ----------------------------------------------------------------------------- AGM: batched coalitions
class CustomForward(MultimodalModel):
    """A model off the base contract (its own forward): AGM stacks the inputs along the batch."""

    def forward(self, inputs, absent=(), only=None):
        return super().forward(inputs, absent)


def toy(model_cls=MultimodalModel, M: int = 3) -> MultimodalModel:
    torch.manual_seed(0)
    names = [f"m{i}" for i in range(M)]
    encs = {m: MLPEncoder(6, 8, 5) for m in names}
    encs[names[0]] = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU())
    encs[names[1]] = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.3), nn.ReLU())
    fusion = ConcatFusion({m: 5 for m in names})
    return model_cls(encs, fusion, MLPHead(5 * M, 16, 4, dropout=0.5), feature_kinds={m: "vector" for m in names},
                     feature_dims={m: 5 for m in names}, out_dim=4)


class Ctx:
    def __init__(self, model):
        self.model = self.raw_model = model

    def forward(self, batch, absent=()):
        return self.model({m: batch[m] for m in self.model.modalities}, absent=tuple(absent))


@pytest.mark.parametrize("model_cls", [MultimodalModel, CustomForward])
def test_batched_coalitions_equal_the_passes_one_by_one(model_cls):
    model = toy(model_cls)
    ctx = Ctx(model)
    meth = AGM(AGMHParams())
    meth.setup(ctx)
    g = torch.Generator().manual_seed(1)
    batch = {m: torch.randn(9, 6, generator=g) for m in model.modalities}
    batch["label"] = torch.randint(0, 4, (9,), generator=g)
    masks = [1, 2, 3, 4, 5, 6]
    model.train()
    full = ctx.forward(batch)
    bn_state = {k: v.clone() for k, v in model.state_dict().items()}
    got = meth.coalition_logits(ctx, batch, masks, full)
    assert model.training and all(sub.training for sub in model.modules())  # train mode restored
    assert all(torch.equal(v, bn_state[k]) for k, v in model.state_dict().items())  # BN statistics untouched
    model.eval()
    ref = torch.stack([ctx.forward(batch, tuple(m for i, m in enumerate(model.modalities) if not S >> i & 1)).logits
                       for S in masks])
    model.train()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    w = torch.randn_like(ref)
    params = [p for p in model.parameters()]
    g_got = torch.autograd.grad((got * w).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((ref * w).sum(), params, allow_unused=True)
    for a, r in zip(g_got, g_ref):
        assert (a is None) == (r is None)
        if a is not None:
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_train_invariant_encoders_reuse_the_full_pass_exactly():
    """An encoder without dropout/batch statistics gives the same output in both modes, so the full
    pass's features stand in for the eval-mode pass; one with them never does."""
    model = toy()
    inv = {m: train_invariant(model.encoders[m]) for m in model.modalities}
    assert inv == {"m0": False, "m1": False, "m2": True}
    assert not train_invariant(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0)))
    sensitive = mode_sensitive(model)
    assert any(isinstance(s, nn.BatchNorm1d) for s in sensitive) and any(isinstance(s, nn.Dropout) for s in sensitive)
    assert not any(type(s) is nn.Linear for s in sensitive)


def test_scaled_sum_scales_each_response():
    mono = torch.randn(3, 4, 2, requires_grad=True)
    kappa = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
    out = ScaledSum.apply(mono, kappa)
    torch.testing.assert_close(out, mono.detach().sum(0))
    g = torch.randn(4, 2)
    (grad,) = torch.autograd.grad(out, mono, g)
    for k in range(3):
        torch.testing.assert_close(grad[k], float(kappa[k]) * g)


def _record_conversions(monkeypatch) -> list[str]:
    """Patch the tensor→Python conversions; every call appends its name to the returned list."""
    calls: list[str] = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, __o=orig, __n=name, **k: calls.append(__n) or __o(t, *a, **k))
    return calls


def test_agm_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """κ, S̄ and the logs stay tensors: a training step converts no tensor to a Python number."""
    tr = build_trainer("agm", "mfeat", run_dir=tmp_path / "r", sets=SMALL_MFEAT)
    ctx, meth, batch = tr.ctx, tr.method, first_batch(tr)
    meth.training_step(ctx, batch)  # first step (caches)
    calls = _record_conversions(monkeypatch)
    out = meth.training_step(ctx, batch)
    out.loss.backward()
    meth.after_backward(ctx)
    monkeypatch.undo()
    assert calls == [], calls


def test_cggm_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    tr = build_trainer("cggm", "mfeat", run_dir=tmp_path / "r", sets=SMALL_MFEAT)
    ctx, meth, batch = tr.ctx, tr.method, first_batch(tr)
    for _ in range(2):
        out = meth.training_step(ctx, batch)
        out.loss.backward()
        meth.after_backward(ctx)
        ctx.optimizer.zero_grad(set_to_none=True)
    calls = _record_conversions(monkeypatch)
    out = meth.training_step(ctx, batch)
    out.loss.backward()
    meth.after_backward(ctx)
    monkeypatch.undo()
    assert calls == [], calls
    assert isinstance(meth.guard_hits, int)

