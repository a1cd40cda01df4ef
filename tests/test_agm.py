"""Behavioural tests of AGM (docs/methods/agm.md §8)."""
from __future__ import annotations

import itertools
import math

import mmbalance.methods.agm as agm_mod
import pytest
import torch
from conftest import SMALL_MFEAT
from mmbalance.methods.agm import (
    AGM,
    AGMHParams,
    agm_coefficients,
    mono_responses,
    per_modality_accuracy,
    permutation_coefficients,
    shapley_coefficients,
)
from torch import nn

from mmbalance.models.base import MultimodalModel
from mmbalance.models.encoders import MLPEncoder
from mmbalance.models.fusion import ConcatFusion
from mmbalance.models.heads import MLPHead
from mmbalance.tasks import ClassificationTask

FAST = {"train.modality_eval": "none"}


class FakeCtx:
    """The parts of StepContext AGM uses, around a plain (unwrapped) model on one process."""

    def __init__(self, model: nn.Module) -> None:
        self.model = self.raw_model = model
        self.task = ClassificationTask(4)
        self.epoch = 0
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, batch, absent=()):
        return self.model({m: batch[m] for m in self.model.modalities}, absent=tuple(absent))

    def reduce_sum(self, x):
        return torch.as_tensor(x, dtype=torch.float64).clone()


def toy_model(M: int = 2) -> MultimodalModel:
    """MLP encoders (BatchNorm in the first), concat fusion, MLP head with dropout 0.5 (agm.md §8)."""
    torch.manual_seed(0)
    names = [f"m{i}" for i in range(M)]
    encs = {m: MLPEncoder(6, 8, 5) for m in names}
    encs[names[0]] = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU())
    fusion = ConcatFusion({m: 5 for m in names})
    return MultimodalModel(encs, fusion, MLPHead(5 * M, 16, 4, dropout=0.5), feature_kinds={m: "vector" for m in names},
                           feature_dims={m: 5 for m in names}, out_dim=4)


def toy_batch(M: int = 2, B: int = 16) -> dict:
    g = torch.Generator().manual_seed(1)
    batch = {f"m{i}": torch.randn(B, 6, generator=g) for i in range(M)}
    batch["label"] = torch.randint(0, 4, (B,), generator=g)
    return batch


def method_for(model, **hp) -> tuple[AGM, FakeCtx]:
    m = AGM(AGMHParams(**hp))
    ctx = FakeCtx(model)
    m.setup(ctx)
    return m, ctx


# ---------------------------------------------------------------- 8.1 decomposition
@pytest.mark.parametrize("M", [2, 3, 4, 5])
def test_mono_responses_sum_to_full_output(M):
    full = (1 << M) - 1
    passes = {S: torch.randn(7, 4) for S in range(1, full + 1)}
    for coef in (shapley_coefficients(M), permutation_coefficients(M, 3, torch.Generator().manual_seed(0))):
        mono = mono_responses(passes, coef, M)
        assert torch.allclose(sum(mono), passes[full], atol=1e-5)


def test_three_modality_weights_match_official_form():
    c = shapley_coefficients(3)  # bits: t=1, a=2, v=4
    t = {S: float(v[0]) for S, v in c.items() if float(v[0]) != 0}
    expected = {7: 1 / 3, 6: -1 / 3, 3: 1 / 6, 2: -1 / 6, 5: 1 / 6, 4: -1 / 6, 1: 1 / 3}
    assert t == pytest.approx(expected)
    c2 = shapley_coefficients(2)
    assert {S: float(v[0]) for S, v in c2.items()} == pytest.approx({3: 0.5, 2: -0.5, 1: 0.5})


