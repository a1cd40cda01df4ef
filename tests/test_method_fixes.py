"""Issue-10 method defects, each with the test that would have caught it (independent oracles)."""
from __future__ import annotations

import pytest
import torch
from conftest import SMALL_MFEAT

from mmbalance.testing import build_trainer


# ------------------------------------------------------------------------------------------- CGGM
@pytest.mark.parametrize("cos_source", ["weights_stale", "grads_same_step"])
@pytest.mark.parametrize("rho_in_b", [False, True])
def test_cggm_magnitude_factor_is_rho_times_b_in_every_combination(tmp_path, cos_source, rho_in_b):
    """Eq. 8-9: encoder m's gradient × ρ·B_m (ρ inside B^p or outside: the same factor); B by hand from
    the classifiers' first-step accuracies (ε⁰ = 0, so Δ = ε)."""
    rho = 2.0
    tr = build_trainer("cggm", run_dir=tmp_path / "r", epochs=1,
                       sets={**SMALL_MFEAT, "train.max_steps_per_epoch": 1, "rho": rho, "lam": 0.1,
                             "cos_source": cos_source, "rho_in_b": rho_in_b})
    meth, mods = tr.method, tr.ctx.modalities
    seen = {}
    real = meth.after_backward

    def spy(ctx):
        y = first_labels
        seen["eps"] = torch.tensor([(meth._last_aux[m].argmax(-1) == y).double().mean().item() for m in mods])
        seen["raw"] = {m: [p.grad.clone() for p in meth._scoped[m]] for m in mods}
        real(ctx)
        seen["after"] = {m: [p.grad.clone() for p in meth._scoped[m]] for m in mods}

    first_labels = next(iter(tr.loader_train))["label"]
    meth.after_backward = spy
    tr.fit()
    eps = seen["eps"]
    s = eps.sum()
    assert abs(float(s)) > 1e-3  # the guard does not fire on this batch
    for k, m in enumerate(mods):
        want = rho * float((s - eps[k]) / s)
        for g0, g1 in zip(seen["raw"][m], seen["after"][m]):
            torch.testing.assert_close(g1, want * g0, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------------- G-Blending
def test_gblending_noise_floor_keeps_a_noise_dominated_head_from_taking_all_the_weight():
    """The published G/O² weights collapse when one head's ΔO is ≈ 0 by chance (issue case: ΔO −0.0005,
    bootstrap SD 0.106): that head gets ~all the loss. With O² + SE² the weights stay balanced."""
    from mmbalance.methods.gblending import blend_weights

    g = torch.tensor([0.05, 0.04, 0.06], dtype=torch.float64)
    o = torch.tensor([-0.0005, 0.10, 0.12], dtype=torch.float64)
    se = torch.tensor([0.106, 0.10, 0.11], dtype=torch.float64)
    paper = blend_weights(g, o)
    assert float(paper[0]) > 0.99  # the collapse, as published
    robust = blend_weights(g, o, o_se=se)
    # by hand: w̃ = G/(O² + SE² + 1e-8)
    raw = torch.tensor([0.05 / (0.0005 ** 2 + 0.106 ** 2 + 1e-8), 0.04 / (0.01 + 0.01 + 1e-8),
                        0.06 / (0.0144 + 0.0121 + 1e-8)], dtype=torch.float64)
    torch.testing.assert_close(robust, raw / raw.sum(), rtol=1e-9, atol=1e-12)
    assert float(robust.max()) < 0.6  # 0.51 / 0.23 / 0.26
    # without noise (SE = 0) the variant is the published formula
    torch.testing.assert_close(blend_weights(g, o, o_se=torch.zeros(3)), paper)


def test_gblending_weight_cap():
    from mmbalance.methods.gblending import blend_weights, cap_weights

    w = cap_weights(torch.tensor([0.9, 0.06, 0.04]), 0.5)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))  # excess 0.4 shared 3:2
    w = cap_weights(torch.tensor([0.7, 0.25, 0.05]), 0.4)  # 2nd pass: 0.25 → 0.25·0.6/0.3 = 0.5 > 0.4
    torch.testing.assert_close(w, torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64))
    torch.testing.assert_close(cap_weights(torch.tensor([0.2, 0.3, 0.5]), 0.6), torch.tensor([0.2, 0.3, 0.5],
                                                                                           dtype=torch.float64))
    w = blend_weights(torch.tensor([0.05, 0.04, 0.06]), torch.tensor([-0.0005, 0.1, 0.12]), max_weight=0.6)
    assert abs(float(w[0]) - 0.6) < 1e-12 and abs(float(w.sum()) - 1) < 1e-12


def test_gblending_overfit_standard_error_matches_the_bootstrap():
    """Oracle: the bootstrap SD of ΔO (resample V and T′ with replacement, 4000 times)."""
    from mmbalance.methods.gblending import overfit_standard_error

    g = torch.Generator().manual_seed(0)
    v0, t0 = torch.rand(110, generator=g), torch.rand(110, generator=g)
    v1, t1 = v0 + 0.3 * torch.randn(110, generator=g), t0 - 0.1 + 0.2 * torch.randn(110, generator=g)
    se = overfit_standard_error(v0, v1, t0, t1)
    iv = torch.randint(0, 110, (4000, 110), generator=g)
    it = torch.randint(0, 110, (4000, 110), generator=g)
    boot = ((v1 - v0)[iv].mean(1) - (t1 - t0)[it].mean(1)).std()
    assert abs(se / float(boot) - 1) < 0.05


def test_gblending_offline_robust_preset_uses_the_floor(tmp_path):
    """The preset runs end to end, logs SE(O) and its weights follow the noise-aware formula."""
    from mmbalance.methods.gblending import blend_weights

    tr = build_trainer("gblending_offline_robust", run_dir=tmp_path / "r", epochs=1,
                       sets={**SMALL_MFEAT, "train.max_steps_per_epoch": 2, "train.modality_eval": "none"})
    assert tr.method.hp.mode == "offline" and tr.method.hp.noise_floor
    tr.fit()
    h = tr.method.history[0]
    assert all(s > 0 for s in h["O_se"])
    want = blend_weights(torch.tensor(h["G"]), torch.tensor(h["O"]), o_se=torch.tensor(h["O_se"]))
    torch.testing.assert_close(torch.tensor(h["w"], dtype=torch.float64), want)
