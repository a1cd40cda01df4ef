"""Anatomy of one warm leaderboard run: where its wall time goes, part by part.

A parent process warms up as a leaderboard worker does (``mmbalance.leaderboard.worker.preload``), then forks
one child per run, exactly as a warm worker serves a run. The child runs ``mmbalance.run.main`` with every
engine part wrapped in an *exclusive* timer (a part's time excludes the parts called inside it), writes the
seconds to a file and exits; the parent times the child from fork to exit (the run's wall time). "other" is
the wall time no part claims (argument parsing, run folder and lock, the fork, the process exit).

Two kinds of run per dataset, interleaved (every repeat runs each kind once, in rotating order, so the load
of a shared machine hits them alike): a *report* run (the leaderboard's defaults: diagnostics, per-modality
evaluation, test) and a *trial* (a tuning trial's settings: ``train.diagnostics=none``,
``train.modality_eval=none``, ``train.evaluate_test=false``).

    PYTHONPATH=. python benchmarks/run_anatomy.py [--datasets mfeat-hard avdigits-small] [--method baseline]
        [--epochs 30] [--repeats 3] [--markdown]

Prints each part's share of the run's wall time (median over the repeats, with min–max), and the training
share (``train_seconds`` of result.json / wall).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _paired import median_range  # noqa: E402

#: (label, description) in print order; "training" is the engine's own train_seconds.
PARTS = (
    ("training", "training epochs (train_seconds)"),
    ("diag_steps", "per-step and per-epoch diagnostics hooks"),
    ("validation", "validation every epoch (full model)"),
    ("val_per_modality", "per-modality validation every epoch"),
    ("val_shared", "validation + per-modality validation in one pass"),
    ("checkpoints", "checkpoints, metrics.jsonl, config.json writes and reads"),
    ("final_eval", "final test + per-modality evaluation (selected model)"),
    ("final_diag", "final diagnostics (probes, Shapley, permutation)"),
    ("imports", "importing method/dataset modules"),
    ("dataset", "dataset load"),
    ("provenance", "git state and package versions"),
    ("setup", "model, method, optimizer set-up"),
    ("other", "the rest (CLI, run folder, lock, fork, exit)"),
)

TRIAL_SETS = ["--set", "train.diagnostics=none", "--set", "train.modality_eval=none",
              "--set", "train.evaluate_test=false"]


class ExclusiveTimers:
    """Nested timers: the time of a call is charged to its label minus the time of the timed calls inside it.
    A wrapper made with ``inherit=True`` charges its time to the enclosing label when there is one."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.stack: list[list] = []  # [label, start, child seconds]

    def wrap(self, owner, name: str, label: str, inherit: bool = False) -> None:
        fn = getattr(owner, name)
        timers = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            top = timers.stack[-1][0] if timers.stack else None
            lab = top if inherit and top not in (None, "fit_other") else label
            timers.stack.append([lab, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                lab, t0, inner = timers.stack.pop()
                dt = time.perf_counter() - t0
                timers.seconds[lab] = timers.seconds.get(lab, 0.0) + dt - inner
                if timers.stack:
                    timers.stack[-1][2] += dt

        static = isinstance(owner, type) and isinstance(owner.__dict__.get(name), staticmethod)
        setattr(owner, name, staticmethod(timed) if static else timed)


def instrument() -> ExclusiveTimers:
    from mmbalance import engine, registry, runfiles
    from mmbalance.diagnostics import runtime

    t = ExclusiveTimers()
    T = engine.Trainer
    t.wrap(registry.Registry, "_load_builtins", "imports")
    t.wrap(registry, "create_dataset", "dataset")
    t.wrap(runfiles, "code_provenance", "provenance")
    t.wrap(runfiles, "package_versions", "provenance")
    t.wrap(T, "__init__", "setup")
    t.wrap(T, "_train_epoch", "training")
    for hook in ("start_epoch", "before_step", "after_backward", "after_edit", "end_epoch"):
        t.wrap(runtime.Diagnostics, hook, "diag_steps")
    t.wrap(T, "evaluate", "validation", inherit=True)
    t.wrap(T, "evaluate_per_modality", "val_per_modality", inherit=True)
    if hasattr(T, "evaluate_with_modalities"):  # the full and per-modality passes in one (shared encoders)
        t.wrap(T, "evaluate_with_modalities", "val_shared", inherit=True)
    for name in ("_save", "_save_last", "_write_metrics", "_write_config", "_read_checkpoint", "_load_last"):
        t.wrap(T, name, "checkpoints")
    t.wrap(T, "_finish", "final_eval")
    t.wrap(runtime.Diagnostics, "final", "final_diag")
    t.wrap(T, "fit", "fit_other")
    return t


def child(argv: list[str], out: str) -> None:
    timers = instrument()
    from mmbalance import run

    code = run.main(argv)
    result = json.loads((Path(argv[argv.index("--run-dir") + 1]) / "result.json").read_text())
    seconds = dict(timers.seconds)
    # fit_other: the fit loop's own bookkeeping between parts (history rows, progress); counted as "other"
    payload = {"code": code, "seconds": seconds, "train_seconds": result["timings"]["train_seconds"],
               "val": result["val"], "test": result.get("test"),
               "probe": (result.get("diagnostics") or {}).get("probe")}
    Path(out).write_text(json.dumps(payload))


def one_run(dataset: str, method: str, epochs: int, trial: bool, workdir: Path, threads: int) -> dict:
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    out = str(run_dir) + ".json"
    argv = ["--method", method, "--dataset", dataset, "--seed", "0", "--epochs", str(epochs),
            "--run-dir", str(run_dir / "run"), "--quiet", "--overwrite"] + (TRIAL_SETS if trial else [])
    from mmbalance.leaderboard import worker

    if hasattr(worker, "preload_dataset"):  # as a warm worker does before forking (once per dataset request)
        worker.preload_dataset(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the run, as a warm worker forks it
        code = 1
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            import torch

            torch.set_num_threads(threads)
            child(argv, out)
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"run failed: {dataset} {method} trial={trial} (status {status})")
    rec = json.loads(Path(out).read_text())
    rec["wall"] = wall
    return rec


def shares(rec: dict) -> dict[str, float]:
    s = dict(rec["seconds"])
    s.pop("fit_other", None)
    # the engine's train_seconds excludes the diagnostics' time inside the steps, which diag_steps holds
    s["training"] = rec["train_seconds"]
    claimed = sum(v for k, v in s.items())
    s["other"] = max(0.0, rec["wall"] - claimed)
    return {k: v / rec["wall"] for k, v in s.items()}


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{100 * statistics.median(values):.1f} % ({100 * min(values):.0f}–{100 * max(values):.0f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["mfeat-hard", "avdigits-small"])
    ap.add_argument("--method", default="baseline")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (the sweep's OMP_NUM_THREADS)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", help="also write every run's record to this file")
    args = ap.parse_args(argv)
    os.environ.setdefault("MMBALANCE_NO_PROGRESS", "1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from mmbalance.leaderboard.worker import preload

    t0 = time.perf_counter()
    preload()
    warm = time.perf_counter() - t0
    kinds = [(d, trial) for d in args.datasets for trial in (False, True)]
    records: dict[tuple[str, bool], list[dict]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
            for d, trial in order:
                records[(d, trial)].append(one_run(d, args.method, args.epochs, trial, Path(tmp), args.threads))
    load = os.getloadavg()
    print(f"{args.method}, {args.epochs} epochs, {args.repeats} interleaved repeats, {args.threads} thread(s) per run; "
          f"worker warm-up {warm:.1f} s (paid once per worker); load average at the end {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}")
    cols = [(d, trial) for d in args.datasets for trial in (False, True)]
    head = ["part of one run"] + [f"{d} {'trial' if t else 'report'}" for d, t in cols]
    rows = []
    for key, desc in PARTS:
        rows.append([desc] + [fmt([shares(rec).get(key, 0.0) for rec in records[c]]) for c in cols])
    rows.append(["wall seconds per run, median (min–max)"] + [
        median_range(w) for w in ([rec["wall"] for rec in records[c]] for c in cols)])
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        width = max(len(r[0]) for r in rows) + 2
        print("".ljust(width) + "".join(h.ljust(26) for h in head[1:]))
        for row in rows:
            print(row[0].ljust(width) + "".join(c.ljust(26) for c in row[1:]))
    for c in cols:  # the numbers the runs reported (to check that a change leaves them alone)
        rec = records[c][0]
        probe = rec.get("probe") or {}
        print(f"{c[0]} {'trial' if c[1] else 'report'}: val {json.dumps(rec['val'], sort_keys=True)}; "
              f"test {json.dumps(rec['test'], sort_keys=True)}; probe test "
              f"{json.dumps(probe.get('test'), sort_keys=True)}")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{d}|{t}": v for (d, t), v in records.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
