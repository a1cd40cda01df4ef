"""Statistics for comparing methods over seeded repeats and over several datasets.

Two levels of comparison are provided:

* **One dataset, method vs. baseline, paired by seed** -- :func:`paired_comparison`
  (paired t-test with a t confidence interval, and the Wilcoxon signed-rank test),
  with :func:`holm_correction` to adjust the p-values of the several methods that
  are compared against the same baseline, and :func:`significance_marker` to turn an
  adjusted p-value into the ``*`` / ``**`` / ``***`` shown on the leaderboard.
* **Power and testability** -- :func:`paired_t_power`, :func:`mde_paired_t` (the minimum
  detectable difference of the paired t-test at a given power, family size and spread),
  :func:`sign_flip_test` (exact paired permutation test), :func:`min_attainable_p` and
  :func:`testability` (a comparison that cannot pass its correction, or has zero spread or
  too few pairs, is "not testable" and never earns a marker).
* **Several datasets, all methods against each other** -- :func:`stratified_bootstrap`
  and :func:`probability_of_improvement` (Agarwal et al. 2021, "Deep Reinforcement Learning
  at the Edge of the Statistical Precipice", NeurIPS: the rliable definitions),
  :func:`average_ranks`, :func:`friedman_test` (Friedman chi-square and the Iman-Davenport
  F), the Nemenyi :func:`nemenyi_critical_difference` and the :func:`cd_diagram` plot.

References
----------
* J. Demšar (2006). "Statistical comparisons of classifiers over multiple data
  sets". Journal of Machine Learning Research 7:1-30.  (Sections 3.1.3 and 3.2.2:
  Wilcoxon, Friedman, Iman-Davenport, Nemenyi, CD diagrams; Table 5: q_alpha.)
* S. Holm (1979). "A simple sequentially rejective multiple test procedure".
  Scandinavian Journal of Statistics 6(2):65-70.
* Student's paired t-test / t interval: any statistics textbook, e.g. the
  "paired t-test" of Demšar 2006, Section 3.1.2.
* Power of the t-test from the noncentral t distribution: J. Cohen (1988), "Statistical
  Power Analysis for the Behavioral Sciences", ch. 2; for known sigma it reduces to the
  closed form ``MDE = (z_{1-a/2} + z_{power}) * sigma / sqrt(n)``.
* Sign-flip (paired permutation) test: Fisher (1935) / Pitman (1937); under H0 the
  differences are symmetric about 0, so each sign pattern is equally likely.

Nothing here touches global state: matplotlib is imported lazily inside
:func:`cd_diagram` and drives the Agg canvas directly (``pyplot`` is never used).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats as _st

__all__ = [
    "SIGNIFICANCE_LEGEND",
    "SIGNIFICANCE_THRESHOLDS",
    "PairedComparison",
    "paired_comparison",
    "holm_correction",
    "significance_marker",
    "MIN_PAIRS",
    "paired_t_power",
    "mde_paired_t",
    "sign_flip_test",
    "min_attainable_p",
    "Testability",
    "testability",
    "stratified_bootstrap",
    "probability_of_improvement",
    "rank_within_datasets",
    "average_ranks",
    "FriedmanResult",
    "friedman_test",
    "nemenyi_q_alpha",
    "nemenyi_critical_difference",
    "nemenyi_groups",
    "cd_diagram",
]

#: ``(upper bound, marker)`` pairs, strictest first; a p-value strictly below the bound
#: (and below ``alpha``) earns the marker.
SIGNIFICANCE_THRESHOLDS: tuple[tuple[float, str], ...] = (
    (0.001, "***"),
    (0.01, "**"),
    (0.05, "*"),
)

#: Human-readable legend of :func:`significance_marker` (for table footers / READMEs).
SIGNIFICANCE_LEGEND = (
    "Significance vs. the baseline (Holm-Bonferroni-adjusted p-values, paired by seed): "
    "*** p < 0.001, ** p < 0.01, * p < 0.05; no marker: not significant at alpha = 0.05 "
    "(or fewer than 2 paired seeds)."
)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _as_1d_finite(values: Sequence[float], what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of numbers, got an array of shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(
            f"{what} must be finite; got {arr[bad[0]]!r} at index {int(bad[0])} "
            f"({bad.size} non-finite value(s) in total)"
        )
    return arr


def _as_score_matrix(scores: np.ndarray, what: str = "scores") -> np.ndarray:
    arr = np.asarray(scores, dtype=float)
    if arr.ndim != 2:
        raise ValueError(
            f"{what} must be a 2-D array [n_datasets, n_methods], got an array of shape {arr.shape}"
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{what} must hold at least one dataset and one method, got shape {arr.shape}")
    bad = np.argwhere(~np.isfinite(arr))
    if bad.size:
        i, j = (int(x) for x in bad[0])
        raise ValueError(
            f"{what} must be finite; got {arr[i, j]!r} at [dataset {i}, method {j}] "
            f"({len(bad)} non-finite value(s) in total)"
        )
    return arr


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")
    return alpha


# --------------------------------------------------------------------------------------
# paired comparison over seeds
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairedComparison:
    """Method vs. baseline on one dataset, paired by seed (differences ``method - baseline``).

    Attributes
    ----------
    n:
        Number of pairs (seeds).
    mean_diff:
        Mean of the paired differences (nan when ``n == 0``).
    ci_low, ci_high:
        Two-sided t confidence interval of the mean difference (95 % by default),
        ``mean_diff -/+ t_{1-(1-c)/2, n-1} * s / sqrt(n)``; nan when ``n < 2``.
        Zero-width (``== mean_diff``) when all differences are identical.
    t_stat, p_ttest:
        Paired t statistic ``mean_diff / (s / sqrt(n))`` and its two-sided p-value from
        Student's t with ``n - 1`` degrees of freedom.  nan when ``n < 2``.  When the
        differences have zero variance: ``t = nan, p = nan`` if they are all zero (no
        evidence either way), ``t = +/-inf, p = 0.0`` if they are all the same nonzero
        value (a perfectly consistent shift).
    p_wilcoxon:
        Two-sided Wilcoxon signed-rank p-value (Demšar 2006, Sec. 3.1.3) from
        ``scipy.stats.wilcoxon(d, zero_method="wilcox")`` (zero differences are dropped;
        scipy's ``method="auto"``: exact null distribution for up to 50 pairs).  nan when
        there is no pair or all differences are zero.  Note that with few seeds the
        exact test cannot reach small p-values (n = 5: p >= 0.0625).
    """

    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    t_stat: float
    p_ttest: float
    p_wilcoxon: float


def paired_comparison(
    method_scores: Sequence[float],
    baseline_scores: Sequence[float],
    *,
    confidence: float = 0.95,
) -> PairedComparison:
    """Compare a method with a baseline whose scores are paired by seed.

    ``method_scores[i]`` and ``baseline_scores[i]`` must come from the same seed.  Tests
    the differences ``d = method - baseline`` with the paired t-test (Student; Demšar 2006
    Sec. 3.1.2) and the Wilcoxon signed-rank test (Wilcoxon 1945; Demšar 2006 Sec. 3.1.3).

    The confidence interval is the t interval ``d_bar +/- t_{(1+c)/2, n-1} * s_d / sqrt(n)``
    with ``s_d`` the sample standard deviation (ddof=1).  See :class:`PairedComparison`
    for the degenerate cases (``n < 2``, zero variance, all-zero differences).

    Raises
    ------
    ValueError
        If the two sequences differ in length, are not 1-D, hold non-finite values, or
        ``confidence`` is not in (0, 1).
    """
    m = _as_1d_finite(method_scores, "method_scores")
    b = _as_1d_finite(baseline_scores, "baseline_scores")
    if m.shape[0] != b.shape[0]:
        raise ValueError(
            "method_scores and baseline_scores must be paired by seed and have the same length, "
            f"got {m.shape[0]} method scores and {b.shape[0]} baseline scores"
        )
    confidence = float(confidence)
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")

    d = m - b
    n = int(d.shape[0])
    nan = float("nan")
    mean_diff = float(np.mean(d)) if n else nan

    # Wilcoxon signed-rank (needs at least one nonzero difference).
    if n == 0 or not np.any(d != 0.0):
        p_wil = nan
    else:
        with warnings.catch_warnings():
            # scipy warns that "exact" is not exact with ties; the p-value is still the
            # documented one, and the warning would only spam leaderboard builds.
            warnings.simplefilter("ignore", category=UserWarning)
            p_wil = float(_st.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)

    if n < 2:
        return PairedComparison(n, mean_diff, nan, nan, nan, nan, p_wil)

    sd = float(np.std(d, ddof=1))
    se = sd / math.sqrt(n)
    df = n - 1
    t_crit = float(_st.t.ppf(0.5 + confidence / 2.0, df))
    # Differences that are identical up to float rounding (e.g. 0.3-0.2 vs 0.5-0.4) count
    # as zero variance, so that a constant shift gives p = 0 instead of noise-driven t.
    scale = float(np.max(np.abs(d)))
    if sd <= 64.0 * np.finfo(float).eps * scale or sd == 0.0:
        if mean_diff == 0.0 or scale == 0.0:
            return PairedComparison(n, mean_diff, mean_diff, mean_diff, nan, nan, p_wil)
        return PairedComparison(
            n, mean_diff, mean_diff, mean_diff, math.copysign(math.inf, mean_diff), 0.0, p_wil
        )

    t_stat = mean_diff / se
    p_t = float(2.0 * _st.t.sf(abs(t_stat), df))
    half = t_crit * se
    return PairedComparison(n, mean_diff, mean_diff - half, mean_diff + half, t_stat, min(p_t, 1.0), p_wil)


# --------------------------------------------------------------------------------------
# multiple-comparison correction and markers
# --------------------------------------------------------------------------------------
def holm_correction(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (Holm 1979; Demšar 2006 Sec. 3.2.2).

    With the ``m`` valid p-values sorted ascending, ``p_(1) <= ... <= p_(m)``, the
    adjusted value of ``p_(i)`` is ``min(1, max_{j <= i} (m - j + 1) * p_(j))``; the running
    maximum keeps the adjusted values monotone in the raw ones, so that rejecting
    ``H_(i)`` iff ``p_adj_(i) < alpha`` reproduces Holm's step-down procedure.  Results
    are returned in the input order.

    nan entries (e.g. a comparison that could not be computed) stay nan and are not
    counted in ``m``.

    Raises
    ------
    ValueError
        If a (non-nan) p-value lies outside [0, 1] or the input is not 1-D.
    """
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"pvalues must be a 1-D sequence, got an array of shape {p.shape}")
    valid = ~np.isnan(p)
    bad = np.flatnonzero(valid & ((p < 0.0) | (p > 1.0)))
    if bad.size:
        raise ValueError(f"p-values must lie in [0, 1]; got {p[bad[0]]!r} at index {int(bad[0])}")
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(valid)
    m = idx.size
    if m:
        order = idx[np.argsort(p[idx], kind="stable")]
        factors = m - np.arange(m)  # m, m-1, ..., 1
        adjusted = np.minimum(1.0, np.maximum.accumulate(factors * p[order]))
        out[order] = adjusted
    return [float(x) for x in out]