def test_shapley_efficiency_on_a_tiny_model():
    """φ_m (with the real empty pass) sums to f(N) − f(∅) and equals the average marginal
    contribution over all M! orders."""
    M = 3
    model = toy_model(M).eval()
    batch = toy_batch(M)
    names = model.modalities
    with torch.no_grad():
        f = {S: model({m: batch[m] for m in names}, absent=tuple(m for i, m in enumerate(names) if not S >> i & 1)).logits
             for S in range(0, 1 << M)}
    mono = mono_responses(f, shapley_coefficients(M), M)
    phi = [mm - f[0] / M for mm in mono]
    assert torch.allclose(sum(phi), f[7] - f[0], atol=1e-5)
    for i in range(M):
        brute = torch.zeros_like(f[0])
        for order in itertools.permutations(range(M)):
            prefix = 0
            for j in order:
                if j == i:
                    brute += (f[prefix | 1 << j] - f[prefix]) / math.factorial(M)
                prefix |= 1 << j
        assert torch.allclose(phi[i], brute, atol=1e-5)


# ---------------------------------------------------------------- 8.2 neutral κ
def test_neutral_kappa_equals_plain_backward():
    model = toy_model(2)
    batch = toy_batch(2)
    method, ctx = method_for(model, alpha=0.0, cond_clip=None)
    torch.manual_seed(5)
    method.training_step(ctx, batch).loss.backward()
    assert torch.equal(method.kappa, torch.ones(2, dtype=torch.float64))
    g_agm = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.manual_seed(5)  # same dropout mask
    ctx.task.loss(ctx.forward(batch).logits, batch["label"]).backward()
    for a, b in zip(g_agm, [p.grad for p in model.parameters()]):
        assert torch.allclose(a, b, atol=1e-5)


# ---------------------------------------------------------------- 8.3 routing
def test_gradient_routing_kappa_2_1(monkeypatch):
    model = toy_model(2)
    batch = toy_batch(2)
    method, ctx = method_for(model, cond_clip=None)
    monkeypatch.setattr(agm_mod, "agm_coefficients",
                        lambda *a, **k: (torch.ones(2), torch.ones(2), torch.tensor([2.0, 1.0], dtype=torch.float64)))
    state = {k: v.clone() for k, v in model.state_dict().items()}  # BatchNorm running statistics
    torch.manual_seed(5)
    method.training_step(ctx, batch).loss.backward()
    g_agm = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.load_state_dict(state)
    # reference: each pass separately, with g = ∂L/∂out
    torch.manual_seed(5)
    full = ctx.forward(batch).logits
    model.eval()
    fa, fv = ctx.forward(batch, ("m1",)).logits, ctx.forward(batch, ("m0",)).logits
    model.train()
    out = full.detach().requires_grad_(True)
    g = torch.autograd.grad(ctx.task.loss(out, batch["label"]), out)[0]
    ((full * 1.5 * g).sum() + (fa * 0.5 * g).sum() - (fv * 0.5 * g).sum()).backward()
    for a, p in zip(g_agm, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5)


# ---------------------------------------------------------------- 8.4–8.6 coefficients, cap, running mean
def test_coefficient_values_and_direction():
    r, rb, k = agm_coefficients(torch.tensor([0.5, 1.0]), torch.tensor([0.7, 0.9]), 1.0, 10.0)
    assert r.tolist() == pytest.approx([1.64872, 0.60653], abs=1e-5)
    assert rb.tolist() == pytest.approx([1.22140, 0.81873], abs=1e-5)
    assert k.tolist() == pytest.approx([0.65226, 1.23640], abs=1e-5)
    # a modality ahead of its history (loss dropped) is damped, one behind it is boosted
    _, _, k = agm_coefficients(torch.tensor([0.4, 1.2]), torch.tensor([0.8, 0.8]), 1.0, 10.0)
    assert k[0] < 1 < k[1]


def test_exponent_cap():
    _, rb, k = agm_coefficients(torch.tensor([10.0, 0.0]), torch.tensor([0.0, 10.0]), 0.5, 10.0)
    assert float(rb[0]) - math.exp(-10) > 10
    assert float(k[0]) == pytest.approx(math.exp(0.5 * 10))


