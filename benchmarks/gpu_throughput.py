"""Training throughput of one method on the MOSI-shaped model (mosi-synth), for ``benchmarks/gpu.sh``.

Runs the engine normally (``Trainer.fit``) for ``--epochs`` epochs of ``--steps`` training steps at the paper's
MOSI batch (64, sequence length 50) and reports steps/s and samples/s from the per-epoch training times
(``epoch_seconds`` in metrics.jsonl: the steps only; validation and checkpoints are outside it), skipping
the first epoch (CUDA context, kernel selection and allocator warm-up). The engine reads the epoch's losses
to the host at the end of each epoch, so an epoch's time includes all its queued GPU work. Under
``accelerate launch --num_processes N`` every process trains and rank 0 reports; samples/s counts the
samples of all processes (``--batch-semantics per_process``, the default: each process takes the full paper
batch, so N processes ideally give N× the samples/s; ``global`` splits the batch over the processes).

    python benchmarks/gpu_throughput.py --method cggm --precision bf16 [--json OUT]
    python benchmarks/gpu_throughput.py --cpu-smoke      # the same path on CPU with a tiny model (tests)
    python benchmarks/gpu_throughput.py --ratio A.json B.json   # samples/s of A over B
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MMBALANCE_NO_PROGRESS", "1")

PAPER = {"batch_size": 64, "seq_len": 50}  # CMU-MOSI in the CGGM paper's configuration (Table 7)
SMOKE = {"batch_size": 8, "seq_len": 4, "steps": 2, "epochs": 2, "samples": 60}


def measure(method: str, precision: str, steps: int, epochs: int, batch_size: int, seq_len: int,
            samples: int, batch_semantics: str, dataset: str = "mosi-synth", extra: dict | None = None) -> dict:
    """One run; returns the report (every rank computes it, rank 0 prints/writes it). ``extra``: more --set
    values (e.g. ``train.channels_last``); ``dataset`` other than mosi-synth keeps its own size options."""
    from mmbalance.testing import build_trainer

    sets = {"train.modality_eval": "none", "train.diagnostics": "none", "train.mixed_precision": precision,
            "train.batch_size": batch_size, "train.max_steps_per_epoch": steps, "train.batch_semantics": batch_semantics}
    if dataset == "mosi-synth":
        sets.update({"dataset.seq_len": seq_len, "dataset.n_samples": samples})
    sets.update(extra or {})
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every rank must use the same run folder (rank 0 writes the checkpoints all ranks read back)
        run_dir = Path(tempfile.gettempdir()) / f"mmbalance-gpu-bench-{os.getppid()}-{os.environ.get('MASTER_PORT', '')}"
    else:
        run_dir = Path(tempfile.mkdtemp(prefix="mmbalance-gpu-bench-"))
    try:
        tr = build_trainer(method, dataset, run_dir=run_dir / "run", epochs=epochs, sets=sets)
        acc = tr.accelerator
        steps_per_epoch = min(steps, len(tr.loader_train))
        res = tr.fit()  # ends with every rank waiting for the others
        rows = [json.loads(x) for x in (run_dir / "run" / "metrics.jsonl").read_text().splitlines()] \
            if acc.is_main_process else []
        acc.wait_for_everyone()
    finally:
        if int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(run_dir, ignore_errors=True)
    world = acc.num_processes
    per_process = batch_size if batch_semantics == "per_process" or world == 1 else batch_size // world
    timed = [r["epoch_seconds"] for r in rows[1:]] or [r["epoch_seconds"] for r in rows]
    sec = statistics.median(timed) if timed else float("nan")
    return {"method": method, "precision": precision, "world_size": world, "device": str(acc.device),
            "steps_per_epoch": steps_per_epoch, "timed_epochs": len(timed), "seconds_per_epoch": sec,
            "steps_per_s": steps_per_epoch / sec, "samples_per_s": steps_per_epoch * per_process * world / sec,
            "batch_per_process": per_process, "seq_len": seq_len, "status": res["status"],
            "is_main": acc.is_main_process}


def report_line(r: dict) -> str:
    return (f"{r['method']:>10} {r['precision']:>4} x{r['world_size']} on {r['device']}: {r['steps_per_s']:8.2f} steps/s, "
            f"{r['samples_per_s']:9.1f} samples/s (batch {r['batch_per_process']}/process, seq {r['seq_len']}, "
            f"{r['steps_per_epoch']} steps x {r['timed_epochs']} timed epochs)")


def ratio(a: Path, b: Path) -> float:
    """samples/s of report ``a`` over report ``b`` (reads two ``--json`` files)."""
    ra, rb = (json.loads(Path(p).read_text()) for p in (a, b))
    return ra["samples_per_s"] / rb["samples_per_s"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="baseline")
    ap.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no", help="train.mixed_precision")
    ap.add_argument("--steps", type=int, default=30, help="training steps per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="epochs (the first is warm-up, not timed)")
    ap.add_argument("--batch-size", type=int, default=PAPER["batch_size"])
    ap.add_argument("--seq-len", type=int, default=PAPER["seq_len"])
    ap.add_argument("--samples", type=int, default=6000, help="mosi-synth n_samples (70%% train)")
    ap.add_argument("--batch-semantics", choices=["per_process", "global"], default="per_process")
    ap.add_argument("--json", type=Path, help="also write the report here (rank 0; atomic)")
    ap.add_argument("--dataset", default="mosi-synth", help="mosi-synth (sized by --seq-len/--samples) or another")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="more settings, e.g. train.channels_last=false or train.compile=true (repeatable)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="CPU, tiny model and data, fp32 and bf16: checks the whole path without a GPU")
    ap.add_argument("--ratio", nargs=2, type=Path, metavar=("A_JSON", "B_JSON"),
                    help="print samples/s of A over B and exit")
    args = ap.parse_args(argv)
    for name in ("steps", "epochs", "batch_size", "seq_len", "samples"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.ratio:
        print(f"{ratio(*args.ratio):.3f}")
        return 0
    import torch

    if args.cpu_smoke:
        os.environ["ACCELERATE_USE_CPU"] = "1"
        torch.set_num_threads(1)
        reports = [measure(args.method, p, SMOKE["steps"], SMOKE["epochs"], SMOKE["batch_size"], SMOKE["seq_len"],
                           SMOKE["samples"], args.batch_semantics) for p in ("no", "bf16")]
        for r in reports:
            print(report_line(r))
        print(f"bf16/fp32 samples/s: {reports[1]['samples_per_s'] / reports[0]['samples_per_s']:.3f} (CPU smoke run: "
              "checks the path, not a measurement)")
        return 0
    extra = dict(item.split("=", 1) for item in args.set if "=" in item)
    if len(extra) != len(args.set):
        ap.error("--set expects NAME=VALUE")
    r = measure(args.method, args.precision, args.steps, args.epochs, args.batch_size, args.seq_len, args.samples,
                args.batch_semantics, args.dataset, extra)
    r["settings"] = extra
    if r["is_main"]:
        print(report_line(r), flush=True)
        if args.json:
            from mmbalance import runfiles

            runfiles.atomic_write_json(args.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
