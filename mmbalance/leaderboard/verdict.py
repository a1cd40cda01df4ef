"""The leaderboard's verdicts: per dataset, every row against the baseline paired by replicate, with failures
counted, pre-registered families and stated power; across datasets, rliable-style intervals instead of point
ranks. Pure statistics on the numbers of :mod:`mmbalance.leaderboard.report`'s summaries; rendering lives in
the report, so this module's dataclasses are the aggregated data a site or a notebook can use directly.

Rules (docs/protocol.md, "Statistics"):

* **Replicates.** Replicate r is training seed r and, on datasets whose split is ``sampled``, split seed r; rows
  are paired by r.
* **Failures count.** A planned replicate that failed (crashed or diverged to a non-finite loss) enters the
  fused metric and the weak-modality probe at the *worst-case value* of its replicate: the score of the constant
  prior predictor on that replicate's test split (``diagnostics.shapley.test.v["none"]`` of the dataset's runs on
  that replicate: chance level for accuracy on a balanced test split, the training-median prediction for
  regression, background everywhere for segmentation). ``survivor_mean`` is the mean over finished runs only.
  Not-applicable rows are not scored; unfinished runs are left out (the row shows ok/planned).
* **Pre-registration.** The weak modality m* is declared in the suite (``[datasets.X] weak``) or derived from the
  baseline's *validation* Shapley shares (smallest mean share; ties → lower validation probe → modality order);
  test values never choose it. The suite's ``primary`` rows form the tested family of each column (fused
  metric, probe [m*], φ-share [m*]), Holm-adjusted within it; other method rows are *exploratory*: Δ and CI,
  no p-value. Without a ``primary`` list every method row is primary.
* **Tests.** Paired t-test on the replicate differences (row − baseline), Holm within the family; a comparison
  with fewer than :data:`~mmbalance.stats.MIN_PAIRS` pairs or zero spread is *not testable* (no p, no marker)
  and counts in its family at p = 1. The exact sign-flip test is reported beside it, with a note where its
  smallest attainable p (2/2^n) cannot pass α/m.
* **Power.** Per dataset and column: the minimum detectable difference at 80 % power of the paired t-test at
  α/m (m = family size) for the median paired spread of the primary rows and the planned number of replicates
  (:func:`~mmbalance.stats.mde_paired_t`); per row the 95 % CI half-width.
* **Across datasets.** Mean Δ over datasets and rliable's probability of improvement over the baseline, each
  with a 95 % stratified-bootstrap interval (replicates resampled within datasets, pairs kept), and average
  ranks with bootstrap intervals; Friedman/Nemenyi only with at least :data:`MIN_DATASETS_FOR_RANK_TESTS`
  datasets.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import stats

ALPHA = 0.05
POWER = 0.8
#: Demšar (2006, Sec. 3.2.2) uses the chi-square approximation of Friedman's statistic for N > 10 datasets;
#: below this many datasets no Friedman test or CD diagram is drawn.
MIN_DATASETS_FOR_RANK_TESTS = 10
BOOTSTRAP_REPS = 2000
BOOTSTRAP_SEED = 0
COLUMNS = ("metric", "probe", "share")
WORST_CASE_RULE = ("a failed replicate counts at the score of the constant prior predictor on its test split "
                   "(chance level for accuracy on a balanced test split; the training-median prediction for "
                   "regression)")


# ------------------------------------------------------------------------------------------ data
@dataclass
class Column:
    """One quantity of one row against the baseline, paired by replicate.

    ``values``: replicate → value (failures at the worst case for ``metric`` and ``probe``); ``delta`` = mean of
    row − baseline over the ``n`` paired replicates, ``ci_low``/``ci_high``/``half_width`` its 95 % t interval;
    ``p``/``p_adj``: raw and Holm-adjusted paired t-test p (nan unless ``status == "tested"``); ``p_sign_flip``:
    exact sign-flip p; ``status``: ``tested`` | ``exploratory`` | ``not testable: …`` | ``reference`` |
    ``baseline`` | ``no data``."""

    values: dict[int, float] = field(default_factory=dict)
    n: int = 0
    delta: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    half_width: float = math.nan
    sd: float = math.nan
    p: float = math.nan
    p_adj: float = math.nan
    p_sign_flip: float = math.nan
    marker: str = ""
    status: str = "no data"
    comparison: stats.PairedComparison | None = None

    @property
    def significant(self) -> bool:
        return self.status == "tested" and math.isfinite(self.p_adj) and self.p_adj < ALPHA


@dataclass
class RowVerdict:
    """One row of one dataset. ``role``: baseline | primary | exploratory | reference (``unimodal:<m>``).
    ``mean`` counts failures at the worst case; ``survivor_mean`` is over finished runs only."""

    dataset: str
    row: str
    role: str
    planned: int = 0
    ok: int = 0
    failed: int = 0
    failed_unscored: int = 0  # failed replicates without a worst-case value: the row is not testable
    not_applicable: int = 0
    pending: int = 0
    mean: float = math.nan
    std: float = math.nan
    survivor_mean: float = math.nan
    cost_seconds: float = math.nan
    columns: dict[str, Column] = field(default_factory=dict)


@dataclass
class Power:
    """Minimum detectable difference (80 % power, paired t-test at α/family) for a column of a dataset."""

    column: str
    sd: float          # median paired spread (sample sd of row − baseline) of the family's rows
    n: int             # planned replicates
    family: int        # tests in the column's family
    mde: float         # in units of the metric (nan: no spread known)
    sign_flip_min_p: float  # 2 / 2^n: the smallest p an exact sign-flip / Wilcoxon test can give


@dataclass
class DatasetVerdict:
    dataset: str
    metric: str
    higher_is_better: bool
    split: str                    # "fixed" | "sampled"
    weak: str | None
    weak_source: str
    replicates: list[int]
    family: list[str]             # primary rows present on this dataset
    missing_primary: list[str]    # primary rows the suite declares that this dataset has no row for
    worst_case: dict[int, float]  # replicate → worst-case value of the metric
    rows: dict[str, RowVerdict]
    power: dict[str, Power] = field(default_factory=dict)


@dataclass
class AggregateRow:
    """A row across datasets: mean Δ vs the baseline (oriented: positive = better) and rliable's probability of
    improvement, each with a 95 % stratified-bootstrap interval; average rank with its bootstrap interval."""

    row: str
    delta: float
    delta_low: float
    delta_high: float
    poi: float
    poi_low: float
    poi_high: float
    rank: float = math.nan
    rank_low: float = math.nan
    rank_high: float = math.nan


@dataclass
class CrossVerdict:
    datasets: list[str]
    rows: list[AggregateRow]
    excluded: dict[str, str]
    rank_tests_drawn: bool
    note: str = ""


@dataclass
class CodeVersions:
    """Commits of the runs behind a report: ``commits`` = commit → number of runs, ``dirty`` = runs from an
    uncommitted tree, ``unknown`` = runs without a recorded commit."""

    commits: dict[str, int]
    dirty: int
    unknown: int

    @property
    def clean(self) -> bool:
        return len(self.commits) <= 1 and self.dirty == 0 and self.unknown == 0

    def describe(self) -> str:
        parts = [f"{c[:10]} ({n} runs)" for c, n in sorted(self.commits.items(), key=lambda x: (-x[1], x[0]))]
        text = f"{len(self.commits)} commit(s): " + ", ".join(parts) if parts else "runs without a recorded commit"
        if self.dirty:
            text += f"; {self.dirty} run(s) from an uncommitted (dirty) tree"
        if self.unknown and parts:
            text += f"; {self.unknown} run(s) without a recorded commit"
        elif self.unknown:
            text += f" ({self.unknown})"
        return text


# ------------------------------------------------------------------------------------------ helpers
def code_versions(results: list[dict[str, Any]]) -> CodeVersions:
    commits: Counter[str] = Counter()
    dirty = unknown = 0
    for r in results:
        code = r.get("code") or {}
        c = code.get("git_commit")
        if not c:
            unknown += 1
            continue
        commits[str(c)] += 1
        dirty += bool(code.get("dirty"))
    return CodeVersions(dict(commits), dirty, unknown)


def _oriented(value: float, higher: bool) -> float:
    return value if higher else -value


def worst_case_values(ds) -> dict[int, float]:
    """Replicate → the prior predictor's test score (in the metric's own direction), the median over the
    dataset's finished runs of that replicate that recorded it (all runs of a replicate share its split)."""
    per: dict[int, list[float]] = {}
    for row in ds.rows.values():
        for st in row.states:
            if st.state != "ok" or not st.result:
                continue
            sh = ((st.result.get("diagnostics") or {}).get("shapley") or {})
            if sh.get("metric") != ds.metric:
                continue
            v = ((sh.get("test") or {}).get("v") or {}).get("none")
            if v is None or not math.isfinite(float(v)):
                continue
            oriented = bool(sh.get("oriented", True))
            val = float(v)
            if oriented and not ds.higher_is_better:
                val = -val
            per.setdefault(st.spec.seed, []).append(val)
    return {r: float(np.median(v)) for r, v in sorted(per.items())}