def test_running_mean_and_first_step():
    model = toy_model(2)
    method, ctx = method_for(model)
    scores = []
    for step in range(4):
        out = method.training_step(ctx, toy_batch(2, B=16 + step))
        scores.append([out.logs["agm/s_m0"], out.logs["agm/s_m1"]])
        if step == 0:
            assert out.logs["agm/rbar_m0"] == 1.0 and out.logs["agm/rbar_m1"] == 1.0
    assert method.t == 4
    assert method.s_bar.tolist() == pytest.approx(torch.tensor(scores, dtype=torch.float64).mean(0).tolist(), rel=1e-9)


# ---------------------------------------------------------------- 8.7 per-modality accuracy, 8.8 coalition passes
def test_per_modality_accuracy_is_not_swapped():
    y = torch.tensor([0, 1, 2, 3])
    right = torch.nn.functional.one_hot(y, 4).float()
    wrong = torch.nn.functional.one_hot((y + 1) % 4, 4).float()
    assert per_modality_accuracy({"audio": right, "visual": wrong}, y) == {"audio": 1.0, "visual": 0.0}


def test_coalition_passes_eval_mode_and_differentiable():
    model = toy_model(3)
    method, ctx = method_for(model)
    batch = toy_batch(3)
    model.train()
    masks = [1, 2, 3, 4, 5, 6]
    p1 = method.coalition_passes(ctx, batch, masks, None)
    p2 = method.coalition_passes(ctx, batch, masks, None)
    assert model.training
    for S in masks:
        assert p1[S].requires_grad and torch.equal(p1[S], p2[S])
    a, b = ctx.forward(batch, ("m1",)).logits, ctx.forward(batch, ("m1",)).logits
    assert not torch.equal(a, b)  # dropout active in training mode


def test_conditional_clip(tmp_path):
    from mmbalance.testing import build_trainer, first_batch

    t = build_trainer("agm", "mfeat", run_dir=tmp_path, sets={**SMALL_MFEAT, **FAST, "cond_clip": 1e-4})
    ctx = t.ctx
    t.method.training_step(ctx, first_batch(t)).loss.backward()
    t.method.after_backward(ctx)
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ctx.raw_model.parameters() if p.grad is not None))
    assert float(norm) == pytest.approx(1e-4, rel=1e-3)


# ---------------------------------------------------------------- runs, refusals
SYN = {"dataset.n_samples": 40, **FAST}


@pytest.mark.parametrize("dataset,sets", [
    ("synthetic", {"dataset.n_modalities": 2}),
    ("synthetic", {"dataset.n_modalities": 3, "absent": "feature_mean", "avg": "ema"}),
    ("synthetic", {"dataset.n_modalities": 6}),
    ("synthetic", {"dataset.n_modalities": 6, "shapley": "permutations", "num_permutations": 2}),
    ("synthetic", {"dataset.n_modalities": 3, "dataset.task": "regression"}),
    ("synthetic", {"dataset.n_modalities": 3, "dataset.task": "segmentation", "dataset.n_samples": 30}),
    ("mfeat", {**SMALL_MFEAT, "model.name": "mlp_transformer_fusion", "train.max_steps_per_epoch": 1}),
])
def test_runs(run_cli, dataset, sets):
    base = SYN if dataset == "synthetic" else FAST
    code, rd, res = run_cli("agm", dataset, epochs=1, sets={**base, **sets})
    assert code == 0 and res["status"] == "ok"
    kappas = [v for k, v in res["method_metrics"].items() if k.startswith("kappa_")]
    assert len(kappas) == len(res["modalities"]) and all(math.isfinite(v) and v > 0 for v in kappas)


def test_bf16_autocast_run(run_cli):
    code, _, res = run_cli("agm", "mfeat", epochs=1, sets={**SMALL_MFEAT, **FAST, "train.mixed_precision": "bf16"})
    assert code == 0 and res["status"] == "ok"


