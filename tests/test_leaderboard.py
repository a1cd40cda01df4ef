"""Leaderboard: suite planning and hashing, skip/resume/failure handling, aggregation and statistics,
byte-identical report output (golden markdown), one real tiny sweep, and the submitit executor."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from mmbalance import stats
from mmbalance.config import config_hash
from mmbalance.leaderboard.execute import RUNNER_ENV, execute_run
from mmbalance.leaderboard.plan import STATUS_FILE, plan_hash_payload, plan_runs, read_state
from mmbalance.leaderboard.report import build_report, write_report
from mmbalance.leaderboard.suite import load_suite
from mmbalance.runfiles import atomic_write_json

GOLDEN = REPO / "tests" / "golden" / "leaderboard.md"
FINISHED = "2025-01-02T03:04:05Z"


def write_suite(root: Path, name: str, body: str) -> Path:
    path = root / "leaderboard" / "suites" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(body))
    return path


# ------------------------------------------------------------------------------------------ fixture runs
FIXTURE_SUITE = """\
    name = "fx"
    description = "Fixture suite of the leaderboard tests (fake run files)."
    seeds = 5
    epochs = 3
    methods = ["baseline", "alpha", "beta", "gamma", "napp", "unimodal:*"]
    sets = { "train.batch_size" = 32 }

    [datasets.mfeat]
    modalities = ["fac", "fou"]

    [datasets.mfeat-hard]
    modalities = ["zer", "mor"]

    [variants.alpha]
    method = "baseline"
    sets = { "train.lr" = 0.02 }

    [variants.beta]
    method = "baseline"
    sets = { "train.lr" = 0.005 }

    [variants.gamma]
    method = "baseline"
    sets = { "train.weight_decay" = 0.001 }

    [variants.napp]
    method = "baseline"
    sets = { "model.name" = "mlp_concat" }
