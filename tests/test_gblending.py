"""Behavioural tests of Gradient-Blending (docs/methods/gblending.md §8)."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import SMALL_MFEAT
from mmbalance.methods.gblending import blend_weights, estimation_epochs

from mmbalance.data import TensorSplit
from mmbalance.testing import build_trainer

TRAIN_FAST = {"train.max_steps_per_epoch": 2, "train.modality_eval": "none"}
FAST = {"first_super_epoch": 1, "super_epoch": 1, **TRAIN_FAST}
FAST_SYNTH = {"dataset.n_samples": 60, **FAST}


def _trainer(tmp_path, method="gblending", name="r", epochs=1, **sets):
    fast = FAST if method.startswith("gblending") else TRAIN_FAST
    return build_trainer(method, "mfeat", run_dir=tmp_path / name, epochs=epochs, sets={**SMALL_MFEAT, **fast, **sets})


def _rows(split: TensorSplit) -> set[tuple]:
    x = torch.cat([split.inputs[m] for m in sorted(split.inputs)], 1)
    return {tuple(r.tolist()) for r in x}


def test_weights_from_train_heldout_only(tmp_path):
    tr = _trainer(tmp_path)
    ctx, method = tr.ctx, tr.method
    held, train, rest = _rows(ctx.heldout), _rows(ctx.data.train), _rows(tr.train_split)
    assert held and held <= train and not held & rest  # V ⊂ TRAIN, excluded from the main loop's data
    assert not held & (_rows(ctx.data.val) | _rows(ctx.data.test))
    splits: list[str] = []
    real = ctx.train_batches

    def spy(split="train", **kw):
        splits.append(split)
        yield from real(split=split, **kw)
    ctx.train_batches = spy
    w = method.estimate(ctx, 1)
    assert set(splits) == {"train", "heldout"}
    assert bool((w > 0).all()) and abs(float(w.sum()) - 1) < 1e-9 and len(w) == len(ctx.modalities) + 1
    for split in (ctx.data.val, ctx.data.test):  # poisoned validation/test change nothing
        split.labels[:] = (split.labels + 3) % 10
        for x in split.inputs.values():
            x.normal_()
    method.history.clear()  # the sub-network shuffles are keyed by the estimate's number
    assert torch.equal(method.estimate(ctx, 1), w)


def test_formula_and_guard():
    w = blend_weights(torch.tensor([0.2, 0.05, 0.3]), torch.tensor([0.1, 0.05, 0.2]))
    assert torch.allclose(w, torch.tensor([0.42105, 0.42105, 0.15789], dtype=torch.float64), atol=1e-5)
    w = blend_weights(torch.tensor([-0.1, 0.2, 0.1]), torch.tensor([0.1, 0.1, 0.1]), 1e-3)
    assert abs(float(w[0]) - 1e-3) < 2e-6 and abs(float(w[1] / w[2]) - 2) < 1e-9
    assert abs(float(w.sum()) - 1) < 1e-12
    assert torch.allclose(blend_weights(torch.tensor([-0.1, 0.0, -2.0]), torch.ones(3)),
                          torch.full((3,), 1 / 3, dtype=torch.float64))
    w = blend_weights(torch.tensor([0.1, 0.1]), torch.tensor([0.0, 0.1]))  # O = 0: finite, dominant
    assert torch.isfinite(w).all() and float(w[0]) > 0.99


def test_losses_are_means_independent_of_batching(tmp_path):
    tr = _trainer(tmp_path)
    ctx, method = tr.ctx, tr.method
    net = method.subnetworks(ctx)[-1]
    ref_v, ref_t = method.measure(ctx, net, "heldout"), method.measure(ctx, net, "train")
    ctx.config.train["eval_batch_size"] = 3
    assert abs(method.measure(ctx, net, "heldout") - ref_v) < 1e-6
    assert abs(method.measure(ctx, net, "train") - ref_t) < 1e-6
    h = ctx.heldout
    ctx.heldout = TensorSplit({m: torch.cat([x, x]) for m, x in h.inputs.items()}, torch.cat([h.labels, h.labels]))
    assert abs(method.measure(ctx, net, "heldout") - ref_v) < 1e-6


def test_estimation_leaves_the_main_run_untouched(tmp_path):
    tr = _trainer(tmp_path, **{"model.dropout": 0.3})  # dropout: the sub-network trainings draw from the RNG
    ctx, method = tr.ctx, tr.method
    tr.fit()  # optimizer state exists after training
    before = (copy.deepcopy(ctx.raw_model.state_dict()), copy.deepcopy(ctx.modules["gb_heads"].state_dict()),
              copy.deepcopy(ctx.optimizer.state_dict()), torch.get_rng_state())
    method.estimate(ctx, 1)
    after = (ctx.raw_model.state_dict(), ctx.modules["gb_heads"].state_dict(), ctx.optimizer.state_dict(),
             torch.get_rng_state())
    for a, b in zip(before[:2], after[:2]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for k, st in before[2]["state"].items():
        assert all(torch.equal(v, after[2]["state"][k][n]) for n, v in st.items())
    assert torch.equal(before[3], after[3])


def test_subnetwork_semantics(tmp_path):
    tr = _trainer(tmp_path)
    ctx, method = tr.ctx, tr.method
    nets = method.subnetworks(ctx)
    batch = next(ctx.train_batches(split="train"))
    heads = ctx.modules["gb_heads"].heads
    for m, net in zip(ctx.modalities, nets[:-1]):
        n_expected = sum(p.numel() for p in ctx.raw_model.encoders[m].parameters()) + \
            sum(p.numel() for p in heads[m].parameters())
        assert sum(p.numel() for p in net.parameters()) == n_expected
        ctx.task.loss(net(batch), batch["label"]).backward()
        assert all(p.grad is not None for p in net.parameters())
        assert all(p.grad is None for p in ctx.raw_model.parameters())  # copies, not the main model
    fused = nets[-1]
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in ctx.raw_model.parameters())


def test_fused_only_weights_equal_the_baseline(tmp_path):
    fixed = _trainer(tmp_path, name="fixed", weights=[0, 0, 0, 1])
    assert fixed.ctx.heldout is None and len(fixed.train_split) == len(fixed.data.train)
    heads0 = copy.deepcopy(fixed.ctx.modules["gb_heads"].state_dict())
    fixed.fit()
    base = _trainer(tmp_path, "baseline", name="base")
    base.fit()
    a, b = fixed.ctx.raw_model.state_dict(), base.ctx.raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    heads1 = fixed.ctx.modules["gb_heads"].state_dict()
    assert all(torch.equal(heads0[k], heads1[k]) for k in heads0)  # no gradient ever reached them


def test_schedule():
    assert estimation_epochs(30, 10, 5) == [0, 10, 15, 20, 25]
    assert estimation_epochs(12, 10, 5) == [0, 10]
    assert estimation_epochs(30, 10, 5, "offline") == [0]


def test_schedule_in_training(tmp_path):
    tr = _trainer(tmp_path, epochs=4, first_super_epoch=2)
    calls = []
    real = tr.method.estimate

    def spy(ctx, n):
        calls.append((ctx.epoch, n))
        return real(ctx, n)
    tr.method.estimate = spy
    tr.fit()
    assert calls == [(0, 2), (2, 1), (3, 1)]
    assert len(tr.method.history) == 3


@pytest.mark.parametrize("method,sets", [
    ("gblending", {"dataset.n_modalities": 2}),
    ("gblending", {"dataset.n_modalities": 6}),
    ("gblending_offline", {"dataset.n_modalities": 3, "dataset.feature": "sequence", "dataset.seq_len": 4}),
    ("gblending", {"dataset.n_modalities": 3, "dataset.task": "regression"}),
    ("gblending", {"dataset.n_modalities": 3, "dataset.task": "segmentation", "dataset.n_samples": 30,
                   "dataset.image_size": 8, "measure": "accuracy"}),
])
def test_runs_on_synthetic_modalities_and_tasks(run_cli, method, sets):
    code, _, result = run_cli(method, "synthetic", epochs=1, sets={**FAST_SYNTH, **sets})
    assert code == 0 and result["status"] == "ok"
    w = [v for k, v in result["method_metrics"].items() if k.startswith("w_")]
    assert len(w) == sets["dataset.n_modalities"] + 1 and abs(sum(w) - 1) < 1e-9 and min(w) > 0


# ---------------------------------------------------------------- oracles (mutation-tested)
def test_subnetworks_train_on_train_minus_v_reshuffled_and_g_o_by_hand(tmp_path):
    """Sub-network trainings draw TRAIN∖V only, with a new shuffle key every epoch; G and O follow
    from the recorded held-out/T′ losses: G = L^V_N − L^V_{N+n}, O = (L^V_{N+n} − L^T_{N+n}) − (L^V_N − L^T_N)."""
    tr = _trainer(tmp_path)
    ctx, method = tr.ctx, tr.method
    draws: list[tuple] = []
    real = ctx.train_batches

    def spy(split="train", shuffle=False, key=0, **kw):
        if shuffle:
            draws.append((split, key))
        yield from real(split=split, shuffle=shuffle, key=key, **kw)
    ctx.train_batches = spy
    measured: list[float] = []
    real_measure = method.measure_samples
    modes: list[bool] = []

    def measure(c, net, split):
        h = net.register_forward_pre_hook(lambda mod, args: modes.append(mod.training))
        try:
            v = real_measure(c, net, split)
        finally:
            h.remove()
        measured.append(float(v.mean()))
        return v
    method.measure_samples = measure
    method.estimate(ctx, 2)
    assert modes and not any(modes)  # measured in eval mode
    assert draws and {s for s, _ in draws} == {"train"}
    n_nets = len(ctx.modalities) + 1
    keys = [k for _, k in draws]
    assert len(set(keys)) == 2 * n_nets  # one key per (sub-network, epoch)
    last = method.history[-1]
    for i in range(n_nets):
        lv0, lt0, lv1, lt1 = measured[4 * i: 4 * i + 4]
        assert last["G"][i] == pytest.approx(lv0 - lv1, abs=1e-12)
        assert last["O"][i] == pytest.approx((lv1 - lt1) - (lv0 - lt0), abs=1e-12)


def test_blended_loss_puts_each_weight_on_its_own_head(tmp_path):
    tr = _trainer(tmp_path)
    ctx, method = tr.ctx, tr.method
    method.weights = torch.tensor([0.6, 0.3, 0.1, 0.0], dtype=torch.float64)
    batch = next(iter(tr.loader_train))
    torch.manual_seed(0)
    out = method.training_step(ctx, batch)
    heads = ctx.modules["gb_heads"].heads
    with torch.no_grad():
        ref = sum(w * torch.nn.functional.cross_entropy(heads[m](out.output.features[m]), batch["label"])
                  for w, m in zip((0.6, 0.3, 0.1), ctx.modalities))
    assert float(out.loss) == pytest.approx(float(ref), rel=1e-5)
