"""``ctx.train_batches``: the shuffle key sets the order on both data paths (tensor batcher, DataLoader)."""
from __future__ import annotations

import pytest
import torch
from conftest import SMALL_MFEAT
from torch.utils.data import Dataset

from mmbalance.testing import build_trainer


class _DictDataset(Dataset):
    """The DataLoader path (image/volume datasets): per-sample dicts with their position as ``idx``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.tensor([float(i)]), "label": torch.tensor(i % 3), "idx": torch.tensor(i)}


def _orders(tr, key, shuffle=True):
    return torch.cat([b["idx"] for b in tr._train_batch_iterator("train", batch_size=8, shuffle=shuffle, key=key)])


@pytest.mark.parametrize("path", ["tensor", "dataloader"])
def test_shuffle_key_sets_the_order(tmp_path, path):
    tr = build_trainer("baseline", run_dir=tmp_path / "r", epochs=1, sets=SMALL_MFEAT)
    if path == "dataloader":
        tr.train_split = _DictDataset(40)
    n = len(tr.train_split)
    orders = [_orders(tr, k) for k in range(4)]
    for o in orders:
        assert sorted(o.tolist()) == list(range(n))  # every sample exactly once
    assert len({tuple(o[:8].tolist()) for o in orders}) == 4  # a different first batch per key
    assert torch.equal(_orders(tr, 2), orders[2])  # the same key gives the same order
    assert torch.equal(_orders(tr, 5, shuffle=False), torch.arange(n))
