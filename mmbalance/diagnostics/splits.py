"""Split helpers for diagnostics: labels, subsets, permuted copies, batches on the device."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..data import TensorSplit, make_loader
from ..data.splits import quantile_bins


def split_labels(split) -> torch.Tensor:
    """All labels of a split (one pass over a map-style dataset, labels only kept)."""
    if isinstance(split, TensorSplit):
        return split.labels
    return torch.cat([b["label"] for b in make_loader(split, 256, shuffle=False, seed=0, num_workers=0)])


def stratify_keys(labels: torch.Tensor, task: str) -> np.ndarray:
    """Classification: the label; regression: quantile bins; segmentation: foreground-fraction bins."""
    y = labels.numpy()
    if task == "classification":
        return y
    if task == "segmentation":
        return quantile_bins((y > 0).reshape(len(y), -1).mean(1), 5)
    return quantile_bins(y.reshape(len(y)))


def subset(split, idx: np.ndarray):
    if isinstance(split, TensorSplit):
        return split.subset(torch.as_tensor(idx, dtype=torch.long))
    return Subset(split, [int(i) for i in idx])


def batches(split, batch_size: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Fixed-order batches of a whole split, on ``device``."""
    if isinstance(split, TensorSplit):
        n = len(split)
        for s in range(0, n, batch_size):
            b = split.batch(torch.arange(s, min(n, s + batch_size)))
            yield {k: v.to(device) for k, v in b.items()}
        return
    for b in make_loader(split, batch_size, shuffle=False, seed=0, num_workers=0):
        yield {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}


class PermutedDataset(Dataset):
    """Map-style view whose item i carries modality ``m`` of item ``perm[i]``."""

    def __init__(self, base, m: str, perm: np.ndarray) -> None:
        self.base, self.m, self.perm = base, m, perm

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        item = dict(self.base[i])
        item[self.m] = self.base[int(self.perm[i])][self.m]
        return item


def permuted(split, m: str, perm: np.ndarray):
    """The split with modality m's rows permuted (labels and other modalities in place)."""
    if isinstance(split, TensorSplit):
        inputs = dict(split.inputs)
        inputs[m] = split.inputs[m][torch.as_tensor(perm, dtype=torch.long, device=split.inputs[m].device)]
        return TensorSplit(inputs, split.labels)
    return PermutedDataset(split, m, perm)
