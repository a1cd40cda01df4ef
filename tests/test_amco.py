"""Behavioural tests of AMCo (docs/methods/amco.md "What the tests check"): the ramp schedule and mask
counts, the shares and the strict threshold, the role of the mask and its lag, the co-optimization loss,
full masking, prediction, refusals, resume and runs on every task and fusion kind."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_MFEAT
from mmbalance.methods.amco import AMCo, AMCoHParams, block_shares, class_mask, feature_mask, rescale

from mmbalance.errors import MethodNotApplicable
from mmbalance.testing import build_trainer, first_batch

FAST = {**SMALL_MFEAT, "train.modality_eval": "none", "train.diagnostics": "none"}


# ---------------------------------------------------------------- closed forms (amco.md §7.1–2)
def test_ramp_schedule_counts_and_rescale():
    method = AMCo(AMCoHParams())
    ps = {}
    for e in (0, 1, 2):
        method.ell = 0.0
        ctx = SimpleNamespace(epoch=e)
        ps[e] = [method.next_ratio(ctx) for _ in range(6)]
    assert ps[0] == [0.0] * 6
    assert ps[1][:4] == pytest.approx([0, 0.5, 0.866025, 1], abs=1e-6) and ps[1][4:] == [1.0, 1.0]
    assert ps[2][:3] == pytest.approx([0, 0.866025, 1], abs=1e-6)
    assert ps[1][3] == 1.0  # 0.1 + 0.1 + 0.1 > 0.3 in floats: min(ε, ℓ) = ε, p exactly 1
    assert [int(p * 6) for p in ps[1][:4]] == [0, 3, 5, 6]
    assert [int(p * 512) for p in ps[1][:4]] == [0, 256, 443, 512]
    assert [rescale(p) for p in ps[1][:3]] == pytest.approx([1, 2, 7.464102], abs=1e-6)
    g = torch.Generator().manual_seed(0)
    for p, n_zero in ((0.5, 256), (0.866025, 443), (1.0, 512)):
        m = feature_mask(512, p, g, torch.device("cpu"))
        assert int((m == 0).sum()) == n_zero and (n_zero == 512 or torch.allclose(m[m > 0], torch.tensor(rescale(p))))
    assert int((class_mask(6, 0.866025, g, torch.device("cpu")) == 0).sum()) == 5


def test_shares_closed_form_and_strict_threshold():
    num, rows = block_shares([torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])])
    assert (num / rows).tolist() == pytest.approx([0.807490, 0.192510], abs=1e-6)
    num, rows = block_shares([torch.zeros(3, 4), torch.zeros(3, 4)])
    assert (num / rows).tolist() == [0.5, 0.5] and not bool(((num / rows) > 0.5).any())
    num, _ = block_shares([torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, -1.0]])])
    assert float(num[0]) == pytest.approx(0.393224, abs=1e-6)
    # maps: per-pixel concatenated softmax, mean over pixels
    u_map = [torch.tensor([2.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)]
    assert block_shares(u_map)[0].tolist() == pytest.approx([0.807490, 0.192510], abs=1e-6)


# ---------------------------------------------------------------- the method on a real model
def _trainer(tmp_path, name="r", method="amco", dataset="mfeat-pix-mor", epochs=2, **sets):
    base = FAST if dataset.startswith("mfeat") else {"train.modality_eval": "none", "train.diagnostics": "none"}
    return build_trainer(method, dataset, run_dir=tmp_path / name, epochs=epochs, sets={**base, **sets})


def _ctx_at(tr, epoch=1):
    ctx = tr.ctx
    ctx.epoch, ctx.epochs_in_phase, ctx.step = epoch, 2, 0
    tr.method.on_epoch_start(ctx)
    return ctx


@pytest.mark.parametrize("dependent", [0, 1])
def test_mask_role_count_and_lag(tmp_path, dependent):
    """With D = {m}: exactly ⌊p·d⌋ of m's channels are 0 in every row (the same channels), the rest × r; the
    other modality is bit-identical to an unmasked forward. The flags used by a step are the previous
    step's: a fresh epoch masks nothing in its first step."""
    tr = _trainer(tmp_path, f"d{dependent}")
    ctx, method, model = _ctx_at(tr), tr.method, tr.ctx.raw_model
    mods = ctx.modalities
    batch = first_batch(tr)
    z = {m: model.encoders[m](batch[m]).detach() for m in mods}
    out0 = method.training_step(ctx, batch).output  # step 0: p = 0, no flags
    assert all(torch.equal(out0.pooled[m], z[m]) for m in mods)
    method.flags = torch.tensor([k == dependent for k in range(2)])
    method.ell = 0.1  # next p = 0.5 at epoch 1
    drawn = {}
    real = method._masks_for
    method._masks_for = lambda c, p, size: drawn.setdefault("masks", real(c, p, size))
    out = method.training_step(ctx, batch).output
    m, other = mods[dependent], mods[1 - dependent]
    mask = drawn["masks"][m]
    assert int((mask == 0).sum()) == int(0.5 * model.feature_dims[m]) and bool((mask[mask != 0] == 2.0).all())
    assert bool((drawn["masks"][other] == 1).all())
    assert torch.allclose(out.pooled[m], z[m] * mask, atol=1e-6)  # the same channels in every row
    assert torch.equal(out.pooled[other], z[other])


