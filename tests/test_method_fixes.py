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
