"""Behavioural tests of MBSD (docs/methods/mbsd.md): the closed form, the gate, tie handling, a per-sample
loop re-implementation of the trainer, the gradient through w, the shared slices, the window, the M = 3
pairwise mean, log-safety, refusal, resume, 2-process DDP."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_MFEAT
from mmbalance.methods.mbsd import mbsd_pair, strong_weak
from test_ddp import assert_identical_ranks, launch_2proc

from mmbalance.testing import build_trainer, first_batch

SETS = {**SMALL_MFEAT, "train.modality_eval": "none"}
Y = torch.tensor([0, 0])
UA = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
UV = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])


def test_closed_form():
    """§7.1 (values by hand): q_a = (0.786986, 0.211942), q_v = (0.211942, 0.106507), c = (1, 0),
    w = (0.575044, 0), RS = (5/3, 1/3), KL_code = q_w(log q_w − q_s) = (−0.495611, ·):
    L = ½·0.575044·(1.666667 − 0.495611) = 0.336705; Bernoulli KL 0.695932; RS on probabilities −0.088605."""
    loss, st = mbsd_pair(UA, UV, Y, kl="code")
    assert loss.item() == pytest.approx(0.336705, abs=1e-6)
    assert st["gated"].item() == 0.5 and st["w"].item() == pytest.approx(0.575044 / 2, abs=1e-6)
    assert st["rs"].item() == pytest.approx(1.0, abs=1e-6)  # (5/3 + 1/3)/2
    assert mbsd_pair(UA, UV, Y, kl="bernoulli")[0].item() == pytest.approx(0.695932, abs=1e-6)
    assert mbsd_pair(UA, UV, Y, kl="code", rs_probs=True)[0].item() == pytest.approx(-0.088605, abs=1e-6)
    assert mbsd_pair(UA, UV, Y, kl="off")[0].item() == pytest.approx(0.575044 * 5 / 3 / 2, abs=1e-6)


def test_gate_counts_only_samples_one_head_gets_right():
    """§7.2: sample 2 (both heads predict class 2, label 0) contributes 0 whatever its RS; label 2 makes it
    count: q_a = e/(2+e) = 0.576117, q_v = e²/(2+e²) = 0.786986, w = 0.210869."""
    alone, _ = mbsd_pair(UA[:1], UV[:1], Y[:1])
    both, _ = mbsd_pair(UA, UV, Y)
    assert both.item() == pytest.approx(alone.item() / 2, abs=1e-7)
    flipped, st = mbsd_pair(UA, UV, torch.tensor([0, 2]))
    assert st["gated"].item() == 1.0 and flipped.item() != pytest.approx(both.item())
    qa, qv = 0.576117, 0.786986
    rs2 = ((0 - 0) ** 2 + (0 - 0) ** 2 + (1 - 2) ** 2) / 3
    kl2 = qa * (torch.log(torch.tensor(qa)).item() - qv)
    assert flipped.item() == pytest.approx(both.item() + (qv - qa) * (rs2 + kl2) / 2, abs=1e-5)


def test_ties_belong_to_the_first_modality():
    """§7.3: Python's max/min return their first argument on a tie: q_s and q_w both come from modality
    j (its gradient, none for l); ``torch.maximum`` would split it in halves."""
    qj = torch.tensor([0.3, 0.2, 0.5], requires_grad=True)
    ql = torch.tensor([0.3, 0.6, 0.1], requires_grad=True)
    qs, qw = strong_weak(qj, ql)
    assert torch.equal(qs.detach(), torch.tensor([0.3, 0.6, 0.5])) and torch.equal(qw.detach(), torch.tensor([0.3, 0.2, 0.1]))
    qw[0].backward()
    assert qj.grad[0] == 1 and ql.grad[0] == 0
    u = torch.tensor([[1.0, 0.5, 0.0]])
    loss, st = mbsd_pair(u, u.clone(), torch.tensor([0]))
    assert loss.item() == 0 and st["w"].item() == 0 and st["l_strong"].item() == 0


def _trainer_loop(ua, uv, y):
    """A test-only re-implementation of the trainer's per-sample loop (``MBSD_trainer.py:130-159``)."""
    pa, pv = F.softmax(ua, 1), F.softmax(uv, 1)
    rs = ((ua - uv) ** 2).mean(1)
    total = 0
    for i in range(len(y)):
        qa, qv = pa[i, y[i]], pv[i, y[i]]
        if ua[i].argmax() == y[i] or uv[i].argmax() == y[i]:
            ps, pw = max(qa, qv), min(qa, qv)
            total = total + (ps - pw) * (rs[i] + F.kl_div(ps, pw, reduction="none"))
    return total / len(y)