"""
BASE = {"mfeat": 0.90, "mfeat-hard": 0.80}
OFFSET = {"baseline": 0.0, "alpha": 0.03, "beta": -0.01, "gamma": 0.005, "napp": 0.01,
          "unimodal:fac": -0.2, "unimodal:fou": -0.4, "unimodal:zer": -0.3, "unimodal:mor": -0.5}
NOISE = [0.004, -0.003, 0.001, 0.006, -0.002]


def fake_result(spec, acc: float, modalities: list[str]) -> dict:
    per_mod = {} if len(modalities) == 1 else {m: {"accuracy": round(acc - 0.1 * (i + 1), 6)}
                                               for i, m in enumerate(modalities)}
    return {"status": "ok", "method": spec.method, "dataset": spec.dataset, "seed": spec.seed,
            "task": "classification", "primary_metric": "accuracy", "higher_is_better": True,
            "modalities": modalities, "test": {"accuracy": acc, "loss": round(1.0 - acc, 6)},
            "val": {"accuracy": round(acc - 0.01, 6), "loss": 0.5}, "test_per_modality": per_mod,
            "timings": {"train_seconds": 1.25 + spec.seed / 10}, "world_size": 1,
            "versions": {"python": "3.11.0", "mmbalance": "0.1.0", "torch": "2.0.0"},
            "hardware": {"cpu_count": 2, "platform": "test-machine"}}


def write_status(spec, state: str, error: str | None = None) -> None:
    atomic_write_json(Path(spec.run_dir) / STATUS_FILE, {
        "suite": spec.suite, "dataset": spec.dataset, "row": spec.row, "method": spec.method, "seed": spec.seed,
        "plan_hash": spec.plan_hash, "argv": None, "state": state, "attempt": 1, "resumed": False,
        "started": FINISHED, "finished": FINISHED, "exit_code": 0 if state == "ok" else 2, "error": error,
        "wall_seconds": 1.0})


def make_fixture(root: Path):
    """Fake run files: gamma seed 3 failed on mfeat; napp n/a on mfeat-hard; everything else ok."""
    suite = load_suite(write_suite(root, "fx", FIXTURE_SUITE))
    specs = plan_runs(suite, root / "results")
    modalities = {"mfeat": ["fac", "fou"], "mfeat-hard": ["zer", "mor"]}
    for spec in specs:
        Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
        if spec.row == "gamma" and spec.dataset == "mfeat" and spec.seed == 3:
            atomic_write_json(Path(spec.run_dir) / "result.json", {"status": "failed", "error": "loss is nan at epoch 2"})
            write_status(spec, "failed", "loss is nan at epoch 2")
            continue
        if spec.row == "napp" and spec.dataset == "mfeat-hard":
            write_status(spec, "n/a", "method 'napp' does not support this model. Reason: needs a split head")
            continue
        acc = round(BASE[spec.dataset] + OFFSET[spec.row] + NOISE[(spec.seed + len(spec.row)) % 5], 6)
        mods = [spec.row.split(":", 1)[1]] if ":" in spec.row else modalities[spec.dataset]
        atomic_write_json(Path(spec.run_dir) / "result.json", fake_result(spec, acc, mods))
        write_status(spec, "ok")
    return suite, specs


# ------------------------------------------------------------------------------------------ planning
def test_plan_expands_rows_merges_sets_and_hashes(tmp_path):
    path = write_suite(tmp_path, "p", """\
        seeds = [3, 7]
        epochs = 4
        methods = ["baseline", "unimodal:*", "v"]
        sets = { "train.lr" = 0.1, "dataset.split_seed" = 1 }
        [datasets.mfeat]
        modalities = ["fac", "fou", "mor"]
        sets = { "train.lr" = 0.2 }
        [datasets.mfeat-hard]
        modalities = ["fou", "zer", "mor"]
        [variants.v]
        method = "baseline"
        sets = { "train.batch_size" = 16, "model.name" = "mlp_concat" }
        [method_sets]
        v = { "train.batch_size" = 8 }
        "v@mfeat-hard" = { "train.batch_size" = 4, "flag" = true, "views" = ["a", "b"] }
    """)
    suite = load_suite(path)
    assert suite.name == "p" and suite.seeds == [3, 7]
    specs = plan_runs(suite, tmp_path / "res", validate=True)
    rows_mfeat = [s.row for s in specs if s.dataset == "mfeat" and s.seed == 3]
    assert rows_mfeat == ["baseline", "unimodal:fac", "unimodal:fou", "unimodal:mor", "v"]
    assert len(specs) == 2 * 5 * 2
    assert [s.seed for s in specs[:10]] == [3] * 10  # seed-major: a partial sweep covers every row
    by = {(s.dataset, s.row, s.seed): s for s in specs}
    v1, v2 = by[("mfeat", "v", 3)], by[("mfeat-hard", "v", 3)]
    # precedence: suite ◄ dataset ◄ variant ◄ method_sets[row] ◄ method_sets[row@dataset]
    assert dict(v1.sets) == {"dataset.split_seed": "1", "model.name": "mlp_concat", "train.batch_size": "8",
                             "train.lr": "0.2"}
    assert dict(v2.sets) == {"dataset.split_seed": "1", "flag": "true", "model.name": "mlp_concat",
                             "train.batch_size": "4", "train.lr": "0.1", "views": "[a, b]"}
    assert v1.method == "baseline" and "--epochs" in v1.run_args()
    assert Path(v1.run_dir) == (tmp_path / "res" / "mfeat" / "v" / "seed3").resolve()
    assert Path(by[("mfeat", "unimodal:fac", 7)].run_dir).parent.name == "unimodal-fac"
    # the plan hash is config_hash over the planned arguments; any planned change changes it
    assert v1.plan_hash == config_hash(plan_hash_payload(v1))
    assert len({s.plan_hash for s in specs}) == len(specs)
    suite.epochs = 5
    assert plan_runs(suite, tmp_path / "res")[0].plan_hash != specs[0].plan_hash
    # the --set texts round-trip through the run CLI's parser
    from mmbalance.config import parse_set_items

    parsed = parse_set_items([f"{k}={v}" for k, v in v2.sets])
    assert parsed["method"] == {"flag": True, "views": ["a", "b"]} and parsed["train"]["lr"] == 0.1


def test_methods_all_is_every_registered_method_plus_unimodal_rows(tmp_path):
    from mmbalance.registry import list_methods

    suite = load_suite(REPO / "leaderboard" / "suites" / "quick.toml")
    assert suite.methods == "all" and suite.seeds == list(range(30))  # 30 replicates
    specs = plan_runs(suite, tmp_path, validate=True)
    rows = {s.row for s in specs if s.dataset == "mfeat"}
    expected = {m for m in list_methods() if m != "unimodal"} | {"unimodal:fac", "unimodal:fou", "unimodal:mor"}
    assert rows == expected
    assert {s.row for s in specs if s.dataset == "mfeat-hard"} >= {"unimodal:zer"}
    assert {s.dataset for s in specs} == {"mfeat", "mfeat-hard", "avdigits-small"}
    assert {s.row for s in specs if s.dataset == "avdigits-small"} >= {"unimodal:audio", "unimodal:image"}
    for name in ("paper", "tiny"):
        assert plan_runs(load_suite(REPO / "leaderboard" / "suites" / f"{name}.toml"), tmp_path)


def test_bad_suites_are_refused(tmp_path):
    from mmbalance.errors import ConfigError
    from mmbalance.leaderboard import main

    with pytest.raises(ConfigError, match="unknown key"):
        load_suite(write_suite(tmp_path, "bad", 'datasets = ["mfeat"]\nmethod = ["baseline"]\n'))
    with pytest.raises(ConfigError, match="replicates"):
        load_suite(write_suite(tmp_path, "bad2", 'datasets = ["mfeat"]\nseeds = 0\n'))
    assert main(["plan", str(tmp_path / "nope.toml")]) == 2
    assert main(["run", str(write_suite(tmp_path, "bad3", 'datasets = ["mfeat"]\nmethods = ["no_such"]\n')),
                 "--results-dir", str(tmp_path / "r")]) == 2


def test_skip_logic_reads_status_and_result(tmp_path):
    suite, specs = make_fixture(tmp_path)
    by = {(s.dataset, s.row, s.seed): s for s in specs}
    assert read_state(by[("mfeat", "alpha", 0)]).state == "ok"
    assert read_state(by[("mfeat", "gamma", 3)]).state == "failed"
    assert read_state(by[("mfeat-hard", "napp", 0)]).state == "n/a"
    spec = by[("mfeat", "beta", 1)]
    # a finished result of another plan (another hash) does not count: the run is stale and re-run
    status = json.loads((Path(spec.run_dir) / STATUS_FILE).read_text())
    atomic_write_json(Path(spec.run_dir) / STATUS_FILE, {**status, "plan_hash": "0" * 16})
    assert read_state(spec).state == "stale" and not read_state(spec).done
    # the sweep died after the result was written but before the status was updated: done
    atomic_write_json(Path(spec.run_dir) / STATUS_FILE, {**status, "state": "running"})
    assert read_state(spec).state == "ok"
    (Path(spec.run_dir) / "result.json").unlink()
    assert read_state(spec).state == "running"
    # execute_run does nothing for a done run
    done = by[("mfeat", "alpha", 0)]
    assert execute_run(done).state == "ok"
    assert json.loads((Path(done.run_dir) / STATUS_FILE).read_text())["finished"] == FINISHED


# ------------------------------------------------------------------------------------------ execution
FAKE_RUNNER = r'''
import json, os, signal, sys
from pathlib import Path
args = sys.argv[1:]
opt = lambda n: args[args.index(n) + 1]
run_dir, seed, resume = Path(opt("--run-dir")), int(opt("--seed")), "--resume" in args
sets = {}
for i, a in enumerate(args):
    if a == "--set":
        k, v = args[i + 1].split("=", 1)
        sets[k] = v
markers = Path(os.environ["FAKE_MARKERS"])
with open(markers, "a") as f:
    f.write(f"start {run_dir.parent.name}/{run_dir.name} resume={int(resume)}\n")
    f.write(f"env {run_dir.parent.name}/{run_dir.name} {os.environ.get('CUDA_VISIBLE_DEVICES', '-')}\n")
if os.environ.get("FAKE_KILL_AT") == f"{run_dir.parent.name}/{run_dir.name}" and not resume:
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints" / "last.pt").write_text("half")
    os.kill(os.getppid(), signal.SIGKILL)  # the sweep dies in the middle of this run
    sys.exit(137)
if resume and os.environ.get("FAKE_REFUSE_RESUME"):
    print("error: --resume: checkpoint was written for another configuration", file=sys.stderr)
    sys.exit(2)
kind = sets.get("fake", "ok")
if kind == "na":
    print("error: not applicable: method 'baseline' cannot run this fake model", file=sys.stderr)
    sys.exit(2)
run_dir.mkdir(parents=True, exist_ok=True)
if kind == "fail":
    (run_dir / "result.json").write_text(json.dumps({"status": "failed", "error": "loss is nan at epoch 1"}))
    print("error: run failed: loss is nan at epoch 1", file=sys.stderr)
    sys.exit(3)
acc = 0.8 + 0.01 * seed + float(sets.get("bonus", 0))
(run_dir / "result.json").write_text(json.dumps({
    "status": "ok", "primary_metric": "accuracy", "higher_is_better": True, "task": "classification",
    "modalities": ["fac", "fou"], "test": {"accuracy": acc}, "val": {"accuracy": acc},
    "test_per_modality": {"fac": {"accuracy": acc - 0.1}, "fou": {"accuracy": acc - 0.3}},
    "timings": {"train_seconds": 0.1}, "versions": {"python": "3"}, "hardware": {"cpu_count": 2}}))
with open(markers, "a") as f:
    f.write(f"done {run_dir.parent.name}/{run_dir.name}\n")
'''

SWEEP_SUITE = """\
    seeds = 3
    epochs = 1
    methods = ["baseline", "good", "napp", "bad"]
    [datasets.mfeat]
    modalities = ["fac", "fou"]
    [variants.good]
    method = "baseline"
    sets = { fake = "ok", bonus = 0.05 }
    [variants.napp]
    method = "baseline"
    sets = { fake = "na" }
    [variants.bad]
    method = "baseline"
    sets = { fake = "fail" }
