"""Behavioural tests of AUG (docs/methods/aug.md) and of the engine's module pool (mmbalance/pool.py):
the loss and its stop-gradient by hand, the assignment rule and check epochs, the timing of a new member
(after validation), trained vs frozen added members, idle pool members untouched and stateless,
per-modality prediction, kill + resume with a pending assignment, 2-process DDP per-rank decisions."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import SMALL_MFEAT
from mmbalance.methods import aug as aug_mod
from mmbalance.methods.aug import assignment, aug_loss, check_epochs
from test_ddp import assert_identical_ranks, launch_2proc

from mmbalance.pool import ModulePool, PoolFullError
from mmbalance.testing import build_trainer, first_batch

TWO = "mfeat-pix-mor"  # two modalities
SETS = {**SMALL_MFEAT, "train.modality_eval": "none", "train.diagnostics": "none"}


def test_loss_closed_form_and_stop_gradient():
    """§8.1/§8.2: C = 2, y = 0, P = (ln 3, 0), N = (0, 0), F = P + N: CE(F) = CE(P) = ln(4/3) = 0.287682,
    residual (1 − 0.5·0.75)·ln 2 = 0.433217, L = 1.008581 (λ = 0.2: residual 0.589175);
    ∂L/∂P = (−0.5, 0.5) (no gradient through the residual weight), ∂L/∂N = (−0.5625, 0.5625)."""
    P = torch.tensor([[math.log(3), 0.0]], requires_grad=True)
    N = torch.zeros(1, 2, requires_grad=True)
    y = torch.tensor([0])
    loss, w, conf = aug_loss(P + N, P, N, y, 0.5)
    assert loss.item() == pytest.approx(1.008581, abs=1e-6) and w.item() == pytest.approx(0.625)
    assert conf.item() == pytest.approx(0.75)
    loss.backward()
    assert torch.allclose(P.grad, torch.tensor([[-0.5, 0.5]]), atol=1e-6)
    assert torch.allclose(N.grad, torch.tensor([[-0.5625, 0.5625]]), atol=1e-6)
    l2, _, _ = aug_loss(P + N, P, N, y, 0.2)
    assert l2.item() == pytest.approx(2 * 0.287682 + 0.589175, abs=1e-6)
    k0, _, _ = aug_loss(P.detach(), None, None, y, 0.5)  # K = 0: CE(F) alone
    assert k0.item() == pytest.approx(0.287682, abs=1e-6)


def test_segmentation_loss_is_per_pixel_and_the_score_a_per_image_mean():
    """Segmentation (generalisation): the same closed form per pixel (two pixels of one image, each as in
    §8.1 → L = 1.008581), and S adds each image's MEAN pixel confidence (0.75, not 1.5)."""
    P = torch.tensor([math.log(3), 0.0]).view(1, 2, 1, 1).expand(1, 2, 1, 2).clone()
    N = torch.zeros(1, 2, 1, 2)
    loss, w, conf = aug_loss(P + N, P, N, torch.zeros(1, 1, 2, dtype=torch.long), 0.5, "segmentation")
    assert loss.item() == pytest.approx(1.008581, abs=1e-6) and conf.item() == pytest.approx(0.75)


def test_assignment_rule_and_check_epochs():
    """§8.4/§8.5/§8.9: the weaker modality receives the member; strict margins; κ rule for M = 3."""
    assert assignment([120, 100]) == [1] and assignment([100, 100.5]) == [] and assignment([98, 100]) == [0]
    assert assignment([101, 100]) == [] and assignment([100, 120]) == [0]  # r = 1.01 exactly: nothing
    assert assignment([100, 70, 95]) == [1]  # ratios to the mean of the others 0.606·…: only modality 2
    assert check_epochs(200) == [0] + list(range(19, 200, 20)) and len(check_epochs(200)) == 11
    assert check_epochs(8) == list(range(8))
    assert check_epochs(25) == [0, 1] + list(range(3, 25, 2))


def test_module_pool_activation_and_state():
    pool = ModulePool(lambda k: torch.nn.Linear(2, 2), 3, initial=1)
    assert pool.n_active == 1 and len(pool.active()) == 1
    pool.activate()
    sd = pool.state_dict()
    other = ModulePool(lambda k: torch.nn.Linear(2, 2), 3, initial=1)
    other.load_state_dict(sd)
    assert other.n_active == 2 and all(torch.equal(a.weight, b.weight) for a, b in zip(pool.members, other.members))
    pool.activate()
    with pytest.raises(PoolFullError):
        pool.activate()


def _force(monkeypatch, receiver=1):
    """The first check gives modality ``receiver`` a member, later checks nobody."""
    calls = []

    def once(S, *a, **k):
        calls.append(S)
        return [receiver] if len(calls) == 1 else []

    monkeypatch.setattr(aug_mod, "assignment", once)