def test_vectorised_form_equals_the_trainer_loop():
    """§7.4: B = 16, C = 5, random logits and labels: loss and gradients agree to 1e-6."""
    g = torch.Generator().manual_seed(0)
    ua, uv = torch.randn(16, 5, generator=g), torch.randn(16, 5, generator=g)
    y = torch.randint(0, 5, (16,), generator=g)
    a1, v1 = ua.clone().requires_grad_(True), uv.clone().requires_grad_(True)
    a2, v2 = ua.clone().requires_grad_(True), uv.clone().requires_grad_(True)
    ref = _trainer_loop(a1, v1, y)
    got, _ = mbsd_pair(a2, v2, y)
    ref.backward()
    got.backward()
    assert abs(ref.item() - got.item()) < 1e-6
    assert torch.allclose(a1.grad, a2.grad, atol=1e-6) and torch.allclose(v1.grad, v2.grad, atol=1e-6)


def test_gradient_flows_through_w_unless_detached():
    """§7.5: float64 autograd = central finite differences (w not detached); with ``detach_weight`` the
    gradient is that of the same formula with w held at its value."""
    g = torch.Generator().manual_seed(3)
    ua = torch.randn(6, 4, generator=g, dtype=torch.float64)
    uv = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    for kl in ("code", "bernoulli"):
        assert torch.autograd.gradcheck(lambda a, v, kl=kl: mbsd_pair(a, v, y, kl=kl)[0],
                                        (ua.clone().requires_grad_(True), uv.clone().requires_grad_(True)))
    a = ua.clone().requires_grad_(True)
    mbsd_pair(a, uv, y, detach_weight=True)[0].backward()
    pa, pv = F.softmax(ua, 1), F.softmax(uv, 1)
    qa, qv = pa.gather(1, y[:, None]).squeeze(1), pv.gather(1, y[:, None]).squeeze(1)
    c = ((ua.argmax(1) == y) | (uv.argmax(1) == y)).double()
    w_const = c * (qa - qv).abs()
    a2 = ua.clone().requires_grad_(True)
    qa2 = F.softmax(a2, 1).gather(1, y[:, None]).squeeze(1)
    qs, qw = torch.where(qv > qa2, qv, qa2), torch.where(qv < qa2, qv, qa2)
    rs = ((a2 - uv) ** 2).mean(1)
    (w_const * (rs + qw * (qw.log() - qs))).mean().backward()
    assert torch.allclose(a.grad, a2.grad, atol=1e-10)


def test_shared_slices_sum_to_the_fused_logits_and_window(tmp_path):
    """§7.6/§7.7 on mfeat: Σ_m u_m = o (bias b/M); with start_epoch = 2 epochs 0–1 give CE(o, y) bitwise,
    epoch 2 adds Σ_m CE(u_m, y) and L_MBSD."""
    tr = build_trainer("mbsd", "mfeat", run_dir=tmp_path / "r", epochs=3, sets={**SETS, "start_epoch": 2})
    ctx, meth = tr.ctx, tr.method
    batch = first_batch(tr)
    y = batch["label"]
    out = ctx.forward(batch)
    u = meth.uni(ctx, out, y)
    assert meth.uni.kind == "shared_slice" and torch.allclose(sum(u.values()), out.logits, atol=1e-5)
    ce = F.cross_entropy(out.logits, y)
    for epoch in (0, 1):
        ctx.epoch = epoch
        assert torch.equal(meth.training_step(ctx, batch).loss, ce)
    ctx.epoch = 2
    mods = ctx.modalities
    pairs = [mbsd_pair(u[a], u[b], y, rs_probs=True)[0] for a, b in ((mods[0], mods[1]), (mods[0], mods[2]),
                                                                     (mods[1], mods[2]))]
    want = ce + sum(F.cross_entropy(u[m], y) for m in mods) + sum(pairs) / 3
    assert torch.allclose(meth.training_step(ctx, batch).loss, want, atol=1e-5)


