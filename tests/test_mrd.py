"""Behavioural tests of Modality Random Dropout (docs/methods/mrd.md §8)."""
from __future__ import annotations

import pytest
import torch
from conftest import SMALL_MFEAT
from mmbalance.methods.mrd import MRDHParams, draw_drop_mask
from scipy.stats import chisquare

from mmbalance.testing import build_trainer, first_batch

FAST_SYNTH = {"dataset.n_samples": 40, "train.max_steps_per_epoch": 2, "train.modality_eval": "none"}


def _trainer(tmp_path, method="mrd", dataset="mfeat", name="r", **sets):
    base = dict(SMALL_MFEAT) if dataset.startswith("mfeat") else {}
    return build_trainer(method, dataset, run_dir=tmp_path / name, epochs=1, sets={**base, **sets})


def test_eval_is_bit_identical_to_the_model_without_mrd(tmp_path):
    mrd, base = _trainer(tmp_path, name="a"), _trainer(tmp_path, "baseline", name="b")
    batch = first_batch(mrd)
    for tr in (mrd, base):
        tr.ctx.model.eval()
    # even with a mask left set by mistake, an encoder in eval mode never drops
    mrd.method._scale = {m: torch.zeros(len(batch["label"])) for m in mrd.ctx.modalities}
    out_mrd = mrd.method.predict(mrd.ctx, batch)
    out_base = base.method.predict(base.ctx, batch)
    assert torch.equal(out_mrd, out_base)


def test_drop_rate_and_uniform_choice():
    g = torch.Generator().manual_seed(0)
    mask = draw_drop_mask(10_000, 3, MRDHParams(p_drop=0.3), g)
    assert abs(float(mask.any(1).float().mean()) - 0.3) < 0.02
    assert int(mask.sum(1).max()) == 1  # one modality per dropped sample
    counts = mask.sum(0).numpy()
    assert chisquare(counts).pvalue > 0.01


@pytest.mark.parametrize("mode", ["one_uniform", "bernoulli"])
def test_never_drops_every_modality(mode):
    g = torch.Generator().manual_seed(1)
    hp = MRDHParams(p_drop=1.0 if mode == "one_uniform" else 0.9, mode=mode)
    for m in (2, 3, 6):
        mask = draw_drop_mask(5_000, m, hp, g)
        assert not bool(mask.all(1).any())
        assert bool(mask.any())


def test_per_sample_masks_differ_within_a_batch():
    mask = draw_drop_mask(256, 3, MRDHParams(p_drop=0.5), torch.Generator().manual_seed(2))
    assert len({tuple(r.tolist()) for r in mask}) > 1


@pytest.mark.parametrize("fill", ["zeros", "learned_token"])
def test_dropped_modality_encoder_gets_no_gradient(tmp_path, fill):
    tr = _trainer(tmp_path, fill=fill, name=fill)
    ctx, method = tr.ctx, tr.method
    mods = ctx.modalities
    batch = {k: v[:1] for k, v in first_batch(tr).items()}
    forced = torch.zeros(1, len(mods), dtype=torch.bool)
    forced[0, 1] = True
    method.draw = lambda ctx, b: forced  # drop modality 1 of the single sample
    out = method.training_step(ctx, batch)
    out.loss.backward()
    enc = ctx.raw_model.encoders
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in enc[mods[1]].parameters())
    for m in (mods[0], mods[2]):
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in enc[m].parameters())
    if fill == "learned_token":
        tok = ctx.modules["mrd_tokens"].tokens[mods[1]]
        assert tok.grad is not None and float(tok.grad.abs().sum()) > 0


def test_rescale_multiplies_kept_features(tmp_path):
    tr = _trainer(tmp_path, rescale=True)
    ctx, method = tr.ctx, tr.method
    batch = {k: v[:2] for k, v in first_batch(tr).items()}
    forced = torch.tensor([[True, False, False], [False, False, False]])
    method.draw = lambda ctx, b: forced
    out = method.training_step(ctx, batch).output
    model = ctx.raw_model
    z = {m: model.encoders[m](batch[m]) for m in ctx.modalities}
    m0, m1 = ctx.modalities[:2]
    assert torch.allclose(out.features[m0][0], torch.zeros_like(z[m0][0]))
    assert torch.allclose(out.features[m1][0], z[m1][0] * 3 / 2, atol=1e-6)
    assert torch.allclose(out.features[m1][1], z[m1][1], atol=1e-6)  # nothing dropped → no rescale


def test_p0_equals_baseline_bit_for_bit_and_p05_differs(tmp_path):
    results = {}
    for name, method, sets in [("base", "baseline", {}), ("p0", "mrd", {"p_drop": 0.0}), ("p5", "mrd", {})]:
        tr = _trainer(tmp_path, method, name=name, **sets, **{"train.modality_eval": "none"})
        tr.fit()
        results[name] = tr.ctx.raw_model.state_dict()
    assert all(torch.equal(results["base"][k], results["p0"][k]) for k in results["base"])
    assert not all(torch.equal(results["base"][k], results["p5"][k]) for k in results["base"])


@pytest.mark.parametrize("sets", [
    {"dataset.n_modalities": 2},
    {"dataset.n_modalities": 6},
    {"dataset.n_modalities": 3, "dataset.task": "regression"},
    {"dataset.n_modalities": 3, "dataset.feature": "sequence", "level": "input"},
    {"dataset.n_modalities": 3, "dataset.task": "segmentation", "mode": "bernoulli"},
])
def test_runs_on_synthetic_modalities_and_tasks(run_cli, sets):
    code, _, result = run_cli("mrd", "synthetic", epochs=1, sets={**FAST_SYNTH, **sets})
    assert code == 0 and result["status"] == "ok"


# ---------------------------------------------------------------- oracles (mutation-tested)
def test_bernoulli_redraw_is_unbiased_across_modalities():
    """Re-drawing all-dropped samples keeps the per-modality drop rates equal (a fallback that always
    keeps modality 0 would make it dropped far less often)."""
    mask = draw_drop_mask(20_000, 3, MRDHParams(p_drop=0.9, mode="bernoulli"), torch.Generator().manual_seed(4))
    rates = mask.float().mean(0)
    assert not bool(mask.all(1).any())
    assert float(rates.max() - rates.min()) < 0.02, rates.tolist()


def test_input_level_replaces_only_the_dropped_inputs(tmp_path):
    tr = _trainer(tmp_path, level="input")
    ctx, method = tr.ctx, tr.method
    batch = {k: v[:2] for k, v in first_batch(tr).items()}
    forced = torch.tensor([[False, True, False], [False, False, False]])
    method.draw = lambda ctx, b: forced
    seen = {}
    hooks = [ctx.raw_model.encoders[m].register_forward_pre_hook(
        lambda mod, args, m=m: seen.__setitem__(m, args[0].detach().clone())) for m in ctx.modalities]
    method.training_step(ctx, batch)
    for h in hooks:
        h.remove()
    m0, m1, m2 = ctx.modalities
    neutral = ctx.raw_model.neutral_input(m1, batch[m1])
    assert torch.equal(seen[m1][0], neutral[0]) and not torch.equal(seen[m1][0], batch[m1][0])
    assert torch.equal(seen[m1][1], batch[m1][1])
    for m in (m0, m2):
        assert torch.equal(seen[m], batch[m])
