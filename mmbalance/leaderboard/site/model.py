"""What the site shows, taken from a built :class:`~mmbalance.leaderboard.report.Report` (never from run files).

The tables come from :func:`~mmbalance.leaderboard.report.csv_records` — the rows of ``results.csv``, so
the site and the CSV cannot disagree — and the figures from the report's per-seed values and per-epoch
curves. A column the report gains appears on the dataset's detail page without a change here; the
compact table picks its columns by name and leaves a column out when the report does not have it.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import MMBalanceError
from ..plan import safe_name
from ..report import DatasetSummary, Report, RowSummary, csv_records, is_reference_row

DASH = "—"


def num(text: Any) -> float:
    """A CSV cell as a float (nan for empty or non-numeric cells)."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def f4(x: float, sign: bool = False) -> str:
    if not math.isfinite(x):
        return DASH
    return f"{x:+.4f}" if sign else f"{x:.4f}"


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of its t confidence interval); half-width nan with fewer than 2 values."""
    v = [x for x in values if math.isfinite(x)]
    if not v:
        return math.nan, math.nan
    if len(v) < 2:
        return float(v[0]), math.nan
    from scipy.stats import t

    sd = float(np.std(v, ddof=1))
    return float(np.mean(v)), float(t.ppf(0.5 + confidence / 2, len(v) - 1) * sd / math.sqrt(len(v)))


def family_of(method: str) -> str:
    """The method family a row belongs to: its registered class's module (``ogm`` and ``ogm_ge`` → ogm_ge);
    ``unimodal`` for ``unimodal:<m>`` rows."""
    if ":" in method:
        return method.split(":", 1)[0]
    try:
        from ...registry import method_entry

        return method_entry(method).factory.__module__.rsplit(".", 1)[-1]
    except (MMBalanceError, ImportError, AttributeError):
        return method


def description_of(method: str) -> str:
    try:
        from ...registry import method_entry

        return method_entry(method).description
    except (MMBalanceError, ImportError, AttributeError):
        return ""


@dataclass
class RowData:
    """One row of one dataset: its results.csv record and the report's per-seed data."""

    name: str
    record: dict[str, str]
    summary: RowSummary

    def get(self, key: str) -> float:
        return num(self.record.get(key))


@dataclass
class DatasetData:
    summary: DatasetSummary
    rows: list[RowData]
    columns: list[str]  # results.csv columns with a value on this dataset

    @property
    def name(self) -> str:
        return self.summary.name

    @property
    def metric(self) -> str:
        return self.summary.metric

    @property
    def weak(self) -> str | None:
        dd = self.summary.diag
        return getattr(dd, "weak", None)

    def row(self, name: str) -> RowData | None:
        return next((r for r in self.rows if r.name == name), None)


@dataclass
class MethodData:
    row: str
    method: str  # the registered name the row runs
    family: str
    description: str
    page: str  # file name under methods/
    sets: list[tuple[str, str]] = field(default_factory=list)  # the row's --set values (first dataset planned)
    sets_by_dataset: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    poi: tuple[float, float, float, int] | None = None  # P(row > baseline), CI, number of datasets
    mean_delta: tuple[float, float, float] | None = None  # the build's mean Δ across datasets (oriented), CI
    rank: tuple[float, float, float] | None = None  # the build's average rank with its interval

    @property
    def is_reference(self) -> bool:
        return is_reference_row(self.row)


@dataclass
class SiteData:
    report: Report
    columns: list[str]
    datasets: list[DatasetData]
    methods: dict[str, MethodData]  # row → method, plan order
    code_versions: list[tuple[str, int]]  # (version text, runs)
    downloads: list[str] = field(default_factory=list)  # file names under downloads/


def site_data(rep: Report) -> SiteData:
    columns, records = csv_records(rep)
    by_key = {(r["dataset"], r["method"]): r for r in records}
    datasets = []
    for ds in rep.datasets:
        rows = [RowData(r.row, by_key.get((ds.name, r.row), {}), r) for r in ds.ordered_rows()]
        used = [c for c in columns if any(row.record.get(c, "") != "" for row in rows)]
        datasets.append(DatasetData(ds, rows, used))
    methods: dict[str, MethodData] = {}
    for spec in rep.specs:
        m = methods.get(spec.row)
        if m is None:
            m = methods[spec.row] = MethodData(spec.row, spec.method, family_of(spec.method),
                                               description_of(spec.method), safe_name(spec.row) + ".html",
                                               list(spec.sets))
        m.sets_by_dataset.setdefault(spec.dataset, list(spec.sets))
    _poi(rep, methods)
    versions = Counter()
    for st in rep.states:
        if st.state == "ok" and st.result:
            code = st.result.get("code") or {}
            commit = str(code.get("git_commit") or "unknown commit")
            versions[commit[:12] + (" (uncommitted changes)" if code.get("dirty") else "")] += 1
    return SiteData(rep, columns, datasets, methods, sorted(versions.items(), key=lambda kv: (-kv[1], kv[0])))


def _poi(rep: Report, methods: dict[str, MethodData]) -> None:
    """The build's aggregates (``Report.aggregate``: mean Δ, probability of improvement and average rank with
    their intervals) when it has them; otherwise P(row > baseline) across datasets
    (:func:`mmbalance.stats.probability_of_improvement`, rliable's definition) with a 95 % stratified-bootstrap
    interval (:func:`mmbalance.stats.stratified_bootstrap`: the seeds of each dataset resampled, a row's run and
    the baseline's run of one seed kept together). Values oriented so that higher is better; datasets where the
    row or the baseline has no paired seed are left out."""
    from ... import stats

    def statistic(tasks: list[np.ndarray]) -> float:
        return stats.probability_of_improvement([t[:, 0] for t in tasks], [t[:, 1] for t in tasks])

    agg = getattr(rep, "aggregate", None)  # the build's own cross-dataset aggregates, when it computes them
    if agg is not None and getattr(agg, "rows", None):
        n = len(getattr(agg, "datasets", []) or [])
        for a in agg.rows:
            m = methods.get(a.row)
            if m is not None:
                m.poi = (a.poi, a.poi_low, a.poi_high, n)
                m.mean_delta = (a.delta, a.delta_low, a.delta_high)
                m.rank = (getattr(a, "rank", math.nan), getattr(a, "rank_low", math.nan),
                          getattr(a, "rank_high", math.nan))
        return
    for row, m in methods.items():
        if row == rep.suite.baseline or m.is_reference:
            continue
        tasks = []
        for ds in rep.datasets:
            base, r = ds.rows.get(ds.baseline), ds.rows.get(row)
            if base is None or r is None or not ds.metric:
                continue
            sign = 1.0 if ds.higher_is_better else -1.0
            x, y = r.primary_values(ds.metric), base.primary_values(ds.metric)
            seeds = sorted(s for s in x if s in y and math.isfinite(x[s]) and math.isfinite(y[s]))
            if seeds:
                tasks.append(np.array([[sign * x[s], sign * y[s]] for s in seeds]))
        if tasks:
            p, lo, hi = stats.stratified_bootstrap(tasks, statistic, reps=2000, seed=0)
            m.poi = (float(p), float(lo), float(hi), len(tasks))


def repo_root() -> Path:
    """The checkout this package lives in (its docs/ folder is linked from method pages when the site is
    written inside it)."""
    return Path(__file__).resolve().parents[3]


def docs_page(method: str) -> Path | None:
    """docs/methods/<family>.md of the checkout, when it exists."""
    fam = family_of(method)
    p = repo_root() / "docs" / "methods" / f"{'baseline' if fam == 'unimodal' else fam}.md"
    return p if p.is_file() else None
