"""Time per training epoch of every registered method relative to the baseline, on mfeat and on a sequence
shape-alike (mosi-synth), from paired, interleaved runs (median (min–max) over pairs). Validation, per-modality
evaluation and diagnostics are off; teacher training (UME/UMT/reconboost_pretrained) is cached and not counted.

    python benchmarks/method_overhead.py [--datasets mfeat mosi-synth] [--methods cggm agm] [--repeats 4]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("MMBALANCE_NO_PROGRESS", "1")

from _paired import paired_ratio  # noqa: E402

DATASET_SETS = {
    "mfeat": {},
    "mosi-synth": {"train.max_steps_per_epoch": 6},
}
EPOCHS = {"mfeat": 6, "mosi-synth": 2}


def seconds_per_epoch(method: str, dataset: str, cache: Path) -> float:
    from mmbalance.errors import MethodNotApplicable
    from mmbalance.testing import build_trainer

    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        try:
            tr = build_trainer(method, dataset, run_dir=Path(tmp), epochs=EPOCHS[dataset],
                               sets={"train.modality_eval": "none", "train.diagnostics": "none",
                                     **DATASET_SETS[dataset]})
        except MethodNotApplicable:
            return float("nan")
        res = tr.fit()
    t = res["timings"]
    return t["train_seconds"] / max(1, t["epochs"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASET_SETS))
    ap.add_argument("--methods", nargs="+")
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from mmbalance.registry import list_methods

    methods = args.methods or [m for m in list_methods() if m not in ("baseline", "unimodal")]
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = Path(cache_dir)
        print("| dataset | method | s/epoch (median) | baseline s/epoch | ratio median (min–max) |")
        print("|---|---|---|---|---|")
        for ds in args.datasets:
            seconds_per_epoch("baseline", ds, cache)  # warm-up
            for m in methods:
                seconds_per_epoch(m, ds, cache)  # warm-up (and trains any cached teachers)
                ratio, xs, ys = paired_ratio(lambda m=m, ds=ds: seconds_per_epoch(m, ds, cache),
                                             lambda ds=ds: seconds_per_epoch("baseline", ds, cache), args.repeats)
                if ratio.median != ratio.median:  # nan: not applicable
                    print(f"| {ds} | {m} | n/a | | |")
                    continue
                print(f"| {ds} | {m} | {sorted(xs)[len(xs) // 2]:.4f} | {sorted(ys)[len(ys) // 2]:.4f} | {ratio} |",
                      flush=True)


if __name__ == "__main__":
    main()