def test_refuses_one_modality(run_cli, capsys):
    code, _, _ = run_cli("agm", "synthetic", epochs=1, sets={**SYN, "dataset.n_modalities": 1})
    assert code == 2 and "at least 2 modalities" in capsys.readouterr().err


def test_scores_are_sum_reduced_before_dividing(monkeypatch):
    model = toy_model(2)
    method, ctx = method_for(model)
    calls = []
    monkeypatch.setattr(ctx, "reduce_sum", lambda x: calls.append(torch.as_tensor(x).clone()) or
                        torch.as_tensor(x, dtype=torch.float64).clone())
    out = method.training_step(ctx, toy_batch(2, B=16))
    assert len(calls) == 1 and calls[0].shape == (3,) and float(calls[0][-1]) == 16  # two CE sums + count
    assert out.logs["agm/s_m0"] == pytest.approx(float(calls[0][0]) / 16)


# ---------------------------------------------------------------- independent oracles, state (mutation-tested)
def test_scores_are_true_class_cross_entropy_of_hand_built_responses():
    """s_m = mean_i −log softmax(m_m,i)[y_i] with m_a = ½(f(av) − f(v) + f(a)), m_v = ½(f(av) − f(a) + f(v))
    built here from separate passes (train-mode full pass, eval-mode coalitions)."""
    model = toy_model(2)
    batch = toy_batch(2)
    method, ctx = method_for(model, cond_clip=None)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    out = method.training_step(ctx, batch)
    model.load_state_dict(state)
    torch.manual_seed(5)
    with torch.no_grad():
        full = ctx.forward(batch).logits
        model.eval()
        fa, fv = ctx.forward(batch, ("m1",)).logits, ctx.forward(batch, ("m0",)).logits
        model.train()
    y = batch["label"]
    for name, mono in (("m0", 0.5 * (full - fv + fa)), ("m1", 0.5 * (full - fa + fv))):
        logp = torch.log_softmax(mono.double(), dim=1)
        s = -sum(float(logp[i, int(y[i])]) for i in range(len(y))) / len(y)
        assert out.logs[f"agm/s_{name}"] == pytest.approx(s, rel=1e-5)


class OwnForward(MultimodalModel):
    """A model with its own ``forward`` (off the base contract): AGM runs its coalitions on stacked inputs."""

    def forward(self, inputs, absent=(), only=None):
        return super().forward(inputs, absent, only)


def _eval_passes(model, ctx, batch, full, mean):
    """f(a-only), f(v-only) in eval mode by hand: the model's own forward with the other modality on zeros."""
    model.eval()
    try:
        return ctx.forward(batch, ("m1",)).logits, ctx.forward(batch, ("m0",)).logits
    finally:
        model.train()


def _feature_mean_passes(model, ctx, batch, full, mean):
    """``absent=feature_mean``: eval-mode fusion and head on the full pass's (train-mode) features, the
    absent modality's replaced by the running mean of the earlier batches (``mean``, hand values)."""
    mean = {m: v.float().expand_as(full.features[m]) for m, v in mean.items()}
    model.eval()
    try:
        return (model.fuse_and_head({"m0": full.features["m0"], "m1": mean["m1"]})[1],
                model.fuse_and_head({"m0": mean["m0"], "m1": full.features["m1"]})[1])
    finally:
        model.train()


def _train_passes(model, ctx, batch, full, mean):
    """``coalition_mode=train``: the passes one by one in train mode, in mask order (a-only, then v-only),
    drawing their dropout masks after the full pass's."""
    return ctx.forward(batch, ("m1",)).logits, ctx.forward(batch, ("m0",)).logits


