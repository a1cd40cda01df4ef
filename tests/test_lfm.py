"""Behavioural tests of LFM (docs/methods/lfm.md "What the tests check"): the fitted schedule and its
clamp, the two divergences and underflow, the fused loss on the mean, the total loss, M = 3 pairs, the
hypergradient step (closed form on a toy), clipping and lr halving, the held-out batch, eval mode during
the learned step, refusals, resume and runs on every task and fusion kind."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SMALL_MFEAT
from mmbalance.methods.lfm import alignment_loss, alphas_fitted, divergence, fitted_alpha_cls, hypergradient

from mmbalance.errors import ConfigError, MethodNotApplicable
from mmbalance.testing import build_trainer, first_batch

FAST = {**SMALL_MFEAT, "train.modality_eval": "none", "train.diagnostics": "none"}


def _logp(p):
    return torch.log(torch.tensor([p], dtype=torch.float64))


# ---------------------------------------------------------------- closed forms (lfm.md §7.1–7)
def test_fitted_schedule_clamp_and_clock():
    assert [fitted_alpha_cls(t) for t in (0, 50, 100, 150)] == pytest.approx([0.204624, 0.436681, 0.539155, 0.821314], abs=1e-6)
    assert 1 - fitted_alpha_cls(183) == pytest.approx(-0.010540, abs=1e-6)
    assert alphas_fitted(183, 200)[1] == 0.0  # clamped (the raw curve pushes the predictions apart)
    assert alphas_fitted(25, 50)[0] == pytest.approx(0.539155, abs=1e-6)  # relative clock: t = 200·25/50
    assert alphas_fitted(25, 50, "absolute")[0] == pytest.approx(fitted_alpha_cls(25))
    assert all(alphas_fitted(e, 200) == alphas_fitted(e, 200, "absolute") for e in (0, 7, 150))


def test_divergences_values_symmetry_and_underflow():
    p, q = _logp([0.9, 0.1]), _logp([0.5, 0.5])
    assert float(divergence(p, q, "js")) == pytest.approx(0.101749, abs=1e-6)
    assert float(divergence(p, q, "code")) == pytest.approx(0.117973, abs=1e-6)
    far_p, far_q = _logp([0.999, 0.001]), _logp([0.001, 0.999])
    assert float(divergence(far_p, far_q, "js")) == pytest.approx(0.685240, abs=1e-6)
    assert float(divergence(far_p, far_q, "js")) < math.log(2)
    assert float(divergence(far_p, far_q, "code")) == pytest.approx(2.761231, abs=1e-6)
    for kind in ("js", "code"):
        assert float(divergence(p, q, kind)) == pytest.approx(float(divergence(q, p, kind)), abs=1e-12)
        assert float(divergence(p, p, kind)) == pytest.approx(0.0, abs=1e-12)
        # logits (0, −200) against (−200, 0): softmax underflows, log-softmax does not
        u = {"a": torch.tensor([[0.0, -200.0]]), "v": torch.tensor([[-200.0, 0.0]])}
        assert math.isfinite(float(alignment_loss(u, kind)))
    assert float(alignment_loss(u, "js")) == pytest.approx(math.log(2), abs=1e-6)


def test_three_modalities_average_the_pairs():
    g = torch.Generator().manual_seed(0)
    u = {m: torch.randn(5, 4, generator=g) for m in "ab"}
    u["c"] = u["a"].clone()
    lp = {m: torch.log_softmax(x.double(), 1) for m, x in u.items()}
    d_ab = divergence(lp["a"], lp["b"]).mean()
    assert float(divergence(lp["a"], lp["c"]).mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(alignment_loss(u)) == pytest.approx(float(2 * d_ab / 3), abs=1e-6)  # (ab + ac + bc)/3, ac = 0


def test_hypergradient_closed_form_on_a_toy():
    """θ = (1, 2), L_cls = ½‖θ‖², L_align = ½θᵀdiag(3, 0)θ, α = (0.05, 0.95): H_tot·c = (2.9, 0.1), a = 1.5."""
    theta = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    loss_cls = 0.5 * (theta ** 2).sum()
    loss_align = 0.5 * (torch.tensor([3.0, 0.0], dtype=torch.float64) * theta ** 2).sum()
    a = hypergradient([theta], loss_cls, loss_align, 0.05, 0.95)
    assert float(a) == pytest.approx(1.5, abs=1e-12)
    assert 0.95 - 1e-4 * float(a) == pytest.approx(0.94985, abs=1e-12)
    # scope: "first" reads only the first tensor; "all" averages every entry
    phi = torch.tensor([4.0], dtype=torch.float64, requires_grad=True)
    lc, la = 0.5 * (theta ** 2).sum() + phi.sum() ** 2, 0.5 * (torch.tensor([3.0, 0.0], dtype=torch.float64) * theta ** 2).sum()
    assert float(hypergradient([theta, phi], lc, la, 0.05, 0.95, "first")) == pytest.approx(1.5)
    # phi: c = 2φ = 8, H_tot = 2·0.05 → h = 0.8; mean over (2.9, 0.1, 0.8)
    assert float(hypergradient([theta, phi], lc, la, 0.05, 0.95, "all")) == pytest.approx((2.9 + 0.1 + 0.8) / 3)


# ---------------------------------------------------------------- the method on a real model
def _trainer(tmp_path, name="r", method="lfm", dataset="mfeat", epochs=2, **sets):
    base = FAST if dataset.startswith(("mfeat", "avdigits")) else {"train.modality_eval": "none", "train.diagnostics": "none"}
    return build_trainer(method, dataset, run_dir=tmp_path / name, epochs=epochs, sets={**base, **sets})


def test_fused_loss_is_on_the_mean_and_the_total_has_the_factor_two(tmp_path):
    tr = _trainer(tmp_path, **{"dataset.views": ["fac", "fou"]})
    ctx, method = tr.ctx, tr.method
    a, v = ctx.modalities
    u = {a: torch.tensor([[2.0, 0.0] + [-1e4] * 8]), v: torch.zeros(1, 10)}
    u[v][0, 2:] = -1e4
    y = torch.tensor([0])
    out = ctx.model(ctx.inputs({k: x[:1] for k, x in first_batch(tr).items()}))
    loss_cls, _ = method.losses(ctx, out, u, y)
    assert float(loss_cls) == pytest.approx(0.313262, abs=1e-6)  # CE((1, 0), 0); a sum fusion gives 0.126928
    method.alpha_cls, method.alpha_align = 0.5, 0.5
    method.losses = lambda ctx, out, u, y: (torch.tensor(0.3), torch.tensor(0.1))
    assert float(method.training_step(ctx, first_batch(tr)).loss) == pytest.approx(0.4, abs=1e-7)


def test_predict_is_the_mean_of_the_unimodal_outputs(tmp_path):
    tr = _trainer(tmp_path)
    ctx, method, model = tr.ctx, tr.method, tr.ctx.raw_model
    batch = first_batch(tr)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(method.predict(ctx, batch), model(ctx.inputs(batch)).logits / 3, atol=1e-6)


def test_learned_step_clip_halving_and_state(tmp_path, monkeypatch):
    import mmbalance.methods.lfm as lfm

    tr = _trainer(tmp_path, method="lfm_learnable")
    ctx, method = tr.ctx, tr.method
    assert (method.alpha_cls, method.alpha_align) == pytest.approx((0.05, 0.95))
    monkeypatch.setattr(lfm, "hypergradient", lambda *a, **k: torch.tensor(-3.0, dtype=torch.float64))
    lrs = []
    for e in (0, 19, 20, 40):
        ctx.epoch = e
        method.on_epoch_start(ctx)
        lrs.append(method.lr_alpha)
    assert method.alpha_align == 0.95  # a < 0 would raise α_align above 0.95: clipped
    assert lrs == [1e-4, 1e-4, 5e-5, 2.5e-5]  # halved at e = 20 and 40, not at 0
    monkeypatch.setattr(lfm, "hypergradient", lambda *a, **k: torch.tensor(100.0, dtype=torch.float64))
    ctx.epoch = 41
    method.on_epoch_start(ctx)
    assert method.alpha_align == pytest.approx(0.95 - 2.5e-5 * 100) and method.alpha_cls == pytest.approx(1 - method.alpha_align)


def test_heldout_batch_is_fixed_and_disjoint_from_training(tmp_path):
    tr = _trainer(tmp_path, method="lfm_learnable")
    ctx, method = tr.ctx, tr.method
    held = ctx.heldout
    assert len(method.heldout_idx) == 8 and int(method.heldout_idx.max()) < len(held)
    rows = held.inputs["fac"][method.heldout_idx]
    train = tr.train_split.inputs["fac"]
    assert not any(bool((train == r).all(1).any()) for r in rows)  # no held-out row is trained on
    seen = []
    orig = method._heldout_batch
    method._heldout_batch = lambda c: seen.append(orig(c)["idx"].tolist()) or orig(c)
    tr.fit()
    assert len(seen) == 2 and seen[0] == seen[1] == method.heldout_idx.tolist()


def test_learned_step_keeps_batchnorm_statistics_and_mode(tmp_path):
    tr = _trainer(tmp_path, method="lfm_learnable", dataset="synthetic-seg", lr_alpha=10.0, alpha_align_init=0.5,
                  **{"dataset.n_samples": 40, "train.batch_size": 8})
    ctx, method, model = tr.ctx, tr.method, tr.ctx.raw_model
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert before
    model.train()
    ctx.epoch = 1
    state = method.state_dict()
    method.on_epoch_start(ctx)
    first = (method.alpha_cls, method.alpha_align)
    assert model.training and all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    method.load_state_dict(state)
    method.on_epoch_start(ctx)
    assert (method.alpha_cls, method.alpha_align) == first  # the same state gives the same α
    assert first[1] != 0.5  # the step moved α


def test_refusals(tmp_path):
    with pytest.raises(MethodNotApplicable, match="regression output has none"):
        _trainer(tmp_path, "reg", dataset="synthetic-regression", **{"dataset.n_samples": 40})
    with pytest.raises(ConfigError, match="equal widths"):
        _trainer(tmp_path, "w", dataset="avdigits-small", align="paper", **{"model.audio_hidden": 32})
    with pytest.raises(MethodNotApplicable, match="MMTM"):
        _trainer(tmp_path, "mmtm", **{"model.name": "mlp_mmtm"})


@pytest.mark.parametrize("method,dataset,sets", [
    ("lfm", "synthetic-regression", {"dataset.n_samples": 40, "align": "paper"}),
    ("lfm", "synthetic-seg", {"dataset.n_samples": 40, "train.batch_size": 8}),
    ("lfm_learnable", "synthetic", {"dataset.n_modalities": 3, "dataset.feature": "sequence", "dataset.n_samples": 40}),
    ("lfm", "mfeat", {**SMALL_MFEAT, "model.name": "mlp_transformer_fusion", "divergence": "code"}),
])
def test_runs_on_every_task_and_fusion(run_cli, method, dataset, sets):
    code, rd, res = run_cli(method, dataset, epochs=2, sets={"train.modality_eval": "none", "train.diagnostics": "none", **sets})
    assert code == 0 and res["status"] == "ok"
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["lfm/loss_align"]) for r in rows)


def test_resume_reproduces_alpha(kill_and_resume):
    (full_dir, full), (code, rd, res) = kill_and_resume("lfm_learnable", sets=FAST, epochs=3, stop_after=2)
    assert code == 0 and res["test"] == full["test"] and res["val"] == full["val"]
    a = [json.loads(x) for x in (full_dir / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    for key in ("method/alpha_cls", "method/lr_alpha", "train_loss"):
        assert [r[key] for r in a] == [r[key] for r in b], key
