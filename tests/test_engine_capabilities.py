"""The engine's two optional capabilities: an epoch plan (ordered groups of training indices with the
modalities present) and several optimizer sub-steps per batch."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import SMALL_MFEAT

from mmbalance.engine import Trainer
from mmbalance.interface import BalancingMethod, BatchGroup, StepOutput
from mmbalance.testing import build_trainer

SETS = {**SMALL_MFEAT, "train.modality_eval": "none", "train.diagnostics": "none"}


class PlanToy(BalancingMethod):
    """Plan: the last 70 training rows with modality 2 only, then the first 58 with modality 1 only."""

    def __init__(self, groups):
        super().__init__()
        self.groups = groups
        self.seen: list[tuple[list[int], tuple[str, ...], int]] = []

    def epoch_plan(self, ctx):
        return self.groups(ctx)

    def training_step(self, ctx, batch):
        self.seen.append((batch["idx"].tolist(), ctx.present, ctx.epoch))
        return super().training_step(ctx, batch)


def test_plan_groups_in_order_with_their_modalities(tmp_path):
    """|D_2| = 70, |D_1| = 58, B = 64 → three steps: 64 and 6 rows of group 2, then 58 of group 1;
    every planned index exactly once, nothing outside the training split."""
    tr = build_trainer("baseline", "mfeat-pix-mor", run_dir=tmp_path / "r", epochs=2, sets=SETS)
    a, v = tr.ctx.modalities
    n = len(tr.train_split)
    method = PlanToy(lambda ctx: [BatchGroup(torch.arange(n - 70, n), (v,)), BatchGroup(torch.arange(58), (a,))])
    tr.method = method
    tr.fit()
    epoch0 = [s for s in method.seen if s[2] == 0]
    assert [len(s[0]) for s in epoch0] == [64, 6, 58]
    assert [s[1] for s in epoch0] == [(v,), (v,), (a,)]
    assert sorted(i for s in epoch0[:2] for i in s[0]) == list(range(n - 70, n))
    assert sorted(epoch0[2][0]) == list(range(58))
    epoch1 = [s for s in method.seen if s[2] == 1]
    assert epoch1[0][0] != epoch0[0][0]  # reshuffled inside the group every epoch (seeded)


def test_plan_is_deterministic_and_none_means_the_default_loader(tmp_path):
    orders = []
    for name in ("a", "b"):
        tr = build_trainer("baseline", "mfeat", run_dir=tmp_path / name, epochs=1, sets=SETS)
        n = len(tr.train_split)
        tr.method = PlanToy(lambda ctx, n=n: [BatchGroup(torch.arange(n))])
        tr.fit()
        orders.append([s[0] for s in tr.method.seen])
    assert orders[0] == orders[1]
    tr = build_trainer("baseline", "mfeat", run_dir=tmp_path / "c", epochs=1, sets=SETS)
    tr.method = PlanToy(lambda ctx: None)
    tr.fit()
    assert [s[0] for s in tr.method.seen] == [b["idx"].tolist() for b in tr.loader_train]
    assert all(s[1] == tuple(tr.ctx.modalities) for s in tr.method.seen)


def test_plan_rejects_bad_groups(tmp_path):
    tr = build_trainer("baseline", "mfeat", run_dir=tmp_path / "r", epochs=1, sets=SETS)
    n = len(tr.train_split)
    tr.method = PlanToy(lambda ctx: [BatchGroup(torch.arange(n + 1))])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 140\)"):
        tr.fit()
    tr.method = PlanToy(lambda ctx: [BatchGroup(torch.arange(3), ("nope",))])
    with pytest.raises(ValueError, match="present=.*subset"):
        tr.fit()


def test_plan_sharding_across_ranks_pads_and_equalises_steps():
    """Rank r of W takes positions r, r+W, … of one permutation shared by every rank, padded by
    wrap-around: both ranks take the same number of batches and together cover every index."""
    from mmbalance.data import TensorSplit

    split = TensorSplit({"a": torch.zeros(200, 1)}, torch.zeros(200, dtype=torch.long))
    groups = [BatchGroup(torch.arange(0, 71), ("a",)), BatchGroup(torch.arange(100, 105), ("a",))]
    per_rank = []
    for rank in (0, 1):
        fake = SimpleNamespace(accelerator=SimpleNamespace(num_processes=2, process_index=rank,
                                                           device=torch.device("cpu")),
                               cfg=SimpleNamespace(batch_size=16), train_split=split,
                               ctx=SimpleNamespace(modalities=["a"]), config=SimpleNamespace(seed=3),
                               _per_process_batch=lambda bs: bs)  # each rank takes 16 (per-process batch)
        per_rank.append([b["idx"].tolist() for b, _ in Trainer._plan_batches(fake, groups, key=5)])
    assert [len(b) for b in per_rank[0]] == [len(b) for b in per_rank[1]] == [16, 16, 4, 3]
    g1 = [i for r in per_rank for b in r[:3] for i in b]
    assert sorted(set(g1)) == list(range(71)) and len(g1) == 72  # one padded repeat
    g2 = [i for r in per_rank for i in r[3]]
    assert sorted(set(g2)) == list(range(100, 105)) and len(g2) == 6


class SubstepToy(BalancingMethod):
    """Two sub-steps per batch, each with a forward restricted to one encoder."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, int]] = []

    def training_substeps(self, ctx, batch):
        for m in ctx.modalities:
            out = ctx.forward(batch, only=(m,))
            yield StepOutput(out.pooled[m].pow(2).mean(), None)

    def after_backward(self, ctx):
        self.calls.append((ctx.step, ctx.substep))

    def predict(self, ctx, batch, absent=()):
        return torch.zeros(len(batch["label"]), 10)


