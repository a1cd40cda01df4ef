"""Test plug-in (``--plugin tests/_collective_counter.py``): counts the Python-level ``torch.distributed``
collectives made inside the engine's training steps and inside whole training epochs, per rank, and writes
``$MMBALANCE_COUNT_DIR/rank<k>.json`` when ``Trainer.fit`` returns. DDP's gradient all-reduce runs in its
C++ reducer and is not counted."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist
from torch.distributed import distributed_c10d

from mmbalance import engine

NAMES = ("all_reduce", "all_reduce_coalesced", "broadcast", "all_gather", "all_gather_into_tensor",
         "all_gather_object", "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor",
         "gather", "scatter", "all_to_all", "all_to_all_single", "barrier")
COUNTS = {"steps": 0, "epoch": 0, "n_steps": 0}
WHERE: list[str | None] = [None]


def _wrap(orig):
    def counted(*a, **k):
        if WHERE[0] is not None:
            COUNTS[WHERE[0]] += 1
        return orig(*a, **k)

    return counted


for _name in NAMES:
    for _mod in (dist, distributed_c10d):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _wrap(getattr(_mod, _name)))

_epoch, _steps, _fit = engine.Trainer._train_epoch, engine.Trainer._train_steps, engine.Trainer.fit


def _train_epoch(self, *a, **k):
    WHERE[0] = "epoch"
    try:
        return _epoch(self, *a, **k)
    finally:
        WHERE[0] = None


def _train_steps(self, *a, **k):
    WHERE[0] = "steps"
    try:
        n = _steps(self, *a, **k)
        COUNTS["n_steps"] += n
        return n
    finally:
        WHERE[0] = "epoch"


def _fit_and_write(self, *a, **k):
    out = _fit(self, *a, **k)
    folder = Path(os.environ["MMBALANCE_COUNT_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{self.accelerator.process_index}.json").write_text(json.dumps(COUNTS))
    return out


engine.Trainer._train_epoch = _train_epoch
engine.Trainer._train_steps = _train_steps
engine.Trainer.fit = _fit_and_write
