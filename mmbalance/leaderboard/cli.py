"""Command line: ``python -m mmbalance.leaderboard {run,build,plan} SUITE``.

* ``run SUITE`` plans the suite's runs (datasets × method rows × seeds, see :mod:`mmbalance.leaderboard.plan`),
  skips those already done with the same plan hash, and runs the rest through ``python -m mmbalance.run``
  (or ``accelerate launch -m mmbalance.run`` when the suite says ``launcher = "accelerate"``) in
  ``--workers`` parallel subprocesses, or as SLURM jobs with ``--executor submitit``. Safe to kill and
  restart: finished runs are kept, interrupted ones resume from their last checkpoint.
* ``build SUITE`` aggregates the runs into README.md, details.md, results.csv and figures/ (see
  :mod:`mmbalance.leaderboard.report`) and the static site in site/ (:mod:`mmbalance.leaderboard.site`);
  the same runs always give byte-identical output. Runs from several commits or an uncommitted tree are
  marked loudly; ``--require-one-commit`` refuses them.
* ``plan SUITE`` lists the planned runs and their state without running anything.
* ``store SUITE`` adds the suite's finished run folders to its compact store (``RESULTS/_store/``, see
  :mod:`mmbalance.leaderboard.store`); ``run`` and ``tune`` add each run as it finishes.

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
    run.add_argument("--part", metavar="I/N", help="run only the I-th of N interleaved slices of the plan (1-based; "
                                                   "the same plan gives the same slices), e.g. one per session")

    build = sub.add_parser("build", help="aggregate the run files into README.md, results.csv, figures/")
    common(build)
    build.add_argument("--out-dir", help="report folder (default: the suite's `output`, under leaderboard/)")
    build.add_argument("--require-one-commit", action="store_true",
                       help="refuse (exit 2) when the runs come from more than one commit or an uncommitted tree "
                            "(default: build and mark the report loudly)")
    build.add_argument("--format", choices=["markdown", "site", "latex"], action="append", default=None,
                       help="markdown (README.md, results.csv, figures; always written), site (a static website "
                            "in site/: sortable tables, method pages, SVG figures; opens from file://) and/or "
                            "latex (results.tex: booktabs tables, best per column in bold, significance marks); "
                            "default: markdown and site")

    plan = sub.add_parser("plan", help="list the planned runs and their state")
    common(plan)
    plan.add_argument("--tune", action="store_true", help="list the tuning trial runs instead of the report runs")

    tune = sub.add_parser("tune", help="equal-budget random search on validation for every row (the suite's [tune])")
    common(tune)
    tune.add_argument("--trials", type=int, help="trials per row (default: the suite's tune.trials)")
    tune.add_argument("--workers", type=int, default=1, help="parallel runs (default 1)")
    tune.add_argument("--executor", choices=["local", "submitit"], default="local")
    tune.add_argument("--cluster", choices=["slurm", "local", "debug"])
    tune.add_argument("--quiet", action="store_true", help="no progress bar")
    tune.add_argument("--part", metavar="I/N", help="run only the I-th of N interleaved slices of the trial runs "
                                                    "(1-based); aggregates every row whose trials are all done")
    st = sub.add_parser("store", help="add every finished run folder of the suite (report, defaults, tuning "
                                      "trials) to its compact store RESULTS/_store/<dataset>.jsonl.gz")
    common(st)
    for sp in (run, build, plan, st):
        sp.add_argument("--untuned", action="store_true",
                        help="suites with [tune]: use the defaults for rows whose tuning is incomplete")
    return p


def _plan(args: argparse.Namespace, validate: bool = False, tuned: bool = True):
    """The suite's report runs; for a suite with ``[tune]`` (and ``tuned``) with each row's chosen values."""
    from .plan import plan_runs
    from .suite import load_suite

    suite = load_suite(args.suite)
    results_dir = Path(args.results_dir) if args.results_dir else suite.default_results_dir()
    data_dir = args.data_dir or suite.data_dir
    specs = plan_runs(suite, results_dir, datasets=args.datasets, rows=args.methods, data_dir=data_dir,
                      validate=validate)
    if not specs:
        raise MMBalanceError(f"suite {suite.name!r}: the plan is empty (check --datasets/--methods)")
    if tuned and suite.tune is not None:
        from .tune import apply_choices

        specs = apply_choices(suite, specs, results_dir, untuned=getattr(args, "untuned", False))
    return suite, results_dir, data_dir, specs


def _run_specs(args: argparse.Namespace, suite, results_dir: Path, data_dir, specs) -> list:
    from .execute import run_local, run_submitit
    from .plan import read_state

    retry = not getattr(args, "no_retry_failed", False)
    if args.executor == "submitit":
        from . import store

        states = run_submitit(specs, folder=results_dir / "_submitit", cluster=args.cluster, data_dir=data_dir,
                            retry_failed=retry, slurm=suite.slurm, workers=args.workers, progress=not args.quiet)
        store.sync(specs)
        return states
    from . import store

    writer = store.Writer()
    try:
        run_local(specs, workers=max(1, args.workers), data_dir=data_dir, retry_failed=retry,
                  per_run_gpus=max(1, suite.num_processes), progress=not args.quiet,
                  on_done=lambda st: writer.add(st.spec))  # runs enter the store as they finish
    finally:
        writer.flush()
        store.sync(specs)
    return [read_state(s) for s in specs]


def part_of(specs: list, part: str | None) -> list:
    """``--part I/N``: every N-th spec starting at the I-th (plan order is seed-major, so each part covers every
    row). Parts are disjoint and together the whole plan; each can run in its own session (all resumable)."""
    if not part:
        return specs
    try:
        i, n = (int(x) for x in part.split("/"))
    except ValueError:
        i = n = 0
    if not (1 <= i <= n):
        raise MMBalanceError(f"--part {part!r}: expected I/N with 1 <= I <= N, e.g. 2/4")
    return specs[i - 1::n]


def cmd_run(args: argparse.Namespace) -> int:
    from .plan import read_state

    suite, results_dir, data_dir, specs = _plan(args, validate=True)
    tuned_dirs = {s.run_dir for s in specs}
    if suite.tune is not None:  # the defaults' runs too: the report shows both tables
        _, _, _, defaults = _plan(args, tuned=False)
        specs = [s for s in defaults if s.run_dir not in tuned_dirs] + specs
    before = Counter(read_state(s).state for s in specs)
    done = before.get("ok", 0) + before.get("n/a", 0)
    print(f"suite {suite.name}: {len(specs)} runs planned, {done} already done, results in {results_dir}",
          file=sys.stderr)
    states = _run_specs(args, suite, results_dir, data_dir, part_of(specs, args.part))
    counts = Counter(s.state for s in states)
    print(f"suite {suite.name}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), file=sys.stderr)
    for st in states:
        if st.state == "failed":
            print(f"  failed: {st.spec.dataset}/{st.spec.row}/seed{st.spec.seed}: {st.error} "
                  f"(log: {Path(st.spec.run_dir) / 'run.log'})", file=sys.stderr)
    if args.build:
        _build(suite, [s for s in specs if s.run_dir in tuned_dirs] if suite.tune is not None else specs,
               args.out_dir, args)
    return 1 if counts.get("failed") else 0


def _build(suite, specs, out_dir: str | None, args: argparse.Namespace | None = None,
           formats: tuple[str, ...] = ("markdown", "site")):
    """Write the report (always), and the site and LaTeX when ``formats`` asks; returns the report."""
    from ..runfiles import atomic_write_text
    from .report import build_report, render_csv, write_report

    out = Path(out_dir) if out_dir else suite.default_out_dir()
    extra = None
    downloads: dict[str, str] = {}
    tuning: dict[tuple[str, str], dict] = {}
    require = bool(getattr(args, "require_one_commit", False))
    if suite.tune is not None and args is not None:  # defaults beside the tuned rows
        from .plan import read_state
        from .tune import plan_tuning, read_tune
        from .tune_report import defaults_sections, tuning_csv, tuning_note, tuning_sections
        from .verdict import code_versions

        _, results_dir, _, defaults = _plan(args, tuned=False)
        results_dir = Path(results_dir).resolve()
        rep_defaults = build_report(suite, defaults, title="defaults table (every row at its published defaults, "
                                                          "untuned)")
        tuned = build_report(suite, specs)
        # the tuning trials chose the configurations: their code versions count too
        trials = [read_state(t) for p in plan_tuning(suite, defaults, results_dir, data_dir=args.data_dir
                                                     or suite.data_dir) for t in p.all_specs]
        tuned.code = code_versions([s.result for s in tuned.states + trials if s.state == "ok" and s.result])
        _check_code(tuned, require)
        _check_code(rep_defaults, require)
        tuned.tuning_note = tuning_note(suite.tune, results_dir, tuned)
        rep_defaults.tuning_note = "none: every row at its published defaults (this is the defaults table)"
        write_report(rep_defaults, out / "defaults", defaults_sections(tuned, rep_defaults, "../README.md"))
        extra = tuning_sections(tuned, results_dir, "defaults/README.md")
        downloads["tuning.csv"] = tuning_csv(tuned, results_dir)
        for ds in tuned.datasets:
            for row in ds.rows:
                info = read_tune(results_dir, ds.name, row)
                if info is not None:
                    tuning[(ds.name, row)] = info
        rep = tuned
    else:
        rep = build_report(suite, specs)
        _check_code(rep, require)
    if "site" in formats:
        from .site import SITE_DIR

        rep.site_link = f"{SITE_DIR}/index.html"
    written = write_report(rep, out, extra)
    if "tuning.csv" in downloads:
        atomic_write_text(out / "tuning.csv", downloads["tuning.csv"])
    print(f"wrote {written['readme']}, {written['details']}, {written['csv']} and {len(written) - 3} figure(s)",
          file=sys.stderr)
    latex = None
    if "latex" in formats or "site" in formats:
        from .latex import render_latex

        latex = render_latex(rep)
    if "latex" in formats:
        atomic_write_text(out / "results.tex", latex)
        print(f"wrote {out / 'results.tex'}", file=sys.stderr)
    if "site" in formats:
        from .site import write_site

        downloads.update({"results.csv": render_csv(rep), "results.tex": latex})
        site = write_site(rep, out, downloads=downloads, tuning=tuning)
        print(f"wrote {site / 'index.html'} (the static site)", file=sys.stderr)
    return rep


def _check_code(rep, require: bool) -> None:
    """Mixed code versions: marked loudly in the report; refused with --require-one-commit."""
    if rep.code is not None and not rep.code.clean:
        msg = f"suite {rep.suite.name!r}: the runs come from {rep.code.describe()}"
        if require:
            raise MMBalanceError(msg + "; re-run them from one clean commit (or build without --require-one-commit, "
                                 "which marks the report)")
        print(f"warning: {msg}; the report is marked MIXED CODE VERSIONS", file=sys.stderr)


def cmd_build(args: argparse.Namespace) -> int:
    from .plan import read_state

    suite, results_dir, _, specs = _plan(args)
    states = [read_state(s) for s in specs]
    if all(st.state == "missing" for st in states):
        raise MMBalanceError(f"suite {suite.name!r}: {str(results_dir)!r} holds no run of this suite (a typo in "
                             "--results-dir?); nothing was written, the existing report is unchanged. Run the "
                             "suite first: python -m mmbalance.leaderboard run SUITE")
    formats = ("markdown", "site") if not args.format else tuple(dict.fromkeys(["markdown", *args.format]))
    _build(suite, specs, args.out_dir, args, formats)
    corrupt = [st.problem for st in states if st.problem]
    for problem in corrupt:  # the report shows them as failed with the same text
        print(f"error: {problem}", file=sys.stderr)
    return 1 if corrupt else 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import read_state

    if args.tune:
        from .tune import plan_tuning

        suite, results_dir, data_dir, report = _plan(args, tuned=False)
        specs = [s for p in plan_tuning(suite, report, results_dir, data_dir=data_dir) for s in p.all_specs]
    else:
        suite, results_dir, _, specs = _plan(args)
    for s in specs:
        print(f"{read_state(s).state:8} {s.plan_hash} {s.dataset} {s.row} seed{s.seed} {' '.join(s.run_args())}")
    counts = Counter(read_state(s).state for s in specs)
    print(f"{len(specs)} runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), file=sys.stderr)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Plan every row's trials, run them (skipping finished ones), aggregate each row's tune.json."""
    from .tune import aggregate, plan_tuning, write_trial_files

    suite, results_dir, data_dir, report = _plan(args, validate=True, tuned=False)
    if suite.tune is None:
        raise MMBalanceError(f"suite {suite.name!r} has no [tune] table (trials, seeds, ...); nothing to tune")
    plans = plan_tuning(suite, report, results_dir, data_dir=data_dir, trials=args.trials)
    write_trial_files(plans, suite.tune)
    specs = [s for p in plans for s in p.all_specs]
    # seed-major within a row's trials is what plan_tuning lists; interleave rows so partial sweeps cover all
    order = sorted(range(len(specs)), key=lambda i: (int(Path(specs[i].run_dir).parent.name[5:]), i))
    specs = [specs[i] for i in order]
    print(f"suite {suite.name}: tuning {len(plans)} rows x {len(plans[0].trials) if plans else 0} trials x "
          f"{len(suite.tune.seeds)} seed(s) = {len(specs)} runs (validation only), results in {results_dir}",
          file=sys.stderr)
    _run_specs(args, suite, results_dir, data_dir, part_of(specs, args.part))
    failed = 0
    for p in plans:
        info = aggregate(p, suite.tune, suite.epochs)
        failed += sum(t["state"] == "failed" for t in info["trials"])
        ch = info["chosen"]
        chosen = (f"trial {ch['k']} " + (", ".join(f"{k}={v}" for k, v in ch["sets"]) or "(defaults)")
                  + f" score {ch['score']:.4f}") if ch else info["state"]
        d = info["default_score"]
        d_text = f"{d:.4f}" if d is not None else "-"
        print(f"  {p.dataset}/{p.row}: {info['trials_ok']}/{info['trials_planned']} ok; chosen {chosen}; "
              f"defaults {d_text}", file=sys.stderr)
    return 1 if failed else 0


def cmd_store(args: argparse.Namespace) -> int:
    """Import the suite's finished run folders into its compact store (run and tune do it as runs finish)."""
    from . import store

    suite, results_dir, data_dir, specs = _plan(args, tuned=False)
    every = list(specs)
    if suite.tune is not None:
        from .tune import apply_choices, plan_tuning

        every += [s for p in plan_tuning(suite, specs, results_dir, data_dir=data_dir) for s in p.all_specs]
        every += [s for s in apply_choices(suite, specs, results_dir, untuned=True) if s not in set(specs)]
    added = store.sync(every)
    size = store.size_bytes(results_dir)
    print(f"suite {suite.name}: {added} line(s) added or updated; store {results_dir / store.STORE_DIR} "
          f"is {size / 1e6:.2f} MB", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"run": cmd_run, "build": cmd_build, "plan": cmd_plan, "tune": cmd_tune,
                "store": cmd_store}[args.command](args)
    except MMBalanceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


