"""The leaderboard's verdicts on planted data with known answers: a row better by the design's minimum
detectable difference is found at the stated power and null rows are not (at the stated rate, over many
synthetic suites); zero spread or too few replicates is "not testable"; exploratory rows get no p-value;
mixed code versions are marked or refused; replicates sample the split with the training seed."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_leaderboard import make_fixture, write_suite

from mmbalance import stats
from mmbalance.errors import ConfigError
from mmbalance.leaderboard.plan import RunSpec, RunState, plan_runs, read_state
from mmbalance.leaderboard.report import summarise
from mmbalance.leaderboard.suite import load_suite
from mmbalance.runfiles import atomic_write_json


def _states(values: dict[str, list[float]], dataset: str = "toy", val: dict[str, list[float]] | None = None
            ) -> list[RunState]:
    """In-memory ok runs: row → test accuracy per replicate (validation = test unless ``val`` says)."""
    out = []
    for row, vals in values.items():
        for r, v in enumerate(vals):
            vv = (val or {}).get(row, vals)[r]
            spec = RunSpec("toy", dataset, row, row, r, 1, (), run_dir=f"/nonexistent/{dataset}/{row}/seed{r}")
            res = {"status": "ok", "primary_metric": "accuracy", "higher_is_better": True, "task": "classification",
                   "modalities": ["a", "b"], "test": {"accuracy": float(v)}, "val": {"accuracy": float(vv)}}
            out.append(RunState(spec, "ok", {"state": "ok"}, res))
    return out


def test_a_known_margin_is_found_at_the_stated_power_and_null_rows_at_the_stated_rate():
    n, sd, family = 12, 0.01, 5  # 12 replicates; paired differences N(delta, 0.01); 5 primary rows
    mde = stats.mde_paired_t(sd, n, family=family)
    rs = np.random.RandomState(11)
    hits, false_rows, any_null, reported = 0, 0, 0, []
    sims = 300
    for _ in range(sims):
        base = 0.8 + rs.normal(0, 0.02, n)  # replicate effects shared by every row (split and seed)
        vals = {"baseline": base, "good": base + mde + rs.normal(0, sd, n)}
        for k in range(family - 1):
            vals[f"null{k}"] = base + rs.normal(0, sd, n)
        v = summarise(_states(vals), "baseline")[0].verdict
        assert v.family == ["good", "null0", "null1", "null2", "null3"] and v.power["metric"].family == family
        hits += v.rows["good"].columns["metric"].significant
        sig = [v.rows[f"null{k}"].columns["metric"].significant for k in range(family - 1)]
        false_rows += sum(sig)
        any_null += any(sig)
        reported.append(v.power["metric"].mde)
    # Holm's first step is Bonferroni at alpha/m, so power at the MDE is at least the stated 80 %
    assert hits / sims >= 0.80 - 0.06, hits / sims
    # family-wise error over the 4 null rows at most alpha = 0.05 (binomial slack for 300 suites)
    assert any_null / sims <= 0.05 + 0.035, any_null / sims
    # the reported MDE (estimated spread) is centred on the true one
    assert np.median(reported) == pytest.approx(mde, rel=0.15)


def test_zero_spread_and_two_replicates_are_not_testable_and_get_no_marker():
    # the new user's 2-seed suite: both replicates exactly one test sample (0.0025) better
    v = summarise(_states({"baseline": [0.9, 0.91], "m": [0.9025, 0.9125]}), "baseline")[0].verdict
    col = v.rows["m"].columns["metric"]
    assert col.status.startswith("not testable") and col.marker == "" and math.isnan(col.p_adj)
    v = summarise(_states({"baseline": [0.9, 0.91, 0.92, 0.93], "m": [0.9025, 0.9125, 0.9225, 0.9325]}),
                  "baseline")[0].verdict
    col = v.rows["m"].columns["metric"]
    assert "zero spread" in col.status and col.marker == "" and col.delta == pytest.approx(0.0025)


def test_exploratory_rows_get_a_ci_and_no_p_value_and_stay_out_of_the_family(tmp_path):
    suite, specs = make_fixture(tmp_path)
    suite.primary = ["alpha"]
    rep_rows = summarise([read_state(s) for s in specs], "baseline", suite)
    v = rep_rows[0].verdict
    assert v.family == ["alpha"] and v.power["metric"].family == 1
    beta = v.rows["beta"].columns["metric"]
    assert v.rows["beta"].role == "exploratory" and beta.status == "exploratory"
    assert math.isnan(beta.p) and math.isnan(beta.p_adj) and beta.marker == "" and math.isfinite(beta.ci_low)
    suite.primary = ["alpha", "alpah"]  # a typo is named, not silently dropped from the family
    assert summarise([read_state(s) for s in specs], "baseline", suite)[0].verdict.missing_primary == ["alpah"]
    # alpha alone in its family: Holm over one test is the raw p
    a = v.rows["alpha"].columns["metric"]
    assert a.p_adj == pytest.approx(a.p)


def _with_code(specs, commit_of) -> None:
    for spec in specs:
        p = Path(spec.run_dir) / "result.json"
        if not p.is_file():
            continue
        res = json.loads(p.read_text())
        if res.get("status") == "ok":
            res["code"] = commit_of(spec)
            atomic_write_json(p, res)


def test_mixed_code_versions_are_marked_and_refused_on_request(tmp_path, capsys):
    from mmbalance.leaderboard import main

    suite, specs = make_fixture(tmp_path)
    args = ["build", str(suite.path), "--results-dir", str(tmp_path / "results"), "--out-dir", str(tmp_path / "o"),
            "--format", "markdown"]
    _with_code(specs, lambda s: {"git_commit": "a" * 40, "dirty": False})
    assert main(args + ["--require-one-commit"]) == 0
    text = (tmp_path / "o" / "README.md").read_text()
    assert "MIXED CODE VERSIONS" not in text and "Code version: 1 commit(s): aaaaaaaaaa (64 runs), clean tree" in text
    # one row re-run from another commit, one run from an uncommitted tree
    _with_code(specs, lambda s: {"git_commit": ("b" if s.row == "beta" else "a") * 40,
                                 "dirty": s.row == "alpha" and s.seed == 0})
    assert main(args + ["--require-one-commit"]) == 2
    err = capsys.readouterr().err
    assert "2 commit(s)" in err and "2 run(s) from an uncommitted (dirty) tree" in err  # alpha seed 0 on both datasets
    assert (tmp_path / "o" / "README.md").read_text() == text  # refused: nothing rewritten
    assert main(args) == 0
    marked = (tmp_path / "o" / "README.md").read_text()
    assert "⚠ MIXED CODE VERSIONS" in marked and "bbbbbbbbbb (10 runs)" in marked


def test_replicates_sample_the_split_with_the_training_seed_and_tuning_uses_its_own_splits(tmp_path):
    from mmbalance.leaderboard.tune import plan_tuning

    body = """\
        replicates = 3
        methods = ["baseline", "ogm_ge"]
        [datasets.mfeat]
        modalities = ["fac", "fou"]
        split = "sampled"
        [datasets.mfeat-hard]
        modalities = ["fou", "zer"]
        [tune]
        trials = 2
        seeds = [1000, 1001, 1002]
        """
    suite = load_suite(write_suite(tmp_path, "rep", body))
    specs = plan_runs(suite, tmp_path / "r")
    for s in specs:
        sets = dict(s.sets)
        if s.dataset == "mfeat":
            assert sets["dataset.split_seed"] == str(s.seed)  # replicate r: split seed r, training seed r
        else:
            assert "dataset.split_seed" not in sets  # a fixed split
    # paired by r: the baseline and ogm_ge of replicate 1 share the split
    r1 = [dict(s.sets)["dataset.split_seed"] for s in specs if s.dataset == "mfeat" and s.seed == 1]
    assert r1 == ["1", "1"]
    trials = [s for p in plan_tuning(suite, specs, tmp_path / "r") for s in p.all_specs if s.dataset == "mfeat"]
    assert {(s.seed, dict(s.sets)["dataset.split_seed"]) for s in trials} == {(1000, "1000"), (1001, "1001"),
                                                                              (1002, "1002")}
    with pytest.raises(ConfigError, match="split_seed"):
        load_suite(write_suite(tmp_path, "bad", body.replace('split = "sampled"',
                                                             'split = "sampled"\nsets = {"dataset.split_seed" = 3}')))
    with pytest.raises(ConfigError, match="weak"):
        load_suite(write_suite(tmp_path, "bad2", body.replace('split = "sampled"', 'weak = "zer"')))


def test_parts_are_disjoint_and_cover_the_plan():
    from mmbalance.errors import MMBalanceError
    from mmbalance.leaderboard.cli import part_of

    plan = list(range(23))
    parts = [part_of(plan, f"{i}/4") for i in range(1, 5)]
    assert sorted(x for p in parts for x in p) == plan and parts[0] == [0, 4, 8, 12, 16, 20]
    assert part_of(plan, None) == plan
    for bad in ("0/4", "5/4", "x", "1/0"):
        with pytest.raises(MMBalanceError, match="--part"):
            part_of(plan, bad)


def test_the_quick_suite_is_pre_registered_and_powered_by_design():
    """quick.toml: sampled splits, declared weak modalities, a primary family of registered methods, tuning seeds
    disjoint from every dataset's replicates, and the replicates its comment derives from the sampled-split pilot
    spreads (mfeat-hard fused sd 0.0119, avdigits-small fused sd 0.0234 and probe sd 0.0422)."""
    from mmbalance.leaderboard.plan import expand_all_methods

    suite = load_suite("quick")
    assert all(d.split == "sampled" and d.weak in d.modalities for d in suite.datasets)
    assert set(suite.primary) <= set(expand_all_methods()) and len(suite.primary) == 12
    assert len(suite.tune.seeds) >= 3 and not set(suite.tune.seeds) & set(suite.all_replicates())
    n_hard, n_av = len(suite.replicates_for("mfeat-hard")), len(suite.replicates_for("avdigits-small"))
    assert stats.mde_paired_t(0.0119, n_hard, family=12) <= 0.0100
    assert stats.mde_paired_t(0.0234, n_av, family=12) <= 0.0100
    assert stats.mde_paired_t(0.0422, n_av, family=12) <= 0.0300
    # the powered rows run every replicate, exploratory rows a prefix of at least 20 (a usable interval)
    assert suite.row_replicates("avdigits-small", "cggm") == list(range(n_av))
    assert suite.row_replicates("avdigits-small", "baseline") == list(range(n_av))
    assert suite.row_replicates("avdigits-small", "mbsd") == list(range(20))


def test_without_diagnostics_the_weak_modality_is_the_weaker_unimodal_row_on_validation():
    # test says unimodal:b is weaker, validation says unimodal:a: validation decides
    vals = {"baseline": [0.9] * 3, "unimodal:a": [0.8, 0.81, 0.82], "unimodal:b": [0.6, 0.61, 0.62]}
    val = {"unimodal:a": [0.5, 0.5, 0.5], "unimodal:b": [0.7, 0.7, 0.7]}
    v = summarise(_states(vals, val=val), "baseline")[0].verdict
    assert v.weak == "a" and "unimodal" in v.weak_source


def test_datasets_and_exploratory_rows_plan_their_own_replicates(tmp_path):
    """A dataset may need more replicates than the suite's (a noisier paired spread), and exploratory rows may run a
    prefix of them: the baseline and the primary family run all of their dataset's, an exploratory row its first k
    (still paired by r, still on split seed r), runs come replicate-major, and the power figure counts the dataset's
    replicates, not the suite's."""
    body = """\
        replicates = 3
        exploratory_replicates = 2
        primary = ["ogm_ge"]
        methods = ["baseline", "ogm_ge", "cggm"]
        [datasets.mfeat]
        modalities = ["fac", "fou"]
        split = "sampled"
        replicates = 5
        [datasets.mfeat-hard]
        modalities = ["fou", "zer"]
        """
    suite = load_suite(write_suite(tmp_path, "reps", body))
    specs = plan_runs(suite, tmp_path / "r")
    planned: dict[tuple[str, str], list[int]] = {}
    for s in specs:
        planned.setdefault((s.dataset, s.row), []).append(s.seed)
    assert planned == {("mfeat", "baseline"): [0, 1, 2, 3, 4], ("mfeat", "ogm_ge"): [0, 1, 2, 3, 4],
                       ("mfeat", "cggm"): [0, 1], ("mfeat-hard", "baseline"): [0, 1, 2],
                       ("mfeat-hard", "ogm_ge"): [0, 1, 2], ("mfeat-hard", "cggm"): [0, 1]}
    assert [s.seed for s in specs] == sorted(s.seed for s in specs)  # replicate-major: a cut run leaves prefixes
    assert all(dict(s.sets)["dataset.split_seed"] == str(s.seed) for s in specs if s.dataset == "mfeat")
    assert "mfeat: 5 (r = 0, 1, 2, 3, 4)" in suite.replicates_text()
    assert "exploratory rows: the first 2" in suite.replicates_text()
    # a tuning seed that is a replicate of one dataset only is still refused
    with pytest.raises(ConfigError, match=r"tune.seeds: \[4\]"):
        load_suite(write_suite(tmp_path, "bad", body + "[tune]\nseeds = [4, 1000]\n"))
    with pytest.raises(ConfigError, match="mfeat-hard: 3 replicate"):
        load_suite(write_suite(tmp_path, "bad2", body.replace("exploratory_replicates = 2",
                                                              "exploratory_replicates = 4")))
    with pytest.raises(ConfigError, match="distinct"):
        load_suite(write_suite(tmp_path, "bad3", body.replace("replicates = 5", "replicates = [0, 1, 1]")))
    # the power figure of a dataset uses its own planned replicates (6 here, the suite has 3)
    toy = load_suite(write_suite(tmp_path, "toy", """\
        replicates = 3
        primary = ["alpha"]
        methods = ["baseline", "alpha"]
        [datasets.toy]
        modalities = ["a", "b"]
        weak = "a"
        replicates = 6
        """))
    rng = np.random.default_rng(0)
    base = list(0.8 + 0.01 * rng.standard_normal(6))
    states = _states({"baseline": base, "alpha": [b + 0.02 + 0.005 * rng.standard_normal() for b in base]})
    power = summarise(states, "baseline", toy)[0].verdict.power["metric"]
    assert power.n == 6 and power.sign_flip_min_p == pytest.approx(2 / 2 ** 6)


