"""Behavioural tests of SMV (docs/methods/smv.md "What the tests check"): Shapley closed forms, the copy
rule, the plan, per-row masking, the valuation pass against a hand-built oracle, the modality-level rule,
the schedule, refusals, resume and runs on every task."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_MFEAT
from mmbalance.methods.smv import copies_from_phi, modality_level_copies, plan_from_copies, shapley_values

from mmbalance.errors import MethodNotApplicable
from mmbalance.testing import build_trainer, first_batch

FAST = {**SMALL_MFEAT, "train.modality_eval": "none", "train.diagnostics": "none"}


def _v2(va: int, vv: int, fused: int, size_weighted: bool = True) -> list[float]:
    """v over the subsets ∅, {a}, {v}, {a, v} (bit masks 0..3)."""
    return [0.0, va, vv, (2 if size_weighted else 1) * fused]


# ---------------------------------------------------------------- closed forms (smv.md §7.1–2, 6)
@pytest.mark.parametrize("pattern,phi", [
    ((1, 1, 1), (1, 1)), ((1, 0, 1), (1.5, 0.5)), ((0, 0, 1), (1, 1)), ((0, 0, 0), (0, 0)),
    ((1, 1, 0), (0, 0)), ((0, 1, 0), (-0.5, 0.5)), ((0, 1, 1), (0.5, 1.5)), ((1, 0, 0), (0.5, -0.5)),
])
def test_shapley_two_modalities_all_patterns(pattern, phi):
    got = shapley_values(torch.tensor([_v2(*pattern)]))[0].tolist()
    assert got == pytest.approx(list(phi), abs=1e-12)
    assert sum(got) == pytest.approx(2 * pattern[2])  # efficiency: Σ φ = M·1[fused correct]


def test_shapley_three_modalities():
    # subsets by bit mask (a = 1, b = 2, c = 4): only {a}, {a, b}, {a, b, c} correct, v(S) = |S|
    v = torch.zeros(1, 8, dtype=torch.float64)
    v[0, 1], v[0, 3], v[0, 7] = 1, 2, 3
    assert shapley_values(v)[0].tolist() == pytest.approx([5 / 3, 7 / 6, 1 / 6], abs=1e-12)
    all_correct = torch.tensor([[0.0] + [float(bin(s).count("1")) for s in range(1, 8)]])
    assert shapley_values(all_correct)[0].tolist() == pytest.approx([1, 1, 1], abs=1e-12)


def test_copy_rule_and_the_indicator_value():
    phi = torch.tensor([[1.5], [1.0], [0.5], [1 / 6], [0.0], [-1 / 6], [-0.5], [0.4], [-0.1]])
    assert copies_from_phi(phi).flatten().tolist() == [0, 0, 1, 2, 2, 3, 3, 0, 0]
    # indicator value (BalanceBenchmark): a sample correct everywhere gets φ = 0.5 → one copy per modality
    ind = shapley_values(torch.tensor([_v2(1, 1, 1, size_weighted=False)]))
    assert ind[0].tolist() == [0.5, 0.5] and copies_from_phi(ind).tolist() == [[1, 1]]
    assert copies_from_phi(shapley_values(torch.tensor([_v2(1, 1, 1)]))).tolist() == [[0, 0]]


def test_plan_multiset_of_indices_and_tags():
    phi = torch.tensor([[1.0, 1.0], [1.5, 0.5], [-0.5, 0.5], [0.0, 0.0]])
    idx, tags = plan_from_copies(copies_from_phi(phi))
    pairs = sorted(zip(idx.tolist(), tags.tolist()))
    expected = sorted([(i, -1) for i in range(4)] + [(1, 1), (2, 0), (2, 0), (2, 0), (2, 1),
                                                      (3, 0), (3, 0), (3, 1), (3, 1)])
    assert pairs == expected


def test_modality_level_rule():
    g = torch.Generator().manual_seed(0)
    c = modality_level_copies(torch.tensor([0.9, 0.3], dtype=torch.float64), 1000, 1.0, "linear", g)
    assert int(c.sum()) == 400 and int(c[:, 0].sum()) == 0  # d = (2/3)·|0.1 − 0.7| = 0.4; weak modality 2
    assert int(c[:, 1].max()) > 1  # drawn with replacement
    assert int(modality_level_copies(torch.tensor([0.5, 0.5]), 1000, 1.0, "linear", g).sum()) == 0
    # M = 3, tie between the first two gaps: the later one wins; d = (2/3)·(0.5 − mean(0.5, 0.1))
    c3 = modality_level_copies(torch.tensor([0.5, 0.5, 0.9], dtype=torch.float64), 300, 1.0, "linear", g)
    assert int(c3[:, 1].sum()) == 40 and int(c3[:, 0].sum()) == int(c3[:, 2].sum()) == 0


# ---------------------------------------------------------------- the method on a real model
def _trainer(tmp_path, name="r", method="smv", dataset="mfeat", epochs=2, **sets):
    return build_trainer(method, dataset, run_dir=tmp_path / name, epochs=epochs, sets={**FAST, **sets})


def test_tagged_rows_keep_only_their_modality_and_gradients_are_per_row(tmp_path):
    tr = _trainer(tmp_path)
    ctx, method, model = tr.ctx, tr.method, tr.ctx.raw_model
    mods = ctx.modalities
    batch = {k: v[:4] for k, v in first_batch(tr).items()}
    batch["plan_tag"] = torch.tensor([-1, 0, 2, 1])
    out = method.training_step(ctx, batch)
    for i, t in enumerate(batch["plan_tag"].tolist()):
        for k, m in enumerate(mods):
            zero = bool((out.output.pooled[m][i] == 0).all())
            assert zero == (t != -1 and t != k), (i, t, m)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    total = 0
    for i, t in enumerate(batch["plan_tag"].tolist()):  # oracle: each row alone, its own modalities only
        z = {m: model.encoders[m](batch[m][i:i + 1]) * (1.0 if t in (-1, k) else 0.0) for k, m in enumerate(mods)}
        total = total + F.cross_entropy(model.head(torch.cat([z[m] for m in mods], 1)), batch["label"][i:i + 1]) / 4
    total.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-7), n


def test_valuation_matches_a_hand_built_oracle_in_eval_mode(tmp_path):
    tr = _trainer(tmp_path, **{"model.dropout": 0.3})
    ctx, method, model = tr.ctx, tr.method, tr.ctx.raw_model
    mods = ctx.modalities
    calls = {m: 0 for m in mods}
    for m in mods:
        model.encoders[m].register_forward_hook(lambda mod, a, o, m=m: calls.__setitem__(m, calls[m] + 1))
    ctx.model.train()
    phi = method.valuate(ctx)
    assert model.training  # train mode restored
    n_batches = len(list(ctx.train_batches("train", shuffle=False)))
    assert all(c == n_batches for c in calls.values())  # the encoders run once per batch
    split = tr.train_split
    model.eval()
    with torch.no_grad():
        z = {m: model.encoders[m](split.inputs[m]) for m in mods}
        y = split.labels
        v = torch.zeros(len(y), 2 ** len(mods), dtype=torch.float64)
        for s in range(1, 2 ** len(mods)):
            keep = [k for k in range(len(mods)) if s >> k & 1]
            logits = model.head(torch.cat([z[m] * (k in keep) for k, m in enumerate(mods)], 1))
            v[:, s] = len(keep) * (logits.argmax(1) == y).double()
    model.train()
    assert torch.allclose(phi, shapley_values(v), atol=1e-12)
    assert torch.equal(phi, method.valuate(ctx))  # deterministic (eval mode: no dropout)


def test_schedule_plan_and_mixed_batches(tmp_path):
    """Warm-up epoch: the default loader (no tags); from epoch W on: originals once each plus the copies
    of the valuation that ran at the start of that epoch, mixed in the same batches."""
    tr = _trainer(tmp_path, warmup_epochs=1)
    method = tr.method
    seen = []
    orig_step, orig_val = method.training_step, method.valuate
    valuations = []

    def spy(ctx, batch):
        seen.append((ctx.epoch, batch["idx"].tolist(), None if "plan_tag" not in batch else batch["plan_tag"].tolist()))
        return orig_step(ctx, batch)

    def spy_val(ctx, positions=None):
        valuations.append(ctx.epoch)
        return orig_val(ctx, positions)

    method.training_step, method.valuate = spy, spy_val
    tr.fit()
    assert valuations == [1]
    assert all(t is None for e, _, t in seen if e == 0)
    rows = [(i, t) for e, idx, tags in seen if e == 1 for i, t in zip(idx, tags)]
    n = len(tr.train_split)
    exp_idx, exp_tags = plan_from_copies(method.copies)
    assert sorted(rows) == sorted(zip(exp_idx.tolist(), exp_tags.tolist()))
    assert sorted(i for i, t in rows if t == -1) == list(range(n))
    assert any(len(set(tags)) > 1 and -1 in tags for e, _, tags in seen if e == 1)  # mixed batches
    assert method.metrics()["samples_trained"] == 2 * n + int(method.copies.sum()) == len(rows) + n  # the data count


def test_modality_level_values_only_the_subset(tmp_path):
    tr = _trainer(tmp_path, method="smv_modality", warmup_epochs=0, part_ratio=0.1)
    ctx, method = tr.ctx, tr.method
    ctx.epoch, ctx.epochs_in_phase = 0, 2
    method.on_epoch_start(ctx)
    n = len(tr.train_split)
    assert int((~torch.isnan(method.phi[:, 0])).sum()) <= int(0.1 * n)
    gap = (1 - method.phi_mean).tolist()
    w = max(range(3), key=lambda k: (gap[k], k))  # the largest gap, ties to the later modality
    d = 2 / 3 * (gap[w] - (sum(gap) - gap[w]) / 2)
    assert int(method.copies.sum()) == int(round(d * n, 6)) and int(method.copies[:, w].sum()) == int(method.copies.sum())


def test_refusals(tmp_path):
    with pytest.raises(MethodNotApplicable, match="MMTM"):
        _trainer(tmp_path, "mmtm", **{"model.name": "mlp_mmtm"})
    tr = _trainer(tmp_path, "mmtm_in", mask_level="input", **{"model.name": "mlp_mmtm"})
    assert tr.method.hp.mask_level == "input"


@pytest.mark.parametrize("method,dataset,sets", [
    ("smv", "synthetic-regression", {"dataset.n_samples": 40}),
    ("smv", "synthetic-seg", {"dataset.n_samples": 40, "train.batch_size": 8}),
    ("smv", "synthetic", {"dataset.n_modalities": 3, "dataset.feature": "sequence", "dataset.n_samples": 40,
                          "batching": "grouped"}),
    ("smv_modality", "mfeat", {**SMALL_MFEAT, "model.name": "mlp_transformer_fusion", "mask_level": "input"}),
])
def test_runs_on_every_task_and_fusion(run_cli, method, dataset, sets):
    code, rd, res = run_cli(method, dataset, epochs=2, sets={"warmup_epochs": 1, "train.modality_eval": "none",
                                                            "train.diagnostics": "none", **sets})
    assert code == 0 and res["status"] == "ok"
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert "method/epoch_samples" in rows[1]


def test_resume_replays_the_plan(kill_and_resume):
    (full_dir, full), (code, rd, res) = kill_and_resume("smv", sets={**FAST, "warmup_epochs": 1}, epochs=3, stop_after=2)
    assert code == 0 and res["test"] == full["test"] and res["val"] == full["val"]
    a = [json.loads(x) for x in (full_dir / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert a[2]["method/epoch_samples"] == b[2]["method/epoch_samples"]
    assert res["method_metrics"]["samples_trained"] == full["method_metrics"]["samples_trained"]  # restored count
