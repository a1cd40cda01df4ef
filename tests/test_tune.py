"""Equal-budget tuning: search spaces, deterministic sampling, selection rules, no test data, resumability,
equal trial counts, and bad input (a space on a non-numeric field, unknown fields, overlapping seeds)."""
from __future__ import annotations

import json
import math
import os
import sys
import textwrap
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from mmbalance.errors import ConfigError
from mmbalance.leaderboard.execute import RUNNER_ENV
from mmbalance.leaderboard.tune import TUNE_DIR, choose, noise_rule, sample_trial
from mmbalance.search import (
    Choice,
    IntUniform,
    LogUniform,
    Uniform,
    distribution_from_json,
    search_space,
    seed_hash,
)


# ------------------------------------------------------------------------------------------ distributions
def test_seed_hash_is_the_documented_sha256_prefix():
    import hashlib

    assert seed_hash("tune", 0, "mfeat", "ogm_ge", 1) == int(
        hashlib.sha256(b"tune|0|mfeat|ogm_ge|1").hexdigest()[:8], 16)


def test_samples_lie_in_their_space_and_cover_it():
    rs = np.random.RandomState(0)
    lu, u, iu, ch = LogUniform(0.03, 1.0), Uniform(1.0, 1.6), IntUniform(2, 10), Choice((3, 5, 10))
    draws = {d: [d.sample(rs) for _ in range(2000)] for d in (lu, u, iu, ch)}
    for d, xs in draws.items():
        assert all(d.contains(x) for x in xs), d
    mid = 0.5 * (math.log(0.03) + math.log(1.0))
    med = float(np.median(np.log(draws[lu])))
    assert abs(med - mid) < 0.05 * abs(mid)
    assert set(draws[iu]) == set(range(2, 11))  # inclusive bounds
    assert set(draws[ch]) == {3, 5, 10}
    for d in (lu, u, iu, ch):
        assert distribution_from_json(d.to_json()) == d


def test_trial_zero_is_the_defaults_and_trials_are_prefix_stable():
    from mmbalance.leaderboard.tune import TuneConfig

    tune = TuneConfig(trials=4)
    space = {"alpha": LogUniform(0.03, 1.0), "train.lr": LogUniform(0.0025, 0.04)}
    assert sample_trial(space, tune, "mfeat", "ogm_ge", 0) == {}
    # independent oracle: one RandomState per trial, fields drawn in sorted name order
    rs = np.random.RandomState(seed_hash("tune", 0, "mfeat", "ogm_ge", 1))
    alpha = math.exp(rs.uniform(math.log(0.03), math.log(1.0)))
    lr = math.exp(rs.uniform(math.log(0.0025), math.log(0.04)))
    got = sample_trial(space, tune, "mfeat", "ogm_ge", 1)
    assert got == {"alpha": alpha, "train.lr": lr}
    # another row or dataset draws other values
    assert sample_trial(space, tune, "mfeat-hard", "ogm_ge", 1) != got
    assert sample_trial(space, tune, "mfeat", "agm", 1) != got


# ------------------------------------------------------------------------------------------ spaces
def _all_method_classes():
    from mmbalance.registry import METHODS, list_methods

    return sorted({(n, METHODS.get(n).factory) for n in list_methods()}, key=lambda x: x[0])


