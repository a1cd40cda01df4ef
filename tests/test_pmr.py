"""Behavioural tests of PMR (docs/methods/pmr.md §8)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_MFEAT
from mmbalance.methods.pmr import coefficients, prototype_logits

from mmbalance.errors import MethodNotApplicable
from mmbalance.testing import build_trainer, first_batch

FAST_SYNTH = {"dataset.n_samples": 40, "train.max_steps_per_epoch": 2, "train.modality_eval": "none"}


def _trainer(tmp_path, method="pmr", dataset="mfeat", name="r", **sets):
    base = dict(SMALL_MFEAT) if dataset.startswith("mfeat") else {}
    return build_trainer(method, dataset, run_dir=tmp_path / name, epochs=1, sets={**base, **sets})


def _spy(ctx, log):
    real = ctx.train_batches

    def spy(split="train", **kw):
        log.append(split)
        yield from real(split=split, **kw)
    ctx.train_batches = spy


def test_prototypes_are_class_means_in_eval_mode(tmp_path):
    tr = _trainer(tmp_path, **{"model.dropout": 0.5, "train.batch_size": 4})
    ctx, method = tr.ctx, tr.method
    splits: list[str] = []
    _spy(ctx, splits)
    first = method.compute_prototypes(ctx).clone()
    # 140 training rows, batch 4 → 35 batches → 3 batches (12 rows) can't hold 10 classes: the first
    # computation keeps drawing until every class is present (step 3)
    assert len(method.last_subset_idx) > 12 and bool(torch.isfinite(first).all())
    second = method.compute_prototypes(ctx).clone()
    assert len(method.last_subset_idx) == 12
    assert torch.equal(second, method.compute_prototypes(ctx))  # same subset, dropout off → identical
    assert ctx.model.training  # the model is back in train mode
    assert set(splits) == {"train"}
    # by hand: class means of the pooled embeddings of those 12 training rows (eval mode)
    idx = method.last_subset_idx
    batch = ctx.data.train.batch(idx)
    model = ctx.raw_model.eval()
    with torch.no_grad():
        pooled = model({m: batch[m] for m in ctx.modalities}).pooled
    model.train()
    y = batch["label"]
    for j, m in enumerate(ctx.modalities):
        for c in range(10):
            if (y == c).any():
                assert torch.allclose(second[j, c], pooled[m][y == c].mean(0), atol=1e-6)
            else:  # absent from the subset: previous prototype kept (step 3)
                assert torch.equal(second[j, c], first[j, c])


def test_hand_example_distances_and_scores():
    protos = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    z = torch.tensor([[0.5, 0.0], [1.8, 0.0]])
    logits = prototype_logits(z, protos)
    assert torch.allclose(-logits, torch.tensor([[0.5, 1.5], [1.8, 0.2]]), atol=1e-6)
    p = logits.softmax(-1).gather(1, torch.tensor([[0], [1]]))[:, 0]
    assert torch.allclose(p, torch.tensor([0.73106, 0.83202]), atol=1e-5)
    assert abs(float(p.sum()) - 1.56308) < 1e-5


def test_binary_and_smooth_coefficients():
    a = 2.0
    assert coefficients(torch.tensor([10.0, 6.0]), a)[0].tolist() == [0.0, a]
    assert coefficients(torch.tensor([6.0, 10.0]), a)[0].tolist() == [a, 0.0]
    assert coefficients(torch.tensor([7.0, 7.0]), a)[0].tolist() == [0.0, 0.0]
    beta, rho = coefficients(torch.tensor([10.0, 4.0, 6.0]), a)
    assert torch.allclose(rho, torch.tensor([2.0, 0.5, 6 / 7], dtype=torch.float64))
    assert beta.tolist() == [0.0, a, a]
    beta_s, rho_s = coefficients(torch.tensor([10.0, 4.0, 6.0]), a, "smooth")
    assert torch.allclose(beta_s, a * torch.tanh(1 / rho_s - 1).clamp_min(0))
    assert beta_s[0] == 0 and beta_s[1] > beta_s[2] > 0


def test_pce_only_on_the_lagging_modality_and_only_into_its_encoder(tmp_path):
    tr = _trainer(tmp_path)
    ctx, method = tr.ctx, tr.method
    protos = method.compute_prototypes(ctx)
    assert not protos.requires_grad
    batch = first_batch(tr)
    out = method.training_step(ctx, batch)
    betas = [float(out.logs[f"pmr/beta_{m}"]) for m in ctx.modalities]  # logged as device tensors
    rhos = [float(out.logs[f"pmr/rho_{m}"]) for m in ctx.modalities]
    assert betas == [2.0 if r < 1 else 0.0 for r in rhos] and 0 < sum(b > 0 for b in betas) < 3
    # total − task loss = Σ β_m·PCE_m, recomputed by hand
    o = out.output
    pce = [F.cross_entropy(prototype_logits(o.pooled[m], protos[j]), batch["label"]) for j, m in enumerate(ctx.modalities)]
    extra = out.loss - ctx.task.loss(o.logits, batch["label"])
    assert torch.allclose(extra, sum(b * p for b, p in zip(betas, pce)), atol=1e-5)
    # gradient locality: PCE_m reaches encoder m only
    enc = ctx.raw_model.encoders
    for j, m in enumerate(ctx.modalities):
        ctx.raw_model.zero_grad(set_to_none=True)
        o = ctx.forward(batch)
        F.cross_entropy(prototype_logits(o.pooled[m], protos[j]), batch["label"]).backward()
        for k in ctx.modalities:
            has = any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in enc[k].parameters())
            assert has == (k == m)
        assert all(p.grad is None for p in ctx.raw_model.head.parameters())


def test_missing_class_keeps_previous_prototype(tmp_path):
    tr = _trainer(tmp_path)
    ctx, method = tr.ctx, tr.method
    first = method.compute_prototypes(ctx).clone()
    real = ctx.train_batches

    def without_class0(split="train", **kw):
        for b in real(split=split, **kw):
            keep = b["label"] != 0
            yield {k: v[keep] for k, v in b.items()}
    ctx.train_batches = without_class0
    ctx.epoch = 1
    second = method.compute_prototypes(ctx)
    assert torch.equal(second[:, 0], first[:, 0])
    assert not torch.equal(second[:, 1:], first[:, 1:])
    assert bool(torch.isfinite(second).all())


def test_momentum_mixes_with_previous(tmp_path):
    tr = _trainer(tmp_path, momentum=0.25)
    ctx, method = tr.ctx, tr.method
    first = method.compute_prototypes(ctx).clone()
    ctx.epoch = 1
    mixed = method.compute_prototypes(ctx).clone()
    method.hp.momentum, method.prototypes = 0.0, first.clone()
    fresh = method.compute_prototypes(ctx)
    assert torch.allclose(mixed, 0.75 * fresh + 0.25 * first, atol=1e-6)


def test_prototypes_never_see_validation_or_test(tmp_path):
    tr = _trainer(tmp_path)
    ctx, method = tr.ctx, tr.method
    clean = method.compute_prototypes(ctx).clone()
    method.prototypes = None
    for split in (ctx.data.val, ctx.data.test):
        split.labels[:] = torch.randint(0, 10, split.labels.shape)
        for x in split.inputs.values():
            x.normal_()
    assert torch.equal(method.compute_prototypes(ctx), clean)
    with pytest.raises(ValueError):
        next(ctx.train_batches(split="val"))


def test_regression_is_refused_with_reason(tmp_path):
    with pytest.raises(MethodNotApplicable, match="classification or segmentation"):
        build_trainer("pmr", "synthetic-regression", run_dir=tmp_path / "r", epochs=1, sets=FAST_SYNTH)


@pytest.mark.parametrize("method,sets", [
    ("pmr", {"dataset.n_modalities": 2}),
    ("pmr", {"dataset.n_modalities": 6}),
    ("pmr_paper", {"dataset.n_modalities": 3, "per_weight": 0.1, "per_epochs": 1}),
    ("pmr", {"dataset.n_modalities": 3, "dataset.feature": "sequence"}),
    ("pmr", {"dataset.n_modalities": 3, "dataset.task": "segmentation", "pixels_per_image": 64}),
])
def test_runs_on_synthetic_modalities_and_tasks(run_cli, method, sets):
    code, rd, result = run_cli(method, "synthetic", epochs=1, sets={**FAST_SYNTH, **sets})
    assert code == 0 and result["status"] == "ok"
    row = (rd / "metrics.jsonl").read_text().splitlines()[0]
    assert "pmr/beta_m0" in row


# ---------------------------------------------------------------- independent oracles (mutation-tested)
def test_scores_and_ratios_by_hand(tmp_path):
    """ρ_m from s_m = Σ_i softmax_k(−‖z̄_m,i − P_m[k]‖₂)[y_i] (true class, softmax over classes) and
    ρ_m = s_m / mean_{k≠m} s_k, written out here from the step's own pooled embeddings."""
    tr = _trainer(tmp_path)
    ctx, method = tr.ctx, tr.method
    protos = method.compute_prototypes(ctx).double()
    batch = first_batch(tr)
    out = method.training_step(ctx, batch)
    y = batch["label"]
    s = []
    for j, m in enumerate(ctx.modalities):
        z = out.output.pooled[m].detach().double()
        d = torch.cdist(z, protos[j, :, : z.shape[1]])
        p = torch.exp(-d - torch.logsumexp(-d, dim=1, keepdim=True))
        s.append(sum(float(p[i, int(y[i])]) for i in range(len(y))))
    for j, m in enumerate(ctx.modalities):
        rho = s[j] / (sum(s) - s[j]) * (len(s) - 1)
        assert float(out.logs[f"pmr/rho_{m}"]) == pytest.approx(rho, rel=1e-5)
    assert method.metrics() == {**{f"beta_{m}": float(out.logs[f"pmr/beta_{m}"]) for m in ctx.modalities},
                                **{f"rho_{m}": float(out.logs[f"pmr/rho_{m}"]) for m in ctx.modalities}}



