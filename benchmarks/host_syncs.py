"""Host syncs per training step, per method: every device→host read during the training epochs is counted
(``Tensor.item``, ``float()``/``int()``/``bool()`` of a tensor, ``tolist``, ``numpy``, ``Tensor.cpu`` of a
non-CPU tensor is not visible on CPU, so the conversions are what we count). On a GPU each is a sync that
stalls the pipeline. Goal: ≤ 2 per step for every method.

    python benchmarks/host_syncs.py [--dataset mfeat] [--methods ...]
"""
from __future__ import annotations

import argparse
import os
import tempfile
from collections import Counter
from pathlib import Path

import torch

os.environ.setdefault("MMBALANCE_NO_PROGRESS", "1")

GOAL = 2.0
COUNTED = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy", "__index__")


class SyncCounter:
    """Patches the Tensor conversions; counts only while ``active``."""

    def __init__(self) -> None:
        self.active = False
        self.counts: Counter[str] = Counter()
        self._orig = {}

    def __enter__(self):
        for name in COUNTED:
            orig = getattr(torch.Tensor, name)
            self._orig[name] = orig

            def wrapper(t, *a, __orig=orig, __name=name, **k):
                if self.active:
                    self.counts[__name] += 1
                return __orig(t, *a, **k)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(torch.Tensor, name, orig)


def syncs_per_step(method: str, dataset: str, epochs: int = 2) -> tuple[float, Counter[str]] | None:
    from mmbalance import engine
    from mmbalance.errors import MethodNotApplicable
    from mmbalance.testing import build_trainer

    with tempfile.TemporaryDirectory() as tmp:
        try:
            tr = build_trainer(method, dataset, run_dir=Path(tmp), epochs=epochs,
                               sets={"train.modality_eval": "none", "train.diagnostics": "none"})
        except MethodNotApplicable:
            return None
        counter = SyncCounter()
        orig = engine.Trainer._train_epoch
        steps = [0]

        def counted(self, pos, phase, schedule):
            before = pos.global_step
            counter.active = True
            try:
                return orig(self, pos, phase, schedule)
            finally:
                counter.active = False
                steps[0] += pos.global_step - before

        engine.Trainer._train_epoch = counted
        try:
            with counter:
                tr.fit()
        finally:
            engine.Trainer._train_epoch = orig
    return sum(counter.counts.values()) / max(1, steps[0]), counter.counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mfeat")
    ap.add_argument("--methods", nargs="+")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from mmbalance.registry import list_methods

    methods = args.methods or [m for m in list_methods() if m != "unimodal"]
    print(f"Device-to-host reads per training step ({args.dataset}, 2 epochs)\n")
    print("| method | host syncs per step | by kind | goal | met? |")
    print("|---|---|---|---|---|")
    for m in methods:
        out = syncs_per_step(m, args.dataset)
        if out is None:
            print(f"| {m} | n/a | | | |")
            continue
        per, kinds = out
        print(f"| {m} | {per:.2f} | {', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))} | ≤ {GOAL:g} | "
              f"{'yes' if per <= GOAL else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
