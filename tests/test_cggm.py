"""Behavioural tests of CGGM (docs/methods/cggm.md §8)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_MFEAT
from mmbalance.methods.cggm import CGGM, balance_coefficients, build_classifier, encoder_scope_parameters

from mmbalance.errors import MethodNotApplicable
from mmbalance.registry import create_model
from mmbalance.tasks import RegressionTask, SegmentationTask
from mmbalance.testing import build_trainer, first_batch

SEQ3 = {"dataset.feature": "sequence", "dataset.n_samples": 60, "dataset.n_modalities": 3}
VEC2 = {"dataset.n_samples": 60, "dataset.n_modalities": 2}


def make(tmp_path, method="cggm", dataset="synthetic", sets=None):
    tr = build_trainer(method, dataset, run_dir=tmp_path / "run", sets=sets)
    return tr, tr.ctx, tr.method, first_batch(tr)


def clf_module(ctx):
    return ctx.accelerator.unwrap_model(ctx.modules[CGGM.MODULE])


def all_params(ctx):
    named = dict(ctx.raw_model.named_parameters())
    named.update({f"clf.{n}": p for n, p in clf_module(ctx).named_parameters()})
    return named


def grads(ctx):
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in all_params(ctx).items()}


def fixed_eps(values):
    return lambda ctx: torch.tensor(values, dtype=torch.float64)


def backward_step(ctx, meth, batch):
    out = meth.training_step(ctx, batch)
    ctx.accelerator.backward(out.loss)
    return out


# ----------------------------------------------------------------------------- coefficients (8.1, 8.2)
def test_coefficients_hand_computed():
    b, hit = balance_coefficients(torch.tensor([0.125, 0.375, -0.125]))
    assert not hit
    assert torch.allclose(b, torch.tensor([2 / 3, 0.0, 4 / 3], dtype=torch.float64), rtol=0, atol=1e-15)
    assert float(b.sum()) == pytest.approx(2.0)
    bp, _ = balance_coefficients(torch.tensor([0.125, 0.375, -0.125]), rho=1.3, rho_in_b=True)
    assert torch.allclose(bp, 1.3 * b)


def test_guard_on_and_off():
    delta = torch.tensor([0.25, -0.25])
    b, hit = balance_coefficients(delta)
    assert hit and b.tolist() == [1.0, 1.0]
    raw, hit = balance_coefficients(delta, guard=False)
    assert not hit
    assert torch.allclose(raw, torch.tensor([-24_999_999.0, 25_000_001.0], dtype=torch.float64), rtol=1e-6)
    bp, _ = balance_coefficients(delta, rho=1.2, rho_in_b=True)  # guard with rho inside: B^p = rho
    assert bp.tolist() == pytest.approx([1.2, 1.2])


# ----------------------------------------------------------------------------- magnitude and scope (8.1, 8.4)
@pytest.mark.parametrize("scope", ["encoder_body", "modality_all"])
def test_magnitude_modulation_scales_only_encoder_scope(tmp_path, scope):
    tr, ctx, meth, batch = make(tmp_path, sets={**SEQ3, "scale_scope": scope, "rho": 1.3})
    meth._batch_eps = fixed_eps([0.125, 0.375, -0.125])  # eps_prev = 0, so Δ = these values
    backward_step(ctx, meth, batch)
    before = grads(ctx)
    meth.after_backward(ctx)
    after = grads(ctx)
    expected = {"m0": 1.3 * 2 / 3, "m1": 0.0, "m2": 1.3 * 4 / 3}
    scoped = {id(p): m for m in expected for p in encoder_scope_parameters(ctx.raw_model, m, scope)}
    proj = {id(p) for m in expected for p in ctx.raw_model.encoders[m].proj.parameters()}
    assert proj
    if scope == "modality_all":
        assert proj <= set(scoped)
    else:
        assert not proj & set(scoped)
    n_scaled = 0
    for name, p in all_params(ctx).items():
        if before[name] is None:
            continue
        if id(p) in scoped:
            assert torch.allclose(after[name], expected[scoped[id(p)]] * before[name], rtol=1e-6, atol=1e-12), name
            n_scaled += 1
        else:
            assert torch.equal(after[name], before[name]), f"{name} outside the encoder scope was modified"
    assert n_scaled > 0
    assert meth.metrics()["factor/m0"] == pytest.approx(0.8666667, rel=1e-6)
    assert meth.metrics()["factor/m2"] == pytest.approx(1.7333333, rel=1e-6)


def test_guard_in_the_hook_and_first_step(tmp_path):
    tr, ctx, meth, batch = make(tmp_path, sets={**SEQ3, "rho": 1.3})
    out = backward_step(ctx, meth, batch)
    # step 0: no direction term, loss = task + Σ aux
    assert "cggm/lgm_added" not in out.logs
    assert float(out.loss) == pytest.approx(float(out.logs["cggm/task_loss"] + out.logs["cggm/aux_loss"]), rel=1e-6)
    eps = meth._batch_eps(ctx).tolist()
    meth.after_backward(ctx)
    logs = ctx.pop_logs()
    for k, m in enumerate(meth.modalities):  # eps_prev = 0: Δ = first-batch metric
        assert logs[f"cggm/delta/{m}"] == pytest.approx(eps[k]) == pytest.approx(logs[f"cggm/eps/{m}"])
    ctx.optimizer.zero_grad(set_to_none=True)
    meth._batch_eps = fixed_eps([e + d for e, d in zip(eps, [0.25, -0.25, 0.0])])  # Σ Δ = 0 → guard
    backward_step(ctx, meth, batch)
    meth.after_backward(ctx)
    assert meth.guard_hits == 1 and meth._b.tolist() == [1.0, 1.0, 1.0]
    assert all(meth.metrics()[f"factor/{m}"] == pytest.approx(1.3) for m in meth.modalities)


# ----------------------------------------------------------------------------- detach (8.7)
def test_classifier_losses_send_no_gradient_to_encoders(tmp_path):
    tr, ctx, meth, batch = make(tmp_path, dataset="mfeat", sets=SMALL_MFEAT)
    out = ctx.forward(batch)
    aux = ctx.modules[CGGM.MODULE]({m: out.features[m].detach() for m in meth.modalities})
    sum(ctx.task.loss(o, batch["label"]) for o in aux.values()).backward()
    assert all(p.grad is None for p in ctx.raw_model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in clf_module(ctx).parameters())
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.extra[CGGM.MODULE].optimizer.zero_grad(set_to_none=True)
    # the method's full step loss gives the same encoder gradients as the task loss alone (before the hook)
    backward_step(ctx, meth, batch)
    with_aux = {n: p.grad.clone() for n, p in ctx.raw_model.named_parameters()}
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.task.loss(ctx.forward(batch).logits, batch["label"]).backward()
    for n, p in ctx.raw_model.named_parameters():
        assert torch.allclose(p.grad, with_aux[n], atol=1e-7), n


# ----------------------------------------------------------------------------- direction term (8.5, 8.6)
def closed_form_grad(wf, wis, b, pairing, lam):
    """−(λ/M)·B_m·(ŵ_m − c_m·ŵ_F)/‖w_F‖ per pairing block (cggm.md §2)."""
    g = torch.zeros_like(wf)
    for k, s in enumerate(pairing.values()):
        blk = wf if s is None else wf[:, s]
        wi = wis[k]
        c = F.cosine_similarity(wi.reshape(1, -1), blk.reshape(1, -1))[0]
        part = -(lam / len(pairing)) * float(b[k]) * (wi / wi.norm() - c * blk / blk.norm()) / blk.norm()
        if s is None:
            g += part
        else:
            g[:, s] += part
    return g


@pytest.mark.parametrize("dataset,sets,pairing", [("synthetic", SEQ3, "full"), ("mfeat", SMALL_MFEAT, "block")])
def test_default_direction_term_reaches_only_final_weight(tmp_path, dataset, sets, pairing):
    tr, ctx, meth, batch = make(tmp_path, dataset=dataset, sets={**sets, "lam": 0.2})
    assert all((s is None) == (pairing == "full") for s in meth.pairing.values())
    backward_step(ctx, meth, batch)
    meth.after_backward(ctx)
    lgm = meth.lgm_prev
    value = float(lgm.detach())
    wf = ctx.raw_model.final_layer().weight
    # the values the term was computed from (the hook changes neither W_F nor the classifiers)
    heads = clf_module(ctx).heads
    snap = {"w_f": wf.detach().clone(), "w_i": [heads[m].final_layer().weight.detach().clone() for m in meth.modalities],
            "b": meth._b.clone()}
    with torch.no_grad():  # the optimizer step changes W_F; the stale term must not follow it
        wf.add_(0.3 * torch.randn_like(wf))
    names, params = zip(*all_params(ctx).items())
    g = torch.autograd.grad(0.2 * lgm, params, allow_unused=True, retain_graph=True)
    for n, p, gi in zip(names, params, g):
        if p is wf:
            assert gi is not None and gi.abs().sum() > 0
            expect = closed_form_grad(snap["w_f"], snap["w_i"], snap["b"], meth.pairing, 0.2)
            assert torch.allclose(gi, expect, atol=1e-6)
        else:
            assert gi is None or not gi.any(), f"direction term reached {n}"
    # staleness: the value added at step t+1 is the one computed at step t
    ctx.optimizer.zero_grad(set_to_none=True)
    out = meth.training_step(ctx, batch)
    assert float(out.logs["cggm/lgm_added"]) == value
    # resume: state_dict rebuilds the same stale term (value and gradient)
    state = meth.state_dict()
    fresh = CGGM(meth.hp)
    for attr in ("modalities", "pairing", "_raw_model", "_raw_classifiers", "_scoped"):  # what setup() builds
        setattr(fresh, attr, getattr(meth, attr))
    fresh.load_state_dict(state)
    fresh.on_epoch_start(ctx)
    assert float(fresh.lgm_prev.detach()) == pytest.approx(value, abs=1e-7)
    g2 = torch.autograd.grad(fresh.lgm_prev, wf)[0]
    assert torch.allclose(0.2 * g2, closed_form_grad(snap["w_f"], snap["w_i"], snap["b"], meth.pairing, 0.2), atol=1e-6)


# ----------------------------------------------------------------------------- cggm_paper (8.10)
def test_paper_preset_same_step_gradient_cosine(tmp_path):
    tr, ctx, meth, batch = make(tmp_path, method="cggm_paper", sets={**VEC2, "rho": 1.3, "lam": 0.2})
    assert meth.hp.cos_source == "grads_same_step" and meth.hp.rho_in_b
    meth._batch_eps = fixed_eps([0.5, 0.25])  # Δ = (0.5, 0.25): B = (1/3, 2/3), B^p = 1.3·B
    out = meth.training_step(ctx, batch)
    lgm = meth.lgm_now
    # the input of each classifier's final layer, from the head itself (the method runs the heads grouped)
    heads = clf_module(ctx).heads
    with torch.no_grad():
        hidden = {m: heads[m].body(out.output.features[m]) for m in meth.modalities}
    # closed form of L_gm on a linear head with cross-entropy: ∂CE/∂W = (softmax − onehot)ᵀ·input / N
    y = batch["label"]
    n = len(y)
    onehot = F.one_hot(y, out.output.logits.shape[1]).float()
    err_f = (out.output.logits.softmax(-1) - onehot).detach()
    bp = torch.tensor([1.3 / 3, 2.6 / 3], dtype=torch.float64)
    assert torch.allclose(meth._b, bp)
    cos = []
    for m in meth.modalities:
        g_block = err_f.t() @ out.output.pooled[m].detach() / n
        g_m = (meth._last_aux[m].softmax(-1) - onehot).t() @ hidden[m] / n
        cos.append(F.cosine_similarity(g_m.reshape(1, -1), g_block.reshape(1, -1))[0])
    expected = (bp.abs().sum() - (bp * torch.stack(cos).double()).sum()) / 2
    assert float(lgm) == pytest.approx(float(expected), abs=1e-6)
    # second-order gradient reaches the fusion head's final weight and the encoders
    wf = ctx.raw_model.final_layer().weight
    enc = list(encoder_scope_parameters(ctx.raw_model, "m0", "encoder_body"))
    g = torch.autograd.grad(lgm, [wf, *enc], allow_unused=True, retain_graph=True)
    assert g[0] is not None and g[0].abs().sum() > 0
    assert any(gi is not None and gi.abs().sum() > 0 for gi in g[1:])
    # magnitude factor = B^p (rho counted once)
    ctx.accelerator.backward(out.loss)
    meth.after_backward(ctx)
    assert meth.metrics()["factor/m0"] == pytest.approx(1.3 / 3) and meth.metrics()["factor/m1"] == pytest.approx(2.6 / 3)


# ----------------------------------------------------------------------------- metrics (8.11, 8.12)
def test_regression_sign_metric_and_neg_mae():
    meth = CGGM()
    ctx = SimpleNamespace(task=RegressionTask())
    num, den = meth._score_parts(ctx, torch.tensor([0.5, 0.5, -0.5]), torch.tensor([0.0, 1.0, -1.0]))
    assert float(num / den) == pytest.approx(2 / 3)
    meth.hp.metric = "neg_mae"
    num, den = meth._score_parts(ctx, torch.tensor([0.5, 0.5, -0.5]), torch.tensor([0.0, 1.0, -1.0]))
    assert float(num / den) == pytest.approx(-0.5)


def test_segmentation_dice_metric():
    target = torch.tensor([[[0, 0], [0, 0]], [[1, 2], [3, 0]]])
    pred = torch.tensor([[[0, 0], [0, 0]], [[1, 1], [3, 3]]])
    logits = F.one_hot(pred, 4).permute(0, 3, 1, 2).float() * 10
    num, den = CGGM()._score_parts(SimpleNamespace(task=SegmentationTask(4)), logits, target)
    e = 1e-3
    slice2 = ((6 + e) / (7 + e) + (4 + e) / (6 + e) + (2 + e) / (3 + e)) / 3  # WT, TC, ET
    assert float(num / den) == pytest.approx((1.0 + slice2) / 2, rel=1e-6)


# ----------------------------------------------------------------------------- architecture (8.8, 8.9, 8.14)
def test_sequence_classifier_single_hidden_projection(tmp_path):
    tr, ctx, meth, batch = make(tmp_path, sets=SEQ3)
    head = build_classifier(ctx.raw_model, "m0")
    calls = []
    head.body[0].register_forward_hook(lambda *a: calls.append(1))
    o = head(ctx.raw_model.encoders["m0"](batch["m0"]))
    assert len(calls) == 1 and o.shape == (len(batch["label"]), 4)
    d, c = 16, 4
    n_tr = sum(p.numel() for p in head.encoder.parameters())
    assert len(head.encoder.layers) == 2
    assert sum(p.numel() for p in head.parameters()) == n_tr + d * d + d + d * c + c


@pytest.mark.parametrize("name,shapes", [
    ("mlp_concat", {"a": (5,), "b": (7,)}), ("mlp_transformer_fusion", {"a": (5,), "b": (7,)}),
    ("seq_transformer", {"a": (4, 5), "b": (4, 7)}), ("conv_seg", {"a": (1, 8, 8), "b": (2, 8, 8)})])
def test_non_empty_scope_for_every_model(name, shapes):
    model = create_model(name, modalities=list(shapes), input_shapes=shapes, out_dim=3)
    for m in shapes:
        body = encoder_scope_parameters(model, m, "encoder_body")
        everything = encoder_scope_parameters(model, m, "modality_all")
        assert body and len(body) <= len(everything)


def test_shape_mismatch_and_single_modality_refused(tmp_path):
    with pytest.raises(MethodNotApplicable, match=r"\(10, 64\).*\(10, 128\).*not a concat-linear"):
        build_trainer("cggm", "mfeat", run_dir=tmp_path / "a", sets={**SMALL_MFEAT, "model.head": "mlp"})
    with pytest.raises(MethodNotApplicable, match=r"\(10, 192\)"):
        build_trainer("cggm", "mfeat", run_dir=tmp_path / "b", sets={**SMALL_MFEAT, "direction_pairing": "full"})
    with pytest.raises(MethodNotApplicable, match="at least 2 modalities"):
        build_trainer("cggm", "synthetic", run_dir=tmp_path / "c", sets={"dataset.n_modalities": 1})


def test_classifier_optimizer_settings(tmp_path):
    tr, ctx, meth, batch = make(tmp_path, dataset="mfeat", sets={**SMALL_MFEAT, "cls_lr": 0.003, "cls_weight_decay": 0.5})
    meth.on_phase_start(ctx)
    opt = ctx.extra[CGGM.MODULE].optimizer
    assert [g["lr"] for g in opt.param_groups] == [0.003] and [g["weight_decay"] for g in opt.param_groups] == [0.5]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in clf_module(ctx).parameters()}
    main = {id(p) for g in ctx.optimizer.param_groups for p in g["params"]}
    assert not main & {id(p) for p in clf_module(ctx).parameters()}
    assert build_trainer("cggm", "mfeat", run_dir=tmp_path / "d", sets=SMALL_MFEAT).method.hp.cls_lr == 1e-2


# ----------------------------------------------------------------------------- inference
def test_predict_equals_baseline_model_forward(tmp_path):
    tr, ctx, meth, batch = make(tmp_path, dataset="mfeat", sets=SMALL_MFEAT)
    base = build_trainer("baseline", "mfeat", run_dir=tmp_path / "base", sets=SMALL_MFEAT)
    ctx.model.eval()
    base.ctx.model.eval()
    got = meth.predict(ctx, batch)
    assert torch.equal(got, base.method.predict(base.ctx, batch))
    assert torch.equal(got, ctx.raw_model(ctx.inputs(batch)).logits)


# ----------------------------------------------------------------------------- end-to-end: M and tasks
@pytest.mark.parametrize("method,dataset,sets", [
    ("cggm", "synthetic", {"dataset.n_modalities": 2, "dataset.n_samples": 80}),
    ("cggm", "synthetic", {"dataset.n_modalities": 6, "dataset.n_samples": 80}),
    ("cggm_paper", "synthetic", {"dataset.n_modalities": 3, "dataset.n_samples": 80, "dataset.feature": "sequence"}),
    ("cggm", "synthetic-regression", {"dataset.n_samples": 80}),
    ("cggm", "synthetic-seg", {"dataset.n_samples": 40}),
    ("cggm_paper", "synthetic-seg", {"dataset.n_samples": 40}),
])
def test_runs_end_to_end(run_cli, method, dataset, sets):
    sets = {**sets, "train.max_steps_per_epoch": 3, "train.modality_eval": "none"}
    code, rd, res = run_cli(method, dataset, epochs=1, sets=sets)
    assert code == 0 and res["status"] == "ok"
    row = json.loads((rd / "metrics.jsonl").read_text().splitlines()[0])
    for m in res["modalities"]:
        for key in (f"cggm/B/{m}", f"cggm/eps/{m}", f"cggm/grad_norm/{m}"):
            assert key in row and row[key] == row[key], key
        assert f"method/B/{m}" in row and f"B/{m}" in res["method_metrics"]
    assert "cggm/lgm" in row


# ----------------------------------------------------------------------------- distributed (8.13)
@pytest.mark.ddp
def test_two_process_ddp_identical_parameters(tmp_path):
    from test_ddp import assert_identical_ranks, launch_2proc

    rd = tmp_path / "run"
    proc = launch_2proc(["--method", "cggm", "--dataset", "mfeat", "--epochs", "1", "--set", "dataset.limit_per_class=20",
                         "--set", "train.modality_eval=none", "--run-dir", str(rd), "--quiet"], tmp_path / "dump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_identical_ranks(tmp_path / "dump")
    res = json.loads((rd / "result.json").read_text())
    assert res["world_size"] == 2 and res["status"] == "ok"
    # the method state of each rank (ε memory, coefficients) is the global-batch one
    s0, s1 = (torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert torch.equal(s0["method_state"]["eps_prev"], s1["method_state"]["eps_prev"])
    assert s0["method_metrics"] == s1["method_metrics"] and "B/fac" in s0["method_metrics"]


def test_curves_can_be_drawn_from_a_run(run_cli, tmp_path):
    """Issue 3: B, ε and gradient norms per epoch are in metrics.jsonl, enough to draw Fig. 2/3/7."""
    import subprocess
    import sys

    from conftest import REPO

    code, rd, _ = run_cli("cggm", sets=SMALL_MFEAT, epochs=2)
    assert code == 0
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    for m in ("fac", "fou", "mor"):
        assert all(f"cggm/B/{m}" in r and f"cggm/eps/{m}" in r and f"cggm/grad_norm/{m}" in r for r in rows)
    out = tmp_path / "curves.png"
    subprocess.run([sys.executable, str(REPO / "tools" / "plot_cggm_curves.py"), str(rd), "--out", str(out)],
                   check=True, capture_output=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- oracles and state (mutation-tested)
def test_eps_is_each_classifiers_accuracy_by_hand(tmp_path):
    """ε_m = top-1 accuracy of classifier m's own output on sg(z_m) (not the fused head's)."""
    tr, ctx, meth, batch = make(tmp_path, dataset="mfeat", sets=SMALL_MFEAT)
    torch.manual_seed(11)
    out = backward_step(ctx, meth, batch)
    meth.after_backward(ctx)
    logs = ctx.pop_logs()
    heads = clf_module(ctx).heads
    y = batch["label"]
    fused_acc = float((out.output.logits.argmax(1) == y).float().mean())
    accs = []
    with torch.no_grad():
        for m in meth.modalities:
            heads[m].eval()  # the classifiers of the mfeat model have no dropout: eval = train output
            acc = sum(int(int(heads[m](out.output.features[m])[i].argmax()) == int(y[i])) for i in range(len(y))) / len(y)
            heads[m].train()
            assert logs[f"cggm/eps/{m}"] == pytest.approx(acc, abs=1e-9), m
            accs.append(acc)
    assert any(a != fused_acc for a in accs)


def test_eps_memory_persists_across_epochs_and_resume(tmp_path):
    """ε^prev carries over an epoch boundary and a checkpoint round trip: the first Δ of the next epoch
    compares with the last batch of the previous one."""
    import io

    tr, ctx, meth, batch = make(tmp_path, sets={**SEQ3})
    meth._batch_eps = fixed_eps([0.5, 0.25, 0.75])
    backward_step(ctx, meth, batch)
    meth.after_backward(ctx)
    ctx.pop_logs()
    ctx.optimizer.zero_grad(set_to_none=True)
    buf = io.BytesIO()
    torch.save(meth.state_dict(), buf)
    buf.seek(0)
    for resumed in (False, True):
        if resumed:
            meth.load_state_dict(torch.load(buf, weights_only=False))
        meth.on_epoch_start(ctx)
        ctx.epoch = 1
        meth._batch_eps = fixed_eps([0.625, 0.25, 0.5])
        backward_step(ctx, meth, batch)
        meth.after_backward(ctx)
        logs = ctx.pop_logs()
        ctx.optimizer.zero_grad(set_to_none=True)
        assert [logs[f"cggm/delta/{m}"] for m in meth.modalities] == pytest.approx([0.125, 0.0, -0.25]), resumed
        meth.eps_prev = torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64)  # rewind for the resumed pass


def test_direction_term_from_start_epoch_inclusive(tmp_path):
    tr, ctx, meth, batch = make(tmp_path, sets={**SEQ3, "start_epoch": 1})
    for epoch, on in ((0, False), (1, True)):
        ctx.epoch = epoch
        out = backward_step(ctx, meth, batch)
        meth.after_backward(ctx)
        ctx.optimizer.zero_grad(set_to_none=True)
        assert ("cggm/lgm_added" in out.logs) == on, epoch


def test_stale_direction_term_sends_gradient_to_the_fusion_weight(tmp_path):
    """The λ·L_gm(t−1) term added at step t carries its graph to W_F: ∂loss/∂W_F minus the task part
    equals λ·∂L_gm/∂W_F ≠ 0 (a detached term would contribute nothing)."""
    tr, ctx, meth, batch = make(tmp_path, sets={**SEQ3, "lam": 0.5})
    backward_step(ctx, meth, batch)
    meth.after_backward(ctx)
    ctx.optimizer.zero_grad(set_to_none=True)
    assert meth.lgm_prev is not None
    wf = ctx.raw_model.final_layer().weight
    g_lgm = torch.autograd.grad(meth.lgm_prev, wf, retain_graph=True)[0]
    assert float(g_lgm.abs().sum()) > 0
    out = meth.training_step(ctx, batch)
    assert "cggm/lgm_added" in out.logs
    g_total = torch.autograd.grad(out.loss, wf, retain_graph=True)[0]
    g_task = torch.autograd.grad(ctx.task.loss(out.output.logits, batch["label"]), wf)[0]  # aux terms: no W_F
    torch.testing.assert_close(g_total - g_task, 0.5 * g_lgm, rtol=1e-4, atol=1e-7)