@pytest.mark.parametrize("case", ["own_forward", "feature_mean", "train_mode"])
def test_coalition_passes_run_in_the_documented_mode_on_every_path(case):
    """The coalition passes f(S) run in eval mode (official default) — also off the batched fast path: a
    model with its own forward (stacked inputs) and ``absent=feature_mean`` once a mean exists — and in
    train mode with ``coalition_mode=train``. The model has batch norm and dropout (p = 0.5), so a pass in
    the wrong mode changes f(S). Oracle: s_m of m_a = ½(f(av) − f(v) + f(a)), m_v = ½(f(av) − f(a) + f(v))
    with each pass built here in its documented mode (full pass in train mode under the same seed)."""
    model = toy_model(2)
    if case == "own_forward":
        model.__class__ = OwnForward
    hp = {"own_forward": {}, "feature_mean": {"absent": "feature_mean"}, "train_mode": {"coalition_mode": "train"}}
    method, ctx = method_for(model, cond_clip=None, **hp[case])
    mean = {}
    if case == "feature_mean":  # a running mean from "earlier batches", distinct per modality
        g = torch.Generator().manual_seed(7)
        mean = {m: torch.randn(5, generator=g, dtype=torch.float64) for m in ("m0", "m1")}
        method.feat_sum, method.feat_count = {m: 4.0 * v for m, v in mean.items()}, 4.0
    batch = toy_batch(2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    torch.manual_seed(5)
    out = method.training_step(ctx, batch)
    assert model.training and all(sub.training for sub in model.modules())  # train mode restored
    model.load_state_dict(state)
    torch.manual_seed(5)
    with torch.no_grad():
        full = ctx.forward(batch)
        fa, fv = {"own_forward": _eval_passes, "feature_mean": _feature_mean_passes,
                  "train_mode": _train_passes}[case](model, ctx, batch, full, mean)
        eval_a, _ = _eval_passes(model, ctx, batch, full, mean)
    if case == "train_mode":  # power: dropout and batch statistics change the pass
        assert not torch.allclose(fa, eval_a)
    y = batch["label"]
    for name, mono in (("m0", 0.5 * (full.logits - fv + fa)), ("m1", 0.5 * (full.logits - fa + fv))):
        logp = torch.log_softmax(mono.double(), dim=1)
        s = -sum(float(logp[i, int(y[i])]) for i in range(len(y))) / len(y)
        assert float(out.logs[f"agm/s_{name}"]) == pytest.approx(s, rel=1e-5), (case, name)


def test_running_mean_persists_across_epochs_and_resume():
    """S̄ is the mean over every previous step of the run: an epoch boundary (on_epoch_start) and a
    checkpoint round trip (state_dict → fresh method → load_state_dict) change nothing."""
    import io

    model = toy_model(2)
    method, ctx = method_for(model)
    scores = []
    for step in range(3):
        out = method.training_step(ctx, toy_batch(2, B=16 + step))
        scores.append([out.logs["agm/s_m0"], out.logs["agm/s_m1"]])
    method.on_epoch_start(ctx)
    ctx.epoch = 1
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    resumed = AGM(AGMHParams())
    resumed.setup(ctx)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    resumed.on_epoch_start(ctx)
    prev = torch.tensor(scores, dtype=torch.float64).mean(0)
    for meth in (method, resumed):
        assert meth.t == 3 and meth.s_bar.tolist() == pytest.approx(prev.tolist(), rel=1e-12)
    out = resumed.training_step(ctx, toy_batch(2, B=20))
    f = 2.0  # M/(M−1)
    rbar0 = math.exp(f * (float(prev.mean()) - float(prev[0])))
    assert out.logs["agm/rbar_m0"] == pytest.approx(rbar0, rel=1e-9)


def test_window_is_inclusive():
    model = toy_model(2)
    method, ctx = method_for(model, start_epoch=1, end_epoch=2, alpha=2.0)
    for epoch, active in ((0, False), (1, True), (2, True), (3, False)):
        ctx.epoch = epoch
        method.training_step(ctx, toy_batch(2, B=16 + epoch))
        assert bool((method.kappa != 1).any()) == active, epoch
