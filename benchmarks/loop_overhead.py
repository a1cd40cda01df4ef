"""Loop overhead: the mmbalance engine vs a plain PyTorch loop doing the same work on mfeat.

Both train the canonical mfeat model (same data, batch order, batch size, optimizer, seed) for the same number of
epochs; the plain loop batches with ``index_select`` like the engine. We time the training epochs only
(validation excluded on both sides; the engine's diagnostics off) and report the engine's throughput relative
to the plain loop from paired, interleaved runs: median (min–max). Goal: ≥ 0.95.

    python benchmarks/loop_overhead.py [--epochs 30] [--repeats 6]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("MMBALANCE_NO_PROGRESS", "1")

from _paired import paired_ratio  # noqa: E402


def plain_seconds(data, epochs: int, seed: int = 0) -> float:
    """A plain loop: the engine's model, optimizer and batch order, no engine."""
    from mmbalance.data import TensorBatcher
    from mmbalance.engine import build_optimizer
    from mmbalance.registry import create_model

    torch.manual_seed(seed)
    model = create_model(data.model.name, modalities=data.modalities, input_shapes=data.input_shapes,
                         out_dim=data.out_dim, **data.model.kwargs)
    from mmbalance.config import TrainConfig, build_hparams

    cfg = build_hparams(TrainConfig, dict(data.train_defaults), where="bench")
    opt = build_optimizer([{"params": list(model.parameters())}], cfg)
    opt = getattr(opt, "optimizer", opt)
    batcher = TensorBatcher(data.train, cfg.batch_size, shuffle=True, seed=seed, rank=0, world_size=1,
                            device=torch.device("cpu"))
    model.train()
    total = 0.0
    for epoch in range(epochs):
        batcher.set_epoch(epoch)
        t0 = time.perf_counter()
        for batch in batcher:
            out = model({m: batch[m] for m in data.modalities})
            loss = torch.nn.functional.cross_entropy(out.logits, batch["label"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        total += time.perf_counter() - t0
    return total


def engine_seconds(epochs: int, seed: int = 0) -> float:
    from mmbalance.testing import build_trainer

    with tempfile.TemporaryDirectory() as tmp:
        tr = build_trainer("baseline", "mfeat", run_dir=tmp, epochs=epochs, seed=seed,
                           sets={"train.modality_eval": "none", "train.diagnostics": "none"})
        res = tr.fit()
    return res["timings"]["train_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from mmbalance.registry import create_dataset

    data = create_dataset("mfeat")
    plain_seconds(data, 2)
    engine_seconds(2)  # warm-up both
    ratio, plain, eng = paired_ratio(lambda: plain_seconds(data, args.epochs), lambda: engine_seconds(args.epochs),
                                     args.repeats)
    n = len(data.train) * args.epochs
    print(f"torch threads {torch.get_num_threads()}, {args.epochs} epochs, {args.repeats} interleaved pairs")
    print(f"plain loop : median {n / statistics.median(plain):9.0f} samples/s")
    print(f"engine     : median {n / statistics.median(eng):9.0f} samples/s")
    print(f"engine throughput / plain throughput: {ratio}  (goal >= 0.95)")


if __name__ == "__main__":
    main()