def test_three_modalities_pairwise_mean(tmp_path, monkeypatch):
    """§7.8: with u_3 = u_2 the pair (2, 3) has w = 0, so L_MBSD = (L^{12} + L^{13})/3 (M = 3 → RS on
    probabilities)."""
    tr = build_trainer("mbsd", "mfeat", run_dir=tmp_path / "r", epochs=1, sets=SETS)
    ctx, meth = tr.ctx, tr.method
    batch = first_batch(tr)
    y = batch["label"]
    g = torch.Generator().manual_seed(5)
    u1, u2 = torch.randn(len(y), 10, generator=g), torch.randn(len(y), 10, generator=g)
    u1[:, 0] += 3  # make some samples correct
    a, b, c = ctx.modalities
    monkeypatch.setattr(meth, "uni", lambda ctx, out, y: {a: u1, b: u2, c: u2.clone()})
    step = meth.training_step(ctx, batch)
    l12 = mbsd_pair(u1, u2, y, rs_probs=True)[0]
    assert mbsd_pair(u2, u2.clone(), y, rs_probs=True)[0].item() == 0
    assert torch.allclose(step.logs["mbsd/loss_mbsd"], 2 * l12 / 3, atol=1e-6)


def test_step_loss_on_a_batch_is_the_mean_of_its_halves_losses(tmp_path):
    """§7.11 in one process: every term is a local-batch mean, so with two equal halves (the two ranks of a
    2-process run) the whole batch's loss and gradient are the mean of the halves' — which is what DDP's
    gradient average trains on. A term summed over the batch or normalised by a batch statistic breaks it."""
    tr = build_trainer("mbsd", "mfeat", run_dir=tmp_path / "r", epochs=1, sets=SETS)
    ctx, meth = tr.ctx, tr.method
    ctx.model.eval()  # no dropout draw: the same sample gives the same logits in either batch
    batch = first_batch(tr)
    n = len(batch["label"]) // 2
    halves = [{k: v[i * n:(i + 1) * n] if torch.is_tensor(v) else v for k, v in batch.items()} for i in (0, 1)]
    whole = {k: v[:2 * n] if torch.is_tensor(v) else v for k, v in batch.items()}
    params = [p for p in ctx.model.parameters() if p.requires_grad]

    def loss_and_grad(b):
        loss = meth.training_step(ctx, b).loss
        return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)

    lw, gw = loss_and_grad(whole)
    (l0, g0), (l1, g1) = loss_and_grad(halves[0]), loss_and_grad(halves[1])
    assert lw.item() == pytest.approx(((l0 + l1) / 2).item(), abs=1e-6)
    assert meth.training_step(ctx, halves[0]).logs["mbsd/loss_mbsd"].item() != 0  # the MBSD term is present
    for a, b, c in zip(gw, g0, g1, strict=True):
        if a is not None:
            assert torch.allclose(a, (b + c) / 2, atol=1e-6)


def test_log_safety_under_bf16():
    """§7.9: a class logit of −200 under bf16 autocast: finite loss with both KL forms."""
    ua = torch.tensor([[-200.0, 1.0, 0.0], [0.0, 2.0, 0.0]]).bfloat16()
    uv = torch.tensor([[-200.0, 0.0, 3.0], [1.0, 0.0, 0.0]]).bfloat16()
    y = torch.tensor([0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for kl in ("code", "bernoulli"):
            assert torch.isfinite(mbsd_pair(ua, uv, y, kl=kl)[0])


def test_regression_is_refused(run_cli, capsys):
    code, rd, _ = run_cli("mbsd", "synthetic-regression", sets={"dataset.n_samples": 60})
    err = capsys.readouterr().err
    assert code == 2 and "regression" in err and "true-class" in err and not rd.exists()


def test_resume_gives_the_same_final_numbers(kill_and_resume):
    (_, full), (code, _, resumed) = kill_and_resume("mbsd", sets=SETS, epochs=2, stop_after=1)
    assert code == 0 and resumed["test"] == full["test"] and resumed["val"] == full["val"]


@pytest.mark.ddp
def test_two_process_identical_ranks(tmp_path):
    """§7.11: every term is a local-batch mean (no statistic is reduced); the replicas stay identical."""
    proc = launch_2proc(["--method", "mbsd", "--dataset", "mfeat", "--epochs", "1", "--set",
                         "dataset.limit_per_class=20", "--set", "train.modality_eval=none", "--run-dir",
                         str(tmp_path / "run"), "--quiet"], tmp_path / "dump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_identical_ranks(tmp_path / "dump")