def significance_marker(p_adj: float, alpha: float = 0.05) -> str:
    """Marker for an (adjusted) p-value: ``"***"`` < 0.001, ``"**"`` < 0.01, ``"*"`` < 0.05.

    Nothing (``""``) is shown unless ``p_adj < alpha``; ``alpha`` only moves the
    significance cut-off, the star levels stay fixed (so with ``alpha=0.01`` a p-value of
    0.02 gets no marker and 0.005 gets ``"**"``).  nan gives ``""``.  See
    :data:`SIGNIFICANCE_LEGEND`.
    """
    alpha = _check_alpha(alpha)
    p = float(p_adj)
    if math.isnan(p) or not p < alpha:
        return ""
    for bound, marker in SIGNIFICANCE_THRESHOLDS:
        if p < bound:
            return marker
    return "*"  # alpha > 0.05 and 0.05 <= p < alpha


# --------------------------------------------------------------------------------------
# power, exact paired test, testability
# --------------------------------------------------------------------------------------
#: The fewest paired replicates a comparison needs to be tested at all (with 2 pairs the t-test
#: has 1 degree of freedom and its interval spans most of the scale).
MIN_PAIRS = 3


def paired_t_power(delta: float, sd: float, n: int, *, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` to detect a true mean
    difference ``delta`` when the paired differences are normal with standard deviation
    ``sd``, over ``n`` pairs: with ``ncp = delta / (sd / sqrt(n))`` and ``c = t_{1-a/2, n-1}``,
    ``power = P(T' > c) + P(T' < -c)``, ``T'`` noncentral t with ``n - 1`` df (Cohen 1988)."""
    alpha = _check_alpha(alpha)
    if n < 2 or not (sd > 0.0 and math.isfinite(sd)):
        return math.nan
    df = n - 1
    ncp = float(delta) / (float(sd) / math.sqrt(n))
    c = float(_st.t.ppf(1.0 - alpha / 2.0, df))
    # P(T' < -c | ncp) = P(T' > c | -ncp); scipy's nct.cdf returns nan for some vanishing lower tails
    upper, lower = (float(_st.nct.sf(c, df, x)) for x in (abs(ncp), -abs(ncp)))
    return (upper if math.isfinite(upper) else 1.0) + (lower if math.isfinite(lower) else 0.0)


def mde_paired_t(sd: float, n: int, *, alpha: float = 0.05, power: float = 0.8, family: int = 1) -> float:
    """Minimum detectable difference of the paired t-test: the smallest ``delta > 0`` that the
    test detects with probability ``power`` at level ``alpha / family`` (Bonferroni, which is
    Holm's first and strictest step, so the figure holds for every member of a Holm family of
    ``family`` tests). Solved exactly on the noncentral t (:func:`paired_t_power`); for large
    ``n`` it tends to the normal closed form ``(z_{1-a/(2 family)} + z_{power}) sd / sqrt(n)``.

    nan when ``n < 2`` or ``sd`` is not a positive finite number (no spread, no power figure).
    """
    if n < 2 or not (sd > 0.0 and math.isfinite(sd)):
        return math.nan
    if not (0.0 < power < 1.0):
        raise ValueError(f"power must lie strictly between 0 and 1, got {power!r}")
    if family < 1:
        raise ValueError(f"family must be >= 1, got {family!r}")
    a = _check_alpha(alpha) / family
    se = float(sd) / math.sqrt(n)
    hi = 1.0
    while paired_t_power(hi * se, sd, n, alpha=a) < power:
        hi *= 2.0
    from scipy.optimize import brentq

    k = brentq(lambda k: paired_t_power(k * se, sd, n, alpha=a) - power, 0.0, hi, xtol=1e-10)
    return float(k * se)


def sign_flip_test(differences: Sequence[float], *, exact_max: int = 16, draws: int = 100_000,
                   seed: int = 0) -> float:
    """Two-sided exact paired permutation (sign-flip) test of ``mean(d) = 0``.

    Under H0 each difference is symmetric about 0, so all ``2^n`` sign patterns are equally
    likely; p = share of patterns whose ``|mean|`` is at least the observed one (the observed
    pattern included). Enumerated for ``n <= exact_max``; above, ``draws`` random patterns from
    ``RandomState(seed)`` with p = (1 + hits) / (1 + draws). nan when every difference is 0.
    The smallest p it can return is :func:`min_attainable_p` (``2 / 2^n``).
    """
    d = _as_1d_finite(differences, "differences")
    n = d.shape[0]
    if n == 0 or not np.any(d != 0.0):
        return math.nan
    obs = abs(float(np.mean(d)))
    tol = 1e-12 * max(1.0, float(np.max(np.abs(d))))
    if n <= exact_max:
        signs = 1.0 - 2.0 * ((np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1)
        stats_ = np.abs(signs @ d) / n
        return float(np.mean(stats_ >= obs - tol))
    rs = np.random.RandomState(seed)
    signs = rs.choice((-1.0, 1.0), size=(draws, n))
    hits = int(np.sum(np.abs(signs @ d) / n >= obs - tol))
    return (1.0 + hits) / (1.0 + draws)


def min_attainable_p(n: int) -> float:
    """Smallest two-sided p-value of an exact sign-flip or Wilcoxon signed-rank test with ``n``
    nonzero pairs: ``2 / 2^n`` (every difference of the same sign). With 5 pairs that is 0.0625,
    so no such test can pass alpha = 0.05 at all."""
    return 2.0 / 2.0 ** int(n) if n >= 1 else math.nan


@dataclass(frozen=True)
class Testability:
    """Whether a paired comparison can be tested, and why not (``reason``, "" when testable)."""

    testable: bool
    reason: str = ""


def testability(differences: Sequence[float], *, min_pairs: int = MIN_PAIRS) -> Testability:
    """A comparison is *not testable* -- shown without p-value or marker -- when it has fewer
    than ``min_pairs`` finite pairs, or its paired differences have zero spread (identical up
    to rounding: a t-test would call a constant one-sample shift infinitely significant)."""
    d = np.asarray([x for x in differences if math.isfinite(float(x))], dtype=float)
    if d.size < min_pairs:
        return Testability(False, f"not testable: {d.size} paired replicate(s) < {min_pairs}")
    scale = float(np.max(np.abs(d)))
    sd = float(np.std(d, ddof=1))
    if sd == 0.0 or sd <= 64.0 * np.finfo(float).eps * scale:
        return Testability(False, "not testable: the paired differences have zero spread")
    return Testability(True)


# --------------------------------------------------------------------------------------
# across datasets: stratified bootstrap and probability of improvement (rliable)
# --------------------------------------------------------------------------------------
def stratified_bootstrap(
    samples: Sequence[np.ndarray],
    statistic,
    *,
    reps: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Percentile interval of ``statistic(samples)`` by the stratified bootstrap of Agarwal et
    al. (2021): each replicate resamples, with replacement, the rows (runs) *within each task*
    (``samples[i]`` is task i's array, runs along axis 0), so every task keeps its run count.
    Rows are resampled as wholes, so columns of one row (e.g. a method and its baseline on the
    same replicate) stay paired. ``statistic`` maps the list of task arrays to a number or a
    1-D array. Returns ``(point, low, high)`` as float arrays (0-d for a scalar statistic);
    draws come from ``RandomState(seed)`` (deterministic).
    """
    confidence = float(confidence)
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")
    arrays = [np.asarray(a, dtype=float) for a in samples]
    if not arrays or any(a.shape[0] < 1 for a in arrays):
        raise ValueError("stratified_bootstrap needs at least one task, each with at least one run")
    rs = np.random.RandomState(seed)
    point = np.asarray(statistic(arrays), dtype=float)
    boot = np.empty((reps,) + point.shape)
    for b in range(reps):
        boot[b] = statistic([a[rs.randint(0, a.shape[0], a.shape[0])] for a in arrays])
    q = (1.0 - confidence) / 2.0
    return point, np.quantile(boot, q, axis=0), np.quantile(boot, 1.0 - q, axis=0)


def probability_of_improvement(x: Sequence[Sequence[float]], y: Sequence[Sequence[float]]) -> float:
    """P(X > Y) of Agarwal et al. (2021): the mean over tasks m of
    ``(1 / (N K)) sum_i sum_j S(x_{m,i}, y_{m,j})`` with ``S = 1`` if ``x > y``, ``1/2`` if equal,
    ``0`` otherwise (the Mann-Whitney U statistic over ``N`` runs of X and ``K`` runs of Y on task
    m). ``x[m]``, ``y[m]``: the scores of X and Y on task m, oriented so that higher is better.
    0.5 = no tendency; 1 = X beats Y on every pair of runs of every task."""
    if len(x) != len(y) or not x:
        raise ValueError(f"x and y must hold the same number (>= 1) of tasks, got {len(x)} and {len(y)}")
    per_task = []
    for xm, ym in zip(x, y):
        a = _as_1d_finite(xm, "x")
        b = _as_1d_finite(ym, "y")
        if a.size == 0 or b.size == 0:
            raise ValueError("every task needs at least one run of x and of y")
        per_task.append(float(np.mean((a[:, None] > b[None, :]) + 0.5 * (a[:, None] == b[None, :]))))
    return float(np.mean(per_task))


# --------------------------------------------------------------------------------------
# ranks and the Friedman test
# --------------------------------------------------------------------------------------
def rank_within_datasets(scores: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """Rank the methods within each dataset (row): rank 1 = best, ties get average ranks.

    ``scores`` is ``[n_datasets, n_methods]``; returns an array of the same shape
    (Demšar 2006 Sec. 3.2.2: "in case of ties, average ranks are assigned").
    """
    arr = _as_score_matrix(scores)
    keyed = -arr if higher_is_better else arr
    return _st.rankdata(keyed, method="average", axis=1)


def average_ranks(scores: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """Average rank of each method over datasets, ``R_j = (1/N) sum_i r_i^j`` (Demšar 2006).

    ``scores`` is ``[n_datasets, n_methods]``; rank 1 = best on a dataset and ties get the
    average of the ranks they span.  Returns a float array of shape ``[n_methods]``;
    the ranks always sum to ``k (k + 1) / 2``.
    """
    return rank_within_datasets(scores, higher_is_better).mean(axis=0)


@dataclass(frozen=True)
class FriedmanResult:
    """Friedman test over ``n_datasets`` datasets and ``n_methods`` methods.

    Attributes
    ----------
    statistic, p_value:
        Friedman chi-square ``chi2_F`` and its p-value (chi-square, ``k - 1`` df).
    avg_ranks:
        Average rank of each method (rank 1 = best), in the column order of the input.
    n_datasets, n_methods:
        ``N`` and ``k``.
    iman_davenport_f, iman_davenport_p:
        Iman-Davenport statistic ``F_F`` and its p-value (F with ``k - 1`` and
        ``(k - 1)(N - 1)`` df); less conservative than ``chi2_F`` (Demšar 2006).
        ``F_F = inf``, ``p = 0.0`` when every dataset ranks the methods identically.
    """

    statistic: float
    p_value: float
    avg_ranks: tuple[float, ...]
    n_datasets: int
    n_methods: int
    iman_davenport_f: float
    iman_davenport_p: float


def friedman_test(scores: np.ndarray, higher_is_better: bool = True) -> FriedmanResult:
    """Friedman test on within-dataset ranks, as in Demšar 2006 Sec. 3.2.2.

    With ``N`` datasets, ``k`` methods and average ranks ``R_j``::

        chi2_F = 12 N / (k (k + 1)) * [ sum_j R_j^2 - k (k + 1)^2 / 4 ]      (k - 1 df)
        F_F    = (N - 1) chi2_F / (N (k - 1) - chi2_F)      (k - 1, (k - 1)(N - 1) df)

    (Friedman 1937, 1940; Iman & Davenport 1980.)  Ties get average ranks and, as in
    Demšar's formula, no tie correction is applied (``scipy.stats.friedmanchisquare``
    does apply one, so the two agree only when there are no ties).

    Raises
    ------
    ValueError
        With fewer than 2 datasets or fewer than 3 methods (the test is not defined /
        not meaningful; for two methods use :func:`paired_comparison`), or with
        non-finite scores.
    """
    arr = _as_score_matrix(scores)
    n_datasets, n_methods = arr.shape
    if n_datasets < 2:
        raise ValueError(f"the Friedman test needs at least 2 datasets (rows of scores), got {n_datasets}")
    if n_methods < 3:
        raise ValueError(
            f"the Friedman test needs at least 3 methods (columns of scores), got {n_methods}; "
            "compare two methods with paired_comparison / a Wilcoxon test instead"
        )
    ranks = average_ranks(arr, higher_is_better)
    N, k = float(n_datasets), float(n_methods)
    chi2 = 12.0 * N / (k * (k + 1.0)) * (float(np.sum(ranks**2)) - k * (k + 1.0) ** 2 / 4.0)
    chi2 = max(chi2, 0.0)  # guard against -1e-15 rounding when all ranks are equal
    p_chi2 = float(_st.chi2.sf(chi2, n_methods - 1))
    denom = N * (k - 1.0) - chi2
    df1, df2 = n_methods - 1, (n_methods - 1) * (n_datasets - 1)
    if denom <= 1e-12 * N * (k - 1.0):  # chi2 at its maximum N(k-1): perfect agreement
        f_ff, p_ff = math.inf, 0.0
    else:
        f_ff = (N - 1.0) * chi2 / denom
        p_ff = float(_st.f.sf(f_ff, df1, df2))
    return FriedmanResult(
        statistic=float(chi2),
        p_value=p_chi2,
        avg_ranks=tuple(float(r) for r in ranks),
        n_datasets=int(n_datasets),
        n_methods=int(n_methods),
        iman_davenport_f=float(f_ff),
        iman_davenport_p=p_ff,
    )


# --------------------------------------------------------------------------------------
# Nemenyi post-hoc test
# --------------------------------------------------------------------------------------
def nemenyi_q_alpha(n_methods: int, alpha: float = 0.05) -> float:
    """Critical value ``q_alpha`` of the Nemenyi test (Demšar 2006, Table 5a).

    ``q_alpha = q_{1-alpha}(k, inf) / sqrt(2)`` with ``q`` the studentized range
    quantile for ``k`` groups and infinite degrees of freedom
    (``scipy.stats.studentized_range``).  Demšar's printed table agrees to +/-0.001
    (e.g. k=4: 2.569).
    """
    alpha = _check_alpha(alpha)
    k = int(n_methods)
    if k != n_methods or k < 2:
        raise ValueError(f"n_methods must be an integer >= 2, got {n_methods!r}")
    return float(_st.studentized_range.ppf(1.0 - alpha, k, np.inf) / math.sqrt(2.0))


def nemenyi_critical_difference(n_methods: int, n_datasets: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference ``CD = q_alpha * sqrt(k (k + 1) / (6 N))`` (Demšar 2006 Sec. 3.2.2).

    Two methods perform significantly differently when their average ranks differ by at
    least ``CD``.  ``q_alpha`` comes from :func:`nemenyi_q_alpha`.  Demšar's example:
    k=4, N=14, alpha=0.05 gives CD = 2.569 * sqrt(20/84) = 1.25.
    """
    N = int(n_datasets)
    if N != n_datasets or N < 1:
        raise ValueError(f"n_datasets must be an integer >= 1, got {n_datasets!r}")
    q = nemenyi_q_alpha(n_methods, alpha)
    k = int(n_methods)
    return q * math.sqrt(k * (k + 1) / (6.0 * N))


def _sorted_ranks(avg_ranks: Mapping[str, float]) -> list[tuple[str, float]]:
    if not isinstance(avg_ranks, Mapping):
        raise ValueError(f"avg_ranks must be a mapping name -> average rank, got {type(avg_ranks).__name__}")
    items: list[tuple[str, float]] = []
    for name, r in avg_ranks.items():
        rv = float(r)
        if not math.isfinite(rv):
            raise ValueError(f"average rank of {name!r} must be finite, got {r!r}")
        items.append((str(name), rv))
    items.sort(key=lambda nr: (nr[1], nr[0]))
    return items


def nemenyi_groups(avg_ranks: Mapping[str, float], cd: float) -> list[tuple[str, ...]]:
    """Maximal groups of methods whose average ranks all differ by less than ``cd``.

    Methods are sorted by average rank (best first); each returned group is a maximal
    run of consecutive methods ``i..j`` with ``R_j - R_i < cd`` (not significantly
    different under Nemenyi, Demšar 2006 Sec. 3.2.2), of at least two methods.  These
    are the bars of :func:`cd_diagram`.
    """
    cd = float(cd)
    if not (cd >= 0.0 and math.isfinite(cd)):
        raise ValueError(f"cd must be a finite number >= 0, got {cd!r}")
    items = _sorted_ranks(avg_ranks)
    groups: list[tuple[str, ...]] = []
    last_end = -1
    for i in range(len(items)):
        j = i
        while j + 1 < len(items) and items[j + 1][1] - items[i][1] < cd:
            j += 1
        if j > i and j > last_end:
            groups.append(tuple(name for name, _ in items[i : j + 1]))
            last_end = j
    return groups


# --------------------------------------------------------------------------------------
# critical-difference diagram
# --------------------------------------------------------------------------------------
def cd_diagram(
    avg_ranks: Mapping[str, float],
    cd: float,
    path: str | Path,
    title: str = "",
) -> None:
    """Write a critical-difference diagram (Demšar 2006, Fig. 1-2) as a PNG.

    The methods are placed on an average-rank axis (rank 1 = best, on the left); the
    better half is labelled on the left, the other half on the right.  A segment of
    length ``cd`` above the axis shows the critical difference, and thick bars below it
    join the groups of methods that are not significantly different
    (:func:`nemenyi_groups`).

    The output is deterministic: identical input gives byte-identical PNGs (matplotlib's
    default style is used regardless of the user's rc settings, fixed size and dpi, no
    "Software" metadata).  Parent directories of ``path`` are created.

    Raises
    ------
    ValueError
        With fewer than two methods, non-finite ranks, or a negative / non-finite ``cd``.
    """
    items = _sorted_ranks(avg_ranks)
    if len(items) < 2:
        raise ValueError(f"a CD diagram needs at least 2 methods, got {len(items)}")
    cd = float(cd)
    if not (cd >= 0.0 and math.isfinite(cd)):
        raise ValueError(f"cd must be a finite number >= 0, got {cd!r}")
    groups = nemenyi_groups(avg_ranks, cd)

    import matplotlib.style  # lazy: keep `import mmbalance.stats` light
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = len(items)
    ranks = [r for _, r in items]
    lo = min(1, math.floor(min(ranks)))
    hi = max(k, math.ceil(max(ranks)))

    n_left = (k + 1) // 2
    left = items[:n_left]  # best first: top to bottom
    right = list(reversed(items[n_left:]))  # worst first: top to bottom

    # Layout in inches (the axes spans the whole figure with data units = inches).
    char_w = 0.075
    label_w = max(len(f"{name} ({r:.2f})") for name, r in items) * char_w + 0.35
    axis_w = max(3.5, 0.6 * (hi - lo))
    margin = 0.15
    width = 2 * (margin + label_w) + axis_w
    row_h = 0.24
    bar_h = 0.11
    top_pad = 0.35 if title else 0.1
    y_cd = top_pad + 0.25  # measured downwards from the top
    y_axis = y_cd + 0.45
    y_groups0 = y_axis + 0.22
    y_rows0 = y_groups0 + bar_h * len(groups) + 0.15
    n_rows = max(len(left), len(right))
    height = y_rows0 + row_h * n_rows + 0.1

    x0 = margin + label_w

    def xr(r: float) -> float:
        return x0 + (r - lo) / (hi - lo) * axis_w

    def y(v: float) -> float:  # from "downwards from the top" to data coordinates
        return height - v

    dpi = 150
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(width, height), dpi=dpi)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
        ax.set_xlim(0.0, width)
        ax.set_ylim(0.0, height)
        ax.set_axis_off()
        lw = 1.0
        fs = 9

        if title:
            ax.text(width / 2, y(0.08), title, ha="center", va="top", fontsize=fs + 2)

        # rank axis with ticks (integers) and minor ticks (halves)
        ax.plot([xr(lo), xr(hi)], [y(y_axis), y(y_axis)], color="black", lw=lw)
        for t in range(lo, hi + 1):
            ax.plot([xr(t), xr(t)], [y(y_axis), y(y_axis - 0.1)], color="black", lw=lw)
            ax.text(xr(t), y(y_axis - 0.13), str(t), ha="center", va="bottom", fontsize=fs)
        for t in range(lo, hi):
            ax.plot([xr(t + 0.5), xr(t + 0.5)], [y(y_axis), y(y_axis - 0.05)], color="black", lw=lw)

        # critical difference segment
        if cd > 0:
            x_end = min(xr(lo + cd), xr(hi))
            ax.plot([xr(lo), x_end], [y(y_cd), y(y_cd)], color="black", lw=lw)
            for xe in (xr(lo), x_end):
                ax.plot([xe, xe], [y(y_cd - 0.05), y(y_cd + 0.05)], color="black", lw=lw)
            ax.text(
                (xr(lo) + x_end) / 2, y(y_cd - 0.07), f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=fs
            )

        # method lines and labels
        for row, (name, r) in enumerate(left):
            yy = y(y_rows0 + row_h * row)
            ax.plot([xr(r), xr(r), x0 - 0.1], [y(y_axis), yy, yy], color="black", lw=lw)
            ax.text(x0 - 0.15, yy, f"{name} ({r:.2f})", ha="right", va="center", fontsize=fs)
        for row, (name, r) in enumerate(right):
            yy = y(y_rows0 + row_h * row)
            ax.plot([xr(r), xr(r), x0 + axis_w + 0.1], [y(y_axis), yy, yy], color="black", lw=lw)
            ax.text(x0 + axis_w + 0.15, yy, f"({r:.2f}) {name}", ha="left", va="center", fontsize=fs)

        # groups not significantly different
        rank_of = dict(items)
        for g, members in enumerate(groups):
            yy = y(y_groups0 + bar_h * g)
            r_a, r_b = rank_of[members[0]], rank_of[members[-1]]
            ax.plot([xr(r_a) - 0.05, xr(r_b) + 0.05], [yy, yy], color="black", lw=3.5, solid_capstyle="butt")

        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png", dpi=dpi, metadata={"Software": None})
