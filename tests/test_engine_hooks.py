"""The loop skips hooks left as the base class's no-ops (decided once per epoch): a method that DOES
override one (in its class or on the instance) still gets it at every step, with the gradients in place;
lr_mult changes made by a method mid-epoch still reach the optimizer; the diagnostics hooks still run
when diagnostics are on."""
from __future__ import annotations

import pytest

from mmbalance.engine import overrides_hook
from mmbalance.interface import BalancingMethod
from mmbalance.testing import build_trainer

SETS = {"dataset.limit_per_class": 10, "train.batch_size": 16, "train.modality_eval": "none", "train.diagnostics": "none"}


def _trainer(tmp_path, **sets):
    return build_trainer("baseline", "mfeat", run_dir=tmp_path, epochs=2, sets={**SETS, **sets})


def test_overrides_hook_sees_class_and_instance_overrides():
    class Sub(BalancingMethod):
        def after_step(self, ctx):
            pass

    m = Sub()
    assert overrides_hook(m, "after_step")
    assert not overrides_hook(m, "after_backward") and not overrides_hook(m, "training_substeps")
    m.after_backward = lambda ctx: None
    assert overrides_hook(m, "after_backward")


def test_class_overridden_hooks_run_every_step_with_gradients(tmp_path):
    tr = _trainer(tmp_path)
    seen = {"after_backward": [], "after_step": [], "substeps": 0}
    base = type(tr.method)

    class Sub(base):
        def training_substeps(self, ctx, batch):
            seen["substeps"] += 1
            return None  # None: the engine falls back to one training_step

        def after_backward(self, ctx):  # gradients present: between backward and zero_grad
            seen["after_backward"].append((ctx.epoch, ctx.step, all(p.grad is not None for p in ctx.raw_model.parameters())))

        def after_step(self, ctx):
            seen["after_step"].append((ctx.epoch, ctx.step))

    tr.method.__class__ = Sub
    tr.fit()
    n = tr.ctx.steps_per_epoch
    assert n >= 2
    expected = [(e, s) for e in range(2) for s in range(n)]
    assert [(e, s) for e, s, _ in seen["after_backward"]] == expected
    assert all(g for _, _, g in seen["after_backward"])
    assert seen["after_step"] == expected
    assert seen["substeps"] == 2 * n


def test_instance_hook_override_is_called(tmp_path):
    tr = _trainer(tmp_path)
    calls = []
    tr.method.after_backward = lambda ctx: calls.append(ctx.step)
    tr.fit()
    assert len(calls) == 2 * tr.ctx.steps_per_epoch


def test_lr_mult_changed_mid_epoch_reaches_the_optimizer(tmp_path):
    tr = _trainer(tmp_path)
    lrs = []

    def after_step(ctx):
        g = ctx.optimizer.param_groups[0]
        lrs.append(g["lr"])
        if ctx.epoch == 0 and ctx.step == 0:
            g["lr_mult"] = 0.25  # a method rescaling its group's lr mid-epoch (takes effect next step)

    tr.method.after_step = after_step
    tr.fit()
    base = tr.ctx.optimizer.param_groups[0]["base_lr"]  # scheduler none: factor 1
    assert lrs[0] == pytest.approx(base)
    assert lrs[1:] == pytest.approx([0.25 * base] * (len(lrs) - 1))


def test_diagnostics_hooks_still_run_when_enabled(tmp_path):
    tr = _trainer(tmp_path, **{"train.diagnostics": "default"})
    counts = {"after_backward": 0, "after_edit": 0}
    for name in counts:
        orig = getattr(tr.diag, name)

        def wrapped(*a, __orig=orig, __name=name, **k):
            counts[__name] += 1
            return __orig(*a, **k)

        setattr(tr.diag, name, wrapped)
    tr.fit()
    assert counts == {"after_backward": 2 * tr.ctx.steps_per_epoch, "after_edit": 2 * tr.ctx.steps_per_epoch}
