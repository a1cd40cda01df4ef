"""Leaderboard aggregation and report: README.md (markdown tables), results.csv and figures/*.png.

Reads only run files — ``result.json`` (and the leaderboard's ``status.json`` for failed and n/a runs)
of the runs that a suite plans. Everything is deterministic: the same run files give byte-identical
output (the date shown is the newest run's finishing time, taken from the files, never "now").

Statistics come from :mod:`mmbalance.stats`: per dataset, every method row vs the baseline row paired by
seed (:func:`~mmbalance.stats.paired_comparison`: paired t-test with a 95 % t interval of the mean
difference, and Wilcoxon signed-rank), Holm correction across the method rows of a dataset
(:func:`~mmbalance.stats.holm_correction`) and markers from the Holm-adjusted t-test p-value
(:func:`~mmbalance.stats.significance_marker`); across datasets, average ranks, the Friedman test and the
Nemenyi critical difference with a CD diagram (Demšar 2006).
"""
from __future__ import annotations

import csv
import io
import math
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .. import stats
from ..errors import RunFileWriteError
from ..runfiles import RESULT_FILE, atomic_write_text, current_umask
from . import diagnostics as lb_diag
from . import reference
from .curves import run_curve
from .plan import RunSpec, RunState, read_state
from .suite import Suite

DASH = "—"


# ------------------------------------------------------------------------------------------ aggregation
def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def is_reference_row(row: str) -> bool:
    """Unimodal ``<method>:<modality>`` rows are references: shown with Δ, not tested, not ranked."""
    return ":" in row


@dataclass
class RowSummary:
    dataset: str
    row: str
    states: list[RunState]
    test: dict[str, dict[int, float]] = field(default_factory=dict)          # metric → seed → value
    per_modality: dict[str, dict[int, float]] = field(default_factory=dict)  # modality → seed → primary
    val: dict[int, float] = field(default_factory=dict)                      # seed → val primary
    train_seconds: dict[int, float] = field(default_factory=dict)
    curves: dict[int, dict[str, list[float]]] = field(default_factory=dict)  # seed → per-epoch series (.curves)
    comparison: stats.PairedComparison | None = None
    p_t_holm: float = math.nan
    p_w_holm: float = math.nan
    marker: str = ""

    def count(self, state: str) -> int:
        return sum(1 for s in self.states if s.state == state)

    @property
    def n_ok(self) -> int:
        return self.count("ok")

    @property
    def n_pending(self) -> int:
        return sum(1 for s in self.states if s.state in ("missing", "stale", "running"))

    @property
    def seeds_ok(self) -> list[int]:
        return sorted(s.spec.seed for s in self.states if s.state == "ok")

    def primary_values(self, metric: str) -> dict[int, float]:
        return self.test.get(metric, {})

    def mean(self, metric: str) -> float:
        vals = [v for v in self.primary_values(metric).values() if math.isfinite(v)]
        return float(np.mean(vals)) if vals else math.nan


@dataclass
class DatasetSummary:
    name: str
    rows: dict[str, RowSummary]
    task: str = ""
    metric: str = ""
    higher_is_better: bool = True
    modalities: list[str] = field(default_factory=list)
    baseline: str = "baseline"
    diag: Any = None  # lb_diag.DatasetDiagnostics: imbalance-diagnostics columns

    def ordered_rows(self) -> list[RowSummary]:
        """Baseline, then method rows best first (rows without a number last), then unimodal references."""
        sign = -1.0 if self.higher_is_better else 1.0

        def key(r: RowSummary) -> tuple[float, str]:
            m = r.mean(self.metric)
            return (sign * m if math.isfinite(m) else math.inf, r.row)

        base = [r for r in self.rows.values() if r.row == self.baseline]
        methods = sorted((r for r in self.rows.values() if r.row != self.baseline and not is_reference_row(r.row)),
                         key=key)
        order = {m: i for i, m in enumerate(self.modalities)}
        refs = sorted((r for r in self.rows.values() if is_reference_row(r.row)),
                      key=lambda r: (order.get(r.row.split(":", 1)[1], len(order)), r.row))
        return base + methods + refs


