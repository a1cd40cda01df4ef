"""Mixed precision: the fp16 loss-scaling path (emulated on CPU with an injected GradScaler) and the
float32 casting of losses, metrics and predictions under bf16 autocast."""
from __future__ import annotations

import torch
from conftest import SMALL_MFEAT

from mmbalance.testing import build_trainer

SCALE = 1024.0  # a power of two: scaling and unscaling are exact in float32


def emulate_fp16(trainer, scaler: torch.amp.GradScaler) -> None:
    """Make a CPU trainer behave like Accelerate's fp16 set-up after ``prepare``: the accelerator holds
    the scaler (``backward`` scales the loss, ``unscale_gradients`` unscales) and every prepared
    optimizer wrapper calls ``scaler.step`` + ``scaler.update`` in its ``step()`` — exactly what
    ``Accelerator(mixed_precision='fp16')`` builds on a GPU, minus the fp16 autocast."""
    from accelerate.optimizer import patch_optimizer_step

    acc = trainer.accelerator
    acc.scaler = scaler
    acc.native_amp = True
    acc.state._mixed_precision = "fp16"  # reset by the next run's make_accelerator
    for opt in acc._optimizers:
        opt.scaler = scaler
        opt._accelerate_step_called = False
        opt._optimizer_original_step_method = opt.optimizer.step
        opt._optimizer_patched_step_method = patch_optimizer_step(opt, opt.optimizer.step)


def _cggm(tmp_path, name, steps=3):
    # SGD without momentum/decay: the update is −lr·g, so an unscaled-twice gradient shows as a 1/1024 update
    sets = {**SMALL_MFEAT, "train.max_steps_per_epoch": steps, "train.momentum": 0.0, "train.weight_decay": 0.0,
            "cls_weight_decay": 0.0}
    return build_trainer("cggm", run_dir=tmp_path / name, epochs=1, sets=sets)


def _params(tr):
    return {"model": [p.detach().clone() for p in tr.ctx.raw_model.parameters()],
            "extra": [p.detach().clone() for ex in tr.ctx.extra.values() for p in ex.module.parameters()]}


def test_fp16_every_optimizer_gets_the_unscaled_update(tmp_path):
    """CGGM's classifiers have their own optimizer: with a 1024 loss scale, every parameter (model and
    classifiers) must end where the unscaled float32 run ends, and the scale is updated once per step."""
    ref = _cggm(tmp_path, "ref")
    before = _params(ref)
    ref.fit()
    want = _params(ref)

    tr = _cggm(tmp_path, "fp16")
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1)  # grows ×2 per update
    emulate_fp16(tr, scaler)
    tr.fit()
    got = _params(tr)
    for part in ("model", "extra"):
        for b, w, g in zip(before[part], want[part], got[part]):
            assert not torch.equal(w, b)  # the reference did move
            torch.testing.assert_close(g - b, w - b, rtol=1e-4, atol=1e-7)
    # 3 steps, growth_interval=1: updated exactly once per step → 1024·2³ (twice per step → 1024·2⁶)
    assert scaler.get_scale() == SCALE * 2 ** 3


def test_fp16_overflow_skips_every_optimizer(tmp_path):
    """An inf in ONE parameter's gradient (of the main model) skips the step of every optimizer,
    including the method's own, and backs the scale off once."""
    tr = _cggm(tmp_path, "inf", steps=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)
    emulate_fp16(tr, scaler)
    first = next(iter(tr.ctx.raw_model.parameters()))
    first.register_hook(lambda g: torch.full_like(g, float("inf")))
    before = _params(tr)
    tr.fit()
    after = _params(tr)
    for part in ("model", "extra"):
        for b, a in zip(before[part], after[part]):
            assert torch.equal(a, b), part
    assert scaler.get_scale() == SCALE * 0.5  # backed off once, not once per optimizer


def _bf16_logits(tmp_path, dataset):
    """A bf16-autocast forward of the dataset's model (Accelerate's autocast returns bf16 logits)."""
    tr = build_trainer("baseline", dataset, run_dir=tmp_path / dataset, epochs=1,
                       sets={"train.mixed_precision": "bf16"})
    batch = next(iter(tr.loader_train))
    out = tr.ctx.forward(batch)
    assert out.logits.dtype == torch.bfloat16  # the situation under test
    return tr.task, out.logits.detach(), batch["label"]


def test_bf16_regression_loss_and_prediction_are_float32(tmp_path):
    task, logits, y = _bf16_logits(tmp_path, "synthetic-regression")
    pred32 = logits.float().reshape(-1)
    loss = task.loss(logits, y)
    assert loss.dtype == torch.float32
    # oracle: float32 L1 on the upcast bf16 predictions against the UNROUNDED float32 targets
    assert torch.equal(y, y.float()) and not torch.equal(y.float(), y.bfloat16().float())  # targets need > bf16 bits
    torch.testing.assert_close(loss, (pred32 - y.float()).abs().mean(), rtol=1e-6, atol=1e-7)
    p = task.prediction(logits)
    assert p.dtype == torch.float32 and torch.equal(p, pred32)
    m = task.new_meter()
    m.update(logits, y)
    got = m.compute()
    assert abs(got["mae"] - float((pred32.double() - y.double()).abs().mean())) < 1e-12
    assert abs(got["loss"] - float((pred32 - y.float()).abs().mean())) < 1e-6


def test_bf16_classification_loss_is_float32(tmp_path):
    task, logits, y = _bf16_logits(tmp_path, "synthetic")
    loss = task.loss(logits, y)
    assert loss.dtype == torch.float32
    ref = -logits.float().log_softmax(-1).gather(1, y.long()[:, None]).mean()  # float32 CE by hand
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    m = task.new_meter()
    m.update(logits, y)
    assert abs(m.compute()["loss"] - float(ref)) < 1e-6
