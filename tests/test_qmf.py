"""Behavioural tests of QMF (docs/methods/qmf.md §8)."""
from __future__ import annotations

import pytest
import torch
from conftest import SMALL_MFEAT
from mmbalance.methods.qmf import energy_confidence, fuse, normalise_history, rank_loss

from mmbalance.testing import build_trainer, first_batch

FAST_SYNTH = {"dataset.n_samples": 40, "train.max_steps_per_epoch": 2, "train.modality_eval": "none"}


def _trainer(tmp_path, method="qmf", name="r", **sets):
    return build_trainer(method, "mfeat", run_dir=tmp_path / name, epochs=1, sets={**SMALL_MFEAT, **sets})


def _grads(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


@pytest.mark.parametrize("detach", [True, False])
def test_detach_w_blocks_the_fusion_gradient_through_the_confidence(tmp_path, detach):
    tr = _trainer(tmp_path, detach_w=detach)
    ctx, method = tr.ctx, tr.method
    batch = first_batch(tr)
    params = list(ctx.raw_model.parameters()) + list(ctx.modules["qmf_heads"].parameters())
    results = []
    for constant in (False, True):
        for p in params:
            p.grad = None
        _, logits = method._unimodal(ctx, batch)
        conf = method._confidences(ctx, logits)
        w = {m: c.clamp_min(0) for m, c in conf.items()}
        if constant:
            w = {m: c.detach().clone() for m, c in w.items()}
        ctx.task.loss(fuse(logits, w, detach), batch["label"]).backward()
        results.append(_grads(params))
    same = all(torch.equal(a, b) for a, b in zip(*results) if a is not None)
    assert same == detach


def test_history_accumulates_per_sample_losses(tmp_path):
    tr = _trainer(tmp_path)
    ctx, method = tr.ctx, tr.method
    batch = first_batch(tr)
    ce = None
    y = batch["label"]
    for _ in range(2):
        method.training_step(ctx, batch)
        with torch.no_grad():  # the oracle: −log softmax(o_m)[y] per sample, written out here
            out = ctx.forward(batch)
            heads = ctx.modules["qmf_heads"].heads
            ce = torch.stack([torch.stack([-torch.log_softmax(heads[m](out.features[m]).double()[i], 0)[int(y[i])]
                                           for i in range(len(y))]) for m in ctx.modalities], 1)
    idx = batch["idx"]
    assert torch.allclose(method.history[:, idx].t(), 2 * ce, atol=1e-6)
    others = torch.ones(method.history.shape[1], dtype=torch.bool)
    others[idx] = False
    assert float(method.history[:, others].abs().sum()) == 0.0


@pytest.mark.parametrize("order", ["before", "after"])
def test_history_order_in_the_rank_term(tmp_path, order):
    tr = _trainer(tmp_path, history_update=order, margin="crl", name=order)
    out = tr.method.training_step(tr.ctx, first_batch(tr))
    # "after": the first step ranks on an all-zero history → Ĥ = 0 → no pair is ordered → exactly 0;
    # "before": the same step's losses are already in H → ordered pairs with gap δ > 0
    assert (out.logs["qmf/rank_loss"] > 0) == (order == "before")


def test_rank_loss_hand_example():
    w, h = torch.tensor([0.5, 0.2]), torch.tensor([1.0, 0.0])
    assert float(rank_loss(w, h, "code")) == 0.0
    assert abs(float(rank_loss(w, h, "crl")) - 1.3) < 1e-6
    # higher past loss with higher confidence: a violation larger than δ is penalised (2 − 0.5)
    assert abs(float(rank_loss(torch.tensor([0.0, 2.0]), torch.tensor([0.0, 0.5]), "code")) - 1.5) < 1e-6
    assert torch.equal(normalise_history(torch.zeros(4)), torch.zeros(4))  # no NaN when max = min


def test_energy_confidence_is_stable_and_clamped():
    logits = torch.tensor([[1e4, 0.0, -1e4], [3.0, 1.0, 2.0], [-50.0, -60.0, -55.0]])
    ref = torch.logsumexp(logits.double(), 1) / 10
    w = energy_confidence(logits)
    assert torch.isfinite(w).all() and torch.allclose(w.double(), ref, rtol=1e-6)
    assert float(w[2]) < 0 and float(w.clamp_min(0)[2]) == 0.0


def test_weights_follow_energy_and_change_the_fused_prediction():
    logits = {"a": torch.tensor([[30.0, 27.0]]), "b": torch.tensor([[0.0, 5.0]])}
    w = {m: energy_confidence(o).clamp_min(0) for m, o in logits.items()}
    assert float(w["a"]) > float(w["b"])  # the peaked, high-energy modality is more confident
    fused = fuse(logits, w, detach=True)
    assert int(fused.argmax()) == 0
    assert int((logits["a"] + logits["b"]).argmax()) == 1  # plain late fusion would say class 1
    # a negative confidence (clamp_w=false) would invert a modality's vote; clamped it abstains
    neg = {"a": torch.tensor([[-40.0, -45.0]])}
    assert float(energy_confidence(neg["a"])) < 0
    assert torch.equal(fuse(neg, {"a": energy_confidence(neg["a"]).clamp_min(0)}, True), torch.zeros(1, 2))


def test_prediction_uses_the_training_confidences(tmp_path):
    tr = _trainer(tmp_path)
    ctx, method = tr.ctx, tr.method
    assert not list(ctx.raw_model.fusion.parameters()) and not list(ctx.raw_model.head.parameters())
    opt_params = {id(p) for g in ctx.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in opt_params for p in ctx.modules["qmf_heads"].parameters())
    batch = first_batch(tr)
    ctx.model.eval()
    pred = method.predict(ctx, batch)
    with torch.no_grad():
        _, logits = method._unimodal(ctx, batch)
        ref = sum(energy_confidence(o).clamp_min(0)[:, None] * o for o in logits.values())
    assert torch.allclose(pred, ref, atol=1e-6)
    m0 = ctx.modalities[0]
    alone = method.predict(ctx, batch, absent=tuple(ctx.modalities[1:]))
    with torch.no_grad():
        _, lo = method._unimodal(ctx, batch, tuple(ctx.modalities[1:]))
    assert torch.equal(alone.argmax(1), lo[m0].argmax(1))


@pytest.mark.parametrize("method,sets", [
    ("qmf", {"dataset.n_modalities": 2}),
    ("qmf", {"dataset.n_modalities": 6}),
    ("qmf_rgbd", {"dataset.n_modalities": 3, "dataset.feature": "sequence"}),
    ("qmf", {"dataset.n_modalities": 3, "dataset.task": "regression"}),
    ("qmf", {"dataset.n_modalities": 3, "dataset.task": "segmentation"}),
])
def test_runs_on_synthetic_modalities_and_tasks(run_cli, method, sets):
    code, _, result = run_cli(method, "synthetic", epochs=1, sets={**FAST_SYNTH, **sets})
    assert code == 0 and result["status"] == "ok"


def test_history_persists_across_epochs_and_resume(tmp_path):
    import io

    from mmbalance.methods.qmf import QMF, QMFHParams

    tr = _trainer(tmp_path)
    ctx, method = tr.ctx, tr.method
    method.training_step(ctx, first_batch(tr))
    h = method.history.clone()
    assert float(h.abs().sum()) > 0
    method.on_epoch_start(ctx)
    ctx.epoch = 1
    assert torch.equal(method.history, h)
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    fresh = QMF(QMFHParams())
    fresh.history = torch.zeros_like(h)
    fresh.load_state_dict(torch.load(buf, weights_only=False))
    assert torch.equal(fresh.history, h)


def test_rank_term_by_hand_with_whole_history_normalisation(tmp_path):
    """L_rank from a planted history (normalised over the WHOLE array, not the batch), energy
    confidences LSE(o_m)/10 and circular pairs (i, i+1), all written out here."""
    tr = _trainer(tmp_path, history_update="after")
    ctx, method = tr.ctx, tr.method
    batch = first_batch(tr)
    idx = batch["idx"].long()
    g = torch.Generator().manual_seed(3)
    hist = torch.rand(method.history.shape, generator=g, dtype=torch.float64) * 0.2 + 0.4
    hist[:, 0], hist[:, -1] = 0.0, 1.0  # global min/max outside the batch's range
    method.history = hist.clone()
    with torch.no_grad():
        out = ctx.forward(batch)
        heads = ctx.modules["qmf_heads"].heads
        expected = 0.0
        for k, m in enumerate(ctx.modalities):
            o = heads[m](out.features[m]).double()
            w = torch.log(torch.exp(o - o.max(1, keepdim=True).values).sum(1)) + o.max(1).values
            w = w / 10
            hk = hist[k]
            hn = ((hk - hk.min()) / (hk.max() - hk.min() + 1e-8))[idx]
            terms = []
            for i in range(len(idx)):
                j = (i + 1) % len(idx)
                t = float(torch.sign(hn[i] - hn[j]))
                terms.append(max(0.0, t * float(w[i] - w[j]) - float(abs(hn[i] - hn[j]))))
            expected += sum(terms) / len(terms)
    res = method.training_step(ctx, batch)
    assert expected > 0
    assert res.logs["qmf/rank_loss"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
