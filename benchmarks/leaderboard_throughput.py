"""Leaderboard throughput: a slice of the quick suite run with warm workers (imports once per worker, one forked
process per run) against one cold ``python -m mmbalance.run`` process per run, paired and interleaved.

Each repeat runs the same slice (default: 8 rows x 3 seeds of mfeat, the suite's 30 epochs, ``--workers 2``)
into two fresh results folders, once per mode, alternating which mode goes first; it reports the wall-time
ratio cold / warm (the speed-up; > 1 is faster) with min/median/max over the pairs, the runs per minute of each
mode, and checks that both modes wrote the same validation/test numbers.

    python benchmarks/leaderboard_throughput.py [--repeats 2] [--rows baseline cggm ...] [--seeds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _paired import paired_ratio  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _suite(path: Path, rows: list[str], seeds: int, dataset: str, epochs: int) -> None:
    path.write_text(f'name = "throughput"\nseeds = {seeds}\nepochs = {epochs}\n'
                    f'methods = {json.dumps(rows)}\nbaseline = "baseline"\noutput = "throughput"\n'
                    f'[datasets.{dataset}]\n')


def _sweep(suite: Path, results: Path, warm: bool, workers: int) -> float:
    env = {**os.environ, "MMBALANCE_WARM_WORKERS": "1" if warm else "0", "MMBALANCE_NO_PROGRESS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mmbalance.leaderboard", "run", str(suite), "--results-dir", str(results),
                    "--workers", str(workers), "--quiet"], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _numbers(results: Path) -> dict[str, tuple]:
    out = {}
    for f in sorted(results.rglob("result.json")):
        r = json.loads(f.read_text())
        out[str(f.relative_to(results))] = (r.get("val"), r.get("test"), r.get("selected"))
    return out


def _train_share(results: Path) -> float:
    """Σ train_seconds / Σ run wall time (status.json ``wall_seconds``) over the sweep's runs."""
    train = wall = 0.0
    for f in results.rglob("result.json"):
        status = f.parent / "status.json"
        if status.is_file():
            train += json.loads(f.read_text())["timings"]["train_seconds"]
            wall += float(json.loads(status.read_text()).get("wall_seconds") or 0.0)
    return train / wall if wall else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rows", nargs="+", default=["baseline", "cggm", "ogm_ge", "qmf", "mla", "pmr", "dgl", "remix"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--dataset", default="mfeat")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    runs = len(args.rows) * args.seeds
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        suite = tmp_path / "throughput.toml"
        _suite(suite, args.rows, args.seeds, args.dataset, args.epochs)
        count = {"warm": 0, "cold": 0}
        last: dict[str, Path] = {}

        def sweep(mode: str) -> float:
            count[mode] += 1
            results = tmp_path / f"{mode}{count[mode]}"
            last[mode] = results
            return _sweep(suite, results, mode == "warm", args.workers)

        ratio, cold, warm = paired_ratio(lambda: sweep("cold"), lambda: sweep("warm"), args.repeats)
        same = _numbers(last["warm"]) == _numbers(last["cold"])
        share = {mode: _train_share(last[mode]) for mode in ("cold", "warm")}
    print(f"slice: {args.dataset}, rows {', '.join(args.rows)}, {args.seeds} seeds, {args.epochs} epochs = "
          f"{runs} runs, --workers {args.workers}")
    print("| mode | wall s (median) | runs/min | Σ train_seconds / Σ run wall (last repeat) |\n|---|---|---|---|")
    for name, xs, mode in (("cold (one process per run)", cold, "cold"), ("warm workers", warm, "warm")):
        med = sorted(xs)[len(xs) // 2]
        print(f"| {name} | {med:.1f} | {60 * runs / med:.1f} | {share[mode]:.2f} |")
    print(f"\nspeed-up cold/warm: {ratio} (goal ≥ 2: the suite's wall time at least halves)")
    print(f"same numbers in both modes: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
