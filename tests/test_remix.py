"""Behavioural tests of Data Remixing (docs/methods/remix.md): KL values, the assignment rule, the
plan, masking, the warm-up loss, the assignment pass, the regression criterion, resume, 2-process DDP."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SMALL_MFEAT
from mmbalance.methods.remix import assign, auto_warmup_epochs, kl_to_uniform
from test_ddp import launch_2proc

from mmbalance.testing import build_trainer, first_batch

FAST = {**SMALL_MFEAT, "train.modality_eval": "none", "train.diagnostics": "none"}


def _logits_for(p: list[float]) -> torch.Tensor:
    return torch.log(torch.tensor([p]).clamp_min(1e-30))


def test_kl_to_uniform_values():
    assert float(kl_to_uniform(torch.zeros(1, 6))) == pytest.approx(0.0, abs=1e-7)
    assert float(kl_to_uniform(_logits_for([0.5, 0.5, 0, 0, 0, 0]))) == pytest.approx(1.584962, abs=1e-6)
    assert float(kl_to_uniform(_logits_for([1, 0, 0, 0, 0, 0]))) == pytest.approx(2.584962, abs=1e-6)


def test_assignment_rule_and_ties():
    kl = torch.tensor([[0.2, 0.9], [0.5, 0.5], [0.9, 0.2]])
    assert assign(kl).tolist() == [0, 1, 1]  # less confident (lower KL) wins; a tie goes to modality 2
    # replacing C by 6 shifts every KL by log2(6/C): the assignment does not change
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(50, 10, generator=g) * s for s in (1.0, 2.0, 0.5)]
    a10 = assign(torch.stack([kl_to_uniform(o) for o in logits], 1))
    a6 = assign(torch.stack([kl_to_uniform(o, 6) for o in logits], 1))
    assert torch.equal(a10, a6)
    assert assign(torch.tensor([[1.0, 3.0, 2.0]]), lower_is_harder=False).tolist() == [1]


def test_warmup_auto():
    assert [auto_warmup_epochs(e) for e in (50, 30, 80, 150, 60)] == [8, 5, 13, 25, 10]


def _trainer(tmp_path, name="r", epochs=2, dataset="mfeat-pix-mor", **sets):
    return build_trainer("remix", dataset, run_dir=tmp_path / name, epochs=epochs, sets={**FAST, **sets})


def test_plan_single_modality_batches_every_sample_once(tmp_path):
    """A forced assignment of 70 samples per modality (B = 64): the epoch is modality-2-only batches of
    64 and 6, then modality-1-only batches of 64 and 6; every training index exactly once."""
    tr = _trainer(tmp_path, epochs=1, warmup_epochs=0)
    method, ctx = tr.method, tr.ctx
    a, v = ctx.modalities
    n = len(tr.train_split)
    forced = torch.zeros(n, dtype=torch.long)
    forced[torch.arange(n) % 2 == 1] = 1
    method.scores = lambda c: torch.stack([forced.float(), 1 - forced.float()], 1)  # KL: lower → assigned
    seen = []
    orig = method.training_step

    def spy(c, batch):
        seen.append((batch["idx"].tolist(), tuple(c.present)))
        return orig(c, batch)

    method.training_step = spy
    tr.fit()
    assert [len(s[0]) for s in seen] == [64, 6, 64, 6]
    assert [s[1] for s in seen] == [(v,), (v,), (a,), (a,)]
    assert sorted(i for s in seen[:2] for i in s[0]) == list(range(1, n, 2))  # modality-2 (v) group first
    assert sorted(i for s in seen for i in s[0]) == list(range(n))


def test_masking_in_a_single_modality_batch(tmp_path):
    tr = _trainer(tmp_path, warmup_epochs=0)
    ctx, method = tr.ctx, tr.method
    a, v = ctx.modalities
    method.assignment = torch.zeros(len(tr.train_split), dtype=torch.long)
    ctx.epoch, ctx.epochs_in_phase, ctx.present = 0, 2, (a,)
    batch = first_batch(tr)
    captured = {}
    hook = ctx.raw_model.fusion.register_forward_hook(lambda mod, args, out: captured.update(args[0]))
    out = method.training_step(ctx, batch)
    hook.remove()
    assert torch.equal(captured[v], torch.zeros_like(captured[v])) and captured[a].abs().sum() > 0
    out.loss.backward()
    for p in ctx.raw_model.encoders[v].parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
    assert all(p.grad is None for p in ctx.modules["remix_heads"].heads[v].parameters())
    assert all(p.grad is not None for p in ctx.modules["remix_heads"].heads[a].parameters())
    # the loss is ℓ(o) + γ·ℓ(u_a): recomputed by hand from the same forward pieces
    with torch.no_grad():
        za = ctx.raw_model.encoders[a](batch[a])
        o = ctx.raw_model.head(torch.cat([za, torch.zeros_like(za)], 1))
        ua = ctx.modules["remix_heads"].heads[a](za)
        want = torch.nn.functional.cross_entropy(o, batch["label"]) + torch.nn.functional.cross_entropy(ua, batch["label"])
    assert float(out.loss) == pytest.approx(float(want), abs=1e-6)


def test_warmup_loss_is_multitask_with_half_weights(tmp_path):
    tr = _trainer(tmp_path, warmup_epochs=3, epochs=4)
    ctx, method = tr.ctx, tr.method
    ctx.epoch, ctx.epochs_in_phase, ctx.present = 0, 4, tuple(ctx.modalities)
    batch = first_batch(tr)
    out = method.training_step(ctx, batch)
    with torch.no_grad():
        y = batch["label"]
        o = ctx.forward(batch)
        u = ctx.modules["remix_heads"]({m: o.features[m] for m in ctx.modalities})
        ce = torch.nn.functional.cross_entropy
        want = ce(o.logits, y) + 0.5 * ce(u[ctx.modalities[0]], y) + 0.5 * ce(u[ctx.modalities[1]], y)
    assert abs(float(out.loss) - float(want)) < 1e-6
    assert method.epoch_plan(ctx) is None  # warm-up: the normal loader


def test_assignment_pass_is_eval_mode_no_graph_and_restores_train_mode(tmp_path):
    tr = _trainer(tmp_path, **{"model.dropout": 0.5})
    ctx, method = tr.ctx, tr.method
    s1, s2 = method.scores(ctx), method.scores(ctx)
    assert torch.equal(s1, s2) and not s1.requires_grad  # dropout off in the pass
    assert s1.shape == (len(tr.train_split), 2) and not torch.isnan(s1).any()
    assert ctx.model.training and all(mod.training for mod in ctx.modules.values())


def test_assignment_is_recomputed_every_epoch(tmp_path):
    tr = _trainer(tmp_path, epochs=3, warmup_epochs=1, **{"train.max_steps_per_epoch": 2})
    method = tr.method
    calls = []
    orig = method.scores
    flips = iter([torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])])

    def scripted(c):
        calls.append(c.epoch)
        s = orig(c)
        s[:] = next(flips)  # mocked head outputs that change between epochs
        return s

    method.scores = scripted
    groups = []
    orig_plan = method.epoch_plan

    def plan(c):
        p = orig_plan(c)
        if p is not None:
            groups.append([(g.present, len(g.indices)) for g in p])
        return p

    method.epoch_plan = plan
    tr.fit()
    n = len(tr.train_split)
    a, v = tr.ctx.modalities
    assert calls == [1, 2]
    assert groups[0] == [((v,), 0), ((a,), n)] and groups[1] == [((v,), n), ((a,), 0)]


def test_regression_gives_each_sample_to_its_larger_error_modality():
    y = torch.tensor([0.0, 1.0])
    err = torch.stack([(torch.tensor([0.5, 1.0]) - y).abs(), (torch.tensor([0.1, 3.0]) - y).abs()], 1)
    assert assign(err, lower_is_harder=False).tolist() == [0, 1]


@pytest.mark.parametrize("dataset,sets", [
    ("synthetic", {"dataset.n_samples": 80, "dataset.n_modalities": 3}),
    ("synthetic", {"dataset.n_samples": 80, "dataset.n_modalities": 6}),
    ("synthetic-regression", {"dataset.n_samples": 80}),
    ("synthetic-seg", {"dataset.n_samples": 30, "dataset.image_size": 8}),
    ("mfeat", {**SMALL_MFEAT, "group_order": "interleaved"}),
])
def test_runs(run_cli, dataset, sets):
    code, _, res = run_cli("remix", dataset, epochs=2,
                           sets={**sets, "warmup_epochs": 1, "train.modality_eval": "none"})
    assert code == 0 and res["status"] == "ok"
    assert sum(v for k, v in res["method_metrics"].items() if k.startswith("assigned/")) == res["num_train_samples"]


def test_resume_gives_the_same_final_numbers(kill_and_resume):
    sets = {**FAST, "warmup_epochs": 1}
    (_, full), (code, _, resumed) = kill_and_resume("remix", sets=sets, epochs=4, stop_after=2)
    assert code == 0 and resumed["test"] == full["test"] and resumed["val"] == full["val"]
    assert resumed["method_metrics"] == full["method_metrics"]


@pytest.mark.ddp
def test_two_process_assignment_identical_and_complete(tmp_path):
    """Each rank scores its shard; the gathered scores give the same assignment on both ranks, covering
    every training sample once; equal step counts (no hang) and identical replicas after a remixed epoch."""
    rd = tmp_path / "run"
    proc = launch_2proc(["--method", "remix", "--dataset", "mfeat", "--epochs", "2", "--set",
                         "dataset.limit_per_class=20", "--set", "warmup_epochs=1", "--set", "train.modality_eval=none",
                         "--set", "train.diagnostics=none", "--run-dir", str(rd), "--quiet"], tmp_path / "dump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "dump" / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "dump" / "rank1.pt", weights_only=False)
    a0, a1 = r0["method_state"]["assignment"], r1["method_state"]["assignment"]
    assert a0 is not None and torch.equal(a0, a1) and len(a0) == 140
    assert r0["method_metrics"] == r1["method_metrics"]
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    for k in r0["extra"]["remix_heads"]:
        assert torch.equal(r0["extra"]["remix_heads"][k], r1["extra"]["remix_heads"][k]), k
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train_loss"]) for r in rows)
