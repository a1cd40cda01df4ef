"""The tuning part of a leaderboard report: what tuning chose per row, and the defaults beside the tuned rows.

For a suite with ``[tune]`` the main tables use each row's chosen configuration; this module adds, per dataset,
a "Tuned configurations" table (trials ok/planned, chosen trial and values, its validation score next to the
defaults' score, median and worst trial score as sensitivity, tuning cost) for the main report, and for the
defaults file (titled as the defaults table) a "Defaults vs tuned" table (test metric of the defaults' runs and
of the tuned runs, and the tuned − defaults difference paired by replicate), plus ``tuning.csv``.
Everything comes from the run files and ``tune.json``; no timestamps, so rebuilding is byte-identical.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..runfiles import read_json
from .plan import safe_name
from .report import DASH, Report, _table, fmt_mean_std
from .tune import DEFAULTS_FAILED_RULE, TUNE_DIR, TUNE_FILE, TuneConfig


def _info(results_dir: Path, dataset: str, row: str) -> dict[str, Any] | None:
    try:
        return read_json(results_dir / TUNE_DIR / dataset / safe_name(row) / TUNE_FILE)
    except (OSError, ValueError):
        return None


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def chosen_text(info: dict[str, Any] | None) -> str:
    if info is None:
        return "untuned"
    ch = info.get("chosen")
    if ch is None:
        return info.get("state", "failed")
    if ch["k"] == 0:
        return "defaults"
    return ", ".join(f"{k.removeprefix('train.')}={_fmt_value(v)}" for k, v in sorted(ch["params"].items()))


def _tune_seconds(results_dir: Path, dataset: str, row: str) -> float:
    """Training seconds of every trial run of the row: the store's lines, overridden by folders that exist."""
    from . import store

    prefix = f"{TUNE_DIR}/{dataset}/{safe_name(row)}/trial"
    results = {rel: rec["result"] for rel, rec in store.load(results_dir, dataset).items()
               if rel.startswith(prefix) and rec.get("result")}
    for p in sorted((results_dir / TUNE_DIR / dataset / safe_name(row)).glob("trial*/seed*/result.json")):
        try:
            results[p.parent.relative_to(results_dir).as_posix()] = read_json(p)
        except (OSError, ValueError):
            continue
    total = 0.0
    for rel in sorted(results):
        res = results[rel]
        t = (res.get("timings") or {}).get("train_seconds") or 0.0
        total += float(t) + float((res.get("method_metrics") or {}).get("teacher_train_seconds", 0.0) or 0.0)
    return total


def header_line(tune: TuneConfig, metric: str) -> str:
    seeds = len(tune.seeds)
    warn = ("" if seeds >= 3 else f" Only {seeds} tuning seed(s): the noise of a trial's mean is poorly known, so the "
            "choice may follow noise (≥ 3 recommended).")
    return (f"Tuning: {tune.trials} trials per row (random search, sampler seed {tune.seed}; trial 0 = defaults), "
            f"tuning seeds {', '.join(map(str, tune.seeds))} (disjoint from the replicates), validation `{metric}`; "
            "the same budget for baseline and unimodal rows. A trial replaces the defaults only if its mean "
            "validation score beats theirs by more than the noise of that mean (the one-SE rule, see docs/protocol.md; "
            "rows tuned before the rule record their own rule in tune.json). The test split is never evaluated "
            "while tuning. Tuned rows' validation scores are optimistic (chosen on that split); every table ranks "
            "by test values of the replicates." + warn)


def tuning_note(tune: TuneConfig, results_dir: Path, tuned: Report) -> str:
    """One line for the report's protocol list."""
    rules = set()
    for ds in tuned.datasets:
        for row in ds.rows.values():
            info = _info(results_dir, ds.name, row.row)
            if info is None:
                continue
            rule = (info.get("rule") or {}).get("rule", "highest validation score (tie-break on loss)").split(" (")[0]
            trials = info.get("trials") or []
            if trials and trials[0].get("k") == 0 and trials[0].get("state") != "ok" and info.get("chosen"):
                rule = DEFAULTS_FAILED_RULE  # a tune.json written before this case had its name says "no candidate"
            # the defaults failing is a fact about one row, so the line names it
            rules.add(f"{rule} ({ds.name}/{row.row})" if rule == DEFAULTS_FAILED_RULE else rule)
    return (f"{tune.trials} random-search trials per row on validation, {len(tune.seeds)} tuning seed(s) "
            f"({', '.join(map(str, tune.seeds))}); choice rule: " + ("; ".join(sorted(rules)) or "—"))


