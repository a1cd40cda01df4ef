"""Method overhead: time per training epoch of every registered method relative to the baseline, on mfeat
and on a sequence shape-alike (mosi-synth), from paired, interleaved runs.

What is counted: ``timings.train_seconds / epochs`` of a normal run (the epochs' training steps and the
method's per-epoch hooks, e.g. G-Blending's estimates or PMR's prototypes); validation, checkpoints and
the test pass are outside it; per-modality evaluation and the diagnostics are off. Teachers (UME/UMT,
``reconboost_pretrained``) are trained once in the warm-up run, cached, and not counted.

How: per method and dataset, one warm-up run, then ``--repeats`` pairs (method, baseline), alternating
which goes first (``_paired.py``); the ratio of each pair is recorded and we print its median (min–max).
One torch thread (as a leaderboard worker).

mosi-synth is reduced (``dataset.seq_len=10``, ``dataset.n_samples=200``, ``train.batch_size=16``, 4 steps
per epoch) so the whole table fits the ``run_all.sh`` budget on a 2-core CPU: the same MulT-shaped model
(cross-modal transformers, regression), but less compute per step, so a method's per-step Python overhead
weighs more than at the paper's size (ratios are, if anything, pessimistic).

    python benchmarks/method_overhead.py [--datasets mfeat mosi-synth] [--methods cggm agm] [--repeats 3]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MMBALANCE_NO_PROGRESS", "1")

from _paired import Ratio, paired_ratio, time_train_epochs  # noqa: E402

DATASET_SETS = {
    "mfeat": {},
    "mosi-synth": {"dataset.seq_len": 10, "dataset.n_samples": 200, "train.batch_size": 16,
                   "train.max_steps_per_epoch": 4},
    # optional (--datasets iemocap-synth): a sequence CLASSIFICATION shape-alike, for the methods that
    # refuse regression (arl, cml, midas)
    "iemocap-synth": {"dataset.seq_len": 10, "dataset.n_samples": 200, "train.batch_size": 16,
                      "train.max_steps_per_epoch": 4},
}
DEFAULT_DATASETS = ["mfeat", "mosi-synth"]
EPOCHS = {"mfeat": 3, "mosi-synth": 2, "iemocap-synth": 2}
#: Presets whose schedule needs more epochs (the paired baseline runs as many).
METHOD_EPOCHS = {"reconboost_official_schedule": 8}
#: Settings of the method's run only: methods with a warm-up of plain joint training are timed with it off,
#: so every timed epoch does the method's work (their ratio is the per-epoch cost after the warm-up).
METHOD_SETS: dict[str, dict[str, object]] = {"opm": {"warmup_epochs": 0}, "arl": {"start": -1},
                                              "arl_released": {"start": -1}, "smv": {"warmup_epochs": 0},
                                              "smv_modality": {"warmup_epochs": 0},
                                              "g2d": {"smp_end_frac": 1.0}, "midas": {"warmup_epochs": 0}}
#: Shown next to the ratio.
NOTES = {m: "teachers (trained once, cached) not counted" for m in ("ume", "umt", "reconboost_pretrained", "g2d",
                                                                   "g2d_no_smp")}
#: Goals of issue 14 (time per epoch / baseline's): (mfeat, sequence shape-alike).
GOALS = {"cggm": (1.5, 1.3), "cggm_paper": (1.5, 1.3), "agm": (3.0, 3.0)}
DEFAULT_GOAL = (1.5, 1.5)


class Skip(Exception):
    """The method cannot run on this dataset/budget (the reason is printed in the table)."""


#: ``--epochs`` (all datasets) and ``--clock`` (``wall``: the engine's train_seconds; ``cpu``: this process's CPU
#: time inside the training epochs, less sensitive to other jobs on a shared machine)
OPTIONS = {"epochs": None, "clock": "wall"}


def seconds_per_epoch(method: str, dataset: str, cache: Path, epochs: int | None = None) -> float:
    from mmbalance.errors import ConfigError, MethodNotApplicable
    from mmbalance.testing import build_trainer

    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        try:
            tr = build_trainer(method, dataset, run_dir=Path(tmp), epochs=epochs or OPTIONS["epochs"] or EPOCHS[dataset],
                               sets={"train.modality_eval": "none", "train.diagnostics": "none",
                                     **DATASET_SETS[dataset], **METHOD_SETS.get(method, {})})
        except MethodNotApplicable:
            raise Skip("n/a") from None
        except ConfigError as exc:  # e.g. a preset whose schedule needs more epochs than the budget
            raise Skip(f"skipped ({str(exc).split(';')[0]})") from None
        cpu = time_train_epochs(tr) if OPTIONS["clock"] == "cpu" else [0.0]
        res = tr.fit()
    t = res["timings"]
    return (cpu[0] if OPTIONS["clock"] == "cpu" else t["train_seconds"]) / max(1, t["epochs"])


def measure(method: str, dataset: str, cache: Path, repeats: int) -> Ratio | str:
    epochs = METHOD_EPOCHS.get(method)
    try:
        seconds_per_epoch(method, dataset, cache, epochs)  # warm-up (and trains any cached teachers)
    except Skip as s:
        return str(s)
    ratio, _, _ = paired_ratio(lambda: seconds_per_epoch(method, dataset, cache, epochs),
                               lambda: seconds_per_epoch("baseline", dataset, cache, epochs), repeats)
    return ratio


def cell(r: Ratio | str) -> str:
    return r if isinstance(r, str) else f"{r.median:.2f} ({r.low:.2f}–{r.high:.2f})"


def met(results: list[Ratio | str], goals: tuple[float, ...]) -> str:
    checked = [(r, g) for r, g in zip(results, goals) if isinstance(r, Ratio) and not math.isnan(r.median)]
    if not checked:
        return "—"
    return "yes" if all(r.median <= g for r, g in checked) else "no"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS, choices=list(DATASET_SETS))
    ap.add_argument("--methods", nargs="+", help="default: every registered method but baseline/unimodal")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved pairs per method and dataset")
    ap.add_argument("--epochs", type=int, help="epochs per run on every dataset (default: mfeat 3, others 2)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: train_seconds; cpu: CPU time of the training epochs (a loaded machine)")
    args = ap.parse_args(argv)
    OPTIONS.update(epochs=args.epochs, clock=args.clock)
    torch.set_num_threads(1)
    from mmbalance.registry import list_methods

    known = list_methods()
    methods = args.methods or [m for m in known if m not in ("baseline", "unimodal")]
    unknown = [m for m in methods if m not in known]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(known)}")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = Path(cache_dir)
        base = {}
        for ds in args.datasets:
            seconds_per_epoch("baseline", ds, cache)  # warm-up
            base[ds] = seconds_per_epoch("baseline", ds, cache)
        print(f"Time per training epoch / baseline's, median (min–max) of {args.repeats} interleaved pairs, one "
              f"thread; baseline s/epoch: " + ", ".join(f"{ds} {s:.3f}" for ds, s in base.items()) + "\n")
        print("| method | " + " | ".join(f"{ds} ratio median (min–max)" for ds in args.datasets)
              + " | goal | met? |")
        print("|---|" + "---|" * len(args.datasets) + "---|---|")
        for m in methods:
            results = [measure(m, ds, cache, args.repeats) for ds in args.datasets]
            goal = GOALS.get(m, DEFAULT_GOAL)
            goals = tuple(goal[min(1, list(DATASET_SETS).index(ds))] for ds in args.datasets)
            goal_txt = " / ".join(f"≤ {g:g}" for g in goals) if len(set(goals)) > 1 else f"≤ {goals[0]:g}"
            note = f" ({NOTES[m]})" if m in NOTES else ""
            print(f"| {m}{note} | " + " | ".join(cell(r) for r in results) + f" | {goal_txt} | "
                  f"{met(results, goals)} |", flush=True)
    print(f"\n({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