def weak_from_validation(ds) -> str | None:
    """m* from the baseline's validation diagnostics: smallest mean validation Shapley share; ties → lower
    mean validation probe → modality order. None without baseline diagnostics."""
    base = ds.rows.get(ds.baseline)
    if base is None:
        return _weak_from_unimodal_validation(ds)
    shares: dict[str, list[float]] = {}
    probes: dict[str, list[float]] = {}
    for st in base.states:
        if st.state != "ok" or not st.result:
            continue
        d = st.result.get("diagnostics") or {}
        for m, v in (((d.get("shapley") or {}).get("val") or {}).get("share") or {}).items():
            if v is not None and math.isfinite(float(v)):
                shares.setdefault(m, []).append(float(v))
        for m, mv in (((d.get("probe") or {}).get("val")) or {}).items():
            v = (mv or {}).get(ds.metric)
            if v is not None and math.isfinite(float(v)):
                probes.setdefault(m, []).append(_oriented(float(v), ds.higher_is_better))
    if not shares:
        return _weak_from_unimodal_validation(ds)
    order = {m: i for i, m in enumerate(ds.modalities)}
    keyed = [(float(np.mean(v)), float(np.mean(probes[m])) if probes.get(m) else math.inf,
              order.get(m, len(order)), m) for m, v in shares.items()]
    return min(keyed)[3]