"""


def _sweep(suite_path: Path, results: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mmbalance.leaderboard", "run", str(suite_path), "--results-dir", str(results),
           "--quiet", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_killed_sweep_resumes_without_running_anything_twice(tmp_path, monkeypatch):
    runner = tmp_path / "fake_run.py"
    runner.write_text(FAKE_RUNNER)
    markers = tmp_path / "markers.txt"
    suite_path = write_suite(tmp_path, "sweep", SWEEP_SUITE)
    results = tmp_path / "results"
    env = {**os.environ, RUNNER_ENV: f"{sys.executable} {runner}", "FAKE_MARKERS": str(markers)}
    # seed-major order: baseline/0, good/0, napp/0, bad/0, baseline/1, good/1 <- killed here
    first = _sweep(suite_path, results, {**env, "FAKE_KILL_AT": "good/seed1"}, "--workers", "1")
    assert first.returncode == -9, first.stderr
    # the restarted sweep runs in-process (its fake runs are subprocesses)
    from mmbalance.leaderboard import main

    monkeypatch.setenv(RUNNER_ENV, env[RUNNER_ENV])
    monkeypatch.setenv("FAKE_MARKERS", str(markers))
    run_args = ["run", str(suite_path), "--results-dir", str(results), "--quiet"]
    assert main(run_args + ["--workers", "2", "--build", "--out-dir", str(tmp_path / "out")]) == 1  # failures → 1
    lines = markers.read_text().splitlines()
    starts = [ln for ln in lines if ln.startswith("start")]
    dones = [ln.split()[1] for ln in lines if ln.startswith("done")]
    ok_runs = [f"{r}/seed{s}" for r in ("baseline", "good") for s in range(3)]
    assert sorted(dones) == sorted(ok_runs)  # every ok run finished exactly once
    assert starts.count("start good/seed1 resume=0") == 1 and starts.count("start good/seed1 resume=1") == 1
    assert starts.count("start baseline/seed0 resume=0") == 1
    # n/a is detected once and the row's other seeds are recorded n/a without running
    assert [s for s in starts if "napp" in s] == ["start napp/seed0 resume=0"]
    # failed runs are recorded with their error, and retried by the next sweep
    assert starts.count("start bad/seed0 resume=0") == 2
    suite = load_suite(suite_path)
    states = {(s.spec.row, s.spec.seed): s for s in map(read_state, plan_runs(suite, results))}
    assert {k for k, s in states.items() if s.state == "n/a"} == {("napp", i) for i in range(3)}
    assert "cannot run this fake model" in states[("napp", 2)].error
    assert states[("bad", 1)].state == "failed" and states[("bad", 1)].error == "loss is nan at epoch 1"
    assert json.loads((results / "mfeat" / "good" / "seed1" / STATUS_FILE).read_text())["resumed"] is True
    # a third sweep that does not retry failures runs nothing
    n_lines = len(lines)
    assert main(run_args + ["--no-retry-failed"]) == 1 and len(markers.read_text().splitlines()) == n_lines
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "| napp " in readme and "n/a" in readme and "not applicable: method 'baseline' cannot run" in readme
    assert "| bad " in readme and "failed" in readme and "bad, seeds 0, 1, 2: failed: loss is nan at epoch 1" in readme


def test_refused_resume_restarts_from_scratch_and_unstartable_runner_fails(tmp_path, monkeypatch):
    runner = tmp_path / "fake_run.py"
    runner.write_text(FAKE_RUNNER)
    monkeypatch.setenv(RUNNER_ENV, f"{sys.executable} {runner}")
    monkeypatch.setenv("FAKE_MARKERS", str(tmp_path / "markers.txt"))
    monkeypatch.setenv("FAKE_REFUSE_RESUME", "1")
    suite = load_suite(write_suite(tmp_path, "rs", SWEEP_SUITE))
    spec = plan_runs(suite, tmp_path / "results")[0]
    (Path(spec.run_dir) / "checkpoints").mkdir(parents=True)
    (Path(spec.run_dir) / "checkpoints" / "last.pt").write_text("half")
    write_status(spec, "running")
    assert execute_run(spec).state == "ok"
    starts = [ln for ln in (tmp_path / "markers.txt").read_text().splitlines() if ln.startswith("start")]
    assert starts == ["start baseline/seed0 resume=1", "start baseline/seed0 resume=0"]
    status = json.loads((Path(spec.run_dir) / STATUS_FILE).read_text())
    assert status["attempt"] == 3 and status["resumed"] is False  # attempt 1 was the "running" one
    monkeypatch.setenv(RUNNER_ENV, str(tmp_path / "no-such-program"))
    other = plan_runs(suite, tmp_path / "results")[1]
    st = execute_run(other)
    assert st.state == "failed" and "cannot start" in st.error


def test_one_gpu_per_worker_and_accelerate_command(tmp_path, monkeypatch):
    import mmbalance.leaderboard.execute as lb_execute
    from mmbalance.leaderboard.execute import build_command, run_local

    runner = tmp_path / "fake_run.py"
    runner.write_text(FAKE_RUNNER)
    monkeypatch.setenv(RUNNER_ENV, f"{sys.executable} {runner}")
    monkeypatch.setenv("FAKE_MARKERS", str(tmp_path / "markers.txt"))
    monkeypatch.setattr(lb_execute, "visible_gpus", lambda: ["3", "5"])
    suite = load_suite(write_suite(tmp_path, "gpu", SWEEP_SUITE.replace('"napp", "bad"', '"good"')))
    specs = plan_runs(suite, tmp_path / "results")
    states = run_local(specs, workers=4, progress=False)  # capped at 2 workers: one GPU each
    assert sorted(s.state for s in states) == ["ok"] * 6
    devices = [ln.split()[2] for ln in (tmp_path / "markers.txt").read_text().splitlines() if ln.startswith("env")]
    assert len(devices) == 6 and set(devices) <= {"3", "5"}
    # launcher = "accelerate": accelerate launch -m mmbalance.run with the suite's process count
    acc = load_suite(write_suite(tmp_path, "acc", SWEEP_SUITE.replace(
        "seeds = 3", 'seeds = 3\n    launcher = "accelerate"\n    num_processes = 2')))
    acc_specs = plan_runs(acc, tmp_path / "results")
    assert acc_specs[0].plan_hash != specs[0].plan_hash  # multi-process runs are other runs
    cmd = build_command(acc_specs[0], resume=True)
    i = cmd.index("-m", 2)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and cmd[i + 1] == "mmbalance.run"
    assert cmd[cmd.index("--num_processes") + 1] == "2" and "--multi_gpu" in cmd[:i]
    assert cmd[-1] == "--resume" and "--run-dir" in cmd


@pytest.mark.slow
def test_submitit_local_executor(tmp_path):
    pytest.importorskip("submitit")
    from mmbalance.leaderboard.execute import run_submitit

    runner = tmp_path / "fake_run.py"
    runner.write_text(FAKE_RUNNER)
    suite = load_suite(write_suite(tmp_path, "sub", SWEEP_SUITE.replace("seeds = 3", "seeds = 1")))
    specs = plan_runs(suite, tmp_path / "results")
    os.environ[RUNNER_ENV] = f"{sys.executable} {runner}"
    os.environ["FAKE_MARKERS"] = str(tmp_path / "markers.txt")
    try:
        states = run_submitit(specs, folder=tmp_path / "sub", cluster="local", progress=False)
    finally:
        del os.environ[RUNNER_ENV], os.environ["FAKE_MARKERS"]
    assert [s.state for s in states] == ["ok", "ok", "n/a", "failed"]


# ------------------------------------------------------------------------------------------ report
def test_statistics_match_an_independent_paired_t_test_and_holm(tmp_path):
    from scipy.stats import ttest_rel

    suite, specs = make_fixture(tmp_path)
    rep = build_report(suite, specs)
    ds = {d.name: d for d in rep.datasets}
    mf = ds["mfeat"]
    v = mf.verdict
    base = mf.rows["baseline"].test["accuracy"]
    tested = ["alpha", "beta", "gamma", "napp"]  # no `primary` list: every method row is in the family
    assert v.family == tested
    raw = []
    for row in tested:
        vals = mf.rows[row].test["accuracy"]
        seeds = sorted(set(vals) & set(base))
        raw.append(float(ttest_rel([vals[s] for s in seeds], [base[s] for s in seeds]).pvalue))
    # gamma's failed seed has no worst-case value in these fake runs: not testable, counted at p = 1 in the family
    raw[2] = 1.0
    # Holm by hand: sort ascending, multiply by m, m-1, ..., running maximum, cap at 1
    order = sorted(range(4), key=lambda i: raw[i])
    holm, run = [0.0] * 4, 0.0
    for j, i in enumerate(order):
        run = max(run, min(1.0, (4 - j) * raw[i]))
        holm[i] = run
    assert mf.rows["gamma"].comparison.n == 4  # seed 3 failed and no prior-predictor value is recorded: 4 pairs
    assert v.rows["gamma"].columns["metric"].status.startswith("not testable")
    for row, p, ph in zip(tested, raw, holm):
        col = v.rows[row].columns["metric"]
        if row == "gamma":
            assert math.isnan(col.p_adj) and col.marker == ""
            continue
        assert col.status == "tested"
        assert col.p == pytest.approx(p, rel=1e-9) and col.p_adj == pytest.approx(ph, rel=1e-9)
        assert col.marker == stats.significance_marker(ph) and mf.rows[row].marker == col.marker
    assert v.rows["alpha"].columns["metric"].marker != ""  # a consistent +0.03 over 5 seeds is significant
    assert v.rows["unimodal:fac"].columns["metric"].status == "reference"
    assert math.isnan(v.rows["unimodal:fac"].columns["metric"].p_adj)
    # power: the family's median paired sd and the planned replicates
    sds = [float(np.std([mf.rows[r].test["accuracy"][s] - base[s] for s in sorted(set(mf.rows[r].test["accuracy"]))],
                        ddof=1)) for r in tested if r != "gamma"]  # the spread of the tested rows
    pw = v.power["metric"]
    assert pw.family == 4 and pw.n == 5 and pw.sd == pytest.approx(float(np.median(sds)))
    assert pw.mde == pytest.approx(stats.mde_paired_t(pw.sd, 5, family=4))
    # across datasets: 2 datasets -> no Friedman/Nemenyi; napp has no result on mfeat-hard and is not aggregated
    assert rep.cross.friedman is None and not rep.aggregate.rank_tests_drawn
    assert [a.row for a in rep.aggregate.rows] == ["baseline", "alpha", "beta"]
    assert "napp" in rep.aggregate.excluded and "without a worst-case value" in rep.aggregate.excluded["gamma"]
    alpha = next(a for a in rep.aggregate.rows if a.row == "alpha")
    d_means = [np.mean([d.rows["alpha"].test["accuracy"][s] - d.rows["baseline"].test["accuracy"][s]
                        for s in range(5)]) for d in rep.datasets]
    assert alpha.delta == pytest.approx(np.mean(d_means)) and alpha.delta_low < alpha.delta < alpha.delta_high
    assert alpha.poi == pytest.approx(1.0)  # +0.03 beats every baseline replicate on both datasets
    out = write_report(rep, tmp_path / "out")
    assert not (tmp_path / "out" / "figures" / "cd_diagram.png").exists() and "figure:mfeat-hard" in out
    text = out["readme"].read_text()
    assert "Friedman test and Nemenyi critical difference not drawn" in text
    import csv

    with open(out["csv"]) as fh:
        rows = {(r["dataset"], r["method"]): r for r in csv.DictReader(fh)}
    a = rows[("mfeat", "alpha")]
    assert float(a["p_ttest_holm"]) == pytest.approx(holm[0]) and a["role"] == "primary"
    assert float(a["test_accuracy_mean"]) == np.mean(list(mf.rows["alpha"].test["accuracy"].values()))
    assert rows[("mfeat", "gamma")]["failed"] == "1" and rows[("mfeat-hard", "napp")]["n/a"] == "5"
    assert rows[("mfeat-hard", "napp")]["test_accuracy_mean"] == ""


def test_markdown_matches_golden_and_build_is_byte_identical(tmp_path):
    suite, specs = make_fixture(tmp_path)
    out1 = write_report(build_report(suite, specs), tmp_path / "out1")
    text = out1["readme"].read_text()
    if os.environ.get("MMBALANCE_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "regenerate with MMBALANCE_UPDATE_GOLDEN=1 after checking the diff"
    assert "| napp " in text and "n/a (" in text and "needs a split head" in text
    assert "| gamma        | primary   | 4/5 (1) (2)    |" in text and "not testable: a failed replicate" in text
    # build twice (same folder and another one): identical bytes for every file
    from mmbalance.leaderboard import main

    assert main(["build", str(suite.path), "--results-dir", str(tmp_path / "results"),
                 "--out-dir", str(tmp_path / "out2"), "--format", "markdown"]) == 0  # the site: test_site.py
    write_report(build_report(suite, specs), tmp_path / "out1")
    files = sorted(p.relative_to(tmp_path / "out1") for p in (tmp_path / "out1").rglob("*") if p.is_file())
    assert {str(f) for f in files} >= {"README.md", "details.md", "results.csv", "figures/mfeat.png"}
    for f in files:
        assert (tmp_path / "out1" / f).read_bytes() == (tmp_path / "out2" / f).read_bytes(), f


def test_tiny_suite_end_to_end(tmp_path, monkeypatch, capsys):
    """The real pipeline: tiny.toml (2 rows x mfeat x 2 seeds x 2 epochs) with 2 workers, then a re-run
    that skips everything, then the report."""
    from mmbalance.leaderboard import main

    results, out = tmp_path / "results", tmp_path / "out"
    monkeypatch.delenv(RUNNER_ENV, raising=False)
    args = ["run", "tiny", "--results-dir", str(results), "--workers", "2", "--quiet"]
    assert main(args) == 0
    suite = load_suite(REPO / "leaderboard" / "suites" / "tiny.toml")
    specs = plan_runs(suite, results)
    assert len(specs) == 4 and all(read_state(s).state == "ok" for s in specs), [read_state(s).error for s in specs]
    assert main(args + ["--build", "--out-dir", str(out)]) == 0
    assert "4 already done" in capsys.readouterr().err
    assert all(json.loads((Path(s.run_dir) / STATUS_FILE).read_text())["attempt"] == 1 for s in specs)
    readme = (out / "README.md").read_text()
    assert "| baseline " in readme and "| unimodal:fac " in readme and "Across datasets" in readme
    res = json.loads((Path(specs[0].run_dir) / "result.json").read_text())
    assert res["timings"]["epochs"] == 2 and res["num_train_samples"] == 140  # 20 per class, 70 % train


# ------------------------------------------------------------------------------------------ diagnostics
def _fake_diagnostics(row: str, seed: int, mods: list[str], poison: bool = False) -> dict:
    """Weak modality fou/mor (second) on validation: probe and share move with the row; alpha lifts them.
    ``poison``: the *test* Shapley shares name the other modality as the weaker one (and the test probes of the
    baseline favour it too) — a choice made on test would follow them."""
    lift = {"alpha": 0.05, "beta": 0.0, "gamma": -0.01, "napp": 0.0}.get(row, 0.0)
    wobble = NOISE[seed % 5]
    share = {mods[0]: 0.8 - lift - wobble, mods[-1]: 0.2 + lift + wobble} if len(mods) > 1 else {mods[0]: 1.0}
    probe = {m: {"accuracy": round(0.9 - 0.2 * i + lift + wobble, 6)} for i, m in enumerate(mods)}
    phi = {m: share[m] * 0.8 for m in mods}
    test_share = {m: (1.0 - v if poison and len(mods) > 1 else v) for m, v in share.items()}
    return {"version": 1, "probe": {"test": probe, "val": probe},
            "shapley": {"metric": "accuracy", "oriented": True,
                        "test": {"phi": phi, "share": test_share, "v": {"none": 0.1},
                                 "imbalance_index": abs(phi[mods[0]] - phi[mods[-1]]) / 0.8},
                        "val": {"share": share}},
            "permutation": {"test": {"drop": {m: 0.1 for m in mods}}},
            "dynamics_final": {"conf_ratio": {m: 1.0 for m in mods}}}


def _add_diagnostics(specs, poison: bool = False) -> None:
    for spec in specs:
        res_path = Path(spec.run_dir) / "result.json"
        if not res_path.is_file():
            continue
        res = json.loads(res_path.read_text())
        if res.get("status") != "ok":
            continue
        res["diagnostics"] = _fake_diagnostics(spec.row, spec.seed, res["modalities"], poison)
        if spec.row == "beta" and spec.dataset == "mfeat" and spec.seed == 4:  # one seed collapses
            res["test"]["accuracy"] = 0.2
        atomic_write_json(res_path, res)


def test_diagnostics_columns_holm_and_divergence(tmp_path):
    from scipy.stats import ttest_rel

    from mmbalance.leaderboard import diagnostics as lb_diag

    suite, specs = make_fixture(tmp_path)
    _add_diagnostics(specs)
    rep = build_report(suite, specs)
    mf = {d.name: d for d in rep.datasets}["mfeat"]
    dd, v = mf.diag, mf.verdict
    assert dd.weak == v.weak == "fou" and "validation" in v.weak_source  # smallest baseline validation share
    for col in ("probe", "share"):
        q = f"{col}[fou]"
        base = dd.values("baseline", q)
        rows = ["alpha", "beta", "gamma", "napp"]
        for r in rows:
            got = v.rows[r].columns[col]
            vals = dict(dd.values(r, q))
            if col == "probe" and r == "gamma":
                vals[3] = 0.1  # gamma's failed seed 3 enters the probe at the prior predictor's score
            seeds = sorted(set(vals) & set(base))
            diffs = [vals[s] - base[s] for s in seeds]
            assert got.n == len(seeds)
            assert got.delta == pytest.approx(np.mean(diffs))
            if np.std(diffs) < 1e-12:  # a constant shift (these fake probes): not testable, no p, no marker
                assert got.status.startswith("not testable") and math.isnan(got.p) and got.marker == ""
            else:
                assert got.status == "tested"
                assert got.p == pytest.approx(float(ttest_rel([vals[s] for s in seeds],
                                                              [base[s] for s in seeds]).pvalue))
        assert v.rows["unimodal:fou"].columns[col].status == "reference"  # reference rows are not tested
    assert v.rows["alpha"].columns["probe"].delta == pytest.approx(0.05)
    # divergence: beta's collapsed seed is flagged, the others are not
    flagged, _ = lb_diag.divergent_seeds(mf.rows["beta"].primary_values("accuracy"), True)
    assert flagged == [4]
    assert lb_diag.divergent_seeds(mf.rows["alpha"].primary_values("accuracy"), True)[0] == []
    out1 = write_report(rep, tmp_path / "o1")
    text = out1["readme"].read_text()
    assert "probe [fou]" in text and "φ-share [fou]" in text
    assert "Imbalance diagnostics (test)" in out1["details"].read_text()
    assert "beta: seeds diverge" in text and "seed 4 (0.2000)" in text
    assert (tmp_path / "o1" / "figures" / "mfeat_weak_probe.png").is_file()
    import csv

    with open(out1["csv"]) as fh:
        rows_csv = {(r["dataset"], r["method"]): r for r in csv.DictReader(fh)}
    a = rows_csv[("mfeat", "alpha")]
    for col in ("probe", "share"):  # alpha's fake shift is constant: not testable, the p cells stay empty
        c = v.rows["alpha"].columns[col]
        assert a[f"diag_{col}_weak_test_status"] == c.status and a[f"diag_{col}_weak_p_ttest_holm"] == ""
        assert float(a[f"diag_{col}_weak_delta"]) == c.delta
    g = rows_csv[("mfeat", "gamma")]
    assert float(g["diag_probe_weak_p_ttest_holm"]) == v.rows["gamma"].columns["probe"].p_adj
    assert rows_csv[("mfeat", "beta")]["seeds_diverge"] == "true" and rows_csv[("mfeat", "alpha")]["seeds_diverge"] == ""
    out2 = write_report(build_report(suite, specs), tmp_path / "o2")
    for k in out1:
        assert out1[k].read_bytes() == out2[k].read_bytes(), k


def test_weak_modality_never_follows_a_poisoned_test_split(tmp_path):
    """The test Shapley shares say the other modality is the weak one: m* (and the tested columns) stay those
    of the validation values; a suite's declared m* wins over both."""
    suite, specs = make_fixture(tmp_path / "clean")
    _add_diagnostics(specs)
    psuite, pspecs = make_fixture(tmp_path / "poisoned")
    _add_diagnostics(pspecs, poison=True)
    clean, poisoned = build_report(suite, specs), build_report(psuite, pspecs)
    for c, p in zip(clean.datasets, poisoned.datasets):
        assert c.verdict.weak == p.verdict.weak == c.modalities[-1]
        for row in ("alpha", "beta", "gamma"):
            a, b = c.verdict.rows[row].columns["probe"], p.verdict.rows[row].columns["probe"]
            assert a.status == b.status and a.delta == b.delta
    psuite.datasets[0].weak = "fac"
    assert build_report(psuite, pspecs).datasets[0].verdict.weak == "fac"


