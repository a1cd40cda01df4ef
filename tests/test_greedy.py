"""Greedy and the MMTM model variant (docs/methods/greedy.md §8)."""
from __future__ import annotations

import math

import pytest
import torch

from mmbalance.errors import MethodNotApplicable
from mmbalance.registry import create_model
from mmbalance.testing import build_trainer, first_batch
from tests.conftest import SMALL_MFEAT


def _mmtm(m=("a", "b"), dims=(6, 5)):
    return create_model("mlp_mmtm", modalities=list(m), input_shapes={k: (d,) for k, d in zip(m, dims)}, out_dim=3,
                        enc_hidden=8, enc_out=4)


def test_gates_replaced_by_running_average_exactly_on_scheduled_steps(tmp_path):
    """§2.3 schedule (ε < 0 forces a decision after every normal step from epoch 0, Q = 2) and §8 test 3."""
    tr = build_trainer("greedy", "mfeat", run_dir=tmp_path / "g", epochs=1,
                       sets={**SMALL_MFEAT, "epsilon": -1.0, "start_epoch": 0, "window": 2, "train.batch_size": 16,
                             "train.modality_eval": "none", "train.diagnostics": "none"})  # count Greedy's forwards only
    block = tr.ctx.raw_model.mmtm_blocks[0]
    seen, batch_means = [], []

    def pre(mod, args):
        if mod.training:
            seen.append((mod.caring, [mod.gate_avg(k).clone() for k in range(3)], [f.detach() for f in args[0]]))

    def post(mod, args, out):
        if mod.training:
            batch_means.append([s / mod.last_count for s in mod.last_gate_sum])
            caring, avgs, ins = seen[-1]
            if caring is not None:  # the caring branch's output is its input times ḡ (before this step's update)
                torch.testing.assert_close(out[caring], ins[caring] * avgs[caring], rtol=0, atol=0)

    block.register_forward_pre_hook(pre)
    block.register_forward_hook(post)
    tr.fit()
    modes = [c for c, _, _ in seen]
    assert len(modes) == 9
    pattern = [None if i % 3 == 0 else "care" for i in range(9)]
    assert [None if c is None else "care" for c in modes] == pattern
    assert tr.method.state.rebalance_steps == 6
    for k in range(3):  # cumulative mean of this branch's own batch-mean gates; evaluation left it alone
        want = torch.stack([bm[k] for bm in batch_means]).mean(0)
        torch.testing.assert_close(block.gate_avg(k), want.to(block.gate_avg(k).dtype))


def test_curation_gradient_is_zero_for_caring_excitation_only():
    """§8 test 2."""
    torch.manual_seed(0)
    model = _mmtm()
    model.train()
    x = {"a": torch.randn(8, 6), "b": torch.randn(8, 5)}
    model(x)  # some training forward so that ḡ is not all zeros is irrelevant here
    model.set_rebalance(0)
    out = model(x)
    out.fused.pow(2).sum().backward()
    for block in model.mmtm_blocks:
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in block.excite[0].parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.excite[1].parameters())
        assert block.squeeze.weight.grad is not None and block.squeeze.weight.grad.abs().sum() > 0


def test_speed_ratio_and_shared_squeeze_in_every_bypass_group():
    """§8 test 4."""
    from mmbalance.methods.greedy import group_ratio

    p1, p2 = torch.nn.Parameter(torch.tensor([3.0, 4.0])), torch.nn.Parameter(torch.tensor([1.0]))
    p1.grad, p2.grad = torch.tensor([1.0, 1.0]), torch.tensor([2.0])
    assert group_ratio([p1, p2]) == pytest.approx((1 + 1 + 4) / (9 + 16 + 1))
    groups = _mmtm().greedy_groups()
    model = _mmtm()
    groups = model.greedy_groups()
    shared = {id(p) for b in model.mmtm_blocks for p in b.squeeze.parameters()}
    for m in ("a", "b"):
        assert shared <= {id(p) for p in groups[f"bypass_{m}"]}
        assert not shared & {id(p) for p in groups[f"main_{m}"]}