def test_substeps_run_one_update_each_and_the_schedule_counts_batches(tmp_path):
    tr = build_trainer("baseline", "mfeat-pix-mor", run_dir=tmp_path / "r", epochs=1,
                       sets={**SETS, "train.max_steps_per_epoch": 2})
    from torch import nn

    tr.ctx.raw_model.fusion, tr.ctx.raw_model.head = nn.Identity(), nn.Identity()
    tr.method = SubstepToy()
    tr.fit()
    assert tr.method.calls == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert tr.ctx.global_step == 2
    assert all(p.grad is None for p in tr.ctx.raw_model.parameters())  # the batch ends with no gradient


def test_plan_on_a_map_style_dataset_gives_training_positions_as_idx():
    """The DataLoader path (image/volume datasets): the same sharding; ``idx`` = positions in the
    training split, and the rows are the dataset's items at those positions."""
    from torch.utils.data import Dataset

    class Rows(Dataset):
        def __len__(self):
            return 30

        def __getitem__(self, i):
            return {"a": torch.tensor([float(i)]), "label": torch.tensor(i % 3)}

    groups = [BatchGroup(torch.arange(10, 21), ("a",), shuffle=False)]
    fake = SimpleNamespace(accelerator=SimpleNamespace(num_processes=2, process_index=1, device=torch.device("cpu")),
                           cfg=SimpleNamespace(batch_size=4), train_split=Rows(),
                           ctx=SimpleNamespace(modalities=["a"]), config=SimpleNamespace(seed=0),
                           _per_process_batch=lambda bs: bs)
    batches = [b for b, _ in Trainer._plan_batches(fake, groups, key=0)]
    idx = [i for b in batches for i in b["idx"].tolist()]
    assert idx == [11, 13, 15, 17, 19, 10]  # rank 1 of 2: odd positions of 10..20, padded by wrap-around
    assert all(torch.equal(b["a"].reshape(-1), b["idx"].float()) for b in batches)


def _fake_trainer(split, rank: int, world: int, batch_size: int, seed: int = 3):
    return SimpleNamespace(accelerator=SimpleNamespace(num_processes=world, process_index=rank, device=torch.device("cpu")),
                           cfg=SimpleNamespace(batch_size=batch_size), train_split=split,
                           ctx=SimpleNamespace(modalities=["a"]), config=SimpleNamespace(seed=seed),
                           _per_process_batch=lambda bs: bs)


def test_plan_tags_travel_with_their_rows_through_shuffle_padding_and_sharding():
    """A group with repeated indices and per-sample tags (tag = 1000·copy + index, so every (idx, tag) pair
    is checkable by hand): every delivered row's tag is the one given for that row, on both ranks; the two
    ranks together deliver the group's multiset of (idx, tag) pairs plus the wrap-around padding; the
    untagged group gets no plan_tag; the tags come out shuffled with the rows (not in input order)."""
    from mmbalance.data import TensorSplit

    split = TensorSplit({"a": torch.arange(50.0)[:, None]}, torch.zeros(50, dtype=torch.long))
    idx = torch.cat([torch.arange(20), torch.tensor([3, 3, 7, 11, 19])])
    copy = torch.cat([torch.zeros(20, dtype=torch.long), torch.tensor([1, 2, 1, 1, 1])])
    tags = 1000 * copy + idx
    groups = [BatchGroup(idx, tags=tags), BatchGroup(torch.arange(30, 33))]
    pairs, counts = [], []
    for rank in (0, 1):
        batches = [b for b, _ in Trainer._plan_batches(_fake_trainer(split, rank, 2, 4), groups, key=7)]
        counts.append([len(b["idx"]) for b in batches])
        tagged = [b for b in batches if "plan_tag" in b]
        assert len(tagged) == 4 and all("plan_tag" not in b for b in batches[4:])
        for b in tagged:
            assert torch.equal(b["plan_tag"] % 1000, b["idx"])  # each row keeps its own tag
            assert torch.equal(b["a"].reshape(-1).long(), b["idx"])
            pairs += list(zip(b["idx"].tolist(), b["plan_tag"].tolist()))
    assert counts[0] == counts[1] == [4, 4, 4, 1, 2]  # 25 rows → 13 per rank (one padded), then 3 → 2
    expected = sorted(zip(idx.tolist(), tags.tolist()))
    assert len(pairs) == 26 and sorted(set(pairs)) == sorted(set(expected))
    assert all(pairs.count(p) >= expected.count(p) for p in expected)
    assert [t for _, t in pairs] != sorted(t for _, t in pairs)


def test_plan_tags_are_checked_against_the_indices(tmp_path):
    tr = build_trainer("baseline", "mfeat", run_dir=tmp_path / "r", epochs=1, sets=SETS)
    tr.method = PlanToy(lambda ctx: [BatchGroup(torch.arange(10), tags=torch.zeros(9, dtype=torch.long))])
    with pytest.raises(ValueError, match=r"group 0: tags must have one entry per index \(10\), got 9"):
        tr.fit()
