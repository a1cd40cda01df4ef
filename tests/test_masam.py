"""Behavioural tests of MASAM (docs/methods/masam.md) and of the engine's perturb/recompute/restore
capability (mmbalance/sam.py): hand-computed direction and size, loss decay and score, one full step
against a plain-PyTorch re-computation (dominant encoder, perturbation, exact restore, clean gradients
for the heads), the unrestored-perturbation guard, frozen normalisation statistics, fp16 unscaling,
resume, 2-process DDP with per-rank method state."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_MFEAT
from mmbalance.methods.masam import loss_decay, sharpness_perturbation
from test_ddp import assert_identical_ranks, launch_2proc

from mmbalance.sam import PerturbationActiveError, frozen_norm_stats
from mmbalance.testing import build_trainer, first_batch

SETS = {**SMALL_MFEAT, "train.modality_eval": "none", "train.diagnostics": "none"}
GU = torch.tensor([1.0, 1.0, -1.0, 0.0])  # tensor 0 = (1, 1), tensor 1 = (−1, 0)
GMM = torch.tensor([2.0, 0.0, 1.0, 0.0])  # (2, 0), (1, 0)
SEG = torch.tensor([0, 0, 1, 1])


def _eps(gu=GU, gmm=GMM, seg=SEG, owner=torch.tensor([0, 0]), n_mod=1, last=torch.tensor([1]), **kw):
    return sharpness_perturbation(gu, gmm, seg, owner, n_mod, 0.3, last_tensor=last, **kw)


def test_direction_and_size_closed_form():
    """§8.1: v = ((1, 0), (1, 0)), ‖v‖ = √2, cos = (0.707107, −1), s = −0.146447:
    per_tensor ε = ((0.15, 0), (0.212132, 0)); last_tensor ε = ((0.212132, 0), (0.212132, 0));
    direction=fused: v = g^mm, ‖v‖ = √5, γ still per tensor: ((0.3·0.707107·2/√5, 0), (0.3/√5, 0))."""
    eps, s, cos = _eps()
    assert torch.allclose(cos, torch.tensor([0.707107, -1.0]), atol=1e-6)
    assert s.item() == pytest.approx(-0.146447, abs=1e-6)
    assert torch.allclose(eps, torch.tensor([0.15, 0.0, 0.212132, 0.0]), atol=1e-6)
    eps_last, _, _ = _eps(gamma_source="last_tensor")
    assert torch.allclose(eps_last, torch.tensor([0.212132, 0.0, 0.212132, 0.0]), atol=1e-6)
    eps_fused, _, _ = _eps(direction="fused")
    assert torch.allclose(eps_fused, torch.tensor([0.189737, 0.0, 0.134164, 0.0]), atol=1e-6)


def test_each_encoder_has_its_own_norm_and_the_nan_guard():
    """§8.11/§8.12: two encoders in one call are normalised separately (encoder 1 = encoder 0 ×10 gives
    the same ε); a tensor with g^mm = 0 gets ε = 0 (the code's 0/0 would be NaN)."""
    gu, gmm = torch.cat([GU, 10 * GU]), torch.cat([GMM, 10 * GMM])
    eps, s, _ = _eps(gu, gmm, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.tensor([0, 0, 1, 1]), 2,
                     torch.tensor([1, 3]))
    assert torch.allclose(eps[:4], eps[4:], atol=1e-6) and torch.allclose(s, torch.full((2,), -0.146447), atol=1e-6)
    eps0, _, _ = _eps(GU, torch.tensor([2.0, 0.0, 0.0, 0.0]))
    assert torch.isfinite(eps0).all() and torch.equal(eps0[2:], torch.zeros(2))


def test_loss_decay_and_score():
    """§8.2: β = 0.91, L = 2.0 then 1.8 → MA = 1.982, d = 0.018; with s = 0.5, w = 0.8: A = 0.1144. The
    first step has MA = L, d = 0; a rising loss gives d = 0."""
    ma, d = loss_decay(torch.zeros(1), torch.zeros(1), torch.tensor(False), torch.tensor([2.0]), 0.91)
    assert ma.item() == 2.0 and d.item() == 0.0
    ma, d = loss_decay(ma, torch.tensor([2.0]), torch.tensor(True), torch.tensor([1.8]), 0.91)
    assert ma.item() == pytest.approx(1.982) and d.item() == pytest.approx(0.018, abs=1e-6)
    assert (0.8 * d + 0.2 * 0.5).item() == pytest.approx(0.1144, abs=1e-6)
    _, d_up = loss_decay(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor(True), torch.tensor([3.0]), 0.91)
    assert d_up.item() == 0.0


def _reference_step(model, heads, batch, mods, rho, w, lr):
    """MASAM's first step in plain PyTorch on copies (independent of mmbalance/sam.py): clean gradients,
    d = 0 so A = (1 − w)·s, m* = argmax, per-tensor ε on m*, gradient at θ + ε for the encoders and the
    clean gradient for everything else; returns (m*, expected parameters after an SGD step)."""
    y = batch["label"]

    def losses():
        out = model({m: batch[m] for m in mods})
        uni = [F.cross_entropy(heads.heads[m](out.pooled[m]), y) for m in mods]
        return F.cross_entropy(out.logits, y), sum(uni)

    enc = {m: list(model.encoders[m].parameters()) for m in mods}
    other = [p for p in model.parameters() if all(p is not q for m in mods for q in enc[m])] + list(heads.parameters())
    l_mm, l_uni = losses()
    g_mm = {m: torch.autograd.grad(l_mm, enc[m], retain_graph=True) for m in mods}
    g_all = torch.autograd.grad(l_mm + l_uni, [p for m in mods for p in enc[m]] + other)
    g_enc, g_other = g_all[:-len(other)], g_all[-len(other):]
    k = 0
    score, eps = [], {}
    for m in mods:
        cos, vs = [], []
        for a, b in zip(g_enc[k:k + len(enc[m])], g_mm[m]):
            gu = a - b
            c = (gu * b).sum() / (gu.norm() * b.norm())
            cos.append(c)
            vs.append(((gu * b).sum() / (b * b).sum()) * b if (gu * b).sum() >= 0 else b)
        k += len(enc[m])
        score.append((1 - w) * torch.stack(cos).mean())
        vn = torch.sqrt(sum((v * v).sum() for v in vs))
        eps[m] = [rho * (c if c > 0 else 1.0) * v / (vn + 1e-12) for c, v in zip(cos, vs)]
    star = mods[int(torch.stack(score).argmax())]
    with torch.no_grad():
        for p, e in zip(enc[star], eps[star]):
            p.add_(e)
    l2_mm, l2_uni = losses()
    g2 = torch.autograd.grad(l2_mm + l2_uni, [p for m in mods for p in enc[m]])
    with torch.no_grad():
        for p, e in zip(enc[star], eps[star]):
            p.sub_(e)
    new_enc = [p.detach() - lr * g for p, g in zip([p for m in mods for p in enc[m]], g2)]
    new_other = [p.detach() - lr * g for p, g in zip(other, g_other)]
    return star, new_enc + new_other


def test_one_step_matches_plain_pytorch_and_steps_at_restored_weights(tmp_path):
    """§8.3/§8.5/§8.6/§8.7 on mfeat (M = 3), SGD without momentum or decay, one step: the optimizer steps
    at θ bitwise (spy), only encoder m* was perturbed during forward 2, encoders move by the perturbed
    gradient and every non-encoder parameter by its clean gradient, as the plain re-computation says."""
    sets = {**SETS, "train.max_steps_per_epoch": 1, "train.momentum": 0.0, "train.weight_decay": 0.0}
    tr = build_trainer("masam", "mfeat", run_dir=tmp_path / "r", epochs=1, sets=sets)
    ctx, meth = tr.ctx, tr.method
    model, heads = ctx.raw_model, ctx.accelerator.unwrap_model(ctx.modules["masam_heads"])
    batch = first_batch(tr)
    mods = ctx.modalities
    star, want = _reference_step(copy.deepcopy(model), copy.deepcopy(heads), batch, mods, 0.3, 0.8, tr.cfg.lr)
    theta0 = [p.detach().clone() for p in model.parameters()]
    seen = {}
    orig_forward = ctx.model.forward

    def spy_forward(*a, **k):  # the second forward of the step: which encoders differ from θ?
        if seen.get("n") == 1:
            seen["moved"] = [m for m in mods if any(not torch.equal(p, q) for p, q in
                                                    zip(model.encoders[m].parameters(), theta_enc[m]))]
        seen["n"] = seen.get("n", 0) + 1
        return orig_forward(*a, **k)

    theta_enc = {m: [p.detach().clone() for p in model.encoders[m].parameters()] for m in mods}
    ctx.model.forward = spy_forward
    opt = tr._fast_optimizer(ctx.optimizer)
    orig_step = opt.step

    def spy_step(*a, **k):
        seen["at_theta"] = all(torch.equal(p, q) for p, q in zip(model.parameters(), theta0))
        return orig_step(*a, **k)

    opt.step = spy_step
    tr.fit()
    assert seen["moved"] == [star] and seen["at_theta"]
    enc = [p for m in mods for p in model.encoders[m].parameters()]
    other = [p for p in model.parameters() if all(p is not q for q in enc)] + list(heads.parameters())
    for p, w in zip(enc + other, want):
        assert torch.allclose(p, w, atol=1e-6)
    assert int(meth.score.argmax()) == mods.index(star)


def test_rho_zero_is_the_multitask_step(tmp_path):
    """§8.4: ρ = 0 gives the same parameters as ``multitask`` (L_mm + Σ L_m, separate linear heads)."""
    sets = {**SETS, "train.max_steps_per_epoch": 2, "train.momentum": 0.0, "train.weight_decay": 0.0}
    a = build_trainer("masam", "mfeat", run_dir=tmp_path / "a", epochs=1, sets={**sets, "rho": 0.0})
    b = build_trainer("multitask", "mfeat", run_dir=tmp_path / "b", epochs=1, sets={**sets, "uni_head": "linear"})
    a.fit()
    b.fit()
    for p, q in zip(a.ctx.raw_model.parameters(), b.ctx.raw_model.parameters()):
        assert torch.allclose(p, q, atol=1e-7)


def test_score_after_two_steps_mixes_decay_and_agreement(tmp_path):
    """§8.2 through the engine: after two steps the stored A = w·d + (1 − w)·s with
    d = max(0, L_1 − MA_2), L_1 recovered from MA_2 = β·L_1 + (1 − β)·L_2 (first step: MA = L)."""
    tr = build_trainer("masam", "mfeat", run_dir=tmp_path / "r", epochs=1,
                       sets={**SETS, "train.max_steps_per_epoch": 2, "score_weight": 0.6, "ema": 0.7})
    tr.fit()
    meth = tr.method
    ma2, l2 = meth.ma, meth.last
    l1 = (ma2 - 0.3 * l2) / 0.7
    d = (l1 - ma2).clamp_min(0)
    assert torch.allclose(meth.d, d, atol=1e-9) and (d > 0).any()
    assert torch.allclose(meth.score, 0.6 * d + 0.4 * meth.s, atol=1e-12)


def test_norm_statistics_are_those_of_the_clean_forward(tmp_path):
    """§8.4: on a model with BatchNorm (synthetic-seg), after one MASAM step the running statistics equal
    those after one clean forward of the batch (forward 2 at θ + ε left them unchanged)."""
    tr = build_trainer("masam", "synthetic-seg", run_dir=tmp_path / "r", epochs=1,
                       sets={"dataset.n_samples": 30, "dataset.image_size": 8, "train.max_steps_per_epoch": 1,
                             "train.modality_eval": "none", "train.diagnostics": "none", "rho": 1.0})
    ref = copy.deepcopy(tr.ctx.raw_model).train()
    batch = first_batch(tr)
    with torch.no_grad():
        ref({m: batch[m] for m in tr.ctx.modalities})
    tr.fit()
    got = {k: v for k, v in tr.ctx.raw_model.state_dict().items() if "running" in k or "num_batches" in k}
    want = ref.state_dict()
    assert got and all(torch.equal(v, want[k]) for k, v in got.items())


def test_unrestored_perturbation_stops_the_step(tmp_path, monkeypatch):
    """§8.8: a method that perturbs and never restores makes the engine raise before clipping/stepping."""
    from mmbalance.methods.masam import MASAM

    monkeypatch.setattr(MASAM, "after_backward", lambda self, ctx: None)
    tr = build_trainer("masam", "mfeat", run_dir=tmp_path / "r", epochs=1, sets={**SETS, "train.max_steps_per_epoch": 1})
    theta0 = [p.detach().clone() for p in tr.ctx.raw_model.parameters()]
    with pytest.raises(PerturbationActiveError, match="restore"):
        tr.fit()
    # θ is left perturbed for inspection, but no optimizer step was taken on it
    assert any(not torch.equal(p, q) for p, q in zip(tr.ctx.raw_model.parameters(), theta0))


def test_frozen_norm_stats_restores_every_buffer():
    bn = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    bn(torch.randn(8, 3))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with frozen_norm_stats(bn):
        bn(torch.randn(8, 3) * 5)
        assert not torch.equal(bn[1].running_mean, before["1.running_mean"])
    after = bn.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_fp16_clean_gradients_are_unscaled_once(tmp_path):
    """Emulated fp16 (loss scale 1024): the clean gradients (autograd.grad of scale·loss) are divided by
    the scale once, so the run lands where the float32 run lands."""
    from test_precision import SCALE, emulate_fp16

    sets = {**SETS, "train.max_steps_per_epoch": 2, "train.momentum": 0.0, "train.weight_decay": 0.0}
    ref = build_trainer("masam", "mfeat", run_dir=tmp_path / "ref", epochs=1, sets=sets)
    before = [p.detach().clone() for p in ref.ctx.raw_model.parameters()]
    ref.fit()
    tr = build_trainer("masam", "mfeat", run_dir=tmp_path / "fp16", epochs=1, sets=sets)
    emulate_fp16(tr, torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1))
    tr.fit()
    for b, w, g in zip(before, ref.ctx.raw_model.parameters(), tr.ctx.raw_model.parameters()):
        torch.testing.assert_close(g - b, w - b, rtol=1e-4, atol=1e-7)
    assert torch.equal(tr.method.score, ref.method.score) or torch.allclose(tr.method.score, ref.method.score, atol=1e-6)