def test_trigger_window_and_start_epoch():
    """§8 tests 5 and 6."""
    from mmbalance.methods.greedy import Greedy, GreedyHParams, caring_branch

    class Ctx:
        epoch = 2

    g = Greedy(GreedyHParams())
    g._mods = ["a", "b"]
    zero = {"bypass_a": 0.0, "main_a": 0.0, "bypass_b": 0.0, "main_b": 0.0}
    g.state.acc = {"bypass_a": 0.1, "main_a": 1.0, "bypass_b": 10 ** -1.2, "main_b": 1.0}  # s = (−1.0, −1.2)
    g.observe(dict(zero, main_a=0.0), epoch=0)  # before start_epoch: A accumulates, no re-balancing
    assert g.state.caring is None and g.state.normal_steps == 1
    g.observe({"bypass_a": 0.0, "main_a": 0.0, "bypass_b": 0.0, "main_b": 0.0}, epoch=2)
    assert g.state.caring == 0 and g.state.remaining == 5
    acc = dict(g.state.acc)
    for i in range(5):
        g._rebalanced_this_step = True
        g.after_backward(Ctx())
        assert g.state.acc == acc
        assert (g.state.caring is None) == (i == 4)
    g2 = Greedy(GreedyHParams())
    g2._mods = ["a", "b"]
    g2.state.acc = {"bypass_a": 1.0, "main_a": 1.0, "bypass_b": 1.0, "main_b": 1.0}
    g2.observe({"bypass_a": 0.5, "main_a": 0.5, "bypass_b": 0.5, "main_b": 0.5}, epoch=0)
    assert g2.state.acc["main_a"] == 1.5 and g2.state.caring is None
    assert caring_branch([-1.0, -1.5, -1.1], 0.01) == 0
    assert caring_branch([-1.0, -1.0, -1.0], 0.01) is None
    assert caring_branch([-1.0, -1.2], math.inf) is None


def test_loss_is_sum_and_prediction_is_mean_of_branches(tmp_path):
    """§8 test 7."""
    tr = build_trainer("greedy", "mfeat", run_dir=tmp_path / "g", epochs=1, sets=SMALL_MFEAT)
    ctx = tr.ctx
    batch = first_batch(tr)
    model = ctx.raw_model
    torch.manual_seed(5)
    out = tr.method.training_step(ctx, batch)
    branch = {m: model.heads[m](out.output.features[m]) for m in ctx.modalities}
    want = sum(ctx.task.loss(branch[m], batch["label"]) for m in ctx.modalities)
    torch.testing.assert_close(out.loss, want)
    ctx.model.eval()
    pred = tr.method.predict(ctx, batch)
    full = model(ctx.inputs(batch))
    torch.testing.assert_close(pred, full.fused.mean(1))
    assert full.fused.shape[1] == 3


def test_canonical_model_is_not_applicable(tmp_path):
    """§8 test 8."""
    with pytest.raises(MethodNotApplicable, match="no MMTM blocks"):
        build_trainer("greedy", "mfeat", run_dir=tmp_path / "g", epochs=1, sets={**SMALL_MFEAT, "model.name": "mlp_concat"})


@pytest.mark.parametrize("method,dataset,sets", [
    ("greedy_vanilla", "mfeat", SMALL_MFEAT),
    ("greedy_random", "synthetic-regression", {"dataset.n_samples": 60, "start_epoch": 0}),
    ("greedy", "synthetic", {"dataset.n_samples": 60, "dataset.feature": "sequence", "start_epoch": 0}),
    ("greedy", "synthetic-seg", {"dataset.n_samples": 30, "dataset.image_size": 8, "start_epoch": 0}),
])
def test_smoke_variants_and_encoders(run_cli, method, dataset, sets):
    code, _, res = run_cli(method, dataset, epochs=2, sets={**sets, "train.modality_eval": "none"})
    assert code == 0 and res["status"] == "ok"
    if method == "greedy_vanilla":
        assert res["method_metrics"]["rebalance_steps"] == 0


def test_prediction_gates_normally_even_mid_rebalancing(tmp_path):
    tr = build_trainer("greedy", "mfeat", run_dir=tmp_path / "g", epochs=1, sets=SMALL_MFEAT)
    ctx, model = tr.ctx, tr.ctx.raw_model
    batch = first_batch(tr)
    ctx.model.eval()
    with torch.no_grad():
        model.set_rebalance(None)
        normal = model(ctx.inputs(batch)).logits
        model.set_rebalance(0)  # the training state machine is in a re-balancing window
        cared = model(ctx.inputs(batch)).logits
        assert not torch.allclose(normal, cared)
        tr.method.state.caring = 0
        torch.testing.assert_close(tr.method.predict(ctx, batch), normal)


def test_state_round_trip_keeps_accumulated_speeds():
    import io

    from mmbalance.methods.greedy import Greedy, GreedyHParams

    g = Greedy(GreedyHParams())
    g._mods = ["a", "b"]
    g.observe({"bypass_a": 0.2, "main_a": 1.0, "bypass_b": 0.1, "main_b": 2.0}, epoch=0)
    buf = io.BytesIO()
    torch.save(g.state_dict(), buf)
    buf.seek(0)
    h = Greedy(GreedyHParams())
    h._mods = ["a", "b"]
    h.load_state_dict(torch.load(buf, weights_only=False))
    assert h.state.acc == {"bypass_a": 0.2, "main_a": 1.0, "bypass_b": 0.1, "main_b": 2.0}
    assert h.metrics()["speed_a"] == pytest.approx(math.log10(0.2)) and h.state.normal_steps == 1