def test_the_cross_dataset_aggregate_uses_exactly_the_replicates_every_row_shares():
    """Exploratory rows run a prefix of their dataset's replicates; the aggregate must compare every row on that
    shared prefix (pairs kept), not the baseline's mean over all its replicates against a row's prefix."""
    from mmbalance.leaderboard.verdict import analyse_across

    verdicts = []
    # powered rows: 6 replicates; the exploratory row: the first 3. Replicates 3–5 of the baseline and of the
    # primary row are far off, so any use of them moves the aggregate visibly.
    data = {
        "d1": {"baseline": [0.80, 0.82, 0.81, 0.10, 0.10, 0.10], "p": [0.83, 0.84, 0.85, 0.99, 0.99, 0.99],
               "x": [0.81, 0.83, 0.80]},
        "d2": {"baseline": [0.60, 0.62, 0.64, 0.95, 0.95, 0.95], "p": [0.61, 0.60, 0.66, 0.20, 0.20, 0.20],
               "x": [0.70, 0.72, 0.74]},
    }
    for name, vals in data.items():
        verdicts.append(summarise(_states(vals, dataset=name), "baseline")[0].verdict)
    agg = analyse_across(verdicts, "baseline")
    got = {a.row: a for a in agg.rows}
    assert set(got) == {"baseline", "p", "x"}
    # hand-computed on replicates 0–2 only: d1 p: (0.84 - 0.81) = +0.03, x: (0.8133.. - 0.81) = +0.00333..;
    # d2 p: (0.6233.. - 0.62) = +0.00333.., x: (0.72 - 0.62) = +0.10
    assert got["p"].delta == pytest.approx((0.03 + 0.01 / 3) / 2)
    assert got["x"].delta == pytest.approx((0.01 / 3 + 0.10) / 2)
    assert got["baseline"].delta == pytest.approx(0.0)
    # P(row > baseline) on the prefix: d1 p: every p value (0.83–0.85) beats every baseline one (0.80–0.82) → 1;
    # d2 p vs baseline {0.60, 0.62, 0.64}: 0.61 → 1/3, 0.60 → 1/6 (one tie), 0.66 → 1 → mean 0.5; average 0.75
    assert got["p"].poi == pytest.approx(0.75)