def tuning_sections(tuned: Report, results_dir: Path, defaults_link: str) -> list[str]:
    suite = tuned.suite
    tune: TuneConfig = suite.tune
    metric = next((d.metric for d in tuned.datasets if d.metric), "metric")
    lines = ["## Tuning", "", header_line(tune, metric), "",
             f"The whole leaderboard with every row at its defaults, and each row's tuned − defaults difference: "
             f"[{defaults_link}]({defaults_link}).", ""]
    for ds in tuned.datasets:
        lines += [f"### {ds.name}: tuned configurations", ""]
        body = []
        for row in ds.ordered_rows():
            info = _info(results_dir, ds.name, row.row)
            if info is None:
                body.append([row.row, DASH, DASH, "untuned", DASH, DASH, DASH, DASH])
                continue
            scores = [t["score"] for t in info["trials"] if t.get("score") is not None]
            ch = info.get("chosen")
            body.append([row.row, f"{info['trials_ok']}/{info['trials_planned']}", str(ch["k"]) if ch else DASH,
                         chosen_text(info), f"{ch['score']:.4f}" if ch else DASH,
                         f"{info['default_score']:.4f}" if info.get("default_score") is not None else DASH,
                         f"{np.median(scores):.4f} / {min(scores):.4f}" if scores else DASH,
                         f"{_tune_seconds(results_dir, ds.name, row.row):.1f}"])
        lines += [_table(["method", "trials", "chosen k", "chosen values", f"val {metric} chosen",
                          f"val {metric} defaults", "median / worst trial", "tuning train s"], body), ""]
    return lines


def defaults_sections(tuned: Report, defaults: Report, tuned_link: str) -> list[str]:
    """The defaults file's own section: per dataset, each row's test metric at its defaults and tuned, and the
    tuned − defaults difference paired by replicate (survivors). No ranks: a rank without an interval reads
    as a verdict (the report's aggregate gives ranks with bootstrap intervals)."""
    lines = ["## Defaults vs tuned", "",
             f"The tuned leaderboard: [{tuned_link}]({tuned_link}). `tuned − defaults` is the mean over replicates "
             "where both finished of the tuned run minus the defaults run (not a Δ vs the baseline).", ""]
    dmap = {d.name: d for d in defaults.datasets}
    for ds in tuned.datasets:
        dd = dmap.get(ds.name)
        if dd is None:
            continue
        body = []
        for row in ds.ordered_rows():
            d_row = dd.rows.get(row.row)
            d_text = fmt_mean_std(d_row.primary_values(ds.metric)) if d_row else DASH
            delta = DASH
            if d_row is not None:
                common = sorted(set(row.primary_values(ds.metric)) & set(d_row.primary_values(ds.metric)))
                if common:
                    delta = f"{np.mean([row.primary_values(ds.metric)[s] - d_row.primary_values(ds.metric)[s] for s in common]):+.4f}"
            body.append([row.row, d_text, fmt_mean_std(row.primary_values(ds.metric)), delta])
        lines += [f"### {ds.name}: defaults vs tuned (test {ds.metric}, survivors)", "",
                  _table(["method", "defaults", "tuned", "tuned − defaults (paired by replicate)"], body), ""]
    return lines


def tuning_csv(tuned: Report, results_dir: Path) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dataset", "row", "trials_ok", "trials_planned", "chosen_k", "tuned_params", "tune_score",
                "default_score"])
    for ds in tuned.datasets:
        for row in ds.ordered_rows():
            info = _info(results_dir, ds.name, row.row)
            if info is None:
                continue
            ch = info.get("chosen")
            w.writerow([ds.name, row.row, info["trials_ok"], info["trials_planned"], ch["k"] if ch else "",
                        json.dumps(ch["params"] if ch else {}, sort_keys=True),
                        repr(ch["score"]) if ch else "", repr(info["default_score"]) if info.get("default_score") is not None else ""])
    return buf.getvalue()
