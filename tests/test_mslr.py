"""Behavioural tests of MSLR (docs/methods/mslr.md §8)."""
from __future__ import annotations

import pytest
import torch
from conftest import SMALL_MFEAT
from mmbalance.methods.mslr import MemoryRatio

from mmbalance.testing import build_trainer, first_batch

FAST = {"train.modality_eval": "none"}


def _groups(opt):
    return {g["name"]: g for g in opt.param_groups}


# ---------------------------------------------------------------- 8.1 groups
def test_one_group_per_modality_with_specified_rates(tmp_path):
    t = build_trainer("mslr", "mfeat", run_dir=tmp_path, sets={**SMALL_MFEAT, **FAST, "c0": [2.0, 1.0, 0.5]})
    model, opt = t.ctx.raw_model, t.ctx.optimizer
    groups = _groups(opt)
    assert set(groups) == {"modality/fac", "modality/fou", "modality/mor", "shared"}
    owner = {}
    for name, g in groups.items():
        for p in g["params"]:
            assert id(p) not in owner  # every parameter in exactly one group
            owner[id(p)] = name
    assert set(owner) == {id(p) for p in model.parameters()}
    for m in model.modalities:
        assert {id(p) for p in groups[f"modality/{m}"]["params"]} == {id(p) for p in model.encoder_parameters(m)}
    assert {id(p) for p in [*model.fusion.parameters(), *model.head.parameters()]} == \
        {id(p) for p in groups["shared"]["params"]}
    assert [groups[f"modality/{m}"]["lr_mult"] for m in ("fac", "fou", "mor")] == [2.0, 1.0, 0.5]
    assert groups["shared"]["lr_mult"] == 1.0
    t._set_lrs(0.3)
    base = groups["shared"]["base_lr"]
    assert groups["modality/fac"]["lr"] == pytest.approx(base * 0.3 * 2.0)
    assert groups["modality/mor"]["lr"] == pytest.approx(base * 0.3 * 0.5)


# ---------------------------------------------------------------- 8.2 Adam check
def _first_update(tmp_path, method, c0):
    t = build_trainer(method, "mfeat", run_dir=tmp_path / f"{method}{c0}",
                      sets={**SMALL_MFEAT, **FAST, "train.optimizer": "adam", "train.lr": 1e-3,
                            "train.weight_decay": 0.0, "c0": c0})
    ctx = t.ctx
    enc = list(ctx.raw_model.encoder_parameters("fac"))
    before = [p.detach().clone() for p in enc]
    t.method.training_step(ctx, first_batch(t)).loss.backward()
    grad = torch.cat([p.grad.flatten() for p in enc])
    t.method.after_backward(ctx)
    t._set_lrs(1.0)
    ctx.optimizer.step()
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(enc, before)]), grad


def test_adam_param_groups_double_the_update_grad_scale_does_not(tmp_path):
    base, grad = _first_update(tmp_path, "mslr", {"fac": 1.0})
    assert base.abs().max() > 1e-4
    assert torch.allclose(_first_update(tmp_path, "mslr", {"fac": 2.0})[0], 2 * base, atol=1e-6, rtol=0)
    scaled = _first_update(tmp_path, "mslr_grad_scale", {"fac": 2.0})[0]
    # Adam normalises the scale away; only entries whose |g| is comparable to Adam's eps (1e-8) move
    big = grad.abs() > 1e-4
    assert big.float().mean() > 0.5
    assert torch.allclose(scaled[big], base[big], atol=1e-6, rtol=0)


def test_grad_scale_form_multiplies_gradients(tmp_path):
    t = build_trainer("mslr_grad_scale", "mfeat", run_dir=tmp_path, sets={**SMALL_MFEAT, **FAST, "c0": [3.0, 1.0, 0.5]})
    ctx = t.ctx
    assert len(ctx.optimizer.param_groups) == 1
    t.method.training_step(ctx, first_batch(t)).loss.backward()
    model = ctx.raw_model
    g0 = {m: [p.grad.clone() for p in model.encoder_parameters(m)] for m in model.modalities}
    t.method.after_backward(ctx)
    for m, c in zip(("fac", "fou", "mor"), (3.0, 1.0, 0.5)):
        for a, p in zip(g0[m], model.encoder_parameters(m)):
            assert torch.allclose(p.grad, c * a, atol=1e-7, rtol=0)


