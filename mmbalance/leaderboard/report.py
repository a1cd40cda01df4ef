"""Leaderboard aggregation and report: README.md (findings, power, one compact table per dataset), details.md
(the wide per-modality and diagnostics tables), results.csv and figures/*.png.

Reads only run states — each run's ``result.json`` and ``status.json``, from its folder or from the suite's
compact store (:mod:`mmbalance.leaderboard.store`). Everything is deterministic: the same runs give
byte-identical output (the date shown is the newest run's finishing time, taken from the files, never "now").

The verdicts — failures counted at the worst case, the pre-registered weak modality and primary family, Holm
within the family, "not testable" comparisons, power (minimum detectable differences), and the cross-dataset
stratified-bootstrap intervals — come from :mod:`mmbalance.leaderboard.verdict`; this module groups the runs
(:class:`DatasetSummary`) and renders. Every comparison is Δ = row − baseline, paired by replicate.
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
from . import verdict as lb_verdict
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
    diag: Any = None  # lb_diag.DatasetDiagnostics: imbalance-diagnostics quantities
    verdict: Any = None  # lb_verdict.DatasetVerdict: the tests, power and failure-counted means

    def scored_mean(self, r: RowSummary) -> float:
        """The row's mean with failures at the worst case (the verdict's), else its survivors' mean."""
        rv = self.verdict.rows.get(r.row) if self.verdict is not None else None
        return rv.mean if rv is not None and math.isfinite(rv.mean) else r.mean(self.metric)

    def ordered_rows(self) -> list[RowSummary]:
        """Baseline, then method rows best first by the failure-counted mean (rows without a number last), then
        unimodal references."""
        sign = -1.0 if self.higher_is_better else 1.0

        def key(r: RowSummary) -> tuple[float, str]:
            m = self.scored_mean(r)
            return (sign * m if math.isfinite(m) else math.inf, r.row)

        base = [r for r in self.rows.values() if r.row == self.baseline]
        methods = sorted((r for r in self.rows.values() if r.row != self.baseline and not is_reference_row(r.row)),
                         key=key)
        order = {m: i for i, m in enumerate(self.modalities)}
        refs = sorted((r for r in self.rows.values() if is_reference_row(r.row)),
                      key=lambda r: (order.get(r.row.split(":", 1)[1], len(order)), r.row))
        return base + methods + refs


def summarise(states: list[RunState], baseline: str, suite: Suite | None = None) -> list[DatasetSummary]:
    """Group run states by dataset and row (plan order) and compute every statistic (the suite supplies the
    primary family, each dataset's split kind and declared weak modality, and the planned replicates)."""
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
        summary.diag = lb_diag.summarise_dataset(summary)
        entry = next((e for e in (suite.datasets if suite else []) if e.name == ds), None)
        replicates = (suite.replicates_for(ds) if suite
                      else sorted({st.spec.seed for r in rows.values() for st in r.states}))
        summary.verdict = lb_verdict.analyse_dataset(
            summary, primary=suite.primary if suite else None, split=entry.split if entry else "fixed",
            declared_weak=entry.weak if entry else None, replicates=replicates, is_reference=is_reference_row)
        summary.diag.weak = summary.verdict.weak
        _legacy_fields(summary)
        out.append(summary)
    return out