def test_flags_come_from_this_steps_shares_and_reset_each_epoch(tmp_path):
    tr = _trainer(tmp_path)
    ctx, method = _ctx_at(tr), tr.method
    a, v = ctx.modalities
    C = ctx.data.out_dim
    dom = torch.zeros(1, C)
    dom[0, 0] = 5.0
    method.uni = lambda ctx, out, y: {a: dom.expand(len(y), C).clone(), v: torch.zeros(len(y), C)}
    method.training_step(ctx, first_batch(tr))
    assert method.flags.tolist() == [True, False]
    assert float(method.last_shares[0]) == pytest.approx((math.exp(5) + C - 1) / (math.exp(5) + 2 * C - 1), abs=1e-6)
    method.uni = lambda ctx, out, y: {a: torch.zeros(len(y), C), v: torch.zeros(len(y), C)}
    method.training_step(ctx, first_batch(tr))
    assert float(method.last_shares[0]) == pytest.approx(0.5, abs=1e-12) and method.flags.tolist() == [False, False]  # share = σ: strict >
    method.flags = torch.tensor([True, False])
    method.on_epoch_start(ctx)
    assert method.flags.tolist() == [False, False] and method.ell == 0.0


def test_loss_is_fused_plus_unimodal_and_full_mask_zeroes_the_encoder_gradient(tmp_path):
    tr = _trainer(tmp_path)
    ctx, method, model = _ctx_at(tr), tr.method, tr.ctx.raw_model
    a, v = ctx.modalities
    batch = first_batch(tr)
    y = batch["label"]
    method.flags = torch.tensor([True, False])
    method.ell = 0.3  # p = 1: every channel of a is 0
    out = method.training_step(ctx, batch)
    out.loss.backward()
    grads = [p.grad for p in model.encoders[a].parameters()]
    assert all(g is not None and float(g.abs().sum()) == 0 for g in grads)  # zero, not None
    assert any(float(p.grad.abs().sum()) > 0 for p in model.encoders[v].parameters())
    # oracle: CE(head([0, z_v])) + CE(W_a·0 + b/2) + CE(W_v·z_v + b/2), by hand
    with torch.no_grad():
        z_v = model.encoders[v](batch[v])
        w, b = model.final_layer().weight, model.final_layer().bias
        sl = model.split_head()
        za = torch.zeros(len(y), sl[a].stop - sl[a].start)
        fused = F.cross_entropy(torch.cat([za, z_v], 1) @ w.t() + b, y)
        ua = F.cross_entropy(za @ w[:, sl[a]].t() + b / 2, y)
        uv = F.cross_entropy(z_v @ w[:, sl[v]].t() + b / 2, y)
    assert float(out.loss) == pytest.approx(float(fused + ua + uv), abs=1e-6)