def test_a_failed_replicate_counts_at_the_prior_predictor_score(tmp_path):
    """gamma's seed 3 failed on mfeat; its replicate's prior predictor scores 0.1: the row's mean is the mean
    of its 4 survivors and 0.1, i.e. lower by (survivor mean − 0.1) / 5, and Δ pairs all 5 replicates."""
    suite, specs = make_fixture(tmp_path)
    _add_diagnostics(specs)
    mf = build_report(suite, specs).datasets[0]
    rv = mf.verdict.rows["gamma"]
    surv = [mf.rows["gamma"].test["accuracy"][s] for s in (0, 1, 2, 4)]
    assert rv.failed == 1 and rv.survivor_mean == pytest.approx(np.mean(surv))
    assert rv.mean == pytest.approx((sum(surv) + 0.1) / 5)
    assert rv.survivor_mean - rv.mean == pytest.approx((np.mean(surv) - 0.1) / 5)
    base = mf.rows["baseline"].test["accuracy"]
    col = rv.columns["metric"]
    assert col.n == 5 and col.delta == pytest.approx(np.mean([*(s - base[k] for s, k in zip(surv, (0, 1, 2, 4))),
                                                              0.1 - base[3]]))
    text = write_report(build_report(suite, specs), tmp_path / "o")["readme"].read_text()
    assert f"{rv.mean:.4f}" in text and f"(survivors {rv.survivor_mean:.4f})" in text
    assert "1 failed replicate(s) counted at the worst case" in text
