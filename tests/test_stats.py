"""Tests of mmbalance.stats: hand-computed values, scipy cross-checks and Demšar 2006's numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from mmbalance import stats as S

# --------------------------------------------------------------------------------------
# paired comparison
# --------------------------------------------------------------------------------------
# d = method - baseline = [2, 2, 1, 4, 1]
METHOD = [80.0, 82.0, 78.0, 85.0, 81.0]
BASELINE = [78.0, 80.0, 77.0, 81.0, 80.0]


def _t4_cdf(x: float) -> float:
    """Closed-form CDF of Student's t with 4 degrees of freedom."""
    u = 1.0 + x * x / 4.0
    return 0.5 + 3.0 / 8.0 * x / math.sqrt(u) * (1.0 - x * x / (12.0 * u))


def test_paired_t_hand_computed():
    # mean d = 10/5 = 2; deviations 0,0,-1,2,-1 -> SS = 6; s^2 = 6/4 = 1.5
    # se = sqrt(1.5/5) = sqrt(0.3); t = 2/sqrt(0.3) = 3.6514837...
    r = S.paired_comparison(METHOD, BASELINE)
    t_hand = 2.0 / math.sqrt(0.3)
    assert r.n == 5
    assert r.mean_diff == pytest.approx(2.0)
    assert r.t_stat == pytest.approx(t_hand, rel=1e-12)
    assert t_hand == pytest.approx(3.6515, abs=1e-4)
    # two-sided p from the closed-form t_4 CDF: 2 * (1 - F(t)) = 0.02178...
    p_hand = 2.0 * (1.0 - _t4_cdf(t_hand))
    assert r.p_ttest == pytest.approx(p_hand, rel=1e-9)
    assert r.p_ttest == pytest.approx(0.0218, abs=1e-4)


def test_paired_t_matches_scipy_ttest_rel():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 10):
        base = rng.normal(0.7, 0.05, n)
        meth = base + rng.normal(0.01, 0.02, n)
        r = S.paired_comparison(meth, base)
        ref = st.ttest_rel(meth, base)
        assert r.t_stat == pytest.approx(float(ref.statistic), rel=1e-10)
        assert r.p_ttest == pytest.approx(float(ref.pvalue), rel=1e-10)
        assert r.p_wilcoxon == pytest.approx(float(st.wilcoxon(meth - base).pvalue), rel=1e-12)


def test_confidence_interval_t_quantile_formula():
    r = S.paired_comparison(METHOD, BASELINE)
    assert r.ci_low < r.mean_diff < r.ci_high
    t_crit = st.t.ppf(0.975, 4)
    assert t_crit == pytest.approx(2.776, abs=1e-3)  # textbook table value
    half = t_crit * math.sqrt(0.3)
    assert r.ci_low == pytest.approx(2.0 - half, rel=1e-12)
    assert r.ci_high == pytest.approx(2.0 + half, rel=1e-12)
    # the interval excludes 0 exactly when the two-sided t-test rejects at 5 %
    assert (r.ci_low > 0) == (r.p_ttest < 0.05)
    # other confidence levels
    r90 = S.paired_comparison(METHOD, BASELINE, confidence=0.90)
    assert r90.ci_high - r90.ci_low == pytest.approx(2 * st.t.ppf(0.95, 4) * math.sqrt(0.3))
    assert r90.ci_high < r.ci_high


def test_wilcoxon_known_small_examples():
    # d = [1..5] all positive: W- = 0, P(W- = 0) = 1/2^5, two-sided p = 2/32
    r = S.paired_comparison([1, 2, 3, 4, 5], [0, 0, 0, 0, 0])
    assert r.p_wilcoxon == pytest.approx(2 / 32)
    # d = [1, -2, 3, 4, 5]: W- = 2; subsets of {1..5} with rank sum <= 2 are {}, {1}, {2}
    # -> P(W- <= 2) = 3/32, two-sided p = 6/32
    r = S.paired_comparison([1, -2, 3, 4, 5], [0, 0, 0, 0, 0])
    assert r.p_wilcoxon == pytest.approx(6 / 32)
    # zero differences are discarded ("wilcox"): same as d = [1..5]
    r = S.paired_comparison([0, 1, 2, 3, 4, 5], [0] * 6)
    assert r.p_wilcoxon == pytest.approx(2 / 32)


