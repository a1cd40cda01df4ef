"""Behavioural tests of MLA (docs/methods/mla.md): closed-form projection, sub-step arithmetic through
the engine, gating, per-modality prediction, refusals, resume, 2-process DDP per-rank state."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL_MFEAT
from mmbalance.methods.mla import (
    entropy_weights,
    fuse_outputs,
    project_gradient,
    projection_alpha,
    update_projector,
)
from test_ddp import launch_2proc

from mmbalance.testing import build_trainer, first_batch

PIX_MOR = {**SMALL_MFEAT, "train.modality_eval": "none"}


def test_projection_closed_form():
    """mla.md §8.1: d = 2, P = I, r = (1, 1), α = 0.1 (values computed by hand)."""
    P = update_projector(torch.eye(2), torch.tensor([1.0, 1.0]), 0.1, "scalar")
    exp = torch.tensor([[0.523217, -0.475651], [-0.475651, 0.523217]])
    assert torch.allclose(P, exp, atol=1e-6)
    g = project_gradient(torch.tensor([[1.0, 0.0]]), P, "replace")
    assert torch.allclose(g, torch.tensor([[0.523217, -0.475651]]), atol=1e-6)
    g_add = project_gradient(torch.tensor([[1.0, 0.0]]), P, "add")
    assert torch.allclose(g_add, torch.tensor([[1.523217, -0.475651]]), atol=1e-6)
    Pe = update_projector(torch.eye(2), torch.tensor([1.0, 1.0]), 0.1, "elementwise")
    assert torch.allclose(Pe, torch.tensor([[0.070360, -0.703598], [-0.703598, 0.070360]]), atol=1e-6)
    P10 = update_projector(torch.eye(2), torch.tensor([1.0, 0.0]), 0.1, "scalar")
    assert torch.allclose(P10, torch.diag(torch.tensor([0.090536, 0.995893])), atol=1e-6)
    # a 1×1 conv weight [C, d, 1, 1] is projected as the [C, d] matrix
    gc = project_gradient(torch.tensor([[1.0, 0.0]]).view(1, 2, 1, 1), P, "replace")
    assert torch.allclose(gc.view(1, 2), torch.tensor([[0.523217, -0.475651]]), atol=1e-6)


def test_alpha_schedule():
    assert projection_alpha(0, 10) == pytest.approx(0.1)
    assert projection_alpha(5, 10) == pytest.approx(0.0316228, abs=1e-7)


def test_gating_closed_form_and_per_sample():
    """§8.6: o_a = (0, 0), o_v = (3, 0) → e = (0.693147, 0.190865), w = (0.377004, 0.622996)."""
    oa, ov = torch.zeros(1, 2), torch.tensor([[3.0, 0.0]])
    w = entropy_weights([oa, ov], "sample")
    assert torch.allclose(w[:, 0], torch.tensor([0.377004, 0.622996]), atol=1e-6)
    assert torch.allclose(fuse_outputs([oa, ov], w), torch.tensor([[1.868986, 0.0]]), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    a, v = torch.randn(4, 5, generator=g), 3 * torch.randn(4, 5, generator=g)
    for axis, same in (("sample", True), ("batch", False)):
        whole = fuse_outputs([a, v], entropy_weights([a, v], axis))
        alone = torch.cat([fuse_outputs([a[i:i + 1], v[i:i + 1]], entropy_weights([a[i:i + 1], v[i:i + 1]], axis))
                           for i in range(4)])
        assert torch.allclose(whole, alone, atol=1e-6) == same, axis


def _snapshot(tr):
    ctx = tr.ctx
    head = ctx.modules["mla_head"]
    return ({m: [p.detach().clone() for p in ctx.raw_model.encoders[m].parameters()] for m in ctx.modalities},
            [p.detach().clone() for p in head.parameters()])


@pytest.mark.parametrize("zero", ["official", "set_to_none"])
def test_substeps_touch_only_their_encoder_and_see_the_updated_head(tmp_path, zero):
    """§8.4/§8.5 on mfeat-pix-mor (M = 2), SGD momentum 0.9, no weight decay, one batch, no projection.
    Hand-computed with plain autograd: a ← a − η g_a; H ← H − η g_H,a; v sees that H;
    v ← v − η g_v; H ← H − η (0.9 g_H,a + g_H,v); with zero-filled gradients (official) encoder a takes a
    second, momentum-only step η·0.9·g_a, with set_to_none it does not."""
    sets = {**PIX_MOR, "train.momentum": 0.9, "train.weight_decay": 0.0, "train.max_steps_per_epoch": 1,
            "substep_zero": zero}
    tr = build_trainer("mla_released", "mfeat-pix-mor", run_dir=tmp_path / "r", epochs=1, sets=sets)
    ctx = tr.ctx
    a, v = ctx.modalities
    enc0, head0 = _snapshot(tr)
    batch = first_batch(tr)
    eta = tr.cfg.lr
    model = ctx.raw_model
    head = ctx.modules["mla_head"]

    def unimodal_grads(m, head_params):
        enc = model.encoders[m]
        z = torch.func.functional_call(enc, dict(zip([n for n, _ in enc.named_parameters()], enc0[m])), (batch[m],))
        W, b = head_params
        loss = torch.nn.functional.cross_entropy(z @ W.t() + b, batch["label"])
        return torch.autograd.grad(loss, [*enc0[m], W, b])

    enc0 = {m: [t.clone().requires_grad_(True) for t in ts] for m, ts in enc0.items()}
    h0 = [t.clone().requires_grad_(True) for t in head0]
    ga = unimodal_grads(a, h0)
    g_enc_a, g_h_a = ga[:-2], ga[-2:]
    h1 = [(t - eta * g).detach().requires_grad_(True) for t, g in zip(h0, g_h_a)]
    gv = unimodal_grads(v, h1)
    g_enc_v, g_h_v = gv[:-2], gv[-2:]
    tr.fit()
    factor = 1.9 if zero == "official" else 1.0
    for p, p0, g in zip(model.encoders[a].parameters(), enc0[a], g_enc_a):
        assert torch.allclose(p, p0 - factor * eta * g, atol=1e-6)
    for p, p0, g in zip(model.encoders[v].parameters(), enc0[v], g_enc_v):
        assert torch.allclose(p, p0 - eta * g, atol=1e-6)
    for p, p1, g1, g2 in zip(head.parameters(), h1, g_h_a, g_h_v):
        assert torch.allclose(p, p1 - eta * (0.9 * g1 + g2), atol=1e-6)
    assert tr.method.n == 2


def test_first_substep_is_not_projected_and_the_second_is(tmp_path):
    tr = build_trainer("mla", "mfeat-pix-mor", run_dir=tmp_path / "r", epochs=1, sets=PIX_MOR)
    ctx, method = tr.ctx, tr.method
    batch = first_batch(tr)
    weight = ctx.modules["mla_head"].out.weight
    subs = method.training_substeps(ctx, batch)
    for k, out in enumerate(subs):
        ctx.substep = k
        weight.grad = None
        out.loss.backward()
        before = weight.grad.clone()
        method.after_backward(ctx)
        if k == 0:
            assert torch.equal(weight.grad, before) and torch.equal(method.P, torch.eye(64))
        else:
            r = ctx.raw_model.encoders[ctx.modalities[1]](batch[ctx.modalities[1]]).detach().mean(0)
            k_ = r  # P = I before this update: k = r
            P = torch.eye(64) - torch.outer(k_, k_) / (0.1 + r @ r)
            P = P / P.norm()
            assert torch.allclose(method.P, P, atol=1e-6)
            assert torch.allclose(weight.grad, before @ P.t(), atol=1e-6)
        for p in list(ctx.raw_model.parameters()) + [weight, ctx.modules["mla_head"].out.bias]:
            p.grad = None


def test_predict_single_modality_is_the_shared_head_exactly(tmp_path):
    tr = build_trainer("mla", "mfeat", run_dir=tmp_path / "r", epochs=1, sets=PIX_MOR)
    ctx = tr.ctx
    batch = first_batch(tr)
    a = ctx.modalities[0]
    head = ctx.modules["mla_head"]
    with torch.no_grad():
        expected = head.out(ctx.raw_model.encoders[a](batch[a]))
    got = tr.method.predict(ctx, batch, absent=tuple(ctx.modalities[1:]))
    assert torch.equal(got, expected)
    full = tr.method.predict(ctx, batch)
    assert full.shape == expected.shape and not torch.equal(full, expected)


def test_unequal_widths_refused_naming_them():
    from types import SimpleNamespace

    from mmbalance.methods.mla import MLA

    from mmbalance.errors import MethodNotApplicable

    model = SimpleNamespace(modalities=["a", "b"], feature_dims={"a": 64, "b": 40},
                            feature_kinds={"a": "vector", "b": "vector"})
    with pytest.raises(MethodNotApplicable, match="a=64, b=40"):
        MLA().setup(SimpleNamespace(raw_model=model))


def test_regression_dynamic_fusion_is_a_config_error(run_cli, capsys):
    code, rd, _ = run_cli("mla", "synthetic-regression", sets={"dataset.n_samples": 60, "fusion": "dynamic"})
    assert code == 2 and "fusion=dynamic" in capsys.readouterr().err and not rd.exists()


@pytest.mark.parametrize("dataset,sets", [
    ("synthetic", {"dataset.n_samples": 60, "dataset.n_modalities": 3}),
    ("synthetic", {"dataset.n_samples": 60, "dataset.n_modalities": 6}),
    ("synthetic-regression", {"dataset.n_samples": 60}),
    ("synthetic-seg", {"dataset.n_samples": 30, "dataset.image_size": 8}),
])
def test_runs_on_synthetic_sets(run_cli, dataset, sets):
    code, _, res = run_cli("mla", dataset, sets={**sets, "train.modality_eval": "none"})
    assert code == 0 and res["status"] == "ok"


def test_alternate_trains_one_modality_per_batch(tmp_path):
    tr = build_trainer("mla_alternate", "mfeat", run_dir=tmp_path / "r", epochs=1,
                       sets={**PIX_MOR, "train.max_steps_per_epoch": 1})
    enc0, _ = _snapshot(tr)
    tr.fit()
    moved = {m: any(not torch.equal(p, p0) for p, p0 in zip(tr.ctx.raw_model.encoders[m].parameters(), enc0[m]))
             for m in tr.ctx.modalities}
    assert moved == {m: k == 0 for k, m in enumerate(tr.ctx.modalities)}


def test_resume_gives_the_same_final_numbers(kill_and_resume):
    sets = dict(PIX_MOR)
    (_, full), (code, _, resumed) = kill_and_resume("mla", sets=sets, epochs=3, stop_after=2)
    assert code == 0 and resumed["test"] == full["test"] and resumed["val"] == full["val"]
    assert resumed["method_metrics"] == full["method_metrics"]


@pytest.mark.ddp
def test_two_process_projector_is_global_and_identical(tmp_path):
    """§8.9: r is the global batch mean, so P is identical on both ranks (P is never broadcast: a
    rank-local mean would make it differ), the replicas stay identical, and DDP does not complain about
    parameters unused in a sub-step."""
    rd = tmp_path / "run"
    proc = launch_2proc(["--method", "mla", "--dataset", "mfeat", "--epochs", "1", "--set",
                         "dataset.limit_per_class=20", "--set", "train.modality_eval=none", "--run-dir", str(rd),
                         "--quiet"], tmp_path / "dump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "dump" / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "dump" / "rank1.pt", weights_only=False)
    # 140 train rows, global batch 64 (32 per rank): 3 optimizer steps per epoch × 3 modalities' sub-steps
    assert r0["method_state"]["n"] == r1["method_state"]["n"] == 3 * 3
    assert not torch.equal(r0["method_state"]["P"], torch.eye(64))
    assert torch.equal(r0["method_state"]["P"], r1["method_state"]["P"])
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    for k in r0["extra"]["mla_head"]:
        assert torch.equal(r0["extra"]["mla_head"][k], r1["extra"]["mla_head"][k]), k
    assert json.loads((rd / "result.json").read_text())["world_size"] == 2


def test_fp16_each_substep_is_unscaled_once_and_updates_the_scale(tmp_path):
    """Emulated fp16 (loss scale 1024): every sub-step lands where the float32 run lands, and the
    scale is updated once per sub-step (2 batches × 3 modalities, growth ×2 per update)."""
    from test_precision import SCALE, emulate_fp16

    sets = {**PIX_MOR, "train.max_steps_per_epoch": 2, "train.momentum": 0.0, "train.weight_decay": 0.0}

    def params(tr):
        return [p.detach().clone() for p in tr.ctx.raw_model.parameters()] + \
               [p.detach().clone() for p in tr.ctx.modules["mla_head"].parameters()]

    ref = build_trainer("mla", "mfeat", run_dir=tmp_path / "ref", epochs=1, sets=sets)
    before = params(ref)
    ref.fit()
    want = params(ref)
    tr = build_trainer("mla", "mfeat", run_dir=tmp_path / "fp16", epochs=1, sets=sets)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1)
    emulate_fp16(tr, scaler)
    tr.fit()
    for b, w, g in zip(before, want, params(tr)):
        torch.testing.assert_close(g - b, w - b, rtol=1e-4, atol=1e-7)
    assert scaler.get_scale() == SCALE * 2 ** 6
