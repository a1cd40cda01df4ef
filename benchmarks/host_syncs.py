"""Host syncs per training step, per method (goal: at most 2 per step for every method).

Counted while a method trains (single process, CPU, validation/diagnostics off), divided by the number of
training steps; the epoch-start/-end hooks of the training epochs are included (``in steps`` columns: the
steps alone). How the counting works (``mmbalance/hostsyncs.py``):

- ``all``: every conversion of a tensor to a Python value (``Tensor.item``, ``float()``/``int()``/``bool()``
  of a tensor, ``tolist``, ``numpy``, ``__index__``), on any tensor — what this script reported before it
  could tell devices apart;
- ``device``: the reads a GPU would pay as a sync. A TorchFunctionMode tags every tensor that would live
  on the accelerator (the model's and the methods' parameters and buffers, the batches, anything created
  with ``device=ctx.device`` or moved there, and everything computed from those); ``device`` counts the
  conversions of tagged tensors, device→host copies (``.cpu()``, ``.to("cpu")``) and device values
  written into host tensors. Reads of host tensors (``ctx.generator`` draws, bookkeeping kept on the
  CPU on purpose) are in ``host``;
- ``h2d``: host→device copies (``torch.tensor(list, device=...)``, ``host.to(device)``, ...): on a GPU
  a blocking copy each.

    python benchmarks/host_syncs.py [--dataset mfeat] [--epochs 2] [--methods ...] [--where 5]
"""
from __future__ import annotations

import argparse
import os

import torch

os.environ.setdefault("MMBALANCE_NO_PROGRESS", "1")

GOAL = 2.0  # device reads per training step (issue 14)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mfeat")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--methods", nargs="+")
    ap.add_argument("--where", type=int, default=0, metavar="N",
                    help="also list the N call sites with the most device reads / h2d copies per method")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from mmbalance.errors import ConfigError
    from mmbalance.hostsyncs import count_host_syncs
    from mmbalance.registry import list_methods

    methods = args.methods or [m for m in list_methods() if m != "unimodal"]
    print(f"Tensor-to-Python reads per training step ({args.dataset}, {args.epochs} epochs); goal: device / step "
          f"<= {GOAL:g}\n")
    print("| method | all / step | device / step | host / step | h2d / step | device in steps / step | device reads by kind "
          "| met? |")
    print("|---|---|---|---|---|---|---|---|")
    for m in methods:
        try:
            rep = count_host_syncs(m, args.dataset, epochs=args.epochs)
        except ConfigError as exc:  # e.g. a method whose schedule needs more epochs
            print(f"| {m} | n/a ({exc}) | | | | | | |", flush=True)
            continue
        if rep is None:
            print(f"| {m} | n/a | | | | | | |")
            continue
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(rep.epoch.device.items()))
        print(f"| {m} | {rep.per_step('reads'):.2f} | {rep.per_step('device'):.2f} | {rep.per_step('host'):.2f} | "
              f"{rep.per_step('h2d'):.2f} | {rep.per_step('device', 'steps'):.2f} | {kinds} | "
              f"{'yes' if rep.per_step('device') <= GOAL else 'no'} |", flush=True)
        if args.where:
            for site, n in rep.epoch.where.most_common(args.where):
                print(f"|  | {n} × {site} | | | | | | |")


if __name__ == "__main__":
    main()
