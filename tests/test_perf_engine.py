"""The engine's hot path: no host sync per training step (the non-finite check and the epoch-mean loss
live on the device and are read once per epoch), and a non-finite loss still fails the run with the FIRST
bad step."""
from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter

import pytest
import torch

from mmbalance import engine
from mmbalance.errors import NonFiniteLossError
from mmbalance.testing import build_trainer

SETS = {"dataset.limit_per_class": 10, "train.batch_size": 16, "train.modality_eval": "none", "train.diagnostics": "none"}
COUNTED = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy")


def _count_syncs(tr, monkeypatch) -> tuple[int, int, int]:
    """(host reads inside the training steps, host reads in whole training epochs, steps)."""
    counts: Counter[str] = Counter()
    state = {"in": None}
    for name in COUNTED:
        orig = getattr(torch.Tensor, name)

        def wrapper(t, *a, __orig=orig, **k):
            if state["in"] is not None:
                counts[state["in"]] += 1
            return __orig(t, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    real_epoch, real_steps = engine.Trainer._train_epoch, engine.Trainer._train_steps
    steps = [0]

    def epoch(self, *a, **k):
        state["in"] = "epoch"
        try:
            return real_epoch(self, *a, **k)
        finally:
            state["in"] = None

    def inner(self, *a, **k):
        state["in"] = "steps"
        try:
            n = real_steps(self, *a, **k)
            steps[0] += n
            return n
        finally:
            state["in"] = "epoch"

    monkeypatch.setattr(engine.Trainer, "_train_epoch", epoch)
    monkeypatch.setattr(engine.Trainer, "_train_steps", inner)
    tr.fit()
    return counts["steps"], counts["epoch"], steps[0]


def test_baseline_training_steps_never_read_the_device(tmp_path, monkeypatch):
    tr = build_trainer("baseline", run_dir=tmp_path / "r", epochs=2, sets=SETS)
    in_steps, in_epoch, steps = _count_syncs(tr, monkeypatch)
    assert steps >= 4
    assert in_steps == 0  # a per-step loss.item() / NaN all-reduce would count once per step
    assert in_epoch <= 2 * 2  # per epoch: the mean loss and the non-finite flag


def _poison(tr, at_step: int, epoch: int = 0):
    real = tr.method.training_step

    def step(ctx, batch):
        out = real(ctx, batch)
        if ctx.step == at_step and tr._epoch_seen[0] == epoch:
            return dataclasses.replace(out, loss=out.loss * float("nan"))
        return out

    tr._epoch_seen = [-1]
    real_start = tr.method.on_epoch_start

    def start(ctx):
        tr._epoch_seen[0] += 1
        return real_start(ctx)

    tr.method.training_step = step
    tr.method.on_epoch_start = start


def test_nan_fails_the_run_naming_the_first_bad_step(tmp_path):
    tr = build_trainer("baseline", run_dir=tmp_path / "r", epochs=3, sets=SETS)
    _poison(tr, at_step=2, epoch=1)  # later steps turn NaN too (NaN weights): the FIRST one is reported
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 2;"):
        tr.fit()
    res = json.loads((tmp_path / "r" / "result.json").read_text())
    assert res["status"] == "failed" and "non-finite training loss (nan)" in res["error"]
    rows = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1  # epoch 0 finished and was recorded; the failed epoch is not


def test_a_crash_after_a_nan_reports_the_nan(tmp_path):
    tr = build_trainer("baseline", run_dir=tmp_path / "r", epochs=2, sets=SETS)
    _poison(tr, at_step=1)
    real_after = tr.method.after_step

    def after(ctx):
        if ctx.step == 3:
            raise RuntimeError("method choked on NaN weights")
        return real_after(ctx)

    tr.method.after_step = after
    with pytest.raises(NonFiniteLossError, match=r"epoch 0, step 1;"):
        tr.fit()


def test_watch_sum_is_the_float_sum_of_the_losses():
    w = engine.LossWatch(torch.device("cpu"))
    vals = [torch.tensor(v, dtype=torch.float32) for v in (0.1, 2.3, 1e-7, 5.5)]
    for i, v in enumerate(vals):
        w.add(v, i)
    assert w.mean(4) == sum(float(v) for v in vals) / 4
    assert w.first_bad(type("A", (), {"num_processes": 1})()) == (None, 0.0)


def test_watch_across_chunk_boundaries(monkeypatch):
    """Losses stacked in chunks of 3: the mean is still the sequential float sum over every step, and the
    first non-finite one (in the second chunk, after sub-steps repeat a step number) is reported."""
    monkeypatch.setattr(engine.LossWatch, "CHUNK", 3)
    w = engine.LossWatch(torch.device("cpu"))
    losses = [0.5, 1.25, 2.0, 3.5, float("inf"), float("nan"), 4.0]
    steps = [0, 1, 1, 2, 3, 3, 4]  # two sub-steps at steps 1 and 3
    for v, s in zip(losses, steps):
        w.add(torch.tensor(v), s)
    assert w.first_bad(type("A", (), {"num_processes": 1})()) == (3, float("inf"))
    w2 = engine.LossWatch(torch.device("cpu"))
    for v, s in zip(losses[:4] + [4.0], steps[:4] + [4]):
        w2.add(torch.tensor(v), s)
    assert w2.mean(5) == (0.5 + 1.25 + 2.0 + 3.5 + 4.0) / 5
    assert w2.first_bad(type("A", (), {"num_processes": 1})()) == (None, 0.0)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_fused_optimizers_match_the_per_parameter_loop(kind, monkeypatch):
    """Same updates (to float rounding) with the fused/foreach kernels, including a parameter that first
    gets a gradient at step 3 (MLA-style sub-steps broke torch's fused SGD)."""
    from mmbalance.config import TrainConfig

    cfg = TrainConfig(optimizer=kind, lr=0.05, momentum=0.9, weight_decay=1e-3)
    runs = []
    for env in ("1", "0"):
        monkeypatch.setenv("MMBALANCE_FUSED_OPTIMIZER", env)
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
        opt = engine.build_optimizer([{"params": iter(ps)}], cfg)
        assert bool(opt.defaults.get("fused" if kind != "sgd" else "foreach")) == (env == "1")
        g = torch.Generator().manual_seed(1)
        for step in range(6):
            for i, p in enumerate(ps):
                p.grad = None if (i == 1 and step < 3) else torch.randn(p.shape, generator=g)
            opt.step()
        runs.append([p.detach().clone() for p in ps])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_method_logs_stay_on_the_device_and_are_read_once_per_epoch(tmp_path, monkeypatch):
    """ctx.log(tensor) from any method: no host read in the steps, one read for all keys per epoch, the
    per-epoch mean of exactly that epoch's values (the log is reset at the epoch boundary)."""
    tr = build_trainer("baseline", run_dir=tmp_path / "r", epochs=2, sets=SETS)
    real = tr.method.training_step

    def step(ctx, batch):
        out = real(ctx, batch)
        v = torch.tensor(float(100 * ctx.epoch + ctx.step))  # a CPU tensor built from host ints: no read
        ctx.log("probe/a", v)
        ctx.log("probe/b", 2 * v)
        out.logs["probe/c"] = -v  # StepOutput.logs go through ctx.log too
        ctx.log("probe/host", 1.5)
        return out

    tr.method.training_step = step
    in_steps, in_epoch, steps = _count_syncs(tr, monkeypatch)
    assert in_steps == 0
    assert in_epoch <= 2 * 2  # per epoch: the losses, and the logged sums of all keys together
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    n = steps // 2
    for epoch, row in enumerate(rows):
        mean = 100 * epoch + (n - 1) / 2  # mean of 100·epoch + step over the epoch's steps 0..n-1
        assert row["probe/a"] == pytest.approx(mean, abs=1e-12)
        assert row["probe/b"] == pytest.approx(2 * mean, abs=1e-12)
        assert row["probe/c"] == pytest.approx(-mean, abs=1e-12)
        assert row["probe/host"] == 1.5


@pytest.mark.ddp
def test_ddp_training_steps_make_no_collective_call(tmp_path):
    """2-process DDP: besides DDP's own gradient all-reduce (C++ reducer, not counted) the engine makes no
    torch.distributed call inside the training steps, and at most one per epoch (the non-finite check)."""
    from conftest import REPO
    from test_ddp import launch_2proc

    epochs = 2
    count_dir = tmp_path / "counts"
    plugin = REPO / "tests" / "_collective_counter.py"
    os.environ["MMBALANCE_COUNT_DIR"] = str(count_dir)
    try:
        proc = launch_2proc(["--method", "baseline", "--dataset", "mfeat", "--epochs", str(epochs), "--set",
                             "dataset.limit_per_class=20", "--run-dir", str(tmp_path / "run"), "--quiet",
                             "--plugin", str(plugin)], tmp_path / "dump")
    finally:
        del os.environ["MMBALANCE_COUNT_DIR"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        c = json.loads((count_dir / f"rank{rank}.json").read_text())
        assert c["n_steps"] >= 2 * epochs
        assert c["steps"] == 0, c  # e.g. a per-step loss all-reduce or NaN flag reduction
        assert c["epoch"] <= epochs, c


def test_backward_shortcut_only_without_gradient_accumulation(tmp_path):
    """The engine skips accelerate's ``loss / gradient_accumulation_steps`` only when that is a division by
    1: with accumulation 2 the gradients must be accelerate's (halved), with 1 the plain ones."""
    from mmbalance.testing import first_batch

    tr = build_trainer("baseline", run_dir=tmp_path / "r", epochs=1, sets=SETS)
    batch = first_batch(tr)

    def grads(accumulation: int) -> list[torch.Tensor]:
        tr.accelerator.gradient_accumulation_steps = accumulation
        tr._plain_backward = None  # decided again on the next step
        tr.ctx.model.zero_grad(set_to_none=True)
        tr._backward(tr.method.training_step(tr.ctx, batch).loss)
        return [p.grad.clone() for p in tr.ctx.model.parameters()]

    plain = grads(1)
    assert tr._plain_backward is True
    halved = grads(2)
    assert tr._plain_backward is False
    for a, b in zip(plain, halved):
        torch.testing.assert_close(b, a / 2, rtol=1e-6, atol=1e-9)


def test_raw_module_is_the_unwrapped_module_cached_per_wrapper(tmp_path, monkeypatch):
    """ctx.raw_module(name) is accelerator.unwrap_model(modules[name]), unwrapped once per wrapper (the unwrap
    looks packages up on the file system; MLA paid it every step), and follows a replaced wrapper."""
    tr = build_trainer("mla", "mfeat", run_dir=tmp_path / "r", epochs=1, sets=SETS)
    ctx = tr.ctx
    calls = []
    real = ctx.accelerator.unwrap_model
    monkeypatch.setattr(ctx.accelerator, "unwrap_model", lambda m, *a, **k: calls.append(m) or real(m, *a, **k))
    head = ctx.raw_module("mla_head")
    assert head is real(ctx.modules["mla_head"]) and head is ctx.raw_module("mla_head")
    assert len(calls) == 1

    replaced = torch.nn.Linear(2, 2)  # e.g. the module re-prepared (wrapped again) after a resume
    monkeypatch.setitem(ctx.modules, "mla_head", replaced)
    assert ctx.raw_module("mla_head") is replaced  # not the stale cached head
    assert len(calls) == 2
