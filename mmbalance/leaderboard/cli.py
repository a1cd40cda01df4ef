"""Command line: ``python -m mmbalance.leaderboard {run,build,plan} SUITE``.

* ``run SUITE`` plans the suite's runs (datasets × method rows × seeds, see :mod:`mmbalance.leaderboard.plan`),
  skips those already done with the same plan hash, and runs the rest through ``python -m mmbalance.run``
  (or ``accelerate launch -m mmbalance.run`` when the suite says ``launcher = "accelerate"``) in
  ``--workers`` parallel subprocesses, or as SLURM jobs with ``--executor submitit``. Safe to kill and
  restart: finished runs are kept, interrupted ones resume from their last checkpoint.
* ``build SUITE`` aggregates the run files into README.md, results.csv and figures/ (see
  :mod:`mmbalance.leaderboard.report`); the same run files always give byte-identical output.
* ``plan SUITE`` lists the planned runs and their state without running anything.

Exit codes: 0 ok; 1 ``run`` finished with failed runs; 2 bad input.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from ..errors import MMBalanceError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmbalance.leaderboard",
        description="Run a leaderboard suite (datasets x methods x seeds) and build its report.",
        epilog="Examples:\n"
               "  python -m mmbalance.leaderboard run quick --workers 2\n"
               "  python -m mmbalance.leaderboard build quick\n"
               "  python -m mmbalance.leaderboard run paper --executor submitit\n"
               "  python -m mmbalance.leaderboard plan leaderboard/suites/tiny.toml --results-dir /tmp/lb",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("suite", help="suite name in leaderboard/suites/ (quick, paper, tiny) or a .toml path")
        sp.add_argument("--results-dir", help="run folders (default: leaderboard/results/SUITE)")
        sp.add_argument("--datasets", nargs="+", metavar="NAME", help="only these datasets of the suite")
        sp.add_argument("--methods", nargs="+", metavar="ROW", help="only these method rows of the suite")
        sp.add_argument("--data-dir", help="root folder of on-disk datasets (default: the suite's, or $MMBALANCE_DATA)")

    run = sub.add_parser("run", help="run the suite's missing runs")
    common(run)
    run.add_argument("--workers", type=int, default=1, help="parallel runs (default 1; GPUs: at most one per run)")
    run.add_argument("--executor", choices=["local", "submitit"], default="local",
                     help="local subprocesses (default) or submitit jobs (SLURM where available)")
    run.add_argument("--cluster", choices=["slurm", "local", "debug"],
                     help="submitit cluster (default: slurm when available, else local)")
    run.add_argument("--no-retry-failed", action="store_true", help="leave failed runs failed instead of re-running")
    run.add_argument("--build", action="store_true", help="build the report when the runs are done")
    run.add_argument("--out-dir", help="report folder for --build")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    build = sub.add_parser("build", help="aggregate the run files into README.md, results.csv, figures/")
    common(build)
    build.add_argument("--out-dir", help="report folder (default: the suite's `output`, under leaderboard/)")

    plan = sub.add_parser("plan", help="list the planned runs and their state")
    common(plan)
    return p


def _plan(args: argparse.Namespace, validate: bool = False):
    from .plan import plan_runs
    from .suite import load_suite

    suite = load_suite(args.suite)
    results_dir = Path(args.results_dir) if args.results_dir else suite.default_results_dir()
    data_dir = args.data_dir or suite.data_dir
    specs = plan_runs(suite, results_dir, datasets=args.datasets, rows=args.methods, data_dir=data_dir,
                      validate=validate)
    if not specs:
        raise MMBalanceError(f"suite {suite.name!r}: the plan is empty (check --datasets/--methods)")
    return suite, results_dir, data_dir, specs


def cmd_run(args: argparse.Namespace) -> int:
    from .execute import run_local, run_submitit
    from .plan import read_state

    suite, results_dir, data_dir, specs = _plan(args, validate=True)
    before = Counter(read_state(s).state for s in specs)
    done = before.get("ok", 0) + before.get("n/a", 0)
    print(f"suite {suite.name}: {len(specs)} runs planned, {done} already done, results in {results_dir}",
          file=sys.stderr)
    retry = not args.no_retry_failed
    if args.executor == "submitit":
        states = run_submitit(specs, folder=results_dir / "_submitit", cluster=args.cluster, data_dir=data_dir,
                              retry_failed=retry, slurm=suite.slurm, workers=args.workers, progress=not args.quiet)
    else:
        run_local(specs, workers=max(1, args.workers), data_dir=data_dir, retry_failed=retry,
                  per_run_gpus=max(1, suite.num_processes), progress=not args.quiet)
        states = [read_state(s) for s in specs]
    counts = Counter(s.state for s in states)
    print(f"suite {suite.name}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), file=sys.stderr)
    for st in states:
        if st.state == "failed":
            print(f"  failed: {st.spec.dataset}/{st.spec.row}/seed{st.spec.seed}: {st.error} "
                  f"(log: {Path(st.spec.run_dir) / 'run.log'})", file=sys.stderr)
    if args.build:
        _build(suite, specs, args.out_dir)
    return 1 if counts.get("failed") else 0


def _build(suite, specs, out_dir: str | None) -> None:
    from .report import build_report, write_report

    out = Path(out_dir) if out_dir else suite.default_out_dir()
    written = write_report(build_report(suite, specs), out)
    print(f"wrote {written['readme']}, {written['csv']} and {len(written) - 2} figure(s)", file=sys.stderr)


def cmd_build(args: argparse.Namespace) -> int:
    suite, _, _, specs = _plan(args)
    _build(suite, specs, args.out_dir)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import read_state

    suite, results_dir, _, specs = _plan(args)
    for s in specs:
        print(f"{read_state(s).state:8} {s.plan_hash} {s.dataset} {s.row} seed{s.seed} {' '.join(s.run_args())}")
    counts = Counter(read_state(s).state for s in specs)
    print(f"{len(specs)} runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"run": cmd_run, "build": cmd_build, "plan": cmd_plan}[args.command](args)
    except MMBalanceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


