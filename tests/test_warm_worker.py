"""The leaderboard's warm workers: start-up once per worker, one forked process per run.

What they must keep from one-process-per-run: the same run files and numbers, isolation between runs (globals,
RNG, default dtype), failure containment (a crash, an exit code or a SIGKILL ends that run only), SIGTERM from
a stopped sweep reaching the run, and a dead worker being replaced."""
from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from mmbalance.leaderboard import execute
from mmbalance.leaderboard.execute import WarmWorker

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="warm workers need fork + prctl")

MODULE = [sys.executable, "-m", "mmbalance.run"]


@pytest.fixture()
def targets(tmp_path: Path) -> str:
    """Fake run bodies the worker can run instead of ``mmbalance.run.main``."""
    f = tmp_path / "fake_runs.py"
    f.write_text(textwrap.dedent('''
        import json, os, sys, time
        import torch
        import mmbalance.registry as registry

        def report(argv):
            out = {"pid": os.getpid(), "dtype": str(torch.get_default_dtype()),
                   "rand": torch.rand(1).item(), "leak": getattr(registry, "_LEAK", None),
                   "threads": torch.get_num_threads(), "env": os.environ.get("FAKE_ENV"), "argv": argv}
            print(json.dumps(out))
            torch.set_default_dtype(torch.float64)   # globals a run changes must not reach the next run
            registry._LEAK = "from " + argv[0]
            torch.manual_seed(123)
            return int(argv[1]) if len(argv) > 1 else 0

        def crash(argv):
            raise RuntimeError("boom in the run")

        def hard_exit(argv):
            os._exit(7)

        def sleep(argv):
            import signal
            def on_term(signum, frame):
                print("got SIGTERM, checkpointing", flush=True)
                sys.exit(143)
            signal.signal(signal.SIGTERM, on_term)
            print("sleeping", flush=True)
            time.sleep(60)
            return 0
    '''))
    return str(f)


def _log(tmp_path: Path, name: str) -> Path:
    return tmp_path / f"{name}.log"


def _last_json(path: Path) -> dict:
    return json.loads([ln for ln in path.read_text().splitlines() if ln.startswith("{")][-1])


def test_runs_are_isolated_processes_forked_from_one_worker(tmp_path, targets):
    w = WarmWorker({"OMP_NUM_THREADS": "1"})
    try:
        assert w.run([*MODULE, "first"], _log(tmp_path, "a"), {"FAKE_ENV": "one"}, target=f"{targets}:report") == 0
        worker_pid = w.proc.pid
        assert w.run([*MODULE, "second", "5"], _log(tmp_path, "b"), {}, target=f"{targets}:report") == 5
        assert w.proc.pid == worker_pid  # the same warm worker served both
        a, b = _last_json(_log(tmp_path, "a")), _last_json(_log(tmp_path, "b"))
        assert a["pid"] != b["pid"] != worker_pid  # each run its own process
        # nothing the first run changed reaches the second: default dtype, module globals, the RNG stream
        assert b["dtype"] == "torch.float32" and b["leak"] is None
        assert a["rand"] == b["rand"]  # both start from the worker's untouched RNG state, not from seed 123
        assert a["env"] == "one" and b["env"] is None  # per-run environment
        assert a["threads"] == 1  # OMP_NUM_THREADS applied in the child
    finally:
        w.close()


def test_a_crashing_run_ends_only_that_run(tmp_path, targets):
    w = WarmWorker()
    try:
        assert w.run([*MODULE, "x"], _log(tmp_path, "crash"), target=f"{targets}:crash") == 1
        assert "RuntimeError: boom in the run" in _log(tmp_path, "crash").read_text()
        assert w.run([*MODULE, "x"], _log(tmp_path, "exit"), target=f"{targets}:hard_exit") == 7
        pid = w.proc.pid
        assert w.run([*MODULE, "ok"], _log(tmp_path, "ok"), target=f"{targets}:report") == 0
        assert w.proc.pid == pid
    finally:
        w.close()


