"""Batching: a fast tensor batcher for in-memory splits and a DataLoader path for large data.

The tensor batcher mirrors ``DistributedSampler`` semantics without per-sample overhead: one seeded
permutation per (seed, phase, epoch), padded by wrap-around to a multiple of the world size, rank r
takes positions r, r+W, r+2W, …, then consecutive batches; the last partial batch is kept.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .containers import TensorSplit


class TensorBatcher:
    """Iterates batches of a :class:`TensorSplit` by direct tensor indexing."""

    def __init__(self, split: TensorSplit, batch_size: int, *, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> None:
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch_key = 0
        self.device = device
        if device is not None and device.type != "cpu":
            self.split = TensorSplit({m: x.to(device) for m, x in split.inputs.items()}, split.labels.to(device))

    def set_epoch(self, key: int) -> None:
        """Set the shuffling key (the engine passes a unique number per phase and epoch)."""
        self.epoch_key = key

    def _indices(self) -> torch.Tensor:
        n = len(self.split)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch_key)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            total = -(-n // self.world_size) * self.world_size
            if total > n:
                order = torch.cat([order, order[: total - n]])
            order = order[self.rank::self.world_size]
        return order

    def __len__(self) -> int:
        per_rank = -(-len(self.split) // self.world_size)
        return -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self._indices()
        if self.device is not None:
            order = order.to(self.device)
        for idx in order.split(self.batch_size):  # one op for every batch's positions (not a slice per step)
            yield self.split.batch(idx)


def eval_index_shards(n: int, batch_size: int, rank: int, world_size: int) -> list[torch.Tensor]:
    """Evaluation batches for one rank. Global positions are padded (repeating the last index) only to
    a multiple of the world size, then cut into blocks of ``batch_size·world_size`` (the last block
    smaller); rank r takes the r-th equal contiguous part of every block. Gathering block k of all
    ranks in rank order therefore gives contiguous positions, and trimming the gathered result to n
    removes exactly the padding (no sample dropped or counted twice)."""
    total = -(-n // world_size) * world_size
    pos = torch.arange(total).clamp_(max=n - 1)
    chunk = batch_size * world_size
    out = []
    for start in range(0, total, chunk):
        block = pos[start:start + chunk]
        per = len(block) // world_size
        out.append(block[rank * per:(rank + 1) * per])
    return out


def collate_dicts(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    keys = samples[0].keys()
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, num_workers: int = 0,
                drop_last: bool = False, pin_memory: bool = False) -> DataLoader:
    """DataLoader for image/volume datasets (prepared by Accelerate, which shards it by rank). ``pin_memory``
    (on CUDA): batches in page-locked memory, so that the copy to the GPU can be asynchronous."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=num_workers,
                      drop_last=drop_last, collate_fn=collate_dicts, persistent_workers=num_workers > 0,
                      pin_memory=pin_memory)