# ---------------------------------------------------------------- MMTM variants of the paper datasets' models
def _open_gates(model):
    """Every MMTM gate exactly 1 (σ(1e4) == 1 in float32): the branches then compute what the canonical
    encoders compute."""
    with torch.no_grad():
        for block in model.mmtm_blocks:
            for ex in block.excite:
                ex.weight.zero_()
                ex.bias.fill_(1e4)


def _copy_in_order(src, dst):
    """Copy src's state into dst entry by entry (same order and shapes: the MMTM branch holds the
    canonical encoder's modules, only regrouped into stages)."""
    a, b = src.state_dict(), dst.state_dict()
    assert [v.shape for v in a.values()] == [v.shape for v in b.values()]
    dst.load_state_dict(dict(zip(b, a.values())))


def _call_order(model, stage_names):
    order = []
    for m in model.modalities[:1]:
        for s, stage in enumerate(model.encoders[m]):
            stage.register_forward_hook(lambda *_a, s=s: order.append(stage_names[s]))
    for b in model.mmtm_blocks:
        b.register_forward_hook(lambda *_a: order.append("MMTM"))
    return order


@pytest.mark.parametrize("nlevels,after", [(5, ["L3", "L4", "L5"]), (4, ["L2", "L3", "L4"])])
def test_msa_mmtm_blocks_after_the_last_three_layers_and_branches_equal_the_canonical_encoders(nlevels, after):
    """greedy.md §3.1: MOSI (5 layers) MMTM after layers 3, 4, 5; IEMOCAP/Food-101 (4 layers) after 2, 3, 4.
    With every gate at 1 each branch is exactly the canonical msa_transformer encoder (projection, √D
    scaling, MulT padding positions, key-padding mask, final LayerNorm) and its head the residual head on
    position 0."""
    mods, shapes = ["text", "audio"], {"text": (7, 12), "audio": (5, 3)}
    kw = dict(d_model=10, num_heads=2, nlevels=nlevels, key_padding=["audio"])
    torch.manual_seed(0)
    canon = create_model("msa_transformer", modalities=mods, input_shapes=shapes, out_dim=3, **kw)
    mm = create_model("msa_mmtm", modalities=mods, input_shapes=shapes, out_dim=3, **kw)
    names = ["in"] + [f"L{i}" for i in range(1, nlevels + 1)]
    order = _call_order(mm, names)
    for m in mods:
        _copy_in_order(canon.encoders[m], mm.encoders[m])
    _open_gates(mm)
    canon.eval(), mm.eval()
    x = {m: torch.randn(4, *shapes[m]) for m in mods}
    x["audio"][:, 3:] = 0  # padded steps: position 0 and masked keys
    out = mm(x)
    want_order = []
    for n in names:
        want_order.append(n)
        if n in after:
            want_order.append("MMTM")
    assert order == want_order
    assert len(mm.mmtm_blocks) == 3 and all(b.dims == [10, 10] for b in mm.mmtm_blocks)
    for k, m in enumerate(mods):
        h = canon.encoders[m](x[m])
        torch.testing.assert_close(out.features[m], h, rtol=0, atol=1e-6)
        head = mm.heads[m].head
        manual = head.out_layer(h[:, 0] + head.proj2(torch.relu(head.proj1(h[:, 0]))))
        torch.testing.assert_close(out.fused[:, k], manual, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.logits, out.fused.mean(1))
    # the key-padding mask matters: without it the audio branch differs
    mm.key_padding = []
    assert not torch.allclose(mm(x).features["audio"], out.features["audio"], atol=1e-4)


TINY_DEEPLAB = dict(backbone="resnet18", width=8, blocks=[1, 1, 1, 1], aspp_width=16, decoder_width=16, low_reduced=8)


@pytest.mark.parametrize("backbone,widths", [("resnet18", [16, 32, 64]),  # stem width 8: 16/32/64
                                             ("smp:resnet18", [128, 256, 512])])  # smp keeps ResNet-18 widths