def _legacy_fields(ds: DatasetSummary) -> None:
    """``row.comparison`` / ``p_t_holm`` / ``marker`` (read by the LaTeX export) from the verdict's fused column."""
    for row in ds.rows.values():
        rv = ds.verdict.rows.get(row.row)
        col = rv.columns.get("metric") if rv else None
        if col is None or row.row == ds.baseline:
            continue
        row.comparison = col.comparison
        row.p_t_holm = col.p_adj
        row.marker = col.marker


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
        missing = [d.name for d in summaries if r not in d.rows or not math.isfinite(d.scored_mean(d.rows[r]))]
        if missing:
            excluded[r] = "no result on " + ", ".join(missing)
        else:
            rows.append(r)
    cross = CrossDataset(rows, datasets, excluded)
    if len(datasets) < lb_verdict.MIN_DATASETS_FOR_RANK_TESTS:
        cross.note = (f"not drawn: {len(datasets)} dataset(s) < {lb_verdict.MIN_DATASETS_FOR_RANK_TESTS}")
        return cross
    if len(datasets) < 2 or len(rows) < 3:
        cross.note = (f"Skipped: average ranks, the Friedman test and the Nemenyi CD diagram need at least 2 datasets "
                      f"and 3 methods with results on all of them (here {len(datasets)} dataset(s), {len(rows)} "
                      "method(s)).")
        return cross
    scores = np.array([[(1.0 if d.higher_is_better else -1.0) * d.scored_mean(d.rows[r]) for r in rows]
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
    """Everything a report is rendered from. ``aggregate`` (a :class:`~mmbalance.leaderboard.verdict.CrossVerdict`)
    and each ``datasets[i].verdict`` (a :class:`~mmbalance.leaderboard.verdict.DatasetVerdict`) are the
    aggregated data, free of formatting; ``code`` lists the code versions of the runs."""

    suite: Suite
    specs: list[RunSpec]
    states: list[RunState]
    datasets: list[DatasetSummary]
    cross: CrossDataset
    site_link: str | None = None  # the report's link to its static site (set by the build that writes one)
    aggregate: Any = None
    code: Any = None
    title: str = ""
    tuning_note: str = ""


def build_report(suite: Suite, specs: list[RunSpec], *, title: str = "") -> Report:
    states = [read_state(s) for s in specs]
    summaries = summarise(states, suite.baseline, suite)
    agg = lb_verdict.analyse_across([d.verdict for d in summaries], suite.baseline)
    code = lb_verdict.code_versions([s.result for s in states if s.state == "ok" and s.result])
    return Report(suite, specs, states, summaries, cross_dataset(summaries, suite.baseline), aggregate=agg, code=code,
                  title=title)


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


def _pts(x: float, ds: DatasetSummary) -> str:
    """A difference in the metric's units, with points (× 100) for metrics on a 0–1 scale."""
    if not math.isfinite(x):
        return DASH
    return f"{x:.4f} ({100 * x:.2f} points)" if ds.task in ("classification", "segmentation") else f"{x:.4f}"


def _protocol_lines(rep: Report) -> list[str]:
    suite = rep.suite
    splits = []
    for ds in rep.datasets:
        split = ds.verdict.split if ds.verdict else "fixed"
        splits.append(f"{ds.name}: " + ("split seed r (sampled)" if split == "sampled" else "one fixed split"))
    budget = f"{suite.epochs} epochs per run" if suite.epochs else "each dataset's default number of epochs"
    tuning = rep.tuning_note or "published defaults (no tuning)"
    return [
        f"- Suite: `{suite.display_path()}`",
        f"- Replicates: {suite.replicates_text()}; replicate r = training seed r and, where the "
        "split is sampled, split seed r; every row is paired with the baseline by r. Splits — " + "; ".join(splits),
        "- Model selection: each run keeps its best validation epoch and evaluates test once; hyperparameters: "
        + tuning + ". Nothing is chosen on test (the weak modality below included).",
        f"- Budget: {budget}",
    ]


def _code_lines(rep: Report) -> list[str]:
    code = rep.code
    if code is None:
        return []
    if code.clean:
        return [f"- Code version: {code.describe()}, clean tree."]
    return ["", f"> **⚠ MIXED CODE VERSIONS.** These runs come from {code.describe()}. Rows may differ by code as "
            "well as by method; rebuild from one clean commit (`build --require-one-commit` refuses such a build).",
            ""]


def render_markdown(rep: Report, figures: dict[str, str], extra: list[str] | None = None) -> str:
    """The report; ``extra`` lines (e.g. the tuning sections) go before the environment section."""
    suite = rep.suite
    arg = _cli_suite_arg(suite)
    counts = Counter(s.state for s in rep.states)
    title = f"# mmbalance leaderboard: suite `{suite.name}`" + (f" — {rep.title}" if rep.title else "")
    lines = [title, "",
             f"<!-- generated by `python -m mmbalance.leaderboard build {arg}` from the run files; do not edit -->", ""]
    if suite.description:
        lines += [suite.description, ""]
    if rep.site_link:
        lines += [f"Browse this leaderboard as a website (sortable tables, one page per method with its training "
                  f"curves, figures): [{rep.site_link}]({rep.site_link}) — open it from a checkout or any static "
                  "host.", ""]
    lines += _protocol_lines(rep) + [
        f"- Runs: {len(rep.states)} planned; " + ", ".join(
            f"{counts.get(k, 0)} {k}" for k in ("ok", "failed", "n/a")) +
        f", {sum(counts.get(k, 0) for k in ('missing', 'running', 'stale'))} not finished",
        f"- Newest run finished: {newest_run_date(rep.states)}"] + _code_lines(rep) + [
        f"- Reproduce everything: `python -m mmbalance.leaderboard run {arg} && "
        f"python -m mmbalance.leaderboard build {arg}`",
        "- Wide tables (every metric, per-modality scores, all diagnostics): [details.md](details.md) and "
        "[results.csv](results.csv).", ""]
    lines += _findings_section(rep) + _power_section(rep)
    lines += ["## Per dataset", "",
              "Cells are test-split values over the replicates (model selected on validation). Δ = row − baseline, "
              "the mean of the per-replicate differences with its 95 % t interval. "
              + lb_verdict.WORST_CASE_RULE.capitalize() + "; the row's n shows them and the survivors' mean is given "
              "beside. p: paired t-test, Holm-adjusted within the primary family of that column (markers: "
              "*** p < 0.001, ** p < 0.01, * p < 0.05); `exploratory` rows get the CI only; `n.t.` = not testable "
              "(fewer than 3 pairs or zero spread); unimodal rows are references.", ""]
    for ds in rep.datasets:
        lines += _dataset_section(rep, ds, arg, figures)
    lines += _aggregate_section(rep, figures)
    lines += extra or []
    lines += _environment_section(rep)
    return "\n".join(lines).rstrip("\n") + "\n"


COLUMN_TEXT = {"metric": "the fused metric", "probe": "the weak-modality probe", "share": "the weak-modality φ-share"}


def _findings_section(rep: Report) -> list[str]:
    lines = ["## Findings", "",
             "Generated from the primary comparisons that pass their test (Holm within the family, α = 0.05); "
             "effect = row − baseline with its 95 % CI.", ""]
    found = 0
    for ds in rep.datasets:
        v = ds.verdict
        if v is None or not v.metric:
            continue
        for row in ds.ordered_rows():
            rv = v.rows[row.row]
            parts = []
            for q in lb_verdict.COLUMNS:
                col = rv.columns.get(q)
                if col is None or not col.significant:
                    continue
                what = (f"test {v.metric}" if q == "metric" else
                        f"{v.weak} probe" if q == "probe" else f"{v.weak} φ-share")
                parts.append(f"{what} {col.delta:+.4f} [{col.ci_low:+.4f}, {col.ci_high:+.4f}] "
                             f"({fmt_p_eq(col.p_adj)})")
            if parts:
                found += 1
                n = rv.columns["metric"].n if rv.columns.get("metric") else 0
                lines.append(f"- **{ds.name}**, `{row.row}`: " + "; ".join(parts) + f" — {n} paired replicates"
                             + (f", {rv.failed} failed counted at the worst case" if rv.failed else "") + ".")
    if not found:
        lines.append("- No primary comparison passes its test on any dataset. Effects smaller than the minimum "
                     "detectable differences below could go unseen; read the CIs.")
    return lines + [""]


def _power_section(rep: Report) -> list[str]:
    lines = ["## Power", "",
             "Minimum detectable difference (MDE): the smallest true paired difference the design detects with 80 % "
             "power by the paired t-test at α/m (m = the primary family's size; Holm's strictest step), given the "
             "median paired spread (sd of row − baseline over replicates) of the family's rows and the planned "
             "replicates. A difference below the MDE can be real and unseen; a row without a marker is not evidence "
             "of no effect. The last column is the smallest p an exact sign-flip or Wilcoxon test can reach with "
             "these replicates (2/2ⁿ).", ""]
    body = []
    for ds in rep.datasets:
        v = ds.verdict
        if v is None or not v.metric:
            continue
        pm, pp = v.power.get("metric"), v.power.get("probe")
        body.append([ds.name, str(len(v.replicates)), v.split, str(len(v.family)),
                     f"{pm.sd:.4f}" if pm and math.isfinite(pm.sd) else DASH, _pts(pm.mde, ds) if pm else DASH,
                     v.weak or DASH, f"{pp.sd:.4f}" if pp and math.isfinite(pp.sd) else DASH,
                     _pts(pp.mde, ds) if pp else DASH, f"{stats.min_attainable_p(len(v.replicates)):.4g}"])
    lines += [_table(["dataset", "replicates", "split", "family m", "sd Δ fused", "MDE fused", "weak m*",
                      "sd Δ probe", "MDE probe [m*]", "min exact p"], body), ""]
    return lines


def _p_cell(col: lb_verdict.Column | None) -> str:
    if col is None:
        return DASH
    if col.status == "tested":
        return fmt_p(col.p_adj) + (f" {col.marker}" if col.marker else "")
    if col.status == "exploratory":
        return "CI only"
    if col.status.startswith("not testable"):
        return "n.t."
    return DASH


def _delta_cell(col: lb_verdict.Column | None, with_p: bool = False) -> str:
    if col is None or col.n == 0 or not math.isfinite(col.delta):
        return DASH
    text = f"{col.delta:+.4f}"
    if math.isfinite(col.ci_low):
        text += f" [{col.ci_low:+.4f}, {col.ci_high:+.4f}]"
    if with_p and col.status in ("tested", "exploratory") or (with_p and col.status.startswith("not testable")):
        text += f" ({_p_cell(col)})"
    return text


def _dataset_section(rep: Report, ds: DatasetSummary, arg: str, figures: dict[str, str]) -> list[str]:
    suite = rep.suite
    v = ds.verdict
    lines = [f"### {ds.name}", ""]
    direction = "higher is better" if ds.higher_is_better else "lower is better"
    metric = ds.metric or "metric"
    if not ds.metric:
        return lines + ["No finished run yet.", ""]
    weak = v.weak if v else None
    lines += [f"Task: {ds.task}; primary metric `{metric}` ({direction}); split: "
              + ("sampled per replicate" if v and v.split == "sampled" else "one fixed split")
              + f"; weak modality m* = {weak or DASH} ({v.weak_source if v else ''}); primary family: "
              + (f"{len(v.family)} row(s)" if v else DASH) + ".", ""]
    if v and v.missing_primary:
        lines += ["Declared primary rows without a row here (not in the plan, misspelt, or excluded): "
                  + ", ".join(f"`{r}`" for r in v.missing_primary) + ".", ""]
    notes = Notes()
    headers = ["row", "role", "n ok/planned", f"{metric}", "Δ vs baseline [95% CI]", "p (Holm)",
               f"probe [{weak or 'm*'}] Δ [CI] (p)", f"φ-share [{weak or 'm*'}] Δ [CI] (p)", "train s/run"]
    body = []
    for row in ds.ordered_rows():
        rv = v.rows[row.row]
        n_text, empty = _status_cell(row, notes)
        if rv.failed - rv.failed_unscored:
            n_text += " " + notes.ref(f"{row.row}: {rv.failed - rv.failed_unscored} failed replicate(s) counted at "
                                      "the worst case (the prior predictor's test score of the replicate) in the "
                                      "mean, Δ and p")
        if empty is not None and not rv.columns.get("metric", lb_verdict.Column()).values:
            body.append([row.row, rv.role, n_text, empty] + [DASH] * 5)
            continue
        diverge = lb_diag.divergence_note(row, metric, ds.higher_is_better)
        if diverge:
            n_text += " ⚠ " + notes.ref(diverge)
        mean_text = f"{rv.mean:.4f}" if math.isfinite(rv.mean) else DASH
        if math.isfinite(rv.std):
            mean_text += f" ± {rv.std:.4f}"
        if rv.failed - rv.failed_unscored and math.isfinite(rv.survivor_mean):
            mean_text += f" (survivors {rv.survivor_mean:.4f})"
        cols = rv.columns
        col = cols.get("metric")
        if col is not None and col.status.startswith("not testable"):
            n_text += " " + notes.ref(f"{row.row}: {col.status}")
        is_base = rv.role == "baseline"
        body.append([row.row, rv.role, n_text, mean_text, DASH if is_base else _delta_cell(col),
                     DASH if is_base else _p_cell(col),
                     DASH if is_base else _delta_cell(cols.get("probe"), with_p=True),
                     DASH if is_base else _delta_cell(cols.get("share"), with_p=True),
                     f"{rv.cost_seconds:.2f}" if math.isfinite(rv.cost_seconds) else DASH])
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
              f"{ds.name} --seed R{epochs}` plus the row's `--set` values (each run's status holds its exact "
              "command).", ""]
    if ds.name in figures:
        lines += [f"![{ds.name}: test {metric}]({figures[ds.name]})", ""]
    return lines


def _aggregate_section(rep: Report, figures: dict[str, str]) -> list[str]:
    agg = rep.aggregate
    lines = ["## Across datasets", ""]
    if agg is None or not agg.rows:
        return lines + [(agg.note if agg is not None else "No aggregate."), ""]
    lines += [f"Over {len(agg.datasets)} dataset(s) ({', '.join(agg.datasets)}), rliable-style: mean Δ vs the "
              "baseline (oriented: positive = better) averaged over datasets, the probability of improvement P(row > "
              "baseline) (Agarwal et al. 2021: per dataset the share of replicate pairs the row wins, ties ½, "
              "averaged over datasets) and the average rank (1 = best, failures at the worst case), each with a 95 % "
              f"stratified-bootstrap interval ({lb_verdict.BOOTSTRAP_REPS} resamples of the replicates within each "
              "dataset, seed 0). Descriptive: no test across datasets is made here.", ""]
    order = sorted(agg.rows, key=lambda a: (-a.delta, a.row))
    body = [[a.row, f"{a.delta:+.4f} [{a.delta_low:+.4f}, {a.delta_high:+.4f}]",
             f"{a.poi:.2f} [{a.poi_low:.2f}, {a.poi_high:.2f}]",
             f"{a.rank:.1f} [{a.rank_low:.1f}, {a.rank_high:.1f}]"] for a in order]
    lines += [_table(["row", "mean Δ vs baseline [95% CI]", "P(improvement) [95% CI]", "average rank [95% CI]"],
                     body), ""]
    cross = rep.cross
    if agg.note:
        lines += [agg.note, ""]
    elif cross.friedman is not None:
        fr = cross.friedman
        lines += [f"Friedman test: χ²_F = {fr.statistic:.3f}, {fmt_p_eq(fr.p_value)}; Iman–Davenport F_F = "
                  f"{fr.iman_davenport_f:.3f}, {fmt_p_eq(fr.iman_davenport_p)} ({fr.n_methods} methods, "
                  f"{fr.n_datasets} datasets). Nemenyi critical difference (α = 0.05): CD = {cross.cd:.3f}.", ""]
        if cross.groups:
            lines += ["Groups whose average ranks differ by less than CD (not significantly different): "
                      + "; ".join("{" + ", ".join(g) + "}" for g in cross.groups) + ".", ""]
        if "cd_diagram" in figures:
            lines += [f"![critical difference diagram]({figures['cd_diagram']})", ""]
    if agg.excluded:
        lines += ["Not aggregated: " + "; ".join(f"{r} ({why})" for r, why in agg.excluded.items()) + ".", ""]
    return lines


def _sign_flip_cell(col: lb_verdict.Column, family: int) -> str:
    """The exact sign-flip p, flagged where even its smallest possible value (2/2ⁿ) cannot pass α/m."""
    if not math.isfinite(col.p_sign_flip):
        return DASH
    floor = stats.min_attainable_p(col.n)
    return fmt_p(col.p_sign_flip) + (" (cannot pass α/m at this n)"
                                     if floor >= lb_verdict.ALPHA / max(1, family) else "")


def render_details(rep: Report, figures: dict[str, str]) -> str:
    """details.md: per dataset every test metric, the per-modality scores, the columns' full statistics
    (half-width, raw p, sign-flip p) and the imbalance-diagnostics table."""
    suite = rep.suite
    lines = [f"# mmbalance leaderboard: suite `{suite.name}` — details" + (f" ({rep.title})" if rep.title else ""),
             "", "<!-- generated with README.md; do not edit -->", "",
             "The wide tables behind [README.md](README.md). Means include failed replicates at the worst case only "
             "where the README says so; the tables below that show mean ± std over finished runs say "
             "\"survivors\".", ""]
    for ds in rep.datasets:
        v = ds.verdict
        lines += [f"## {ds.name}", ""]
        if not ds.metric or v is None:
            lines += ["No finished run yet.", ""]
            continue
        metric = ds.metric
        body = []
        for row in ds.ordered_rows():
            rv = v.rows[row.row]
            for q in lb_verdict.COLUMNS:
                col = rv.columns.get(q)
                if col is None or rv.role == "baseline":
                    continue
                body.append([row.row, rv.role, {"metric": metric, "probe": f"probe [{v.weak}]",
                                                 "share": f"φ-share [{v.weak}]"}[q], str(col.n),
                             f"{col.delta:+.4f}" if math.isfinite(col.delta) else DASH,
                             f"{col.half_width:.4f}" if math.isfinite(col.half_width) else DASH,
                             fmt_p(col.p), fmt_p(col.p_adj), _sign_flip_cell(col, len(v.family)), col.status])
        lines += ["### Comparisons with the baseline", "",
                  f"Every column of every row: Δ, 95 % CI half-width, raw and Holm p (paired t-test), exact sign-flip "
                  f"p (its smallest possible value with n replicates is 2/2ⁿ: "
                  f"{stats.min_attainable_p(len(v.replicates)):.4g} here), and the test status.", "",
                  _table(["row", "role", "column", "n", "Δ", "CI ±", "p", "p (Holm)", "p sign-flip", "status"], body),
                  ""]
        per = [[r.row, str(r.n_ok)] + [fmt_mean_std(r.per_modality.get(m, {})) for m in ds.modalities]
               + [fmt_mean_std(r.primary_values(metric))] for r in ds.ordered_rows() if r.n_ok]
        lines += ["### Per-modality test scores (survivors, mean ± std)", "",
                  f"`{metric}` of the fused model with only that modality present (`test_per_modality`).", "",
                  _table(["row", "n ok"] + [f"{metric} [{m}]" for m in ds.modalities] + [f"{metric} (fused)"], per), ""]
        metrics = sorted({k for r in ds.rows.values() for k in r.test})
        if metrics:
            full = [[r.row] + [fmt_mean_std(r.test.get(k, {})) for k in metrics] for r in ds.ordered_rows() if r.n_ok]
            lines += ["### All test metrics (survivors, mean ± std)", "", _table(["row"] + metrics, full), ""]
        lines += lb_diag.section(ds, ds.diag, _table, figures.get(f"{ds.name}:weak_probe"))
    return "\n".join(lines).rstrip("\n") + "\n"


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


CSV_FIXED = ["dataset", "method", "role", "planned", "ok", "failed", "n/a", "not_finished", "primary_metric",
             "higher_is_better", "mean", "std", "survivor_mean", "delta", "ci_low", "ci_high", "ci_half_width",
             "n_paired", "p_ttest", "p_ttest_holm", "p_sign_flip", "test_status", "marker", "weak_modality",
             "weak_source", "val_mean", "val_std", "train_seconds_mean", "errors"]


def _mean_std(values: dict[int, float]) -> tuple[str, str]:
    vals = [v for v in values.values() if math.isfinite(v)]
    if not vals:
        return "", ""
    return repr(float(np.mean(vals))), (repr(float(np.std(vals, ddof=1))) if len(vals) > 1 else "")


def _r(x: float) -> str:
    return repr(float(x)) if x is not None and math.isfinite(x) else ""


def _col_fields(prefix: str, col: Any) -> dict[str, str]:
    if col is None:
        return {}
    return {f"{prefix}delta": _r(col.delta), f"{prefix}ci_low": _r(col.ci_low), f"{prefix}ci_high": _r(col.ci_high),
            f"{prefix}ci_half_width": _r(col.half_width), f"{prefix}n_paired": str(col.n) if col.n else "",
            f"{prefix}p_ttest": _r(col.p), f"{prefix}p_ttest_holm": _r(col.p_adj),
            f"{prefix}p_sign_flip": _r(col.p_sign_flip), f"{prefix}test_status": col.status,
            f"{prefix}marker": col.marker}


def csv_records(rep: Report) -> tuple[list[str], list[dict[str, str]]]:
    """The rows of results.csv (one per dataset and row, values as written) and its columns in order: one line
    per (dataset, row): counts, the failure-counted and survivor means, the three tested columns
    (``delta``… for the fused metric, ``diag_probe_weak_*`` and ``diag_share_weak_*``), every test metric and
    diagnostics quantity."""
    dynamic: list[str] = []
    rows: list[dict[str, str]] = []
    for ds in rep.datasets:
        v = ds.verdict
        for row in ds.ordered_rows():
            rv = v.rows[row.row] if v else None
            errors = sorted({f"seed {s.spec.seed}: {s.state}: {s.error}" for s in row.states
                             if s.state in ("failed", "n/a")})
            rec = {"dataset": ds.name, "method": row.row, "role": rv.role if rv else "",
                   "planned": str(len(row.states)), "ok": str(row.n_ok),
                   "failed": str(row.count("failed")), "n/a": str(row.count("n/a")),
                   "not_finished": str(row.n_pending), "primary_metric": ds.metric,
                   "higher_is_better": str(ds.higher_is_better).lower(),
                   "mean": _r(rv.mean) if rv else "", "std": _r(rv.std) if rv else "",
                   "survivor_mean": _r(rv.survivor_mean) if rv else "",
                   "weak_modality": (v.weak or "") if v else "", "weak_source": v.weak_source if v else "",
                   "val_mean": _mean_std(row.val)[0], "val_std": _mean_std(row.val)[1],
                   "train_seconds_mean": _mean_std(row.train_seconds)[0], "errors": " | ".join(errors)}
            if rv is not None and rv.role != "baseline":
                rec.update(_col_fields("", rv.columns.get("metric")))
                rec.update(_col_fields("diag_probe_weak_", rv.columns.get("probe")))
                rec.update(_col_fields("diag_share_weak_", rv.columns.get("share")))
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
        os.replace(stage / "details.md", out / "details.md")
        os.replace(stage / "README.md", out / "README.md")
        written["readme"] = out / "README.md"
        written["csv"] = out / "results.csv"
        written["details"] = out / "details.md"
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
    atomic_write_text(stage / "details.md", render_details(rep, figures))
    atomic_write_text(stage / "results.csv", render_csv(rep))
    for name in names.values():  # savefig follows the umask too, but be explicit: readable like the README
        os.chmod(fig_dir / name, 0o666 & ~current_umask())
    return names