def summarise(states: list[RunState], baseline: str) -> list[DatasetSummary]:
    """Group run states by dataset and row (plan order) and compute every statistic."""
    by_ds: dict[str, dict[str, RowSummary]] = {}
    for st in states:
        rows = by_ds.setdefault(st.spec.dataset, {})
        rows.setdefault(st.spec.row, RowSummary(st.spec.dataset, st.spec.row, [])).states.append(st)
    out = []
    for ds, rows in by_ds.items():
        summary = DatasetSummary(ds, rows, baseline=baseline)
        modalities: list[str] = []
        for row in rows.values():
            for st in row.states:
                if st.state != "ok" or st.result is None:
                    continue
                res = st.result
                if not summary.metric:
                    summary.metric = str(res.get("primary_metric", "")) or summary.metric
                    summary.task = str(res.get("task", ""))
                    summary.higher_is_better = bool(res.get("higher_is_better", True))
                seed = st.spec.seed
                for m in res.get("modalities") or []:
                    if m not in modalities and not is_reference_row(row.row):
                        modalities.append(m)
                for k, v in (res.get("test") or {}).items():
                    row.test.setdefault(k, {})[seed] = _num(v)
                row.val[seed] = _num((res.get("val") or {}).get(res.get("primary_metric", ""), math.nan))
                # Shared unimodal teachers (UME, UMT, reconboost_pretrained) are charged to every run
                # that uses them (specs README, "Shared artefacts").
                teacher_s = (res.get("method_metrics") or {}).get("teacher_train_seconds", 0.0)
                row.train_seconds[seed] = _num((res.get("timings") or {}).get("train_seconds")) + _num(teacher_s)
                row.curves[seed] = run_curve(st, str(res.get("primary_metric", "")))
                per_mod = dict(res.get("test_per_modality") or {})
                if not per_mod and len(res.get("modalities") or []) == 1:  # an <m>-only run is its own column
                    per_mod = {res["modalities"][0]: res.get("test") or {}}
                for m, mv in per_mod.items():
                    row.per_modality.setdefault(m, {})[seed] = _num((mv or {}).get(res.get("primary_metric", "")))
                    if m not in modalities and not is_reference_row(row.row):
                        modalities.append(m)
        for row in rows.values():  # modalities only unimodal rows report come last
            for m in row.per_modality:
                if m not in modalities:
                    modalities.append(m)
        summary.modalities = modalities
        _compare(summary)
        summary.diag = lb_diag.summarise_dataset(summary)
        out.append(summary)
    return out


def _compare(ds: DatasetSummary) -> None:
    base = ds.rows.get(ds.baseline)
    if base is None or not ds.metric:
        return
    bvals = base.primary_values(ds.metric)
    tested: list[RowSummary] = []
    for row in ds.rows.values():
        if row.row == ds.baseline:
            continue
        mvals = row.primary_values(ds.metric)
        seeds = sorted(s for s in mvals if s in bvals and math.isfinite(mvals[s]) and math.isfinite(bvals[s]))
        if not seeds:
            continue
        row.comparison = stats.paired_comparison([mvals[s] for s in seeds], [bvals[s] for s in seeds])
        if not is_reference_row(row.row):
            tested.append(row)
    p_t = stats.holm_correction([r.comparison.p_ttest for r in tested])
    p_w = stats.holm_correction([r.comparison.p_wilcoxon for r in tested])
    for row, pt, pw in zip(tested, p_t, p_w):
        row.p_t_holm, row.p_w_holm = pt, pw
        row.marker = stats.significance_marker(pt)


@dataclass
class CrossDataset:
    rows: list[str]
    datasets: list[str]
    excluded: dict[str, str]
    note: str = ""
    ranks: np.ndarray | None = None          # [datasets, rows]
    friedman: stats.FriedmanResult | None = None
    cd: float = math.nan
    groups: list[tuple[str, ...]] = field(default_factory=list)


def cross_dataset(summaries: list[DatasetSummary], baseline: str) -> CrossDataset:
    datasets = [d.name for d in summaries if d.metric]
    candidates: list[str] = []
    for d in summaries:
        for r in d.rows:
            if r not in candidates and not is_reference_row(r):
                candidates.append(r)
    excluded: dict[str, str] = {}
    rows = []
    for r in candidates:
        missing = [d.name for d in summaries if r not in d.rows or not math.isfinite(d.rows[r].mean(d.metric))]
        if missing:
            excluded[r] = "no result on " + ", ".join(missing)
        else:
            rows.append(r)
    cross = CrossDataset(rows, datasets, excluded)
    if len(datasets) < 2 or len(rows) < 3:
        cross.note = (f"Skipped: average ranks, the Friedman test and the Nemenyi CD diagram need at least 2 datasets "
                      f"and 3 methods with results on all of them (here {len(datasets)} dataset(s), {len(rows)} "
                      "method(s)).")
        return cross
    scores = np.array([[(1.0 if d.higher_is_better else -1.0) * d.rows[r].mean(d.metric) for r in rows]
                       for d in summaries if d.metric])
    cross.ranks = stats.rank_within_datasets(scores)
    cross.friedman = stats.friedman_test(scores)
    cross.cd = stats.nemenyi_critical_difference(len(rows), len(datasets))
    cross.groups = stats.nemenyi_groups(dict(zip(rows, cross.friedman.avg_ranks)), cross.cd)
    return cross