@pytest.mark.parametrize("method", ["aug", "aug_released"])
def test_member_joins_after_validation_and_is_trained_unless_released(tmp_path, monkeypatch, method):
    """§8.3/§8.6/§8.7: the member decided after epoch 0 is not in epoch 0's validation (one member) and is
    used from epoch 1's first forward (two); with ``aug`` its weight moves in epoch 1, with
    ``aug_released`` it stays bitwise (requires_grad false) while gradient still reaches the encoder
    through it; pool members never activated stay bitwise and hold no optimizer state."""
    _force(monkeypatch)
    # checks=1 with 3 epochs: period 3, checks after epochs 0 and 2 (epoch 1 is not a check)
    tr = build_trainer(method, TWO, run_dir=tmp_path / "r", epochs=3,
                       sets={**SETS, "train.max_steps_per_epoch": 2, "checks": 1})
    ctx, meth = tr.ctx, tr.method
    pools = meth._pools(ctx)
    a, v = ctx.modalities
    init = [[p.detach().clone() for p in g.parameters()] for g in pools[v].members]
    seen = []
    orig_predict, orig_uni = meth.predict, meth._unimodal

    def spy_predict(c, batch, absent=()):
        seen.append(("val", c.epoch, pools[v].n_active))
        return orig_predict(c, batch, absent)

    def spy_uni(c, batch, k, m):
        if m == v and c.step == 0:
            seen.append(("train", c.epoch, pools[v].n_active))
        return orig_uni(c, batch, k, m)

    monkeypatch.setattr(meth, "predict", spy_predict)
    monkeypatch.setattr(meth, "_unimodal", spy_uni)
    tr.fit()
    assert meth.checks == {0, 2}
    assert ("val", 0, 1) in seen and ("train", 1, 2) in seen and ("val", 1, 2) in seen and ("train", 2, 2) in seen
    assert meth.K == {a: 0, v: 1} and pools[a].n_active == 1 and pools[v].n_active == 2 and meth.pending == []
    moved = [not torch.equal(p, q) for p, q in zip(pools[v].members[1].parameters(), init[1])]
    assert any(moved) == (method == "aug")
    opt_state = tr._fast_optimizer(ctx.optimizer).state
    for g, g0 in zip(pools[v].members[2:], init[2:]):
        assert all(torch.equal(p, q) for p, q in zip(g.parameters(), g0))
        assert all(p not in opt_state for p in g.parameters())
    if method == "aug_released":
        assert not pools[v].members[1].weight.requires_grad
        batch = first_batch(tr)
        z = ctx.raw_model.encoders[v](batch[v])
        heads = ctx.modules["aug_heads"]
        _, _, N = heads(v, z)
        g = torch.autograd.grad(N.sum(), list(ctx.raw_model.encoders[v].parameters()))
        assert any(t.abs().sum() > 0 for t in g)


def test_predict_with_one_modality_is_its_ensemble(tmp_path):
    """§8.10: with modality 2 absent the prediction is F_1 exactly (weights renormalised)."""
    tr = build_trainer("aug", TWO, run_dir=tmp_path / "r", epochs=1, sets=SETS)
    ctx = tr.ctx
    batch = first_batch(tr)
    a, v = ctx.modalities
    with torch.no_grad():
        F1 = ctx.modules["aug_heads"](a, ctx.raw_model.encoders[a](batch[a]))[0]
    assert torch.equal(tr.method.predict(ctx, batch, absent=(v,)), F1)
    with torch.no_grad():
        F2 = ctx.modules["aug_heads"](v, ctx.raw_model.encoders[v](batch[v]))[0]
    assert torch.allclose(tr.method.predict(ctx, batch), 0.5 * F1 + 0.5 * F2, atol=1e-6)


def test_confidence_score_and_decision_after_an_epoch(tmp_path, monkeypatch):
    """S_m is the sum over the epoch's training samples of softmax(F_m)[y] from each sub-step's forward
    (recomputed by hand; lr 1e-12 so the first sub-step's update does not change the second's forward);
    the decision follows S_1/S_2."""
    sets = {**SETS, "train.max_steps_per_epoch": 1, "train.lr": 1e-12, "assign_margin": 0.0}
    tr = build_trainer("aug", TWO, run_dir=tmp_path / "r", epochs=1, sets=sets)
    ctx, meth = tr.ctx, tr.method
    batch = first_batch(tr)
    with torch.no_grad():
        S = [torch.softmax(ctx.modules["aug_heads"](m, ctx.raw_model.encoders[m](batch[m]))[0], 1)
             .gather(1, batch["label"][:, None]).sum().item() for m in ctx.modalities]
    tr.fit()
    n = len(ctx.data.train)
    assert meth.last[f"S_{ctx.modalities[0]}"] == pytest.approx(S[0] / n, rel=1e-6)
    assert meth.last[f"S_{ctx.modalities[1]}"] == pytest.approx(S[1] / n, rel=1e-6)
    weaker = ctx.modalities[1] if S[0] > S[1] else ctx.modalities[0]
    assert meth.pending == [weaker]


def test_resume_with_a_pending_member_gives_the_same_numbers(kill_and_resume):
    """§8.11: killed right after epoch 0's checkpoint (assignment pending), the resumed run equals the
    uninterrupted one (K, metrics)."""
    sets = {**SETS, "assign_margin": 0.0}
    (_, full), (code, _, resumed) = kill_and_resume("aug", sets=sets, epochs=3, stop_after=1, dataset=TWO)
    assert code == 0 and resumed["test"] == full["test"] and resumed["val"] == full["val"]
    assert resumed["method_metrics"] == full["method_metrics"]
    assert sum(v for k, v in full["method_metrics"].items() if k.startswith("K_")) >= 2


@pytest.mark.ddp
def test_two_process_assignment_uses_the_global_score(tmp_path):
    """§8.12: S is SUM-reduced before deciding, so K, the pending member and S_m are identical on both
    ranks (each sees half of TRAIN: rank-local S differ), and the replicas stay identical."""
    proc = launch_2proc(["--method", "aug", "--dataset", TWO, "--epochs", "2", "--set", "dataset.limit_per_class=20",
                         "--set", "train.modality_eval=none", "--set", "assign_margin=0.0", "--run-dir",
                         str(tmp_path / "run"), "--quiet"], tmp_path / "dump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_identical_ranks(tmp_path / "dump")
    r0 = torch.load(tmp_path / "dump" / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "dump" / "rank1.pt", weights_only=False)
    assert r0["method_state"] == r1["method_state"] and sum(r0["method_state"]["K"].values()) >= 1
    assert r0["method_metrics"] == r1["method_metrics"]
