"""Behavioural tests of OGM-GE / OGM (docs/methods/ogm_ge.md §8)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import SMALL_MFEAT
from mmbalance.methods.ogm_ge import (
    discrepancy_ratios,
    modulate_gradients,
    ogm_coefficients,
    score_sums,
)
from torch import nn

from mmbalance.errors import ConfigError
from mmbalance.testing import build_trainer, first_batch

FAST = {"train.modality_eval": "none"}


def _grads(params):
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def _step_and_grads(trainer):
    """One training step's gradients before and after the method's after_backward."""
    ctx, method = trainer.ctx, trainer.method
    batch = first_batch(trainer)
    out = method.training_step(ctx, batch)
    out.loss.backward()
    model = ctx.raw_model
    params = {m: list(model.encoder_parameters(m)) for m in model.modalities}
    before = {m: _grads(ps) for m, ps in params.items()}
    method.after_backward(ctx)
    after = {m: _grads(ps) for m, ps in params.items()}
    return before, after


# ---------------------------------------------------------------- 8.2 / 8.6 coefficient maths
def test_coefficient_values():
    k = ogm_coefficients(torch.tensor([1.01], dtype=torch.float64), 0.8)
    assert float(k) == pytest.approx(0.33151, abs=1e-5)
    k = ogm_coefficients(torch.tensor([1.5], dtype=torch.float64), 0.1)
    assert float(k) == pytest.approx(0.85111, abs=1e-5)
    rho = discrepancy_ratios(torch.tensor([2.0, 2.0, 2.0]))
    assert torch.equal(ogm_coefficients(rho, 0.8), torch.ones(3, dtype=torch.float64))
    # shifted form is continuous at ρ = 1
    assert float(ogm_coefficients(torch.tensor([1.0 + 1e-9], dtype=torch.float64), 0.8, "shifted")) == pytest.approx(1.0)


def test_three_modalities_ratio_to_mean_of_others():
    s = torch.tensor([3.0, 1.0, 1.0])
    rho = discrepancy_ratios(s)
    assert torch.allclose(rho, torch.tensor([3.0, 0.5, 0.5], dtype=torch.float64))
    k = ogm_coefficients(rho, 0.1)
    assert float(k[0]) == pytest.approx(1 - math.tanh(0.3)) and float(k[0]) < 1
    assert k[1] == 1 and k[2] == 1
    # ModalBed's s_m / Σ_k s_k can never exceed 1 (bug 7.5); ours does
    assert float((s / s.sum()).max()) < 1 < float(rho[0])
    # M = 2: official s_a/s_v and s_v/s_a
    assert torch.allclose(discrepancy_ratios(torch.tensor([4.0, 2.0])), torch.tensor([2.0, 0.5], dtype=torch.float64))


# ---------------------------------------------------------------- 8.1 dominant modality
def test_ogm_scales_dominant_exactly_and_leaves_weaker_untouched(tmp_path):
    t = build_trainer("ogm", "mfeat", run_dir=tmp_path, sets={**SMALL_MFEAT, **FAST, "alpha": 0.8})
    before, after = _step_and_grads(t)
    k = t.method.k
    assert min(k.values()) < 1 and max(k.values()) == 1  # someone dominates, someone does not
    for m, km in k.items():
        for g0, g1 in zip(before[m], after[m]):
            if km == 1:
                assert torch.equal(g0, g1)
            else:
                assert torch.allclose(g1, km * g0, atol=1e-7, rtol=0)


def test_ge_noise_has_gradient_std_and_zero_mean():
    torch.manual_seed(0)
    pa = nn.Parameter(torch.zeros(400, 250))  # 1e5 elements
    pb = nn.Parameter(torch.zeros(400, 250))
    ga, gb = torch.randn(400, 250) * 0.03 + 0.01, torch.randn(400, 250) * 0.5
    pa.grad, pb.grad = ga.clone(), gb.clone()
    ka = 0.6
    modulate_gradients({"a": [pa], "b": [pb]}, {"a": ka, "b": 1.0}, ge=True,
                       generator=torch.Generator().manual_seed(1))
    for res, g in ((pa.grad - ka * ga, ga), (pb.grad - gb, gb)):
        n = res.numel()
        target = float(g.std()) + 1e-8
        assert abs(float(res.std()) / target - 1) < 0.02
        assert abs(float(res.mean())) < 3 * target / math.sqrt(n)
    # without GE the edit is the exact product
    pa.grad = ga.clone()
    modulate_gradients({"a": [pa]}, {"a": ka}, ge=False, generator=None)
    assert torch.allclose(pa.grad, ka * ga, atol=1e-7, rtol=0)


def test_ge_noise_identical_for_identically_seeded_generators():
    """Distributed rule 2: every rank draws the same noise from the same-seeded generator."""
    outs = []
    for _ in range(2):
        p = nn.Parameter(torch.zeros(50))
        p.grad = torch.linspace(-1, 1, 50)
        modulate_gradients({"a": [p]}, {"a": 0.5}, ge=True, generator=torch.Generator().manual_seed(7))
        outs.append(p.grad.clone())
    assert torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------- 8.3 scope
def test_param_scope_all_vs_conv4d():
    enc = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    ps = list(enc.parameters())
    for p in ps:
        p.grad = torch.ones_like(p)
    modulate_gradients({"a": ps}, {"a": 0.5}, ge=False, generator=None, scope="conv4d")
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in ps)
    n = modulate_gradients({"a": ps}, {"a": 0.5}, ge=False, generator=None, scope="all")
    assert n == 4 and {p.dim() for p in ps} == {1, 2}
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in ps)


# ---------------------------------------------------------------- 8.5 split
def test_head_split_sums_to_fused_logits(tmp_path):
    t = build_trainer("ogm_ge", "mfeat", run_dir=tmp_path, sets={**SMALL_MFEAT, **FAST})
    assert t.method.source == "head_split"
    model = t.ctx.raw_model
    with torch.no_grad():
        out = t.ctx.forward(first_batch(t))
        u = model.unimodal_logits(out.pooled)
        assert torch.allclose(sum(u.values()), out.logits, atol=1e-6)
        zero = {m: torch.zeros_like(p) for m, p in out.pooled.items()}
        b = model.final_layer().bias
        for um in model.unimodal_logits(zero).values():
            assert torch.allclose(um, (b / 3).expand_as(um))


# ---------------------------------------------------------------- 8.7 window
def test_outside_window_gradients_untouched(tmp_path):
    t = build_trainer("ogm_ge", "mfeat", run_dir=tmp_path, sets={**SMALL_MFEAT, **FAST, "start_epoch": 1, "alpha": 0.8})
    t.ctx.epoch = 0
    before, after = _step_and_grads(t)
    assert min(t.method.k.values()) < 1
    for m in before:
        assert all(torch.equal(a, b) for a, b in zip(before[m], after[m]))
    t.ctx.optimizer.zero_grad()
    t.ctx.epoch = 1
    before, after = _step_and_grads(t)
    assert any(not torch.equal(a, b) for m in before for a, b in zip(before[m], after[m]))


# ---------------------------------------------------------------- 8.8 probes
def test_probes_do_not_change_encoder_gradients(tmp_path):
    t = build_trainer("ogm_ge", "mfeat", run_dir=tmp_path, sets={**SMALL_MFEAT, **FAST, "score_source": "aux_probe"})
    ctx, model = t.ctx, t.ctx.raw_model
    batch = first_batch(t)
    ctx.optimizer.zero_grad()
    out = t.method.training_step(ctx, batch)
    out.loss.backward()
    with_probes = [p.grad.clone() for m in model.modalities for p in model.encoder_parameters(m)]
    probe_grads = [p.grad for p in ctx.modules["ogm_probes"].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in probe_grads)  # the probes are trained
    ctx.optimizer.zero_grad()
    ctx.task.loss(ctx.forward(batch).logits, batch["label"]).backward()
    plain = [p.grad.clone() for m in model.modalities for p in model.encoder_parameters(m)]
    assert all(torch.equal(a, b) for a, b in zip(with_probes, plain))


# ---------------------------------------------------------------- 8.9 regression score
def test_regression_score():
    B, tau = 8, 0.7
    y = torch.linspace(-2, 2, B)
    assert float(score_sums("regression", {"a": y.clone()}, y, tau)) == pytest.approx(B)
    u = y + tau * torch.sign(torch.randn(B))
    assert float(score_sums("regression", {"a": u}, y, tau)) == pytest.approx(B * math.exp(-1))
    y = torch.randn(50) * 1.3 + 0.4
    ybar = y.mean()
    tau = float((y - ybar).abs().mean())
    s = float(score_sums("regression", {"a": ybar.expand(50)}, y, tau))
    assert s >= 50 * math.exp(-1) - 1e-9  # Jensen


# ---------------------------------------------------------------- modalities, tasks, refusals, bf16
SYN = {"dataset.n_samples": 60, **FAST}


@pytest.mark.parametrize("method,dataset,sets", [
    ("ogm_ge", "synthetic", {"dataset.n_modalities": 2}),
    ("ogm_ge", "synthetic", {"dataset.n_modalities": 3, "dataset.feature": "sequence"}),  # probes
    ("ogm", "synthetic", {"dataset.n_modalities": 6}),
    ("ogm_ge", "synthetic", {"dataset.n_modalities": 3, "dataset.task": "regression"}),
    ("ogm_ge", "synthetic", {"dataset.n_modalities": 3, "dataset.task": "segmentation", "dataset.n_samples": 30}),
])
def test_runs(run_cli, method, dataset, sets):
    code, rd, res = run_cli(method, dataset, epochs=1, sets={**SYN, **sets})
    assert code == 0 and res["status"] == "ok"
    assert len([k for k in res["method_metrics"] if k.startswith("k_")]) == len(res["modalities"])


def test_bf16_autocast_run(run_cli):
    code, _, res = run_cli("ogm_ge", "mfeat", epochs=1, sets={**SMALL_MFEAT, **FAST, "train.mixed_precision": "bf16",
                                                               "score_source": "aux_probe"})
    assert code == 0 and res["status"] == "ok"


def test_refusals(run_cli, capsys, tmp_path):
    code, _, _ = run_cli("ogm_ge", "synthetic", epochs=1, sets={**SYN, "dataset.n_modalities": 1})
    assert code == 2 and "at least 2 modalities" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="head_split is not possible"):
        build_trainer("ogm_ge", "synthetic", run_dir=tmp_path,
                      sets={**SYN, "dataset.feature": "sequence", "score_source": "head_split"})
    with pytest.raises(ConfigError, match="partial sums"):
        build_trainer("ogm_ge", "synthetic", run_dir=tmp_path,
                      sets={**SYN, "dataset.task": "regression", "score_source": "head_split"})


def test_apply_to_lr_sets_group_multipliers_and_scores_are_sum_reduced(tmp_path, monkeypatch):
    t = build_trainer("ogm", "mfeat", run_dir=tmp_path, sets={**SMALL_MFEAT, **FAST, "alpha": 0.8, "apply_to": "lr"})
    ctx = t.ctx
    calls = []
    orig = ctx.reduce_sum
    monkeypatch.setattr(ctx, "reduce_sum", lambda x: calls.append(x) or orig(x))
    before, after = _step_and_grads(t)
    assert len(calls) == 1 and calls[0].shape == (3,)  # the score numerators, before the ratio
    for m in before:  # gradients untouched (ge=false), the lr carries k
        assert all(torch.equal(a, b) for a, b in zip(before[m], after[m]))
    mults = {g["modality"]: g["lr_mult"] for g in ctx.optimizer.param_groups if "modality" in g}
    assert mults == t.method.k and min(mults.values()) < 1


# ---------------------------------------------------------------- independent oracles (mutation-tested)
def _hand_k(t, batch, alpha):
    """k_m from the spec's formulas, computed here from the head weights (not the method's functions):
    u_m = z̄_m·W_mᵀ + b/M, s_m = Σ_i softmax(u_m,i)[y_i] (true class, softmax over classes),
    ρ_m = s_m / mean_{k≠m} s_k, k_m = 1 − tanh(α·ρ_m) if ρ_m > 1 else 1 (paper Eq. 10)."""
    model = t.ctx.raw_model
    mods = list(model.modalities)
    with torch.no_grad():
        out = t.ctx.forward(batch)
        W, b = model.final_layer().weight.double(), model.final_layer().bias.double()
        split = model.split_head()
        s = []
        for m in mods:
            u = out.pooled[m].double() @ W[:, split[m]].T + b / len(mods)
            p = torch.exp(u - torch.logsumexp(u, dim=1, keepdim=True))
            s.append(sum(float(p[i, int(batch["label"][i])]) for i in range(len(u))))
    k = {}
    for j, m in enumerate(mods):
        rho = s[j] / (sum(s[:j] + s[j + 1:]) / (len(mods) - 1))
        k[m] = 1 - math.tanh(alpha * rho) if rho > 1 else 1.0
    return k, s


def test_dominant_modality_scaled_by_hand_computed_k(tmp_path):
    """The edit equals k_m·g with k_m computed by hand from the head split (true-class probability,
    softmax over classes, ratio to the OTHER modalities, the right modality)."""
    t = build_trainer("ogm", "mfeat", run_dir=tmp_path, sets={**SMALL_MFEAT, **FAST, "alpha": 0.8})
    batch = first_batch(t)
    k, s = _hand_k(t, batch, 0.8)
    assert min(k.values()) < 1 == max(k.values())
    before, after = _step_and_grads(t)
    for m in t.ctx.modalities:
        assert t.method.k[m] == pytest.approx(k[m], abs=1e-6), m
        for g0, g1 in zip(before[m], after[m]):
            assert torch.allclose(g1, k[m] * g0, atol=1e-6, rtol=1e-5)


def test_window_is_inclusive_at_both_ends(tmp_path):
    t = build_trainer("ogm", "mfeat", run_dir=tmp_path, sets={**SMALL_MFEAT, **FAST, "alpha": 0.8, "start_epoch": 1,
                                                               "end_epoch": 2})
    for epoch, active in ((0, False), (1, True), (2, True), (3, False)):
        t.ctx.optimizer.zero_grad()
        t.ctx.epoch = epoch
        before, after = _step_and_grads(t)
        changed = any(not torch.equal(a, b) for m in before for a, b in zip(before[m], after[m]))
        assert changed == active, epoch
