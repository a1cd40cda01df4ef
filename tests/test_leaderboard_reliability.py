"""Leaderboard reliability: two sweeps never run a cell twice, killing a sweep stops its runs, a build
that fails half-way keeps the previous report, from-scratch attempts keep an older finished result."""
from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_leaderboard import FAKE_RUNNER, make_fixture, write_suite

from mmbalance.leaderboard import report as lb_report
from mmbalance.leaderboard.execute import RUNNER_ENV, SWEEP_LOCK, build_command, execute_run
from mmbalance.leaderboard.plan import plan_runs
from mmbalance.leaderboard.report import build_report, write_report
from mmbalance.leaderboard.suite import load_suite
from mmbalance.locks import FolderLock

SUITE = """\
    seeds = 3
    epochs = 1
    methods = ["baseline", "good"]
    [datasets.mfeat]
    modalities = ["fac", "fou"]
    [variants.good]
    method = "baseline"
    sets = { fake = "ok", bonus = 0.05 }
"""
SLOW_RUNNER = "import time; time.sleep(float(__import__('os').environ.get('FAKE_SLEEP', '0')))\n" + FAKE_RUNNER


def _env(tmp_path: Path, runner_code: str = SLOW_RUNNER, **extra: str) -> dict[str, str]:
    runner = tmp_path / "fake_run.py"
    runner.write_text(runner_code)
    return {**os.environ, RUNNER_ENV: f"{sys.executable} {runner}", "FAKE_MARKERS": str(tmp_path / "markers.txt"),
            "PYTHONPATH": str(REPO), **extra}


def _sweep_cmd(suite_path: Path, results: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mmbalance.leaderboard", "run", str(suite_path), "--results-dir", str(results),
            "--quiet", *extra]


def test_a_cell_held_by_another_sweep_is_left_to_it(tmp_path, monkeypatch):
    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    spec = plan_runs(load_suite(write_suite(tmp_path, "s", SUITE)), tmp_path / "results")[0]
    with FolderLock(spec.run_dir, SWEEP_LOCK):
        assert execute_run(spec).state == "busy"
        assert not (tmp_path / "markers.txt").exists()  # nothing was started
    assert execute_run(spec).state == "ok"
    assert execute_run(spec).state == "ok"  # done: not run again
    starts = [ln for ln in (tmp_path / "markers.txt").read_text().splitlines() if ln.startswith("start")]
    assert starts == ["start baseline/seed0 resume=0"]


def test_two_concurrent_sweeps_run_every_cell_once(tmp_path):
    suite_path = write_suite(tmp_path, "s", SUITE)
    env = _env(tmp_path, FAKE_SLEEP="0.3")
    procs = [subprocess.Popen(_sweep_cmd(suite_path, tmp_path / "results", "--workers", "2"), cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    lines = (tmp_path / "markers.txt").read_text().splitlines()
    done = sorted(ln.split()[1] for ln in lines if ln.startswith("done"))
    assert done == sorted(f"{r}/seed{s}" for r in ("baseline", "good") for s in range(3))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state


PID_RUNNER = """
import os, sys, time
from pathlib import Path
args = sys.argv[1:]
Path(os.environ["FAKE_PIDS"]).mkdir(exist_ok=True)
(Path(os.environ["FAKE_PIDS"]) / str(os.getpid())).write_text(args[args.index("--run-dir") + 1])
time.sleep(120)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killing_a_sweep_stops_its_runs(tmp_path, sig):
    suite_path = write_suite(tmp_path, "s", SUITE)
    pids = tmp_path / "pids"
    env = _env(tmp_path, PID_RUNNER, FAKE_PIDS=str(pids))
    sweep = subprocess.Popen(_sweep_cmd(suite_path, tmp_path / "results", "--workers", "2"), cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (pids.is_dir() and len(list(pids.iterdir())) == 2):
        assert time.monotonic() < deadline and sweep.poll() is None
        time.sleep(0.05)
    children = [int(p.name) for p in pids.iterdir()]
    assert all(_alive(c) for c in children)
    sweep.send_signal(sig)
    sweep.wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(c) for c in children), "a run outlived its sweep"


def test_failed_build_keeps_the_previous_report(tmp_path, monkeypatch):
    suite, specs = make_fixture(tmp_path)
    out = tmp_path / "out"
    write_report(build_report(suite, specs), out)
    before = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}
    assert "README.md" in before and any(k.startswith("figures/") for k in before)
    real = lb_report.bar_chart
    calls = []

    def full_disk_after_one(ds, path):  # the first figure is written, then the disk is full
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(ds, path)

    monkeypatch.setattr(lb_report, "bar_chart", full_disk_after_one)
    from mmbalance.errors import RunFileWriteError

    with pytest.raises(RunFileWriteError, match="No space left on device.*unchanged"):
        write_report(build_report(suite, specs), out)
    after = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}
    assert after == before  # README, results.csv and every figure untouched; no staging folder left


def test_from_scratch_attempts_overwrite_and_keep_teachers_in_the_results_folder(tmp_path):
    spec = plan_runs(load_suite(write_suite(tmp_path, "s", SUITE)), tmp_path / "results")[0]
    fresh, resumed = build_command(spec, resume=False), build_command(spec, resume=True)
    assert "--overwrite" in fresh and "--resume" not in fresh
    assert "--resume" in resumed and "--overwrite" not in resumed
    out = fresh[fresh.index("--output-dir") + 1]
    assert Path(out) == (tmp_path / "results").resolve()  # teacher caches: RESULTS/_teachers