def _weak_from_unimodal_validation(ds) -> str | None:
    """Without baseline diagnostics: the modality whose ``unimodal:m`` row has the lowest mean validation score
    (oriented; ties → modality order); None without such rows."""
    order = {m: i for i, m in enumerate(ds.modalities)}
    keyed = []
    for name, row in ds.rows.items():
        if not name.startswith("unimodal:"):
            continue
        vals = [_oriented(v, ds.higher_is_better) for v in row.val.values() if math.isfinite(v)]
        m = name.split(":", 1)[1]
        if vals:
            keyed.append((float(np.mean(vals)), order.get(m, len(order)), m))
    return min(keyed)[2] if keyed else None


def _column(values: dict[int, float], base: dict[int, float]) -> Column:
    col = Column(values=dict(values))
    reps = sorted(r for r in values if r in base and math.isfinite(values[r]) and math.isfinite(base[r]))
    col.n = len(reps)
    if not reps:
        return col
    d = [values[r] - base[r] for r in reps]
    c = stats.paired_comparison([values[r] for r in reps], [base[r] for r in reps])
    col.comparison = c
    col.delta, col.ci_low, col.ci_high = c.mean_diff, c.ci_low, c.ci_high
    col.half_width = (c.ci_high - c.ci_low) / 2 if math.isfinite(c.ci_low) else math.nan
    col.sd = float(np.std(d, ddof=1)) if len(d) > 1 else math.nan
    col.p_sign_flip = stats.sign_flip_test(d)
    col.p = c.p_ttest
    return col


