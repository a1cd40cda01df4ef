"""Loop overhead: the mmbalance engine (baseline method) vs the fastest honest plain PyTorch loop on mfeat.

The plain loop is what a careful user would write by hand for the same training, and it does bit-identical
work: the same model (built by the same registry call from the same seed; its encoders and head called
directly, no ``MultimodalModel`` wrapper, no fusion module), the same optimizer object type and kernels
(``build_optimizer``: foreach SGD on mfeat), the same batch order (one seeded ``randperm`` per epoch, the
engine's seed formula), batches gathered with ``index_select`` (the cheapest row gather), cross-entropy,
``loss.backward()``, ``opt.step()``, ``opt.zero_grad(set_to_none=True)``. Nothing else: no NaN check, no
loss bookkeeping, no hooks.

What is counted: the training epochs only, on both sides. For the engine that is every call of
``Trainer._train_epoch`` (the scope of ``timings.train_seconds``: the epoch's batches, the method's hooks,
the per-epoch loss read and non-finite check); validation, checkpoints and the diagnostics (turned off) are
outside it. Model construction and data loading are not counted. ``--clock wall`` (default) times with
``time.perf_counter``; ``--clock cpu`` with ``time.process_time`` (this process's CPU time: less disturbed
by other jobs on a shared machine, blind to waiting; use one thread).

How: ``--repeats`` pairs, each pair runs both (alternating which goes first, ``_paired.py``), and the ratio
of that pair is recorded; we print the median (min–max) of the per-pair ratios
plain seconds / engine seconds (= engine throughput / plain throughput). Goal: ≥ 0.95.

Before timing, the script checks that both loops end with the same parameters (max abs difference
≤ 1e-6, normally 0): a plain loop that does less work would flatter nobody.

    python benchmarks/loop_overhead.py [--epochs 20] [--repeats 8] [--clock wall|cpu] [--markdown]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MMBALANCE_NO_PROGRESS", "1")

from _paired import paired_ratio  # noqa: E402

DATASET = "mfeat"
GOAL = 0.95
TOLERANCE = 1e-6


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def plain_run(data, epochs: int, seed: int = 0, clock=time.perf_counter) -> tuple[float, dict[str, torch.Tensor]]:
    """(seconds in the training epochs, final parameters) of the hand-written loop."""
    from accelerate.utils import set_seed

    from mmbalance.config import TrainConfig, build_hparams
    from mmbalance.engine import build_optimizer
    from mmbalance.registry import create_model

    cfg = build_hparams(TrainConfig, dict(data.train_defaults), where="bench")
    if cfg.scheduler != "none" or cfg.grad_clip:
        raise SystemExit(f"{DATASET}: the plain loop has no lr schedule or clipping (dataset sets "
                         f"scheduler={cfg.scheduler!r}, grad_clip={cfg.grad_clip!r})")
    set_seed(seed)  # the engine's model seed
    model = create_model(data.model.name, modalities=data.modalities, input_shapes=data.input_shapes,
                         out_dim=data.out_dim, **data.model.kwargs)
    opt = build_optimizer([{"params": [p for p in model.parameters() if p.requires_grad]}], cfg)
    encoders = [model.encoders[m] for m in model.modalities]
    head = model.head
    xs = [data.train.inputs[m] for m in model.modalities]
    ys = data.train.labels
    n, bs = len(ys), cfg.batch_size
    torch.manual_seed(seed + 2)  # the engine's training RNG stream (no dropout here; kept for identity)
    model.train()
    total = 0.0
    for epoch in range(epochs):
        t0 = clock()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for idx in order.split(bs):
            z = torch.cat([enc(torch.index_select(x, 0, idx)) for enc, x in zip(encoders, xs)], dim=-1)
            loss = F.cross_entropy(head(z), torch.index_select(ys, 0, idx))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        total += clock() - t0
    return total, {k: v.detach().clone() for k, v in model.state_dict().items()}


def engine_run(epochs: int, seed: int = 0, clock=time.perf_counter) -> tuple[float, dict[str, torch.Tensor]]:
    """(seconds in the training epochs, final — last-epoch, not best-checkpoint — parameters) of the engine."""
    from mmbalance.testing import build_trainer

    final: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tr = build_trainer("baseline", DATASET, run_dir=tmp, epochs=epochs, seed=seed,
                           sets={"train.modality_eval": "none", "train.diagnostics": "none"})

        def keep_final() -> None:  # called once after the last epoch, before the best checkpoint is loaded
            final.update({k: v.detach().clone() for k, v in tr.ctx.raw_model.state_dict().items()})

        spent = [0.0]
        train_epoch = tr._train_epoch

        def timed_epoch(*a, **k):  # the scope of timings.train_seconds (diagnostics are off)
            t0 = clock()
            try:
                return train_epoch(*a, **k)
            finally:
                spent[0] += clock() - t0

        tr._dump_final_parameters = keep_final
        tr._train_epoch = timed_epoch
        tr.fit()
    return spent[0], final


def check_same_work(data, epochs: int) -> float:
    """Max abs parameter difference after ``epochs`` epochs; exits 1 above the tolerance."""
    _, a = plain_run(data, epochs)
    _, b = engine_run(epochs)
    if a.keys() != b.keys():
        raise SystemExit(f"plain and engine models differ in parameters: {sorted(a.keys() ^ b.keys())}")
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    if not diff <= TOLERANCE:
        raise SystemExit(f"the plain loop and the engine do different work: max |param diff| = {diff:.3g} "
                         f"> {TOLERANCE:g} after {epochs} epochs")
    return diff


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20, help="training epochs per measurement")
    ap.add_argument("--repeats", type=int, default=8, help="interleaved pairs")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: as a leaderboard worker)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    ap.add_argument("--markdown", action="store_true", help="print only a markdown table row block")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from mmbalance.registry import create_dataset

    data = create_dataset(DATASET)
    diff = check_same_work(data, 3)  # also the warm-up of both sides
    clock = CLOCKS[args.clock]
    ratio, plain, eng = paired_ratio(lambda: plain_run(data, args.epochs, clock=clock)[0],
                                     lambda: engine_run(args.epochs, clock=clock)[0], args.repeats)
    n = len(data.train) * args.epochs
    met = "yes" if ratio.median >= GOAL else "no"
    if args.markdown:
        print("| comparison | plain samples/s (median) | engine samples/s (median) | engine/plain throughput, "
              "median (min–max) | goal | met? |")
        print("|---|---|---|---|---|---|")
        print(f"| baseline on {DATASET}, {args.epochs} epochs, {args.repeats} pairs, {args.threads} thread(s), "
              f"{args.clock} clock; "
              f"final params max diff {diff:.1g} | {n / statistics.median(plain):.0f} | "
              f"{n / statistics.median(eng):.0f} | {ratio.median:.3f} ({ratio.low:.3f}–{ratio.high:.3f}) | "
              f"≥ {GOAL} | {met} |")
        return
    print(f"{DATASET}, {args.clock} clock, torch threads {torch.get_num_threads()}, {args.epochs} epochs, {args.repeats} interleaved "
          f"pairs; final parameters after 3 epochs: max |diff| = {diff:.3g} (tolerance {TOLERANCE:g})")
    print(f"plain loop : median {n / statistics.median(plain):9.0f} samples/s")
    print(f"engine     : median {n / statistics.median(eng):9.0f} samples/s")
    print(f"engine throughput / plain throughput: {ratio}  (goal >= {GOAL}: {met})")


if __name__ == "__main__":
    main()