# ------------------------------------------------------------------------------------------ formatting
def f4(x: float) -> str:
    return f"{x:.4f}" if math.isfinite(x) else DASH


def fmt_mean_std(values: dict[int, float]) -> str:
    vals = [v for v in values.values() if math.isfinite(v)]
    if not vals:
        return DASH
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"{np.mean(vals):.4f} ± {np.std(vals, ddof=1):.4f}"


def fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return DASH
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def fmt_p_eq(p: float) -> str:
    """``p = 0.0123`` / ``p < 0.0001`` for running text."""
    text = fmt_p(p)
    return f"p < {text[1:]}" if text.startswith("<") else f"p = {text}"


def fmt_delta(c: stats.PairedComparison | None, marker: str = "") -> str:
    if c is None or not math.isfinite(c.mean_diff):
        return DASH
    text = f"{c.mean_diff:+.4f}"
    if math.isfinite(c.ci_low):
        text += f" [{c.ci_low:+.4f}, {c.ci_high:+.4f}]"
    return text + (f" {marker}" if marker else "")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    from tabulate import tabulate

    return tabulate([[_cell(c) for c in r] for r in rows], headers=[_cell(h) for h in headers], tablefmt="github",
                    disable_numparse=True)


def _seeds_text(seeds: list[int]) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