# ------------------------------------------------------------------------------------------ one dataset
def analyse_dataset(ds, *, primary: list[str] | None, split: str, declared_weak: str | None,
                    replicates: list[int], is_reference) -> DatasetVerdict:
    """Verdicts of one :class:`~mmbalance.leaderboard.report.DatasetSummary` (its rows' run states and the
    per-replicate diagnostics in ``ds.diag``)."""
    worst = worst_case_values(ds) if ds.metric else {}
    if declared_weak:
        weak, source = declared_weak, "declared in the suite"
    else:
        weak = weak_from_validation(ds)
        has_shares = any(((st.result or {}).get("diagnostics") or {}).get("shapley", {}).get("val")
                         for st in (ds.rows[ds.baseline].states if ds.baseline in ds.rows else []))
        source = ("smallest validation Shapley share of the baseline" if weak and has_shares else
                  "lowest validation score of the unimodal rows" if weak else
                  "none (no baseline validation diagnostics, no unimodal rows)")
    method_rows = [r for r in ds.rows if r != ds.baseline and not is_reference(r)]
    family = [r for r in method_rows if primary is None or r in primary]
    missing = [r for r in (primary or []) if r not in ds.rows]
    verdict = DatasetVerdict(ds.name, ds.metric, ds.higher_is_better, split, weak, source, list(replicates),
                             family, missing, worst, {})
    diag = ds.diag

    def quantity(row, q: str, impute: bool) -> dict[int, float]:
        if q == "metric":
            vals = {r: v for r, v in row.primary_values(ds.metric).items() if math.isfinite(v)}
        else:
            if diag is None or weak is None:
                return {}
            key = f"{q}[{weak}]"
            vals = {r: v for r, v in diag.values(row.row, key).items() if math.isfinite(v)}
            if q == "probe" and not ds.higher_is_better:  # diagnostics store oriented probes
                vals = {r: -v for r, v in vals.items()}
        if impute:
            for st in row.states:
                if st.state == "failed" and st.spec.seed in worst:
                    vals[st.spec.seed] = worst[st.spec.seed]
        return vals

    for row in ds.rows.values():
        role = ("baseline" if row.row == ds.baseline else "reference" if is_reference(row.row)
                else "primary" if row.row in family else "exploratory")
        rv = RowVerdict(ds.name, row.row, role, planned=len(row.states), ok=row.n_ok, failed=row.count("failed"),
                        not_applicable=row.count("n/a"), pending=row.n_pending)
        rv.failed_unscored = sum(1 for st in row.states if st.state == "failed" and st.spec.seed not in worst)
        scored = quantity(row, "metric", impute=True)
        if scored:
            vals = list(scored.values())
            rv.mean = float(np.mean(vals))
            rv.std = float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan
        surv = [v for v in row.primary_values(ds.metric).values() if math.isfinite(v)]
        rv.survivor_mean = float(np.mean(surv)) if surv else math.nan
        if row.train_seconds:
            rv.cost_seconds = float(np.mean(list(row.train_seconds.values())))
        verdict.rows[row.row] = rv
    base_row = ds.rows.get(ds.baseline)
    for q in COLUMNS:
        impute = q != "share"
        base_vals = quantity(base_row, q, impute) if base_row is not None else {}
        tested: list[Column] = []
        for row in ds.rows.values():
            rv = verdict.rows[row.row]
            vals = quantity(row, q, impute)
            if rv.role == "baseline":
                rv.columns[q] = Column(values=vals, n=len(vals), status="baseline")
                continue
            col = _column(vals, base_vals) if base_vals else Column(values=vals)
            if col.n == 0:
                col.status = "no data"
            elif rv.role == "reference":
                col.status = "reference"
            elif rv.role == "exploratory":
                col.status = "exploratory"
            elif impute and (rv.failed_unscored or verdict.rows[ds.baseline].failed_unscored):
                col.status = ("not testable: a failed replicate has no worst-case value (no prior-predictor score "
                              "recorded on its split), so the failure cannot be counted")
            else:
                t = stats.testability([vals[r] - base_vals[r] for r in vals if r in base_vals])
                col.status = "tested" if t.testable else t.reason
            if col.status != "tested":  # no p-value is shown for what is not tested
                col.p = col.p_sign_flip = math.nan
            rv.columns[q] = col
            if rv.role == "primary":
                tested.append(col)
        adj = stats.holm_correction([c.p if c.status == "tested" and math.isfinite(c.p) else 1.0 for c in tested])
        for c, pa in zip(tested, adj):
            if c.status == "tested":
                c.p_adj = pa
                c.marker = stats.significance_marker(pa, ALPHA)
        sds = [c.sd for c in tested if c.status == "tested" and math.isfinite(c.sd)]
        n = len(replicates)
        m = max(1, len(family))
        sd = float(np.median(sds)) if sds else math.nan
        verdict.power[q] = Power(q, sd, n, m, stats.mde_paired_t(sd, n, alpha=ALPHA, power=POWER, family=m)
                                 if math.isfinite(sd) else math.nan, stats.min_attainable_p(n))
    return verdict


