"""The loop: equivalence with plain PyTorch, determinism, resume, NaN detection, selection, batching."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL_MFEAT

from mmbalance.data import TensorBatcher, TensorSplit, eval_index_shards
from mmbalance.testing import build_trainer


def test_baseline_equals_hand_written_loop(tmp_path):
    """baseline.md §8.1: 3 steps bit-identical to a plain PyTorch loop (same data order/model/optimizer)."""
    from accelerate.utils import set_seed

    from mmbalance.registry import create_model

    tr = build_trainer("baseline", run_dir=tmp_path / "r", epochs=1, sets={**SMALL_MFEAT, "train.max_steps_per_epoch": 3})
    tr.fit()
    engine_params = [p.detach().clone() for p in tr.ctx.raw_model.parameters()]

    data = tr.data
    set_seed(0)
    model = create_model("mlp_concat", modalities=data.modalities, input_shapes=data.input_shapes, out_dim=10,
                         enc_hidden=128, enc_out=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    torch.manual_seed(2)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
    for k in range(3):
        idx = order[k * 64:(k + 1) * 64]
        out = model({m: data.train.inputs[m][idx] for m in data.modalities})
        loss = torch.nn.functional.cross_entropy(out.logits, data.train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for a, b in zip(engine_params, model.parameters()):
        assert torch.equal(a, b)


def test_same_seed_same_numbers(run_cli, tmp_path):
    _, _, a = run_cli("baseline", sets=SMALL_MFEAT, epochs=3, run_dir=tmp_path / "a")
    _, _, b = run_cli("baseline", sets=SMALL_MFEAT, epochs=3, run_dir=tmp_path / "b")
    _, _, c = run_cli("baseline", sets=SMALL_MFEAT, epochs=3, seed=1, run_dir=tmp_path / "c")
    assert a["test"] == b["test"] and a["val"] == b["val"] and a["config_hash"] == b["config_hash"]
    assert a["config_hash"] != c["config_hash"]


def test_resume_continues_to_the_same_final_numbers(run_cli, tmp_path, monkeypatch):
    sets = {**SMALL_MFEAT, "train.scheduler": "cosine", "train.warmup_epochs": 1, "model.dropout": 0.2}
    _, _, full = run_cli("baseline", sets=sets, epochs=4, run_dir=tmp_path / "full")
    monkeypatch.setenv("MMBALANCE_STOP_AFTER_EPOCHS", "2")
    with pytest.raises(KeyboardInterrupt):
        run_cli("baseline", sets=sets, epochs=4, run_dir=tmp_path / "killed")
    assert not (tmp_path / "killed" / "result.json").exists()
    monkeypatch.delenv("MMBALANCE_STOP_AFTER_EPOCHS")
    code, rd, resumed = run_cli("baseline", sets=sets, epochs=4, run_dir=tmp_path / "killed", extra=["--resume"])
    assert code == 0
    assert resumed["test"] == full["test"] and resumed["val"] == full["val"]
    assert len((rd / "metrics.jsonl").read_text().splitlines()) == 4


def test_non_finite_loss_stops_and_marks_failed(run_cli, capsys):
    code, rd, res = run_cli("baseline", sets={**SMALL_MFEAT, "train.lr": 1e12}, epochs=3)
    assert code == 3
    assert res["status"] == "failed" and "non-finite training loss" in res["error"]
    assert "non-finite" in capsys.readouterr().err


def test_selection_uses_validation_and_tests_once(tmp_path, monkeypatch):
    tr = build_trainer("baseline", run_dir=tmp_path / "r", epochs=4, sets=SMALL_MFEAT)
    seq = iter([0.5, 0.9, 0.7, 0.9])  # epoch 1 best; epoch 3 ties → earlier epoch kept unless lower loss
    calls = {"test": 0}
    real = tr.evaluate

    def fake_eval(split, absent=()):
        if split is tr.data.test and not absent:
            calls["test"] += 1
            return real(split, absent)
        if split is tr.data.val and not absent:
            return {"accuracy": next(seq), "loss": 1.0}
        return real(split, absent)

    def fake_with_modalities(split, full=True):  # the full pass and the per-modality passes together
        return (fake_eval(split) if full else None), tr.evaluate_per_modality(split)

    monkeypatch.setattr(tr, "evaluate", fake_eval)
    monkeypatch.setattr(tr, "evaluate_with_modalities", fake_with_modalities)
    res = tr.fit()
    assert res["selected"]["epoch"] == 1 and calls["test"] == 1


def test_tensor_batcher_shards_and_keeps_last_partial_batch():
    split = TensorSplit({"a": torch.arange(10).float().unsqueeze(1)}, torch.arange(10))
    single = [b["idx"].tolist() for b in TensorBatcher(split, 4, shuffle=False)]
    assert single == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    r0 = torch.cat([b["idx"] for b in TensorBatcher(split, 2, shuffle=True, seed=3, rank=0, world_size=3)])
    r1 = torch.cat([b["idx"] for b in TensorBatcher(split, 2, shuffle=True, seed=3, rank=1, world_size=3)])
    r2 = torch.cat([b["idx"] for b in TensorBatcher(split, 2, shuffle=True, seed=3, rank=2, world_size=3)])
    assert len(r0) == len(r1) == len(r2) == 4
    assert set(torch.cat([r0, r1, r2]).tolist()) == set(range(10))


def test_eval_shards_cover_every_sample_once():
    n, bs, world = 11, 2, 3
    shards = [eval_index_shards(n, bs, r, world) for r in range(world)]
    gathered = torch.cat([torch.cat([shards[r][k] for r in range(world)]) for k in range(len(shards[0]))])
    assert gathered[:n].tolist() == list(range(n))


def test_bf16_autocast_runs_on_cpu(run_cli):
    code, _, res = run_cli("baseline", sets=SMALL_MFEAT, epochs=1, extra=["--mixed-precision", "bf16"])
    assert code == 0 and res["status"] == "ok"


def test_lr_schedules(tmp_path):
    from mmbalance.config import TrainConfig
    from mmbalance.engine import LRSchedule

    step = LRSchedule(TrainConfig(scheduler="step", step_size=2, gamma=0.5), epochs=6, steps_per_epoch=3)
    assert [step.factor(e, 0) for e in range(5)] == [1, 1, 0.5, 0.5, 0.25]
    cos = LRSchedule(TrainConfig(scheduler="cosine", warmup_epochs=1, lr=0.1), epochs=3, steps_per_epoch=2)
    assert cos.factor(0, 0) == pytest.approx(0.5) and cos.factor(0, 1) == pytest.approx(1.0)
    assert cos.factor(2, 1) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 3 / 4)).item()))
    pl = LRSchedule(TrainConfig(scheduler="plateau", plateau_patience=1, plateau_factor=0.1), epochs=5, steps_per_epoch=1)
    for loss in [1.0, 1.0, 1.0]:
        pl.observe_val_loss(loss)
    assert pl.factor(0, 0) == pytest.approx(0.1)


def test_metrics_jsonl_has_per_epoch_rows(run_cli):
    _, rd, _ = run_cli("baseline", sets=SMALL_MFEAT, epochs=2)
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and all("train_loss" in r and "val" in r for r in rows)


def test_eval_shards_do_not_pad_a_single_process_or_small_splits():
    assert [len(b) for b in eval_index_shards(5, 512, 0, 1)] == [5]
    assert [len(b) for b in eval_index_shards(7, 3, 0, 1)] == [3, 3, 1]
    assert sum(len(b) for b in eval_index_shards(5, 512, 1, 2)) == 3  # 5 → padded to 6, 3 per rank


# ---------------------------------------------------------------- loop invariants (mutation-tested)
def test_loop_reshuffles_every_epoch_and_extra_passes_follow_their_key(tmp_path):
    tr = build_trainer("baseline", run_dir=tmp_path / "r", epochs=2, sets={**SMALL_MFEAT, "train.modality_eval": "none"})
    firsts = []
    real = tr.method.training_step

    def spy(ctx, batch):
        if ctx.step == 0:
            firsts.append(batch["idx"].clone())
        return real(ctx, batch)
    tr.method.training_step = spy
    tr.fit()
    assert len(firsts) == 2 and not torch.equal(firsts[0], firsts[1])
    a, b = (next(tr.ctx.train_batches(shuffle=True, key=k))["idx"] for k in (1, 2))
    assert not torch.equal(a, b)


def test_heldout_is_carved_out_of_the_training_loop(tmp_path):
    tr = build_trainer("gblending", run_dir=tmp_path / "r", epochs=1, sets=SMALL_MFEAT)
    n = len(tr.data.train)
    assert len(tr.train_split) + len(tr.ctx.heldout) == n and len(tr.ctx.heldout) > 0
    m = tr.data.modalities[0]
    seen = {tuple(r.tolist()) for b in tr.loader_train for r in b[m]}
    held = {tuple(r.tolist()) for b in tr.ctx.train_batches(split="heldout") for r in b[m]}
    assert held and not seen & held


def test_method_gradient_edits_come_before_clipping(tmp_path, monkeypatch):
    """Step order: after_backward → clip → optimizer step; a method's ×1e3 edit is clipped away."""
    tr = build_trainer("baseline", run_dir=tmp_path / "r", epochs=1,
                       sets={**SMALL_MFEAT, "train.grad_clip": 1e-3, "train.max_steps_per_epoch": 1,
                             "train.modality_eval": "none"})
    events = []

    def edit(ctx):
        events.append("edit")
        for p in ctx.raw_model.parameters():
            if p.grad is not None:
                p.grad.mul_(1e3)
    tr.method.after_backward = edit
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm, *a, **k):
        events.append("clip")
        return real_clip(params, max_norm, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    tr.fit()
    assert events[:2] == ["edit", "clip"]


def test_extra_module_gradients_are_cleared_every_step(tmp_path):
    tr = build_trainer("cggm", run_dir=tmp_path / "r", epochs=1,
                       sets={**SMALL_MFEAT, "train.max_steps_per_epoch": 2, "train.modality_eval": "none"})
    grads = []
    real = tr.method.training_step

    def spy(ctx, batch):
        grads.append([None if p.grad is None else float(p.grad.abs().sum()) for p in ctx.modules["cggm_classifiers"].parameters()])
        return real(ctx, batch)
    tr.method.training_step = spy
    tr.fit()
    assert len(grads) == 2 and all(g is None or g == 0 for g in grads[1])


def test_evaluation_in_eval_mode_and_lr_multipliers_applied(tmp_path):
    tr = build_trainer("baseline", run_dir=tmp_path / "r", epochs=1, sets={**SMALL_MFEAT, "model.dropout": 0.5})
    a, b = tr.evaluate(tr.data.val), tr.evaluate(tr.data.val)
    assert a == b and tr.ctx.model.training
    g = tr.ctx.optimizer.param_groups[0]
    g["lr_mult"] = 0.25
    tr._set_lrs(0.5)
    assert g["lr"] == pytest.approx(g["base_lr"] * 0.5 * 0.25)


def test_resume_restores_the_method_generator(kill_and_resume):
    """MRD draws its masks from ctx.generator: a resumed run must continue that stream."""
    sets = {**SMALL_MFEAT, "train.modality_eval": "none"}
    (_, full), (code, _, resumed) = kill_and_resume("mrd", sets=sets, epochs=2, stop_after=1)
    assert code == 0 and resumed["val"] == full["val"] and resumed["test"] == full["test"]