def test_deeplab_mmtm_blocks_after_layer2_to_4_and_branches_equal_the_canonical_encoders(backbone, widths):
    """greedy.md §3.1 BraTS row: branch = ResNet + ASPP of one modality, MMTM (spatial squeeze) after layer2,
    layer3 and layer4, each branch its own one-input DeepLabV3+ decoder with logits at the input size.
    With every gate at 1, z_m is the canonical DeepLabEncoder's cat(up(ASPP_m), layer1_m)."""
    if backbone.startswith("smp:"):
        pytest.importorskip("segmentation_models_pytorch")
    mods = ["flair", "t1ce"]
    shapes = {m: (1, 32, 32) for m in mods}
    kw = {**TINY_DEEPLAB, "backbone": backbone}
    torch.manual_seed(0)
    canon = create_model("deeplab_multi", modalities=mods, input_shapes=shapes, out_dim=4, **kw)
    mm = create_model("deeplab_mmtm", modalities=mods, input_shapes=shapes, out_dim=4, **kw)
    order = _call_order(mm, ["stem+layer1", "layer2", "layer3", "layer4", "aspp"])
    for m in mods:
        _copy_in_order(canon.encoders[m], mm.encoders[m])
    _open_gates(mm)
    canon.eval(), mm.eval()
    x = {m: torch.randn(2, *shapes[m]) for m in mods}
    out = mm(x)
    assert order == ["stem+layer1", "layer2", "MMTM", "layer3", "MMTM", "layer4", "MMTM", "aspp"]
    assert [b.dims for b in mm.mmtm_blocks] == [[c, c] for c in widths]
    for m in mods:
        torch.testing.assert_close(out.features[m], canon.encoders[m](x[m]), rtol=0, atol=1e-5)
    assert out.fused.shape == (2, 2, 4, 32, 32) and out.logits.shape == (2, 4, 32, 32)
    groups = mm.greedy_groups()  # each branch's decoder is in its main group
    assert {id(p) for p in mm.heads["flair"].parameters()} <= {id(p) for p in groups["main_flair"]}


def test_greedy_refuses_models_without_mmtm_with_an_accurate_message(tmp_path):
    """The message names the models that have an MMTM variant and no longer suggests a nonexistent option."""
    from mmbalance.methods.greedy import Greedy

    from mmbalance.data import ModelSpec

    with pytest.raises(MethodNotApplicable) as exc:
        Greedy().configure_model(ModelSpec("no_such_model", {}), None)
    msg = str(exc.value)
    assert "model.variant" not in msg and "msa_transformer" in msg and "deeplab_multi" in msg
    with pytest.raises(MethodNotApplicable) as exc:
        build_trainer("greedy", "mfeat", run_dir=tmp_path / "g", epochs=1, sets={**SMALL_MFEAT, "model.name": "mlp_concat"})
    assert "model.variant" not in str(exc.value) and "mlp_mmtm" in str(exc.value)


def test_gate_running_averages_use_the_reduced_sums_and_counts(tmp_path):
    """ḡ_m comes from gate sums and batch sizes SUM-reduced across processes: with a fake reduction that
    adds another rank's n samples whose gates are all 1, ḡ = (Σ g + n)/(B + n) after the first step."""
    tr = build_trainer("greedy", "mfeat", run_dir=tmp_path / "g", epochs=1, sets={**SMALL_MFEAT, "train.diagnostics": "none"})
    ctx, block = tr.ctx, tr.ctx.raw_model.mmtm_blocks[0]
    n_other = 5.0
    ctx.reduce_sum = lambda x: torch.as_tensor(x, dtype=torch.float64).clone() + n_other
    seen = []
    block.register_forward_hook(lambda mod, args, out: seen.append(([s.detach().clone() for s in mod.last_gate_sum],
                                                                     mod.last_count)) if mod.training else None)
    tr.method.training_step(ctx, first_batch(tr))
    sums, count = seen[-1]
    for k, s in enumerate(sums):
        want = (s.double() + n_other) / (count + n_other)
        torch.testing.assert_close(block.gate_avg(k).double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["cumulative", "ema"])
def test_gate_running_average_by_hand(mode):
    """ḡ after batch-mean gates μ_1, μ_2, μ_3 (sums / count): cumulative = their mean; ema = μ_1 first,
    then β·ḡ + (1 − β)·μ_t (greedy.md §2.1 step 5), with the count given as a device tensor."""
    from mmbalance.models.mmtm import MMTMBlock

    block = MMTMBlock([3, 2], ["vector", "vector"])
    g = torch.Generator().manual_seed(0)
    beta = 0.9
    means = [[torch.rand(3, generator=g), torch.rand(2, generator=g)] for _ in range(3)]
    counts = [4.0, 6.0, 5.0]
    for mu, c in zip(means, counts):
        block.update_running_average([m.double() * c for m in mu], torch.tensor(c, dtype=torch.float64), mode, beta)
    for k in range(2):
        seq = [mu[k].double() for mu in means]
        if mode == "cumulative":
            want = sum(seq) / 3
        else:
            want = seq[0]
            for x in seq[1:]:
                want = beta * want + (1 - beta) * x
        torch.testing.assert_close(block.gate_avg(k).double(), want, rtol=1e-6, atol=1e-7)
    assert int(block.gate_updates) == 3