def test_per_subtracts_the_entropy_of_the_leading_modalities_only(tmp_path):
    """pmr_paper PER (§2.1): loss = ℓ + Σ_m β_m·PCE_m − w·Σ_{m: ρ_m > 1} H_m, H_m the mean entropy of the
    prototype softmax, written out here; after ``per_epochs`` the PER term is gone."""
    tr = _trainer(tmp_path, method="pmr_paper", per_weight=0.3, per_epochs=1)
    ctx, method = tr.ctx, tr.method
    protos = method.compute_prototypes(ctx).double()
    batch = first_batch(tr)
    y = batch["label"]
    for epoch, on in ((0, True), (1, False)):
        ctx.epoch = epoch
        out = method.training_step(ctx, batch)
        o = out.output
        expected = float(ctx.task.loss(o.logits, y))
        rhos = [float(out.logs[f"pmr/rho_{m}"]) for m in ctx.modalities]
        assert 0 < sum(r > 1 for r in rhos) < len(rhos)
        for j, m in enumerate(ctx.modalities):
            z = o.pooled[m].detach().double()
            logp = torch.log_softmax(-torch.cdist(z, protos[j, :, : z.shape[1]]), dim=1)
            expected += float(out.logs[f"pmr/beta_{m}"]) * float(-logp.gather(1, y[:, None]).mean())
            if on and rhos[j] > 1:
                expected -= 0.3 * float(-(logp.exp() * logp).sum(1).mean())
        assert float(out.loss) == pytest.approx(expected, rel=1e-5, abs=1e-6), epoch

def test_prototype_subset_is_reshuffled_every_epoch(tmp_path):
    tr = _trainer(tmp_path)
    ctx, method = tr.ctx, tr.method
    method.compute_prototypes(ctx)
    subsets = []
    for epoch in (1, 2):
        ctx.epoch = epoch
        method.compute_prototypes(ctx)
        subsets.append(method.last_subset_idx.clone())
    assert len(subsets[0]) == len(subsets[1]) and not torch.equal(subsets[0], subsets[1])


def test_window_is_inclusive(tmp_path):
    tr = _trainer(tmp_path, start_epoch=1, end_epoch=2)
    ctx, method = tr.ctx, tr.method
    method.compute_prototypes(ctx)
    batch = first_batch(tr)
    for epoch, active in ((0, 0.0), (1, 1.0), (2, 1.0), (3, 0.0)):
        ctx.epoch = epoch
        assert method.training_step(ctx, batch).logs["pmr/active"] == active, epoch
