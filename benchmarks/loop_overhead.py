"""Loop overhead: the mmbalance engine's training throughput vs a plain PyTorch loop on mfeat.

Both train the canonical mfeat model (same data, batch size, optimizer) for the same number of
epochs; we compare training samples per second (validation excluded on both sides). Target: the
engine reaches ≥ 0.9× the plain loop.

    python benchmarks/loop_overhead.py [--epochs 50] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

os.environ.setdefault("MMBALANCE_NO_PROGRESS", "1")


def plain_loop(data, epochs: int, seed: int = 0) -> float:
    from mmbalance.registry import create_model

    torch.manual_seed(seed)
    model = create_model("mlp_concat", modalities=data.modalities, input_shapes=data.input_shapes, out_dim=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x, y = data.train.inputs, data.train.labels
    n = len(y)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for s in range(0, n, 64):
            idx = order[s:s + 64]
            out = model({m: x[m][idx] for m in data.modalities})
            loss = torch.nn.functional.cross_entropy(out.logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return n * epochs / (time.perf_counter() - t0)


def engine_loop(epochs: int, seed: int = 0) -> float:
    from mmbalance.testing import build_trainer

    with tempfile.TemporaryDirectory() as tmp:
        tr = build_trainer("baseline", "mfeat", run_dir=tmp, epochs=epochs, seed=seed,
                           sets={"train.modality_eval": "none"})
        res = tr.fit()
    return res["num_train_samples"] * epochs / res["timings"]["train_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this model size)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from mmbalance.registry import create_dataset

    data = create_dataset("mfeat")
    plain_loop(data, 2)  # warm-up
    plain = max(plain_loop(data, args.epochs) for _ in range(args.repeats))
    engine = max(engine_loop(args.epochs) for _ in range(args.repeats))
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"plain PyTorch loop : {plain:10.0f} samples/s")
    print(f"mmbalance engine   : {engine:10.0f} samples/s")
    print(f"ratio engine/plain : {engine / plain:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