@pytest.mark.parametrize("name,cls", _all_method_classes(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_method_space_parses_and_holds_its_defaults(name, cls):
    import typing

    from mmbalance.registry import create_method

    if getattr(cls, "accepts_name_argument", False):
        name = f"{name}:m0"
    from mmbalance.search import method_search_space

    space = method_search_space(name)
    method = create_method(name)  # registered (preset) defaults = trial 0
    hints = typing.get_type_hints(cls.hparams_cls) if space else {}
    assert set(space) <= set(search_space(cls.hparams_cls))
    for key, dist in space.items():
        assert typing.get_origin(hints[key]) is not Literal and hints[key] is not bool
        assert dist.contains(getattr(method.hp, key)), (name, key, getattr(method.hp, key), dist)
        assert distribution_from_json(dist.to_json()) == dist


def test_space_on_a_non_numeric_field_is_refused_naming_the_field():
    @dataclass
    class Bad:
        mode: Literal["a", "b"] = field(default="a", metadata={"search": Choice(("a", "b"))})

    @dataclass
    class Flag:
        on: bool = field(default=True, metadata={"search": Choice((True, False))})

    @dataclass
    class IntFloat:
        window: int = field(default=5, metadata={"search": Uniform(1.0, 9.0)})

    for cls, key in ((Bad, "mode"), (Flag, "on"), (IntFloat, "window")):
        with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{key}"):
            search_space(cls)
    assert fields(Bad)  # the dataclass itself is fine; only its space is refused


# ------------------------------------------------------------------------------------------ selection
def _t(k, state="ok", score=None, ok_seeds=1, val_loss=1.0):
    return {"k": k, "state": state, "score": score, "ok_seeds": ok_seeds, "val_loss": val_loss}


def test_selection_rules():
    assert choose([_t(0, score=0.5), _t(1, score=0.7), _t(2, score=0.6)])["k"] == 1
    # tie on score → more ok seeds → lower validation loss → lower k
    assert choose([_t(1, score=0.7, ok_seeds=1), _t(2, score=0.7, ok_seeds=2)])["k"] == 2
    assert choose([_t(2, score=0.7, val_loss=0.9), _t(1, score=0.7, val_loss=0.5)])["k"] == 1
    assert choose([_t(3, score=0.7), _t(1, score=0.7)])["k"] == 1
    # a tie with the defaults keeps the defaults (the loss tie-break never moves off them)
    assert choose([_t(0, score=0.7, val_loss=0.9), _t(1, score=0.7, val_loss=0.5)])["k"] == 0
    # failed trials are never chosen, whatever their partial score; all failed → None
    assert choose([_t(0, score=0.5), _t(1, state="failed", score=0.99)])["k"] == 0
    assert choose([_t(0, state="failed"), _t(1, state="failed")]) is None
    assert choose([_t(0, state="n/a")]) is None
    # defaults failed on a tuning seed: the best ok trial, and the recorded rule says why (not "no candidate")
    trials = [_t(0, state="failed", score=None), _t(1, score=0.6), _t(2, score=0.8), _t(3, score=0.7)]
    assert choose(trials)["k"] == 2
    rule = noise_rule(trials)
    assert rule["rule"].startswith("defaults failed") and rule["replace"] and rule["k"] == 2
    assert noise_rule([_t(0, score=0.5)]) == {"rule": "no candidate", "replace": False}


def test_tuning_note_names_the_rows_whose_defaults_failed_in_new_and_legacy_records(tmp_path):
    """The report's protocol line: one entry per rule, except 'defaults failed', which names its rows — whether
    tune.json records that rule (current) or 'no candidate' with a failed trial 0 and a choice (written before
    the rule had its name). A 'no candidate' row whose defaults were fine stays 'no candidate'."""
    from types import SimpleNamespace

    from mmbalance.leaderboard.tune import TuneConfig
    from mmbalance.leaderboard.tune_report import tuning_note

    failed0 = [{"k": 0, "state": "failed"}, {"k": 1, "state": "ok"}]
    records = {
        ("d1", "a"): {"rule": {"rule": "no candidate", "replace": False}, "trials": failed0, "chosen": {"lr": 0.1}},
        ("d1", "b"): {"rule": {"rule": "defaults failed: best ok trial", "replace": True, "k": 1},
                      "trials": failed0, "chosen": {"lr": 0.1}},
        ("d2", "c"): {"rule": {"rule": "one-SE (gain 0.02 > 1.0 se)"}, "trials": [{"k": 0, "state": "ok"}],
                      "chosen": {}},
        ("d2", "d"): {"rule": {"rule": "no candidate", "replace": False}, "trials": [{"k": 0, "state": "ok"}],
                      "chosen": {}},
    }
    for (ds, row), info in records.items():
        (tmp_path / TUNE_DIR / ds / row).mkdir(parents=True)
        (tmp_path / TUNE_DIR / ds / row / "tune.json").write_text(json.dumps(info))
    report = SimpleNamespace(datasets=[
        SimpleNamespace(name=ds, rows={r: SimpleNamespace(row=r) for (d, r) in records if d == ds}) for ds in ("d1", "d2")])
    note = tuning_note(TuneConfig(trials=8, seeds=[1000, 1001, 1002]), tmp_path, report)
    assert note == ("8 random-search trials per row on validation, 3 tuning seed(s) (1000, 1001, 1002); choice rule: "
                    "defaults failed: best ok trial (d1/a); defaults failed: best ok trial (d1/b); no candidate; one-SE")


def _landscape(rs, gains, seeds=3, split_sd=0.02, noise_sd=0.01):
    """K trials x tuning seeds: value = 0.8 + gain_k + a per-seed split effect shared by every trial + noise."""
    split = rs.normal(0, split_sd, seeds)
    trials = []
    for k, g in enumerate(gains):
        v = {str(1000 + s): 0.8 + g + split[s] + rs.normal(0, noise_sd) for s in range(seeds)}
        trials.append({"k": k, "state": "ok", "score": sum(v.values()) / seeds, "ok_seeds": seeds,
                       "val_loss": 1.0, "val_per_seed": v})
    return trials


def test_one_se_rule_keeps_the_defaults_on_a_flat_landscape_and_finds_a_real_gain():
    rs = np.random.RandomState(0)
    # flat: 8 trials with the same expected score. The rule's stated error rate for a row is 1 - Phi(1) = 0.159
    # (split over the 7 candidates); argmax alone would leave the defaults 7 times in 8.
    kept = [choose(_landscape(rs, [0.0] * 8))["k"] == 0 for _ in range(600)]
    assert np.mean(kept) >= 1 - 0.159 - 0.03, np.mean(kept)
    # exactly flat (every trial the same per-seed values): the defaults, whatever the loss tie-break says
    flat = _landscape(np.random.RandomState(1), [0.0] * 8, noise_sd=0.0)
    for t in flat[1:]:
        t["val_loss"] = 0.1
    assert choose(flat)["k"] == 0
    # a real gain of 5 noise sd on trial 3 is taken nearly always
    found = [choose(_landscape(rs, [0, 0, 0, 0.05, 0, 0, 0, 0]))["k"] == 3 for _ in range(300)]
    assert np.mean(found) >= 0.9, np.mean(found)


# ------------------------------------------------------------------------------------------ end to end
FAKE_RUNNER = r'''
import json, math, os, sys
from pathlib import Path
args = sys.argv[1:]
run_dir = Path(args[args.index("--run-dir") + 1])
seed = int(args[args.index("--seed") + 1])
sets = {}
for i, a in enumerate(args):
    if a == "--set":
        k, v = args[i + 1].split("=", 1)
        sets[k] = v
calls = Path(os.environ["FAKE_CALLS"])
no_test = sets.get("train.evaluate_test") == "false"
with open(calls, "a") as f:
    f.write(f"{run_dir}\n")
if "/_tune/" in str(run_dir) and not no_test:
    sys.exit("tuning trials must not evaluate test")
n = len(calls.read_text().splitlines())
if os.environ.get("FAKE_DIE_AT") == str(n):
    sys.exit(137)
lr = float(sets.get("train.lr", 0.01))
acc = 1.0 - abs(math.log(lr / 0.02))  # the oracle: lr nearest 0.02 wins
test = None if no_test else {"accuracy": acc - 0.01 * seed}
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "result.json").write_text(json.dumps({
    "status": "ok", "primary_metric": "accuracy", "higher_is_better": True, "task": "classification",
    "modalities": ["fac", "fou"], "val": {"accuracy": acc, "loss": 1.0}, "test": test,
    "test_per_modality": None if no_test else {"fac": test, "fou": test}, "timings": {"train_seconds": 0.1}}))
'''

SUITE = """\
    seeds = [0, 1]
    epochs = 1
    methods = ["baseline", "ogm_ge"]
    [datasets.mfeat]
    modalities = ["fac", "fou", "mor"]
    sets = { "dataset.limit_per_class" = 10 }
    [tune]
    trials = 4
    seeds = [1000, 1001]
"""


def _setup(tmp_path, monkeypatch, suite_text=SUITE):
    runner = tmp_path / "fake.py"
    runner.write_text(FAKE_RUNNER)
    suite = tmp_path / "s.toml"
    suite.write_text(textwrap.dedent(suite_text))
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv(RUNNER_ENV, f"{sys.executable} {runner}")
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    return suite, calls


def _tune(suite, results, *extra):
    from mmbalance.leaderboard import main

    return main(["tune", str(suite), "--results-dir", str(results), "--quiet", *extra])


def _tune_json(results, row):
    return (results / TUNE_DIR / "mfeat" / row / "tune.json").read_bytes()


def test_tune_is_deterministic_equal_budget_and_chosen_values_reach_the_report(tmp_path, monkeypatch):
    suite, calls = _setup(tmp_path, monkeypatch)
    a, b = tmp_path / "a", tmp_path / "b"
    assert _tune(suite, a) == 0
    assert _tune(suite, b, "--workers", "2") == 0
    for row in ("baseline", "ogm_ge"):
        assert _tune_json(a, row) == _tune_json(b, row)  # same suite → same trials and choice, any worker count
        info = json.loads(_tune_json(a, row))
        assert info["trials_planned"] == 4 and info["trials_ok"] == 4  # equal budget for every row
        assert len(info["trials"]) == 4 and info["trials"][0]["params"] == {}
        best = max(info["trials"], key=lambda t: t["score"])
        lr = best["params"].get("train.lr", 0.01)
        assert info["chosen"]["k"] == best["k"]
        assert info["chosen"]["score"] == pytest.approx(1.0 - abs(math.log(lr / 0.02)))
        for t in info["trials"][1:]:
            assert 0.01 / 4 <= t["params"]["train.lr"] <= 0.01 * 4
    # 2 rows x 4 trials x 2 tuning seeds, per folder
    assert len(calls.read_text().splitlines()) == 2 * 16
    # report runs carry the chosen values; the plan hash covers them
    from mmbalance.leaderboard.cli import _plan

    class Args:
        suite_ = None

    args = Args()
    args.suite, args.results_dir, args.datasets, args.methods, args.data_dir, args.untuned = (
        str(suite), str(a), None, None, None, False)
    _, _, _, specs = _plan(args)
    chosen = json.loads(_tune_json(a, "baseline"))["chosen"]
    base = [s for s in specs if s.row == "baseline"]
    assert all(tuple(x) in s.sets for s in base for x in chosen["sets"])
    assert all("train.evaluate_test" not in dict(s.sets) for s in specs)
    assert {s.seed for s in specs} == {0, 1}


def test_killed_tune_resumes_without_redoing_finished_trials(tmp_path, monkeypatch):
    suite, calls = _setup(tmp_path, monkeypatch)
    results = tmp_path / "r"
    monkeypatch.setenv("FAKE_DIE_AT", "4")
    assert _tune(suite, results) == 1  # the 4th run "was killed" → failed trial → exit 1
    monkeypatch.delenv("FAKE_DIE_AT")
    first = calls.read_text().splitlines()
    assert len(first) == 16
    calls.write_text("")
    assert _tune(suite, results) == 0
    again = calls.read_text().splitlines()
    assert again == [first[3]]  # only the killed run is redone
    statuses = [json.loads(p.read_text()) for p in results.glob("_tune/mfeat/*/trial*/seed*/status.json")]
    assert sorted(s["attempt"] for s in statuses) == [1] * 15 + [2]
    # raising the budget runs exactly the new trials (prefix-stable sampling)
    calls.write_text("")
    assert _tune(suite, results, "--trials", "6") == 0
    new = calls.read_text().splitlines()
    assert len(new) == 2 * 2 * 2 and all(("trial4" in p or "trial5" in p) for p in new)


def test_incomplete_tuning_stops_the_report_plan_unless_untuned(tmp_path, monkeypatch, capsys):
    from mmbalance.leaderboard import main

    suite, _ = _setup(tmp_path, monkeypatch)
    code = main(["plan", str(suite), "--results-dir", str(tmp_path / "none")])
    assert code == 2 and "tuning is incomplete" in capsys.readouterr().err


@pytest.mark.parametrize("extra,needle", [
    ("[tune]\ntrials = 2\nseeds = [0]\n", "also report seeds"),
    ("[tune]\ntrials = 2\nseeds = [1000]\n[tune.spaces]\nogm_ge = { beta = [\"log\", 0.1, 0.5] }\n", "'beta'"),
    ("[tune]\ntrials = 2\nseeds = [1000]\n[tune.spaces]\nogm_ge = { alpha = [\"log\", 0.01, 5.0] }\n", "never widen"),
    ("[tune]\ntrials = 0\n", "tune.trials"),
    ("[tune]\nsampler = \"grid\"\n", "tune.sampler"),
])
def test_bad_tune_tables_name_the_key_and_write_nothing(tmp_path, monkeypatch, capsys, extra, needle):
    base = SUITE.split("    [tune]")[0]
    suite, calls = _setup(tmp_path, monkeypatch, textwrap.dedent(base) + extra)
    results = tmp_path / "r"
    assert _tune(suite, results) == 2
    assert needle in capsys.readouterr().err
    assert not results.exists() and not calls.exists()


def test_fixed_and_searched_key_is_refused(tmp_path, monkeypatch, capsys):
    text = SUITE.replace('sets = { "dataset.limit_per_class" = 10 }',
                         'sets = { "dataset.limit_per_class" = 10, "train.lr" = 0.05 }')
    suite, calls = _setup(tmp_path, monkeypatch, text)
    assert _tune(suite, tmp_path / "r") == 2
    assert "train.lr" in capsys.readouterr().err and not calls.exists()


# ------------------------------------------------------------------------------------------ no test data
def test_evaluate_test_false_never_touches_the_test_split(tmp_path, monkeypatch):
    """A poisoned test split (NaN features, out-of-range labels) cannot change a tuning trial: the engine
    never evaluates it and the run's validation outcome equals a run with a clean test split."""
    import torch

    from mmbalance import engine
    from mmbalance.run import build_parser, resolve

    def run(poison: bool, out: Path):
        args = build_parser().parse_args(["--method", "baseline", "--dataset", "mfeat", "--epochs", "2",
                                          "--set", "dataset.limit_per_class=10", "--set",
                                          "train.evaluate_test=false", "--run-dir", str(out), "--quiet"])
        config, train_cfg, data, method, run_dir = resolve(args)
        if poison:
            for m in data.test.inputs:
                data.test.inputs[m] = torch.full_like(data.test.inputs[m], float("nan"))
            data.test.labels = torch.full_like(data.test.labels, 99)
        seen = []
        orig = engine.Trainer.evaluate

        def spy(self, split, absent=()):
            seen.append(split is data.test)
            return orig(self, split, absent)

        monkeypatch.setattr(engine.Trainer, "evaluate", spy)
        res = engine.Trainer(config, train_cfg, data, method, run_dir, quiet=True).fit()
        return res, seen

    clean, seen_clean = run(False, tmp_path / "clean")
    poisoned, seen_poisoned = run(True, tmp_path / "poisoned")
    assert not any(seen_clean) and not any(seen_poisoned)
    assert clean["test"] is None and clean["test_per_modality"] is None
    assert poisoned["val"] == clean["val"] and poisoned["selected"] == clean["selected"]
    on_disk = json.loads((tmp_path / "poisoned" / "result.json").read_text())
    assert on_disk["test"] is None
    assert os.path.exists(tmp_path / "poisoned" / "config.json")


def test_trial_only_sets_do_not_change_what_a_trial_selects(tmp_path):
    """Trials skip the diagnostics and the per-modality evaluation; that must not change the trial's outcome
    (the selected checkpoint and its validation metrics) — e.g. an evaluation that drew from the training RNG
    would. Checked on a method with its own RNG use in training (OGM-GE's noise) and on QMF (own predict)."""
    from mmbalance.leaderboard.tune import TRIAL_SETS
    from mmbalance.run import run

    assert ("train.evaluate_test", "false") in TRIAL_SETS
    for method in ("ogm_ge", "qmf"):
        out = {}
        for name, extra in (("full", []), ("trial", [x for k, v in TRIAL_SETS for x in ("--set", f"{k}={v}")])):
            run(["--method", method, "--dataset", "mfeat", "--epochs", "3", "--set", "dataset.limit_per_class=12",
                 "--run-dir", str(tmp_path / method / name), "--quiet", *extra])
            out[name] = json.loads((tmp_path / method / name / "result.json").read_text())
        assert out["trial"]["test"] is None and out["full"]["test"] is not None
        assert out["trial"]["val"] == out["full"]["val"] and out["trial"]["selected"] == out["full"]["selected"]


def test_show_space_prints_the_declared_space(capsys):
    from mmbalance.run import main

    assert main(["--method", "ogm_ge", "--show-space"]) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "['log', 0.03, 1.0]" in out and "train.lr" in out


def test_tuned_report_shows_chosen_values_and_the_defaults_table_byte_identically(tmp_path, monkeypatch):
    from mmbalance.leaderboard import main

    suite, calls = _setup(tmp_path, monkeypatch)
    results, out = tmp_path / "r", tmp_path / "out"
    assert _tune(suite, results) == 0
    assert main(["run", str(suite), "--results-dir", str(results), "--quiet"]) == 0
    run_calls = [c for c in calls.read_text().splitlines() if "/_tune/" not in c]
    chosen = {row: json.loads(_tune_json(results, row))["chosen"] for row in ("baseline", "ogm_ge")}
    # defaults' runs + tuned runs for rows whose choice is not trial 0; each 2 report seeds
    assert len(run_calls) == 2 * (2 + sum(ch["k"] != 0 for ch in chosen.values()))
    assert main(["build", str(suite), "--results-dir", str(results), "--out-dir", str(out)]) == 0
    first = {p: p.read_bytes() for p in (out / "README.md", out / "tuning.csv", out / "defaults" / "README.md")}
    assert main(["build", str(suite), "--results-dir", str(results), "--out-dir", str(out)]) == 0
    assert {p: p.read_bytes() for p in first} == first
    text = (out / "README.md").read_text()
    assert "## Tuning" in text and "4 trials per row" in text and "defaults vs tuned" not in text
    dtext = (out / "defaults" / "README.md").read_text()
    assert dtext.startswith(f"# mmbalance leaderboard: suite `{suite.stem}` — defaults table")
    assert "defaults vs tuned" in dtext and "tuned − defaults" in dtext
    assert "4/4" in text  # trials ok/planned for every row
    for row, ch in chosen.items():
        if ch["k"] == 0:
            assert f"| {row} " in text and "defaults" in text
        else:
            lr = ch["params"]["train.lr"]
            assert f"lr={lr:.3g}" in text