def test_degenerate_cases():
    nan_fields = ("ci_low", "ci_high", "t_stat", "p_ttest")
    r0 = S.paired_comparison([], [])
    assert r0.n == 0 and math.isnan(r0.mean_diff) and math.isnan(r0.p_wilcoxon)
    assert all(math.isnan(getattr(r0, f)) for f in nan_fields)

    r1 = S.paired_comparison([0.9], [0.8])
    assert r1.n == 1 and r1.mean_diff == pytest.approx(0.1)
    assert all(math.isnan(getattr(r1, f)) for f in nan_fields)
    assert r1.p_wilcoxon == pytest.approx(1.0)

    # identical scores: no evidence either way
    rz = S.paired_comparison([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert rz.mean_diff == 0.0 and rz.ci_low == 0.0 and rz.ci_high == 0.0
    assert math.isnan(rz.t_stat) and math.isnan(rz.p_ttest) and math.isnan(rz.p_wilcoxon)

    # constant nonzero shift (up to float rounding): t = +inf, p = 0
    rs = S.paired_comparison([0.3, 0.5, 0.7], [0.2, 0.4, 0.6])
    assert rs.t_stat == math.inf and rs.p_ttest == 0.0
    assert rs.ci_low == pytest.approx(0.1) and rs.ci_high == pytest.approx(0.1)
    rn = S.paired_comparison([1.0, 2.0], [3.0, 4.0])
    assert rn.t_stat == -math.inf and rn.p_ttest == 0.0


def test_paired_comparison_errors():
    with pytest.raises(ValueError, match=r"3 method scores and 2 baseline scores"):
        S.paired_comparison([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        S.paired_comparison([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="1-D"):
        S.paired_comparison([[1.0, 2.0]], [[1.0, 2.0]])
    with pytest.raises(ValueError, match="confidence"):
        S.paired_comparison([1, 2], [0, 0], confidence=95)


def test_paired_comparison_is_frozen():
    r = S.paired_comparison(METHOD, BASELINE)
    with pytest.raises(AttributeError):
        r.n = 3  # type: ignore[misc]


# --------------------------------------------------------------------------------------
# Holm and markers
# --------------------------------------------------------------------------------------
def test_holm_textbook_example():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> max(0.06, 0.04)
    adj = S.holm_correction([0.01, 0.04, 0.03, 0.005])
    assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert isinstance(adj, list) and all(isinstance(x, float) for x in adj)


def test_holm_monotone_capped_and_nan():
    assert S.holm_correction([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert S.holm_correction([0.3, 0.4, 0.5]) == pytest.approx([0.9, 0.9, 0.9])
    assert S.holm_correction([]) == []
    assert S.holm_correction([0.02]) == pytest.approx([0.02])
    # nan stays nan and does not count: m = 2
    adj = S.holm_correction([0.01, float("nan"), 0.04])
    assert adj[0] == pytest.approx(0.02) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.04)
    assert all(math.isnan(x) for x in S.holm_correction([float("nan")] * 2))
    # ties get the same adjusted value
    assert S.holm_correction([0.03, 0.03]) == pytest.approx([0.06, 0.06])
    # monotone in the raw p-values, never below them
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 0.2, 12)
    adj = np.array(S.holm_correction(p))
    order = np.argsort(p)
    assert np.all(np.diff(adj[order]) >= 0) and np.all(adj >= p) and np.all(adj <= 1)


def test_holm_rejects_invalid_pvalues():
    with pytest.raises(ValueError, match="index 1"):
        S.holm_correction([0.1, 1.5])
    with pytest.raises(ValueError):
        S.holm_correction([-0.1])


@pytest.mark.parametrize(
    ("p", "marker"),
    [
        (0.0005, "***"),
        (0.001, "**"),
        (0.005, "**"),
        (0.01, "*"),
        (0.049, "*"),
        (0.05, ""),
        (0.5, ""),
        (float("nan"), ""),
    ],
)
def test_significance_marker(p, marker):
    assert S.significance_marker(p) == marker


def test_significance_marker_alpha_and_legend():
    assert S.significance_marker(0.02, alpha=0.01) == ""
    assert S.significance_marker(0.005, alpha=0.01) == "**"
    assert S.significance_marker(0.07, alpha=0.1) == "*"
    with pytest.raises(ValueError):
        S.significance_marker(0.01, alpha=0.0)
    for token in ("***", "0.001", "**", "0.01", "*", "0.05"):
        assert token in S.SIGNIFICANCE_LEGEND


# --------------------------------------------------------------------------------------
# ranks and Friedman
# --------------------------------------------------------------------------------------
def test_average_ranks_with_ties():
    scores = np.array([[0.9, 0.8, 0.8], [0.7, 0.9, 0.5]])
    # row 1: best 0.9 -> 1, tie of 0.8 at ranks 2,3 -> 2.5 each; row 2: [2, 1, 3]
    assert S.average_ranks(scores) == pytest.approx([1.5, 1.75, 2.75])
    np.testing.assert_allclose(S.rank_within_datasets(scores), [[1, 2.5, 2.5], [2, 1, 3]])
    # lower is better: row 1 [3, 1.5, 1.5], row 2 [2, 3, 1]
    assert S.average_ranks(scores, higher_is_better=False) == pytest.approx([2.5, 2.25, 1.25])
    r = S.average_ranks(np.random.default_rng(2).normal(size=(7, 5)))
    assert r.sum() == pytest.approx(5 * 6 / 2)


def test_average_ranks_errors():
    with pytest.raises(ValueError, match="2-D"):
        S.average_ranks(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"dataset 1, method 0"):
        S.average_ranks(np.array([[1.0, 2.0], [np.nan, 1.0]]))


def test_friedman_hand_computed_tiny_example():
    # ranks (lower score = better): [1,2,3], [1,3,2], [2,1,3] -> R = [4/3, 2, 8/3]
    # sum R^2 = 16/9 + 4 + 64/9 = 116/9; k(k+1)^2/4 = 12; 12N/(k(k+1)) = 36/12 = 3
    # chi2_F = 3 * (116/9 - 12) = 8/3;  p = chi2_2.sf(8/3) = exp(-4/3)
    # F_F = (N-1) chi2 / (N(k-1) - chi2) = 2 * 8/3 / (6 - 8/3) = 1.6 with (2, 4) df
    # p_F = (1 + 2 * 1.6 / 4)^(-4/2) = 1.8^-2   (closed-form F(2, d2) survival)
    scores = np.array([[1, 2, 3], [1, 3, 2], [2, 1, 3]], dtype=float)
    r = S.friedman_test(scores, higher_is_better=False)
    assert r.n_datasets == 3 and r.n_methods == 3
    assert r.avg_ranks == pytest.approx((4 / 3, 2.0, 8 / 3))
    assert r.statistic == pytest.approx(8 / 3)
    assert r.p_value == pytest.approx(math.exp(-4 / 3))
    assert r.iman_davenport_f == pytest.approx(1.6)
    assert r.iman_davenport_p == pytest.approx(1.8**-2)
    # higher_is_better flips the ranks but not the statistic
    r2 = S.friedman_test(scores, higher_is_better=True)
    assert r2.avg_ranks == pytest.approx((8 / 3, 2.0, 4 / 3))
    assert r2.statistic == pytest.approx(r.statistic)


def test_friedman_matches_scipy_without_ties():
    scores = np.random.default_rng(3).normal(size=(9, 4))
    r = S.friedman_test(scores)
    ref = st.friedmanchisquare(*scores.T)
    assert r.statistic == pytest.approx(float(ref.statistic), rel=1e-10)
    assert r.p_value == pytest.approx(float(ref.pvalue), rel=1e-10)


# Demšar 2006, Sec. 3.2.2 / Table 6: four C4.5 variants on 14 data sets with average ranks
# 3.143, 2.000, 2.893, 1.964 (rank sums 44, 28, 40.5, 27.5).  The rank matrix below is
# constructed to have exactly those rank sums (it is not the paper's AUC table).
DEMSAR_RANKS = np.array(
    [
        (4, 1, 2.5, 2.5),
        (4, 3, 2, 1),
        (4, 2, 1, 3),
        (4, 2, 1, 3),
        (4, 1, 2, 3),
        (3, 4, 1, 2),
        (3, 2, 4, 1),
        (3, 2, 4, 1),
        (3, 2, 4, 1),
        (3, 1, 4, 2),
        (3, 1, 4, 2),
        (2, 3, 4, 1),
        (2, 3, 4, 1),
        (2, 1, 3, 4),
    ],
    dtype=float,
)


def test_friedman_demsar_2006_example():
    r = S.friedman_test(DEMSAR_RANKS, higher_is_better=False)
    assert r.n_datasets == 14 and r.n_methods == 4
    assert np.round(r.avg_ranks, 3) == pytest.approx([3.143, 2.000, 2.893, 1.964])
    assert round(r.statistic, 2) == 9.28  # paper: chi2_F = 9.28
    assert round(r.iman_davenport_f, 2) == 3.69  # paper: F_F = 3.69, F(3, 39)
    assert r.iman_davenport_f > st.f.ppf(0.95, 3, 39)  # paper: critical value 2.85
    assert round(float(st.f.ppf(0.95, 3, 39)), 2) == 2.85
    assert r.iman_davenport_p < 0.05
    cd = S.nemenyi_critical_difference(4, 14)
    assert round(cd, 2) == 1.25  # paper: CD = 2.569 * sqrt(4*5 / (6*14)) = 1.25


def test_friedman_perfect_agreement_and_all_ties():
    scores = np.tile([0.9, 0.8, 0.7], (5, 1))
    r = S.friedman_test(scores)
    assert r.statistic == pytest.approx(5 * 2)  # maximum N(k-1)
    assert r.iman_davenport_f == math.inf and r.iman_davenport_p == 0.0
    ties = np.ones((4, 3))
    r = S.friedman_test(ties)
    assert r.statistic == pytest.approx(0.0, abs=1e-12)
    assert r.p_value == pytest.approx(1.0)
    assert r.iman_davenport_f == pytest.approx(0.0, abs=1e-12)


def test_friedman_errors():
    with pytest.raises(ValueError, match="at least 2 datasets"):
        S.friedman_test(np.array([[0.1, 0.2, 0.3]]))
    with pytest.raises(ValueError, match="at least 3 methods"):
        S.friedman_test(np.array([[0.1, 0.2], [0.3, 0.4]]))


# --------------------------------------------------------------------------------------
# Nemenyi
# --------------------------------------------------------------------------------------
# Demšar 2006, Table 5(a), q_0.05 (the printed table is accurate to +/- 0.001)
DEMSAR_Q05 = {2: 1.960, 3: 2.343, 4: 2.569, 5: 2.728, 6: 2.850, 7: 2.949, 8: 3.031, 9: 3.102, 10: 3.164}


@pytest.mark.parametrize(("k", "q"), sorted(DEMSAR_Q05.items()))
def test_nemenyi_q_alpha_against_demsar_table(k, q):
    assert S.nemenyi_q_alpha(k) == pytest.approx(q, abs=1e-3)
    n = 10
    cd = S.nemenyi_critical_difference(k, n)
    assert cd == pytest.approx(S.nemenyi_q_alpha(k) * math.sqrt(k * (k + 1) / (6 * n)), rel=1e-12)


def test_nemenyi_errors_and_alpha():
    assert S.nemenyi_q_alpha(4, alpha=0.10) == pytest.approx(2.291, abs=1e-3)  # Table 5(a), q_0.10
    with pytest.raises(ValueError):
        S.nemenyi_critical_difference(1, 10)
    with pytest.raises(ValueError):
        S.nemenyi_critical_difference(4, 0)
    with pytest.raises(ValueError):
        S.nemenyi_critical_difference(4, 10, alpha=1.5)


def test_nemenyi_groups():
    ranks = {"a": 1.0, "b": 1.5, "c": 2.3, "d": 3.9, "e": 4.1}
    assert S.nemenyi_groups(ranks, 1.25) == [("a", "b"), ("b", "c"), ("d", "e")]
    assert S.nemenyi_groups(ranks, 10.0) == [("a", "b", "c", "d", "e")]
    assert S.nemenyi_groups(ranks, 0.1) == []
    # exactly CD apart counts as significantly different
    assert S.nemenyi_groups({"x": 1.0, "y": 2.0}, 1.0) == []


# --------------------------------------------------------------------------------------
# CD diagram
# --------------------------------------------------------------------------------------
def test_cd_diagram_writes_deterministic_png(tmp_path):
    ranks = {"baseline": 3.143, "OGM-GE": 2.000, "PMR": 2.893, "AGM (ours)": 1.964}
    p1, p2 = tmp_path / "a.png", tmp_path / "sub" / "b.png"
    S.cd_diagram(ranks, 1.25, p1, title="Demšar 2006 example")
    S.cd_diagram(dict(reversed(list(ranks.items()))), 1.25, str(p2), title="Demšar 2006 example")
    b1, b2 = p1.read_bytes(), p2.read_bytes()
    assert b1[:8] == b"\x89PNG\r\n\x1a\n"
    assert b1 == b2
    assert b"Software" not in b1
    S.cd_diagram(ranks, 0.5, p2)
    assert p2.read_bytes() != b1


def test_cd_diagram_errors(tmp_path):
    with pytest.raises(ValueError, match="at least 2 methods"):
        S.cd_diagram({"a": 1.0}, 1.0, tmp_path / "x.png")
    with pytest.raises(ValueError, match="cd"):
        S.cd_diagram({"a": 1.0, "b": 2.0}, -1.0, tmp_path / "x.png")
    with pytest.raises(ValueError, match="finite"):
        S.cd_diagram({"a": 1.0, "b": float("nan")}, 1.0, tmp_path / "x.png")


# --------------------------------------------------------------------------------------
# power, exact paired test, testability, rliable aggregates
# --------------------------------------------------------------------------------------
def test_mde_matches_the_normal_closed_form_for_a_large_paired_design():
    # Known sigma (n large): MDE = (z_{1-a/(2m)} + z_{0.8}) sigma / sqrt(n), z from the closed-form inverse
    # normal values 1.959964 (a = 0.05), 0.841621 (power 0.8) and 2.935199 (a = 0.05 / 15).
    for family, z_a in ((1, 1.959964), (15, 2.935199)):
        closed = (z_a + 0.841621) * 2.0 / math.sqrt(20000)
        assert S.mde_paired_t(2.0, 20000, family=family) == pytest.approx(closed, rel=2e-3)
    # small n: larger than the normal formula (t quantiles), smaller than the t-quantile sum + 10 %
    n, sd = 6, 1.0
    approx = (st.t.ppf(0.975, n - 1) + st.t.ppf(0.8, n - 1)) * sd / math.sqrt(n)
    mde = S.mde_paired_t(sd, n)
    assert (1.959964 + 0.841621) / math.sqrt(n) < mde < 1.1 * approx
    assert math.isnan(S.mde_paired_t(0.0, 10)) and math.isnan(S.mde_paired_t(1.0, 1))


def test_mde_has_the_stated_power_in_simulated_normal_paired_designs():
    # 4000 paired designs with normal differences of mean MDE: the t-test at a/m rejects ~80 % of them.
    n, sd, m = 8, 0.02, 5
    mde = S.mde_paired_t(sd, n, family=m)
    rs = np.random.RandomState(7)
    d = rs.normal(mde, sd, size=(4000, n))
    p = st.ttest_1samp(d, 0.0, axis=1).pvalue
    assert np.mean(p < 0.05 / m) == pytest.approx(0.80, abs=0.025)
    d0 = rs.normal(0.0, sd, size=(4000, n))
    assert np.mean(st.ttest_1samp(d0, 0.0, axis=1).pvalue < 0.05 / m) < 0.02


def test_sign_flip_test_exact_values():
    import itertools

    # all five of one sign: only the observed pattern and its mirror reach |mean| = 3 -> 2/32
    assert S.sign_flip_test([1, 2, 3, 4, 5]) == pytest.approx(2 / 32)
    assert S.min_attainable_p(5) == pytest.approx(0.0625) and S.min_attainable_p(10) == pytest.approx(2 / 1024)
    d = [0.3, -0.1, 0.5, 0.2, -0.4, 0.6]
    obs = abs(sum(d))
    brute = np.mean([abs(sum(s * x for s, x in zip(signs, d))) >= obs - 1e-12
                     for signs in itertools.product((1, -1), repeat=len(d))])
    assert S.sign_flip_test(d) == pytest.approx(brute)
    assert math.isnan(S.sign_flip_test([0.0, 0.0, 0.0]))
    # Monte-Carlo branch agrees with the enumeration
    d17 = np.random.RandomState(3).normal(0.2, 1.0, 17)
    assert S.sign_flip_test(d17, exact_max=8, draws=40000) == pytest.approx(S.sign_flip_test(d17, exact_max=17),
                                                                             abs=0.01)


def test_zero_spread_or_too_few_pairs_is_not_testable():
    # the new user's 2-seed suite: both seeds one test sample (0.0025) better -> was "***, p < 0.0001"
    assert not S.testability([0.0025, 0.0025]).testable
    assert "zero spread" in S.testability([0.0025, 0.0025, 0.0025]).reason
    assert "2 paired" in S.testability([0.01, 0.02]).reason
    assert S.testability([0.01, 0.02, 0.0]).testable
    assert not S.testability([0.3 - 0.2, 0.5 - 0.4, 0.7 - 0.6]).testable  # equal up to rounding


def test_probability_of_improvement_hand_computed():
    # task 1: x = [1, 3] vs y = [2, 2]: pairs (1>2 no, 1>2 no, 3>2, 3>2) -> 0.5; task 2: 5 vs 5 tie -> 0.5
    assert S.probability_of_improvement([[1, 3], [5]], [[2, 2], [5]]) == pytest.approx(0.5)
    # task 1 all wins, task 2: x = [1, 2] vs y = [2]: 0 + 0.5 -> 0.25; mean (1 + 0.25) / 2
    assert S.probability_of_improvement([[9], [1, 2]], [[0], [2]]) == pytest.approx(0.625)


def test_stratified_bootstrap_resamples_within_tasks_and_keeps_pairs():
    rs = np.random.RandomState(0)
    a = rs.normal(size=(12, 1))
    paired = [np.hstack([a + 0.1, a]), np.hstack([a[:5] + 0.1, a[:5]])]  # column 0 - column 1 = 0.1 always

    def delta(tasks):
        return np.mean([np.mean(t[:, 0] - t[:, 1]) for t in tasks])

    point, lo, hi = S.stratified_bootstrap(paired, delta, reps=300)
    assert float(point) == pytest.approx(0.1) and float(lo) == pytest.approx(0.1) and float(hi) == pytest.approx(0.1)
    # the mean of task 1 (values 0..9) and task 2 (constant 100): only task 1 varies, task 2's size is kept
    p, lo, hi = S.stratified_bootstrap([np.arange(10.0), np.full(3, 100.0)],
                                       lambda t: np.mean(t[0]) + np.mean(t[1]), reps=2000, seed=1)
    assert float(p) == pytest.approx(104.5)
    se = np.std(np.arange(10.0)) / math.sqrt(10)
    assert float(hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.12)