# ---------------------------------------------------------------- 8.3 memory
def test_memory_ratio_window():
    mem = MemoryRatio(5)
    rs = [mem.update(a) for a in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)]
    assert rs[:5] == [1.0] * 5
    assert rs[5] == pytest.approx(0.95 / 0.7) and round(rs[5], 3) == 1.357


def test_lr_mult_follows_heldout_metric(tmp_path, monkeypatch):
    t = build_trainer("mslr", "mfeat", run_dir=tmp_path, sets={**SMALL_MFEAT, **FAST, "c0": [1.5, 1.0, 1.0],
                                                                  "ratio_clip": [0.5, 1.3]})
    seq = iter([0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    monkeypatch.setattr(t.method, "heldout_metrics", lambda ctx: dict.fromkeys(("fac", "fou", "mor"), next(seq)))
    groups = _groups(t.ctx.optimizer)
    for epoch in range(6):
        t.ctx.epoch = epoch
        t.method.on_epoch_end(t.ctx)
        r = 1.0 if epoch < 5 else 1.3  # 0.95 / 0.7 = 1.357, clipped to 1.3
        assert groups["modality/fac"]["lr_mult"] == pytest.approx(1.5 * r)
        assert groups["modality/fou"]["lr_mult"] == pytest.approx(r)
        assert groups["shared"]["lr_mult"] == 1.0


# ---------------------------------------------------------------- 8.4 splits
def test_metric_uses_only_heldout_training_rows(tmp_path, monkeypatch):
    t = build_trainer("mslr", "mfeat", run_dir=tmp_path, sets={**SMALL_MFEAT, **FAST})
    ctx = t.ctx
    assert len(t.train_split) + len(ctx.heldout) == len(ctx.data.train) and len(ctx.heldout) > 0
    held = {tuple(r.tolist()) for r in ctx.heldout.inputs["fac"]}
    train_rows = {tuple(r.tolist()) for r in t.train_split.inputs["fac"]}
    assert not held & train_rows
    for batch in t.loader_train:  # training batches never contain held-out rows
        assert not {tuple(r.tolist()) for r in batch["fac"]} & held
    seen = []
    orig = ctx.train_batches

    def spy(split="train", **kw):
        seen.append(split)
        return orig(split, **kw)

    monkeypatch.setattr(ctx, "train_batches", spy)
    a = t.method.heldout_metrics(ctx)
    assert seen == ["heldout"] and set(a) == {"fac", "fou", "mor"} and all(0 <= v <= 1 for v in a.values())


# ---------------------------------------------------------------- 8.5 scheduler composition
def test_step_scheduler_and_multiplier_compose(run_cli, tmp_path):
    t = build_trainer("mslr", "mfeat", run_dir=tmp_path, epochs=3,
                      sets={**SMALL_MFEAT, **FAST, "c0": 1.5, "train.scheduler": "step", "train.step_size": 2,
                            "train.gamma": 0.5})
    t.fit()
    groups = _groups(t.ctx.optimizer)
    base = groups["shared"]["base_lr"]
    assert groups["modality/fac"]["lr"] == pytest.approx(0.5 * base * 1.5)  # epoch 2: halved, × mult
    assert groups["shared"]["lr"] == pytest.approx(0.5 * base)


# ---------------------------------------------------------------- runs, refusals, bf16
SYN = {"dataset.n_samples": 60, **FAST}


@pytest.mark.parametrize("method,sets", [
    ("mslr", {"dataset.n_modalities": 2}),
    ("mslr", {"dataset.n_modalities": 3, "dataset.feature": "sequence", "metric_split": "train_running"}),
    ("mslr_grad_scale", {"dataset.n_modalities": 6}),
    ("mslr", {"dataset.n_modalities": 3, "dataset.task": "regression", "window": 1, "accumulate": True}),
    ("mslr", {"dataset.n_modalities": 3, "dataset.task": "segmentation", "dataset.n_samples": 30, "window": 1}),
])
def test_runs(run_cli, method, sets):
    code, rd, res = run_cli(method, "synthetic", epochs=2, sets={**SYN, **sets})
    assert code == 0 and res["status"] == "ok"
    mm = res["method_metrics"]
    assert len([k for k in mm if k.startswith("lr_mult_")]) == len(res["modalities"])
    assert all(v > 0 for k, v in mm.items() if k.startswith("a_"))


def test_bf16_autocast_run(run_cli):
    code, _, res = run_cli("mslr", "mfeat", epochs=1, sets={**SMALL_MFEAT, **FAST, "train.mixed_precision": "bf16"})
    assert code == 0 and res["status"] == "ok"


def test_refuses_one_modality(run_cli, capsys):
    code, _, _ = run_cli("mslr", "synthetic", epochs=1, sets={**SYN, "dataset.n_modalities": 1})
    assert code == 2 and "at least 2 modalities" in capsys.readouterr().err


# ---------------------------------------------------------------- oracles and state (mutation-tested)
def test_memory_slides_and_survives_a_state_round_trip():
    mem = MemoryRatio(3)
    rs = [mem.update(a) for a in (0.2, 0.4, 0.6, 0.8, 1.0)]
    assert rs == pytest.approx([1, 1, 1, 0.8 / 0.4, 1.0 / 0.6])  # means of the previous 3 only
    fresh = MemoryRatio(3)
    fresh.load(mem.state())
    assert fresh.update(0.9) == pytest.approx(mem.update(0.9)) == pytest.approx(0.9 / 0.8)


def test_method_state_round_trip_keeps_the_memory(tmp_path):
    t = build_trainer("mslr", "mfeat", run_dir=tmp_path, sets={**SMALL_MFEAT, **FAST, "window": 2})
    for a in (0.5, 0.7):
        t.method.update_ratios(dict.fromkeys(("fac", "fou", "mor"), a))
    state = t.method.state_dict()
    u = build_trainer("mslr", "mfeat", run_dir=tmp_path / "u", sets={**SMALL_MFEAT, **FAST, "window": 2})
    u.method.load_state_dict(state)
    u.method.update_ratios(dict.fromkeys(("fac", "fou", "mor"), 0.9))
    assert u.method.r["fac"] == pytest.approx(0.9 / 0.6)


def test_heldout_metric_by_hand_in_eval_mode_per_modality(tmp_path):
    """a_m = accuracy of modality m's probe on the held-out rows, model in eval mode (dropout off),
    each value assigned to its own modality."""
    t = build_trainer("mslr", "mfeat", run_dir=tmp_path, sets={**SMALL_MFEAT, **FAST, "model.dropout": 0.5})
    ctx = t.ctx
    probes = ctx.modules["mslr_probes"]
    h = ctx.heldout
    model = ctx.raw_model.eval()
    with torch.no_grad():
        pooled = model({m: h.inputs[m] for m in ctx.modalities}).pooled
        # make the probes clearly different: the first one fitted (least squares) to the held-out labels
        m0 = ctx.modalities[0]
        x = torch.cat([pooled[m0], torch.ones(len(h.labels), 1)], 1)
        sol = torch.linalg.lstsq(x, torch.nn.functional.one_hot(h.labels, 10).float()).solution
        probes.probes[m0].weight.copy_(sol[:-1].T)
        probes.probes[m0].bias.copy_(sol[-1])
    model.train()
    a = t.method.heldout_metrics(ctx)
    assert ctx.model.training
    model.eval()
    with torch.no_grad():
        want = {m: float((probes.probes[m](pooled[m]).argmax(1) == h.labels).float().mean()) for m in ctx.modalities}
    model.train()
    assert len(set(want.values())) > 1
    assert a == pytest.approx(want, abs=1e-6)