def test_logit_variant_masks_classes_and_predicts_through_the_star_layer(tmp_path):
    tr = _trainer(tmp_path, method="amco_bb")
    ctx, method, model = _ctx_at(tr), tr.method, tr.ctx.raw_model
    a, v = ctx.modalities
    batch = first_batch(tr)
    y = batch["label"]
    C = ctx.data.out_dim
    method.flags = torch.tensor([True, False])
    method.ell = 0.3  # p = 1: u_a ≡ 0, its unimodal loss is log C
    seen = {}
    real = method.uni
    method.uni = lambda c, o, yy: seen.setdefault("u", real(c, o, yy))
    out = method.training_step(ctx, batch)
    star = ctx.modules["amco_star"]
    with torch.no_grad():
        u = seen["u"]
        expected = F.cross_entropy(star(u[v]), y) + math.log(C) + F.cross_entropy(u[v], y)
    assert float(out.loss) == pytest.approx(float(expected), abs=1e-5)
    model.eval()
    with torch.no_grad():
        logits = model(ctx.inputs(batch)).logits
        assert torch.allclose(method.predict(ctx, batch), star(logits), atol=1e-6)


def test_evaluation_never_masks(tmp_path):
    tr, base = _trainer(tmp_path, "a"), _trainer(tmp_path, "b", method="baseline")
    batch = first_batch(tr)
    for t in (tr, base):
        t.ctx.model.eval()
    tr.method._masks = {m: torch.zeros(tr.ctx.raw_model.feature_dims[m]) for m in tr.ctx.modalities}  # left set
    assert torch.equal(tr.method.predict(tr.ctx, batch), base.method.predict(base.ctx, batch))


def test_refusals(tmp_path):
    with pytest.raises(MethodNotApplicable, match="regression output has neither"):
        _trainer(tmp_path, "reg", dataset="synthetic-regression", **{"dataset.n_samples": 40})
    with pytest.raises(MethodNotApplicable, match="needs a concat-linear head"):
        _trainer(tmp_path, "tf", method="amco_bb", dataset="mfeat", **{"model.name": "mlp_transformer_fusion"})
    with pytest.raises(MethodNotApplicable, match="MMTM"):
        _trainer(tmp_path, "mmtm", dataset="mfeat", **{"model.name": "mlp_mmtm"})


@pytest.mark.parametrize("method,dataset,sets", [
    ("amco", "synthetic-seg", {"dataset.n_samples": 40, "sigma": 0.3}),
    ("amco", "synthetic", {"dataset.n_modalities": 3, "dataset.feature": "sequence", "dataset.n_samples": 40, "sigma": 0.34}),
    ("amco", "mfeat", {**SMALL_MFEAT, "model.name": "mlp_transformer_fusion", "sigma": 0.34}),
    ("amco_bb", "avdigits-small", {"dataset.limit_per_class": 8}),
])
def test_runs_on_every_task_and_fusion(run_cli, method, dataset, sets):
    code, rd, res = run_cli(method, dataset, epochs=2, sets={"train.modality_eval": "none", "train.diagnostics": "none",
                                                            "train.batch_size": 8, **sets})
    assert code == 0 and res["status"] == "ok"
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["amco/p"] > 0 and all(math.isfinite(r["train_loss"]) for r in rows)


def test_resume_reproduces_masks_and_numbers(kill_and_resume):
    (full_dir, full), (code, rd, res) = kill_and_resume("amco", sets=FAST, epochs=3, stop_after=2, dataset="mfeat-pix-mor")
    assert code == 0 and res["test"] == full["test"] and res["val"] == full["val"]
    a = [json.loads(x) for x in (full_dir / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert a[2]["amco/dependent_pix"] == b[2]["amco/dependent_pix"] > 0  # masks were applied after the resume