def _run_in_thread(w: WarmWorker, argv, log, target):
    w.spawn()  # from the test's thread: a worker dies with the thread that started it (PR_SET_PDEATHSIG)
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("code", w.run(argv, log, target=target)))
    t.start()
    deadline = time.monotonic() + 120  # a cold worker start on a loaded 2-core machine
    while not (log.exists() and "sleeping" in log.read_text()):
        assert time.monotonic() < deadline, f"the run never started: {log.read_text() if log.exists() else ''}"
        time.sleep(0.05)
    # the forked run writes its log before the worker's reply reaches the thread that registers it as live
    while not execute._LIVE:
        assert time.monotonic() < deadline, "the started run was never registered as live"
        time.sleep(0.01)
    return t, box


def test_stop_live_runs_sends_sigterm_to_the_forked_run(tmp_path, targets):
    w = WarmWorker()
    try:
        log = _log(tmp_path, "sleep")
        t, box = _run_in_thread(w, [*MODULE, "s"], log, f"{targets}:sleep")
        execute.stop_live_runs(grace=20)
        t.join(30)
        assert box["code"] == 143 and "got SIGTERM" in log.read_text()
        assert not execute._LIVE
    finally:
        w.close()


def test_a_sigkilled_run_is_reported_killed_and_a_dead_worker_is_replaced(tmp_path, targets):
    w = WarmWorker()
    try:
        log = _log(tmp_path, "k1")
        t, box = _run_in_thread(w, [*MODULE, "s"], log, f"{targets}:sleep")
        (handle,) = list(execute._LIVE)
        os.kill(handle.pid, signal.SIGKILL)
        t.join(30)
        assert box["code"] == -signal.SIGKILL and execute._killed(box["code"])
        # the worker dies mid-run: the run is reported killed (resumable), its process does not linger
        log2 = _log(tmp_path, "k2")
        t, box = _run_in_thread(w, [*MODULE, "s"], log2, f"{targets}:sleep")
        (handle,) = list(execute._LIVE)
        old_worker = w.proc.pid
        os.kill(old_worker, signal.SIGKILL)
        t.join(30)
        assert execute._killed(box["code"])
        deadline = time.monotonic() + 20
        while True:  # the orphaned run got SIGTERM from the kernel (PR_SET_PDEATHSIG)
            try:
                os.kill(handle.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "the run outlived its worker"
            time.sleep(0.1)
        assert "got SIGTERM" in log2.read_text()
        assert w.run([*MODULE, "again"], _log(tmp_path, "k3"), target=f"{targets}:report") == 0
        assert w.proc.pid != old_worker
    finally:
        w.close()


def test_warm_and_cold_sweeps_write_the_same_results(tmp_path, monkeypatch):
    """A real (tiny) suite through warm workers and through one process per run: same numbers, same files."""
    from mmbalance.leaderboard.plan import plan_runs
    from mmbalance.leaderboard.suite import load_suite

    monkeypatch.delenv(execute.RUNNER_ENV, raising=False)
    suite = load_suite("tiny")
    out = {}
    for mode in ("warm", "cold"):
        specs = [s for s in plan_runs(suite, tmp_path / mode) if s.row == "baseline"][:2]
        states = execute.run_local(specs, workers=1, progress=False, warm_workers=mode == "warm")
        assert [s.state for s in states] == ["ok", "ok"], [s.error for s in states]
        for s in specs:
            status = json.loads((Path(s.run_dir) / "status.json").read_text())
            assert status["warm_worker"] is (mode == "warm")
            res = json.loads((Path(s.run_dir) / "result.json").read_text())
            diag = {k: v for k, v in res["diagnostics"].items() if k != "seconds"}  # timings differ
            out.setdefault(mode, []).append((s.seed, res["val"], res["test"], res["selected"], diag))
    assert out["warm"] == out["cold"]
    assert all(x[2] is not None for x in out["warm"])