def test_resume_gives_the_same_final_numbers(kill_and_resume):
    """§8.10: the EMA state (MA, last, started) is checkpointed."""
    (full_dir, full), (code, _, resumed) = kill_and_resume("masam", sets=SETS, epochs=2, stop_after=1)
    assert code == 0 and resumed["test"] == full["test"] and resumed["val"] == full["val"]
    assert resumed["method_metrics"] == full["method_metrics"] and full["method_metrics"]["ma_fac"] > 0


@pytest.mark.ddp
def test_two_process_statistics_are_global(tmp_path):
    """§8.9: the ranks see different halves of TRAIN; the clean gradients and losses are all-reduced, so
    the score A, the EMA and m* are identical on both ranks (a rank-local statistic would differ), and the
    replicas stay identical (a rank-local clean gradient for the heads would make them drift)."""
    proc = launch_2proc(["--method", "masam", "--dataset", "mfeat", "--epochs", "1", "--set",
                         "dataset.limit_per_class=20", "--set", "train.modality_eval=none", "--run-dir",
                         str(tmp_path / "run"), "--quiet"], tmp_path / "dump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_identical_ranks(tmp_path / "dump")
    r0 = torch.load(tmp_path / "dump" / "rank0.pt", weights_only=False)["method_state"]
    r1 = torch.load(tmp_path / "dump" / "rank1.pt", weights_only=False)["method_state"]
    assert bool(r0["started"]) and set(r0) == {"ma", "last", "started", "score", "d", "s"}
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