class Notes:
    """Numbered footnotes of one table, deduplicated by text."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def ref(self, text: str) -> str:
        text = _cell(text)
        if text not in self.items:
            self.items.append(text)
        return f"({self.items.index(text) + 1})"

    def render(self) -> str:
        return "\n".join(f"{i}. {t}" for i, t in enumerate(self.items, 1))


def _status_cell(row: RowSummary, notes: Notes) -> tuple[str, str | None]:
    """The n cell ("5", "3/5") and, when the row has no number at all, the text for the value cell."""
    n_plan = len(row.states)
    refs: list[str] = []
    for state in ("n/a", "failed"):
        errors: dict[str, list[int]] = {}
        for st in row.states:
            if st.state == state:
                errors.setdefault(st.error or "no reason recorded", []).append(st.spec.seed)
        for err, seeds in errors.items():
            label = "not applicable" if state == "n/a" else "failed"
            refs.append(notes.ref(f"{row.row}, {_seeds_text(sorted(seeds))}: {label}: {err}"))
    pend = row.n_pending
    if pend:
        refs.append(notes.ref(f"{pend} of {n_plan} planned runs not finished (not run yet, interrupted, or run "
                              "with another configuration)"))
    n_text = str(row.n_ok) if row.n_ok == n_plan else f"{row.n_ok}/{n_plan}"
    marks = (" " + " ".join(refs)) if refs else ""
    if row.n_ok:
        return n_text + marks, None
    if row.count("n/a"):
        return n_text, "n/a" + marks
    if row.count("failed"):
        return n_text, "failed" + marks
    return n_text, "not run" + marks


# ------------------------------------------------------------------------------------------ outputs
@dataclass
class Report:
    suite: Suite
    specs: list[RunSpec]
    states: list[RunState]
    datasets: list[DatasetSummary]
    cross: CrossDataset
    site_link: str | None = None  # the report's link to its static site (set by the build that writes one)


def build_report(suite: Suite, specs: list[RunSpec]) -> Report:
    states = [read_state(s) for s in specs]
    summaries = summarise(states, suite.baseline)
    return Report(suite, specs, states, summaries, cross_dataset(summaries, suite.baseline))


def newest_run_date(states: list[RunState]) -> str:
    """The newest finishing time among the runs (status.json content; result.json mtime as fallback)."""
    stamps: list[datetime] = []
    for st in states:
        fin = (st.status or {}).get("finished") if st.state in ("ok", "failed", "n/a") else None
        if fin:
            try:
                stamps.append(datetime.strptime(fin, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC))
                continue
            except ValueError:
                pass
        if st.state == "ok":
            p = Path(st.spec.run_dir) / RESULT_FILE
            if p.is_file():
                stamps.append(datetime.fromtimestamp(p.stat().st_mtime, tz=UTC))
    return max(stamps).strftime("%Y-%m-%d %H:%M UTC") if stamps else "no finished run"


def _most_common(dicts: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    keyed = Counter(tuple(sorted((str(k), str(v)) for k, v in d.items())) for d in dicts if d)
    if not keyed:
        return {}, 0
    ((items, _),) = keyed.most_common(1)
    return dict(items), len(keyed)


def _cli_suite_arg(suite: Suite) -> str:
    shown = suite.display_path()
    return suite.name if shown == f"leaderboard/suites/{suite.name}.toml" else shown


def render_markdown(rep: Report, figures: dict[str, str], extra: list[str] | None = None) -> str:
    """The report; ``extra`` lines (e.g. the tuning sections) go before the environment section."""
    suite = rep.suite
    arg = _cli_suite_arg(suite)
    counts = Counter(s.state for s in rep.states)
    lines = [f"# mmbalance leaderboard: suite `{suite.name}`", "",
             f"<!-- generated by `python -m mmbalance.leaderboard build {arg}` from the run files; do not edit -->", ""]
    if suite.description:
        lines += [suite.description, ""]
    if rep.site_link:
        lines += [f"Browse this leaderboard as a website (sortable tables, one page per method with its training "
                  f"curves, figures): [{rep.site_link}]({rep.site_link}) — open it from a checkout or any static "
                  "host.", ""]
    budget = f"{suite.epochs} epochs per run" if suite.epochs else "each dataset's default number of epochs"
    lines += [
        f"- Suite: `{suite.display_path()}`",
        f"- Seeds: {', '.join(map(str, suite.seeds))} (training seed; the split seed is fixed, so methods are "
        "compared on identical splits and paired by seed)",
        f"- Budget: {budget}",
        f"- Runs: {len(rep.states)} planned; " + ", ".join(
            f"{counts.get(k, 0)} {k}" for k in ("ok", "failed", "n/a")) +
        f", {sum(counts.get(k, 0) for k in ('missing', 'running', 'stale'))} not finished",
        f"- Newest run finished: {newest_run_date(rep.states)}",
        f"- Reproduce everything: `python -m mmbalance.leaderboard run {arg} && "
        f"python -m mmbalance.leaderboard build {arg}`",
        "",
        "Cells are test-split values, mean ± sample std over seeds (model selected on validation). "
        "Δ = method − baseline, mean of the per-seed differences with its 95 % t confidence interval. "
        "p-values are two-sided, paired by seed, Holm-adjusted across the method rows of a dataset; "
        "unimodal rows (`unimodal:<m>`) are references and are not tested. " + stats.SIGNIFICANCE_LEGEND,
        ""]
    for ds in rep.datasets:
        lines += _dataset_section(rep, ds, arg, figures)
    lines += _cross_section(rep.cross, figures)
    lines += extra or []
    lines += _environment_section(rep)
    return "\n".join(lines).rstrip("\n") + "\n"


def _dataset_section(rep: Report, ds: DatasetSummary, arg: str, figures: dict[str, str]) -> list[str]:
    suite = rep.suite
    lines = [f"## {ds.name}", ""]
    direction = "higher is better" if ds.higher_is_better else "lower is better"
    metric = ds.metric or "metric"
    if ds.metric:
        lines += [f"Task: {ds.task}; primary metric `{metric}` ({direction}); per-modality columns: `{metric}` "
                  "of the fused model with only that modality present (`test_per_modality`).", ""]
    else:
        lines += ["No finished run yet.", ""]
    notes = Notes()
    headers = ["method", "n", f"{metric}", "Δ vs baseline [95% CI]", "p t-test (Holm)", "p Wilcoxon (Holm)"]
    diag_headers = lb_diag.main_headers(ds.diag)
    headers += [f"{metric} [{m}]" for m in ds.modalities] + diag_headers + ["train s/run (incl. teachers)"]
    body = []
    for row in ds.ordered_rows():
        n_text, empty = _status_cell(row, notes)
        if empty is not None:
            body.append([row.row, n_text, empty] + [DASH] * (3 + len(ds.modalities) + len(diag_headers) + 1))
            continue
        diverge = lb_diag.divergence_note(row, metric, ds.higher_is_better)
        if diverge:
            n_text += " ⚠ " + notes.ref(diverge)
        tested = row.row != ds.baseline and not is_reference_row(row.row)
        body.append([row.row, n_text, fmt_mean_std(row.primary_values(metric)),
                     DASH if row.row == ds.baseline else fmt_delta(row.comparison, row.marker),
                     fmt_p(row.p_t_holm) if tested else DASH, fmt_p(row.p_w_holm) if tested else DASH]
                    + [fmt_mean_std(row.per_modality.get(m, {})) for m in ds.modalities]
                    + lb_diag.main_cells(ds.diag, row.row, ds.baseline)
                    + [f"{np.mean(list(row.train_seconds.values())):.2f}" if row.train_seconds else DASH])
    lines += [_table(headers, body), ""]
    if ds.baseline not in ds.rows:
        lines += [f"The baseline row `{ds.baseline}` is not in this suite: no Δ or p-values.", ""]
    if notes.items:
        lines += ["Notes:", "", notes.render(), ""]
    lines += reference.section(suite.reference.get(ds.name, []), _table)
    cmd = (f"python -m mmbalance.leaderboard run {arg} --datasets {ds.name} && "
           f"python -m mmbalance.leaderboard build {arg}")
    epochs = f" --epochs {suite.epochs}" if suite.epochs else ""
    lines += [f"Reproduce this table: `{cmd}`. One cell: `python -m mmbalance.run --method METHOD --dataset "
              f"{ds.name} --seed SEED{epochs}` plus the row's `--set` values (each run's `status.json` holds its "
              "exact command).", ""]
    metrics = sorted({k for r in ds.rows.values() for k in r.test})
    if metrics:
        full = [[r.row] + [fmt_mean_std(r.test.get(k, {})) for k in metrics] for r in ds.ordered_rows() if r.n_ok]
        lines += ["<details><summary>All test metrics (mean ± std over seeds)</summary>", "",
                  _table(["method"] + metrics, full), "", "</details>", ""]
    if ds.name in figures:
        lines += [f"![{ds.name}: test {metric}]({figures[ds.name]})", ""]
    lines += lb_diag.section(ds, ds.diag, _table, figures.get(f"{ds.name}:weak_probe"))
    return lines


def _cross_section(cross: CrossDataset, figures: dict[str, str]) -> list[str]:
    lines = ["## Across datasets", ""]
    if cross.note:
        return lines + [cross.note, ""]
    fr = cross.friedman
    assert fr is not None and cross.ranks is not None
    order = sorted(range(len(cross.rows)), key=lambda j: (fr.avg_ranks[j], cross.rows[j]))
    headers = ["method", "average rank"] + [f"rank on {d}" for d in cross.datasets]
    body = [[cross.rows[j], f"{fr.avg_ranks[j]:.2f}"] + [f"{cross.ranks[i, j]:g}" for i in range(len(cross.datasets))]
            for j in order]
    lines += ["Ranks of the mean primary metric (rank 1 = best; ties share the average rank).", "",
              _table(headers, body), "",
              f"Friedman test: χ²_F = {fr.statistic:.3f}, {fmt_p_eq(fr.p_value)}; Iman–Davenport F_F = "
              f"{fr.iman_davenport_f:.3f}, {fmt_p_eq(fr.iman_davenport_p)} ({fr.n_methods} methods, "
              f"{fr.n_datasets} datasets). Nemenyi critical difference (α = 0.05): CD = {cross.cd:.3f}.", ""]
    if cross.groups:
        lines += ["Groups whose average ranks differ by less than CD (not significantly different): "
                  + "; ".join("{" + ", ".join(g) + "}" for g in cross.groups) + ".", ""]
    if cross.excluded:
        lines += ["Not ranked: " + "; ".join(f"{r} ({why})" for r, why in cross.excluded.items()) + ".", ""]
    if "cd_diagram" in figures:
        lines += [f"![critical difference diagram]({figures['cd_diagram']})", ""]
    return lines


def _environment_section(rep: Report) -> list[str]:
    results = [s.result for s in rep.states if s.state == "ok" and s.result]
    versions, n_versions = _most_common([r.get("versions") or {} for r in results])
    hardware, n_hardware = _most_common([r.get("hardware") or {} for r in results])
    lines = ["## Environment", ""]
    if not results:
        return lines + ["No finished run.", ""]
    lines += ["Software versions (from the runs' `result.json`"
              + (f"; the runs used {n_versions} different version sets, the most common is shown" if n_versions > 1
                 else "") + "):", "",
              _table(["package", "version"], [[k, v] for k, v in sorted(versions.items())]), "",
              "Hardware" + (f" (the runs ran on {n_hardware} different machines; the most common is shown)"
                            if n_hardware > 1 else "") + ": "
              + "; ".join(f"{k} {v}" for k, v in sorted(hardware.items())) + ".", ""]
    worlds = sorted({int(r.get("world_size", 1)) for r in results})
    lines += [f"Processes per run: {', '.join(map(str, worlds))}.", ""]
    return lines


CSV_FIXED = ["dataset", "method", "planned", "ok", "failed", "n/a", "not_finished", "primary_metric",
             "higher_is_better", "delta", "ci_low", "ci_high", "n_paired", "t_stat", "p_ttest", "p_ttest_holm",
             "p_wilcoxon", "p_wilcoxon_holm", "marker", "val_mean", "val_std", "train_seconds_mean", "errors"]


def _mean_std(values: dict[int, float]) -> tuple[str, str]:
    vals = [v for v in values.values() if math.isfinite(v)]
    if not vals:
        return "", ""
    return repr(float(np.mean(vals))), (repr(float(np.std(vals, ddof=1))) if len(vals) > 1 else "")


def _r(x: float) -> str:
    return repr(float(x)) if x is not None and math.isfinite(x) else ""


def csv_records(rep: Report) -> tuple[list[str], list[dict[str, str]]]:
    """The rows of results.csv (one per dataset and row, values as written) and its columns in order."""
    dynamic: list[str] = []
    rows: list[dict[str, str]] = []
    for ds in rep.datasets:
        for row in ds.ordered_rows():
            c = row.comparison
            errors = sorted({f"seed {s.spec.seed}: {s.state}: {s.error}" for s in row.states
                             if s.state in ("failed", "n/a")})
            rec = {"dataset": ds.name, "method": row.row, "planned": str(len(row.states)), "ok": str(row.n_ok),
                   "failed": str(row.count("failed")), "n/a": str(row.count("n/a")),
                   "not_finished": str(row.n_pending), "primary_metric": ds.metric,
                   "higher_is_better": str(ds.higher_is_better).lower(),
                   "delta": _r(c.mean_diff) if c else "", "ci_low": _r(c.ci_low) if c else "",
                   "ci_high": _r(c.ci_high) if c else "", "n_paired": str(c.n) if c else "",
                   "t_stat": _r(c.t_stat) if c else "", "p_ttest": _r(c.p_ttest) if c else "",
                   "p_ttest_holm": _r(row.p_t_holm), "p_wilcoxon": _r(c.p_wilcoxon) if c else "",
                   "p_wilcoxon_holm": _r(row.p_w_holm), "marker": row.marker,
                   "val_mean": _mean_std(row.val)[0], "val_std": _mean_std(row.val)[1],
                   "train_seconds_mean": _mean_std(row.train_seconds)[0], "errors": " | ".join(errors)}
            for k, vals in sorted(row.test.items()):
                rec[f"test_{k}_mean"], rec[f"test_{k}_std"] = _mean_std(vals)
            for m, vals in sorted(row.per_modality.items()):
                rec[f"test_{m}_{ds.metric}_mean"], rec[f"test_{m}_{ds.metric}_std"] = _mean_std(vals)
            rec.update(lb_diag.csv_fields(ds.diag, row.row))
            rec["seeds_diverge"] = "true" if lb_diag.divergence_note(row, ds.metric, ds.higher_is_better) else ""
            for k in rec:
                if k not in CSV_FIXED and k not in dynamic:
                    dynamic.append(k)
            rows.append(rec)
    return CSV_FIXED + sorted(dynamic), rows


def render_csv(rep: Report) -> str:
    cols, rows = csv_records(rep)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", restval="")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def bar_chart(ds: DatasetSummary, path: Path) -> bool:
    """Mean ± std of the primary metric per row (deterministic PNG); False when there is nothing to plot."""
    rows = [r for r in ds.ordered_rows() if math.isfinite(r.mean(ds.metric))]
    if not rows:
        return False
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    means = [r.mean(ds.metric) for r in rows]
    stds = [float(np.std([v for v in r.primary_values(ds.metric).values() if math.isfinite(v)], ddof=1))
            if len(r.primary_values(ds.metric)) > 1 else 0.0 for r in rows]
    with matplotlib.style.context("default"):
        height = 1.0 + 0.28 * len(rows)  # inches: 0.6 below the bars (axis label), 0.4 above (title)
        fig = Figure(figsize=(7.0, height), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0.3, 0.6 / height, 0.65, 1.0 - 1.0 / height))
        y = np.arange(len(rows))
        colors = ["#444444" if r.row == ds.baseline else ("#9ecae1" if is_reference_row(r.row) else "#3182bd")
                  for r in rows]
        ax.barh(y, means, xerr=stds, color=colors, capsize=2)
        ax.set_yticks(y, [r.row for r in rows])
        ax.invert_yaxis()
        lo = min(m - s for m, s in zip(means, stds))
        hi = max(m + s for m, s in zip(means, stds))
        pad = 0.05 * (hi - lo if hi > lo else 1.0)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_xlabel(f"test {ds.metric} (mean ± std over seeds)")
        ax.set_title(ds.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=110, metadata={"Software": None})
    return True


def write_report(rep: Report, out_dir: str | Path, extra: list[str] | None = None) -> dict[str, Path]:
    """Write README.md, results.csv and figures/ into ``out_dir``; returns the written paths. ``extra``:
    further markdown lines (see :func:`render_markdown`).

    Everything is rendered into a private staging folder inside ``out_dir`` first and moved into place
    only when all of it was written, so a build that fails half-way (full disk, no permission, a
    plotting error) leaves the previous README.md, results.csv and figures as they were."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".build.", suffix=".tmp", dir=out))
    except OSError as exc:
        raise RunFileWriteError(f"cannot write the report into {str(out)!r}: {exc.strerror or exc}") from None
    try:
        try:
            names = _render_into(rep, stage, extra)
        except OSError as exc:
            raise RunFileWriteError(f"cannot write the report into {str(out)!r}: {exc.strerror or exc}; the "
                                    "previous README.md, results.csv and figures are unchanged") from None
        fig_dir = out / "figures"
        fig_dir.mkdir(exist_ok=True)
        written: dict[str, Path] = {}
        for key, name in names.items():
            os.replace(stage / "figures" / name, fig_dir / name)
            written[key] = fig_dir / name
        for stale in fig_dir.glob("*.png"):  # figures of datasets no longer in the suite
            if stale.name not in set(names.values()):
                os.unlink(stale)
        os.replace(stage / "results.csv", out / "results.csv")
        os.replace(stage / "README.md", out / "README.md")
        written["readme"] = out / "README.md"
        written["csv"] = out / "results.csv"
        return written
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _render_into(rep: Report, stage: Path, extra: list[str] | None = None) -> dict[str, str]:
    """README.md, results.csv and figures/*.png in ``stage``; returns {written key: figure file name}."""
    fig_dir = stage / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, str] = {}
    names: dict[str, str] = {}
    for ds in rep.datasets:
        name = f"{ds.name}.png"
        if ds.metric and bar_chart(ds, fig_dir / name):
            figures[ds.name] = f"figures/{name}"
            names[f"figure:{ds.name}"] = name
        name = f"{ds.name}_weak_probe.png"
        if ds.metric and lb_diag.scatter_figure(ds, ds.diag, fig_dir / name):
            figures[f"{ds.name}:weak_probe"] = f"figures/{name}"
            names[f"figure:{ds.name}:weak_probe"] = name
    cross = rep.cross
    if cross.friedman is not None:
        stats.cd_diagram(dict(zip(cross.rows, cross.friedman.avg_ranks)), cross.cd, fig_dir / "cd_diagram.png",
                         title=f"Nemenyi CD (alpha 0.05), {len(cross.datasets)} datasets")
        figures["cd_diagram"] = "figures/cd_diagram.png"
        names["figure:cd_diagram"] = "cd_diagram.png"
    atomic_write_text(stage / "README.md", render_markdown(rep, figures, extra))
    atomic_write_text(stage / "results.csv", render_csv(rep))
    for name in names.values():  # savefig follows the umask too, but be explicit: readable like the README
        os.chmod(fig_dir / name, 0o666 & ~current_umask())
    return names
