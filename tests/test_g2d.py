"""Behavioural tests of G2D (docs/methods/g2d.md). Oracles: hand-computed KL values and gradients, teacher
confidences by hand, the SGD-with-momentum update written out, and the fused-head gradient by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_MFEAT
from mmbalance.methods.g2d import distill_logits, smp_suppressed
from mmbalance.methods.ogm_ge import score_sums

from mmbalance.teachers import teacher_key
from mmbalance.testing import build_trainer, first_batch

FAST = {"train.modality_eval": "none"}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    """One output dir (one teacher cache) shared by the tests of this module."""
    return tmp_path_factory.mktemp("g2d_teachers")


def toy(tmp_path, out_dir, name="run", method="g2d", **extra):
    sets = {"dataset.n_modalities": 2, "dataset.num_classes": 3, "dataset.n_samples": 80, "train.batch_size": 8,
            "model.enc_hidden": 8, "model.enc_out": 8, "train.weight_decay": 0.0, **FAST, **extra}
    return build_trainer(method, "synthetic", run_dir=tmp_path / name, epochs=2, sets=sets, output_dir=out_dir)


# ---------------------------------------------------------------- the losses and the choice, by hand
def test_logit_term_by_hand():
    # teacher (ln 3, 0) → p = (0.75, 0.25); student (0, 0) → q = (0.5, 0.5): KL = 0.75 ln 1.5 + 0.25 ln 0.5
    t = torch.tensor([[math.log(3.0), 0.0]])
    s = torch.zeros(1, 2, requires_grad=True)
    kl = distill_logits("classification", s, t, 1.0)
    assert float(kl) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)  # 0.130812
    (g,) = torch.autograd.grad(kl, s)
    assert torch.allclose(g, torch.tensor([[-0.25, 0.25]]), atol=1e-6)  # q − p
    p2 = torch.tensor([3 ** 0.5, 1.0]) / (3 ** 0.5 + 1)  # τ = 2: softmax((ln 3)/2, 0)
    hand = 4 * float((p2 * (p2 / 0.5).log()).sum())  # τ²·KL
    assert float(distill_logits("classification", s, t, 2.0)) == pytest.approx(hand, abs=1e-6)  # 0.145363
    assert hand == pytest.approx(0.145363, abs=1e-6)
    # a non-zero student: τ divides the student's logits too, softmax((1, 0)/2) = (e^½, 1)/(e^½ + 1)
    q2 = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    hand = 4 * sum(float(p2[c]) * math.log(float(p2[c]) / q2[c]) for c in range(2))
    assert float(distill_logits("classification", torch.tensor([[1.0, 0.0]]), t, 2.0)) == pytest.approx(hand, abs=1e-6)


def test_smp_choice_by_hand_and_tie():
    y = torch.tensor([0, 1])
    l1 = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    l2 = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    rho = score_sums("classification", {"a": l1, "b": l2}, y)
    e2, e3 = math.exp(2), math.exp(3)
    assert torch.allclose(rho, torch.tensor([e2 / (e2 + 1) + 0.5, 0.5 + e3 / (e3 + 1)]), atol=1e-6)  # 1.380797, 1.452574
    assert smp_suppressed(rho).tolist() == [0.0, 1.0]  # the more confident teacher's modality is suppressed
    assert smp_suppressed(rho.flip(0)).tolist() == [1.0, 0.0]  # swapped teachers: the other one
    assert smp_suppressed(torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]  # tie: nothing (the code raises)
    r3 = torch.tensor([1.0, 3.0, 2.0])
    assert smp_suppressed(r3, "keep_weakest").tolist() == [0.0, 1.0, 1.0]
    assert smp_suppressed(r3, "suppress_strongest").tolist() == [0.0, 1.0, 0.0]


# ---------------------------------------------------------------- inside a step
def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_suppression_scope_window_and_teachers_frozen(tmp_path, out_dir):
    tr = toy(tmp_path, out_dir)
    ctx, meth, model = tr.ctx, tr.method, tr.ctx.raw_model
    batch = first_batch(tr)
    teachers = {m: ctx.modules[f"g2d_teacher_{m}"] for m in ctx.modalities}
    before = {m: {k: v.clone() for k, v in t.state_dict().items()} for m, t in teachers.items()}
    ctx.epoch, ctx.epochs_in_phase = 150, 300
    assert meth.smp_window(ctx)
    ctx.epoch = 151
    assert not meth.smp_window(ctx)
    ctx.epoch = 150
    meth.training_step(ctx, batch).loss.backward()
    plain = grads(model)
    m1, m2 = ctx.modalities
    meth._rho = torch.tensor([1.380797, 1.452574, 2.0])  # test 3's confidences: modality 2 is suppressed
    meth.after_backward(ctx)
    got = grads(model)
    for n, g in got.items():
        if n.startswith(f"encoders.{m2}.") and g.dim() >= 2:
            assert torch.count_nonzero(g) == 0, n
        else:  # modality 1, modality 2's biases, the fusion and the head: bitwise unchanged
            assert torch.equal(g, plain[n]), n
    assert meth.metrics()[f"suppressed_{m2}"] == 1.0 and meth.metrics()[f"suppressed_{m1}"] == 0.0
    for m, t in teachers.items():  # frozen: eval mode, no gradient, state bitwise unchanged, deterministic
        assert not t.training and not any(p.requires_grad for p in t.parameters())
        assert all(torch.equal(v, before[m][k]) for k, v in t.state_dict().items())
        assert torch.equal(t({m: batch[m]}).logits, t({m: batch[m]}).logits)


def test_loss_and_fused_target_by_hand(tmp_path, out_dir):
    """L = CE + β·Σ_m KL(p_m^T ‖ softmax(o)) + α·Σ_m MSE(z̄_m, f_m^T), with the logit term on the fused
    output: its head gradient is Σ_m (q − p_m)ᵀ·[z̄_1, z̄_2]/B."""
    tr = toy(tmp_path, out_dir, w_logit=2.0, w_feat=0.5)
    ctx, meth, model = tr.ctx, tr.method, tr.ctx.raw_model
    batch = first_batch(tr)
    y = batch["label"]
    out = meth.training_step(ctx, batch)
    res = model(ctx.inputs(batch))
    with torch.no_grad():
        t = {m: ctx.modules[f"g2d_teacher_{m}"]({m: batch[m]}) for m in ctx.modalities}
    q = res.logits.softmax(1)
    kl = sum((t[m].logits.softmax(1) * (t[m].logits.log_softmax(1) - q.log())).sum(1).mean() for m in t)
    mse = sum(((res.pooled[m] - t[m].pooled[m]) ** 2).mean() for m in t)
    assert torch.allclose(out.loss, F.cross_entropy(res.logits, y) + 2.0 * kl + 0.5 * mse, atol=1e-6)
    # the logit term alone on the head
    tr0 = toy(tmp_path, out_dir, name="kl", w_logit=1.0, w_feat=0.0)
    tr0.ctx.raw_model.load_state_dict(model.state_dict())
    model0 = tr0.ctx.raw_model
    model0.zero_grad(set_to_none=True)
    tr0.method.training_step(tr0.ctx, batch).loss.backward()
    g_all = model0.head.weight.grad.clone()
    model0.zero_grad(set_to_none=True)
    F.cross_entropy(model0(ctx.inputs(batch)).logits, y).backward()
    x = torch.cat([res.pooled[m] for m in ctx.modalities], 1).detach()
    hand = sum((q - t[m].logits.softmax(1)).t() @ x for m in t).detach() / len(y)
    assert torch.allclose(g_all - model0.head.weight.grad, hand, atol=1e-6)


def test_feature_term_is_zero_for_a_copied_encoder(tmp_path, out_dir):
    tr = toy(tmp_path, out_dir)
    ctx, meth, model = tr.ctx, tr.method, tr.ctx.raw_model
    m = ctx.modalities[0]
    model.encoders[m].load_state_dict(ctx.modules[f"g2d_teacher_{m}"].encoders[m].state_dict())
    batch = first_batch(tr)
    out = ctx.forward(batch)
    t_out = meth.teacher_outputs(ctx, batch)
    loss = meth.feature_loss(ctx, m, out, t_out[m])
    assert float(loss) == 0.0
    g = torch.autograd.grad(loss, list(model.encoders[m].parameters()))
    assert all(torch.count_nonzero(x) == 0 for x in g)


@pytest.mark.parametrize("mode", ["zero", "freeze"])
def test_zero_keeps_momentum_freeze_does_not(tmp_path, out_dir, mode):
    """SGD, momentum 0.9, no weight decay: step 1 unsuppressed leaves a momentum buffer b; step 2 suppresses
    modality 2. ``zero``: its weights still move by −lr·0.9·b; ``freeze``: bitwise unchanged."""
    tr = toy(tmp_path, out_dir, name=mode, smp_zero=mode, smp_end_frac=1.0)
    ctx, meth, model = tr.ctx, tr.method, tr.ctx.raw_model
    opt = ctx.optimizer
    batch = first_batch(tr)
    m2 = ctx.modalities[1]
    w = model.encoders[m2][0].weight
    ctx.epoch, ctx.epochs_in_phase = 0, 2
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        meth.training_step(ctx, batch).loss.backward()
        meth._rho = torch.tensor([1.0, 1.0 if step == 0 else 2.0, 2.0])  # tie, then modality 2 suppressed
        meth.after_backward(ctx)
        if step == 1:
            buf = opt.state[w]["momentum_buffer"].clone()
            before = w.detach().clone()
        opt.step()
    lr = opt.param_groups[0]["lr"]
    if mode == "zero":
        assert torch.allclose(w.detach(), before - lr * 0.9 * buf, atol=1e-7)
        assert not torch.equal(w.detach(), before)
    else:
        assert torch.equal(w.detach(), before)


def test_no_smp_preset_edits_nothing(tmp_path, out_dir):
    tr = toy(tmp_path, out_dir, method="g2d_no_smp")
    ctx, meth, model = tr.ctx, tr.method, tr.ctx.raw_model
    assert not meth.smp_window(ctx)
    meth.training_step(ctx, first_batch(tr)).loss.backward()
    plain = grads(model)
    meth.after_backward(ctx)
    assert all(torch.equal(g, plain[n]) for n, g in grads(model).items())


def test_teacher_cache_key_includes_the_seed(tmp_path, out_dir):
    tr = toy(tmp_path, out_dir)
    cfg = tr.ctx.config
    other = type(cfg)(**{**cfg.__dict__, "seed": cfg.seed + 1})
    assert teacher_key(tr.ctx.data, cfg, "m0") != teacher_key(tr.ctx.data, other, "m0")
    info = tr.method.teachers[0]
    assert info.key == teacher_key(tr.ctx.data, cfg, "m0") and "accuracy" in info.val  # selected on validation


def test_resume_gives_the_same_final_numbers(kill_and_resume, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the teacher cache (runs/_teachers) goes to the test's folder
    sets = {**SMALL_MFEAT, **FAST, "smp_end_frac": 0.9}
    (_, full), (code, _, resumed) = kill_and_resume("g2d", sets=sets, epochs=3, stop_after=1)
    assert code == 0 and resumed["test"] == full["test"] and resumed["val"] == full["val"]
    keep = ("rho_", "suppressed_")
    assert {k: v for k, v in resumed["method_metrics"].items() if k.startswith(keep)} == \
        {k: v for k, v in full["method_metrics"].items() if k.startswith(keep)}
