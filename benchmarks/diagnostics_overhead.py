"""Diagnostics overhead: a default mfeat run with ``train.diagnostics=default`` vs ``none``.

Each measurement is one CLI run (``python -m mmbalance.run``, one torch/BLAS thread as a leaderboard worker
uses) in a fresh process. We report, from paired interleaved runs (see ``_paired.py``), the ratio
default / none of

- the whole process's wall time (what a user or the leaderboard waits for: start-up included), and
- the in-process wall time of ``fit()`` (``timings.wall_seconds_this_process``: training, validation,
  the final test pass and the diagnostics; start-up excluded),

as median (min–max), plus the diagnostics' own seconds by component (``result.json``). Goal: ≤ 1.10.

    python benchmarks/diagnostics_overhead.py [--repeats 4] [--method baseline] [--dataset mfeat] [--epochs N]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _paired import median_range, paired_ratio  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def one_run(level: str, args: argparse.Namespace, log: list[dict]) -> tuple[float, float]:
    """(process wall seconds, in-process fit wall seconds) of one run at diagnostics ``level``."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "mmbalance.run", "--method", args.method, "--dataset", args.dataset,
               "--run-dir", tmp, "--quiet", "--set", f"train.diagnostics={level}"]
        if args.epochs:
            cmd += ["--epochs", str(args.epochs)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MMBALANCE_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}
        t = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - t
        res = json.loads((Path(tmp) / "result.json").read_text())
    timings = res["timings"]
    log.append({"level": level, "process_wall": wall, **timings,
                "components": (res.get("diagnostics") or {}).get("seconds", {})})
    return wall, float(timings["wall_seconds_this_process"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--method", default="baseline")
    p.add_argument("--dataset", default="mfeat")
    p.add_argument("--epochs", type=int, default=None, help="default: the dataset's (mfeat: 50)")
    p.add_argument("--markdown", action="store_true", help="also print the ratios as a markdown table")
    args = p.parse_args()
    log: list[dict] = []
    cache: dict[str, tuple[float, float]] = {}

    def measure(level: str, which: int):
        def f() -> float:
            if which == 0:
                cache[level] = one_run(level, args, log)
            return cache[level][which]
        return f

    proc, _, _ = paired_ratio(measure("default", 0), measure("none", 0), args.repeats)
    fits = [(d["wall_seconds_this_process"], n["wall_seconds_this_process"])
            for d, n in zip([r for r in log if r["level"] == "default"], [r for r in log if r["level"] == "none"])]
    fit_ratios = [a / b for a, b in fits]
    print(f"{args.method} on {args.dataset}, {args.repeats} interleaved pairs, one thread per run")
    print(f"  process wall   default/none: {proc}")
    print(f"  fit() wall     default/none: {statistics.median(fit_ratios):.3f} "
          f"({min(fit_ratios):.3f}–{max(fit_ratios):.3f}, n={len(fit_ratios)})")
    for level in ("none", "default"):
        rows = [r for r in log if r["level"] == level]
        print(f"  {level:>7}: process wall median {statistics.median(r['process_wall'] for r in rows):.2f} s, fit wall "
              f"{statistics.median(r['wall_seconds_this_process'] for r in rows):.2f} s, train_seconds "
              f"{statistics.median(r['train_seconds'] for r in rows):.2f} s, diagnostics_seconds "
              f"{statistics.median(r.get('diagnostics_seconds', 0.0) for r in rows):.2f} s")
    if args.markdown:
        fit = median_range(fit_ratios, 3)
        print(f"\n| run | process wall default/none | fit() wall default/none | goal | met? |\n|---|---|---|---|---|\n"
              f"| {args.method} on {args.dataset}, {args.repeats} pairs | {proc.median:.3f} ({proc.low:.3f}–{proc.high:.3f}) "
              f"| {fit} | ≤ 1.10 | {'yes' if proc.median <= 1.10 else 'no'} |\n")
    comps = [r["components"] for r in log if r["level"] == "default"]
    if comps:
        print("  diagnostics by component (median s): " + ", ".join(
            f"{k} {statistics.median(c.get(k, 0.0) for c in comps):.2f}" for k in sorted(comps[0])))


if __name__ == "__main__":
    main()