# ------------------------------------------------------------------------------------------ across datasets
def _rank_rows(means: np.ndarray) -> np.ndarray:
    """Average ranks, 1 = highest: 1 + #{j: x_j > x_i} + ½ #{j ≠ i: x_j = x_i} (ties share their mean rank)."""
    greater = (means[None, :] > means[:, None]).sum(axis=1)
    ties = (means[None, :] == means[:, None]).sum(axis=1) - 1
    return 1.0 + greater + 0.5 * ties


def analyse_across(verdicts: list[DatasetVerdict], baseline: str) -> CrossVerdict:
    """Aggregates over datasets of every non-reference row with scored replicates on all of them."""
    names = [v.dataset for v in verdicts if v.metric]
    vs = [v for v in verdicts if v.metric]
    candidates: list[str] = []
    for v in vs:
        for r, rv in v.rows.items():
            if rv.role in ("primary", "exploratory", "baseline") and r not in candidates:
                candidates.append(r)
    excluded: dict[str, str] = {}
    rows = []
    for r in candidates:
        missing = [v.dataset for v in vs if r not in v.rows or not v.rows[r].columns.get("metric")
                   or not v.rows[r].columns["metric"].values]
        unscored = [v.dataset for v in vs if r in v.rows and v.rows[r].failed_unscored]
        if missing:
            excluded[r] = "no scored replicate on " + ", ".join(missing)
        elif unscored:
            excluded[r] = "a failed replicate without a worst-case value on " + ", ".join(unscored)
        else:
            rows.append(r)
    draw = len(names) >= MIN_DATASETS_FOR_RANK_TESTS
    if not vs or baseline not in rows:
        return CrossVerdict(names, [], excluded, draw, "No aggregate: the baseline has no scored replicate on "
                            "every dataset." if vs else "No dataset has results.")
    # per dataset: replicates scored for every row (failures included at the worst case), oriented
    mats = []
    for v in vs:
        cols = [v.rows[r].columns["metric"].values for r in rows]
        reps = sorted(set.intersection(*(set(c) for c in cols)))
        sign = 1.0 if v.higher_is_better else -1.0
        mats.append(np.array([[sign * c[rep] for c in cols] for rep in reps]).reshape(len(reps), len(rows)))
    if any(m.shape[0] == 0 for m in mats):
        return CrossVerdict(names, [], excluded, draw, "No aggregate: some dataset has no replicate scored for "
                            "every row.")
    b = rows.index(baseline)

    def stat(tasks: list[np.ndarray]) -> np.ndarray:
        delta = np.mean([t.mean(axis=0) - t[:, b].mean() for t in tasks], axis=0)
        poi = np.mean([np.mean((t[:, :, None] > t[:, b][None, None, :]) + 0.5 * (t[:, :, None] == t[:, b][None, None, :]),
                               axis=(0, 2)) for t in tasks], axis=0)
        ranks = np.mean([_rank_rows(t.mean(axis=0)) for t in tasks], axis=0)
        return np.concatenate([delta, poi, ranks])

    point, lo, hi = stats.stratified_bootstrap(mats, stat, reps=BOOTSTRAP_REPS, seed=BOOTSTRAP_SEED)
    k = len(rows)
    out = [AggregateRow(r, float(point[j]), float(lo[j]), float(hi[j]), float(point[k + j]), float(lo[k + j]),
                        float(hi[k + j]), float(point[2 * k + j]), float(lo[2 * k + j]), float(hi[2 * k + j]))
           for j, r in enumerate(rows)]
    note = ("" if draw else f"Friedman test and Nemenyi critical difference not drawn: {len(names)} dataset(s) "
            f"< {MIN_DATASETS_FOR_RANK_TESTS} (Demšar 2006 uses them for more than 10 datasets); the intervals "
            "above are the aggregate evidence.")
    return CrossVerdict(names, out, excluded, draw, note)
