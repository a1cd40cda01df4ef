"""Executing planned runs, locally in parallel workers or as SLURM jobs through submitit; outcomes recorded in
``status.json``.

Locally on Linux, each worker slot keeps one warm worker process (:mod:`mmbalance.leaderboard.worker`) that
imports torch and the engine once and forks a fresh process per run, so the start-up (several seconds per run on
a small CPU) is paid once per worker while every run stays its own process. ``accelerate launch`` suites, the
``MMBALANCE_LEADERBOARD_RUNNER`` override, other platforms and ``MMBALANCE_WARM_WORKERS=0`` start one
``python -m mmbalance.run`` process per run instead."""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..locks import FolderBusyError, FolderLock
from ..runfiles import CHECKPOINT_DIR, RESULT_FILE, atomic_write_json
from .plan import LOG_FILE, NA_PREFIX, STATUS_FILE, RunSpec, RunState, read_json_or_none, read_state, utc_now

#: Test/debug hook: replaces ``python -m mmbalance.run`` (a shell-quoted command line).
RUNNER_ENV = "MMBALANCE_LEADERBOARD_RUNNER"
#: ``0`` turns the warm workers off (one cold ``python -m mmbalance.run`` process per run).
WARM_ENV = "MMBALANCE_WARM_WORKERS"


# ------------------------------------------------------------------------------------------ execution
def runner_command() -> list[str]:
    override = os.environ.get(RUNNER_ENV)
    return shlex.split(override) if override else [sys.executable, "-m", "mmbalance.run"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_command(spec: RunSpec, *, resume: bool, data_dir: str | None = None) -> list[str]:
    # --output-dir: shared artefacts (unimodal teacher caches) stay inside the results folder
    results_root = Path(spec.run_dir).parents[2] if len(Path(spec.run_dir).parents) > 2 else Path(spec.run_dir).parent
    args = spec.run_args() + ["--run-dir", spec.run_dir, "--output-dir", str(results_root), "--quiet"]
    if data_dir:
        args += ["--data-dir", data_dir]
    # The sweep owns the folder: a from-scratch attempt replaces what is there (a finished result of an
    # older plan is kept in previous/ by the engine until the new run finishes), except a finished result of
    # these very settings, which is kept (--skip-finished): a sweep that lost track of a run never redoes it.
    args += ["--resume"] if resume else ["--overwrite", "--skip-finished"]
    if spec.launcher and spec.launcher[0] == "accelerate":
        n = int(spec.launcher[1].split("=", 1)[1])
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n),
                  "--num_machines", "1", "--main_process_port", str(_free_port())]
        if n > 1 and "--multi_gpu" not in spec.launcher:
            launch.append("--multi_gpu")
        return launch + list(spec.launcher[2:]) + ["-m", "mmbalance.run"] + args
    return runner_command() + args


def _attempt_log(log_path: Path, attempt: int) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return ""
    marker = f"=== attempt {attempt}"
    return text[text.rfind(marker):] if marker in text else text


def _error_from_log(text: str) -> str:
    errors = [ln.strip() for ln in text.splitlines() if ln.startswith("error:")]
    if errors:
        return errors[-1][len("error:"):].strip()
    tail = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("=== attempt")]
    return tail[-1] if tail else "no output"


def _killed(exit_code: Any) -> bool:
    """Exit codes of a run stopped by a signal (Ctrl-C, kill, OOM killer), which may resume."""
    return isinstance(exit_code, int) and (exit_code < 0 or exit_code in (130, 137, 143))


#: The live run subprocesses of this sweep (stopped when the sweep itself is interrupted).
_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()
SWEEP_LOCK = ".sweep.lock"


def stop_live_runs(grace: float = 30.0) -> None:
    """SIGTERM every live run (each checkpoints at its next epoch end and exits), SIGKILL after ``grace``."""
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for p in procs:
        with contextlib.suppress(OSError):
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


def warm_workers_enabled() -> bool:
    """Warm workers need ``fork`` and ``prctl`` (Linux) and the default runner."""
    return (sys.platform.startswith("linux") and os.environ.get(WARM_ENV, "1").strip() not in ("0", "false", "no")
            and not os.environ.get(RUNNER_ENV))


class _ForkedRun:
    """The handle :func:`stop_live_runs` uses for a run forked by a warm worker (Popen-like)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.ended = threading.Event()

    def send_signal(self, sig: int) -> None:
        if not self.ended.is_set():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> None:
        if not self.ended.wait(timeout):
            raise subprocess.TimeoutExpired("warm-worker run", timeout or 0.0)


class WarmWorker:
    """One warm worker process (see :mod:`mmbalance.leaderboard.worker`); serves one run at a time.

    If the worker dies (killed, out of memory), the run it was serving is reported as killed by SIGKILL
    (resumable, like any killed run) and the next run starts a new worker."""

    MODULE_ARGV = [sys.executable, "-m", "mmbalance.run"]

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.ready = False

    def spawn(self) -> None:
        """Start the worker process (it imports in the background; :meth:`run` waits for it).

        Call it from a thread that lives as long as the worker should: the kernel's parent-death signal
        (``PR_SET_PDEATHSIG``) fires when the *thread* that started the process exits."""
        if self.proc is not None and self.proc.poll() is None:
            return
        argv = [sys.executable, "-m", "mmbalance.procs", str(os.getpid()), "SIGTERM", "--",
                sys.executable, "-m", "mmbalance.leaderboard.worker"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, bufsize=1, env={**os.environ, **self.env})
        self.ready = False

    def _start(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.spawn()
        if not self.ready:
            if self._read() is None:
                self.close()
                raise OSError("the warm leaderboard worker exited during start-up")
            self.ready = True

    def _read(self) -> dict[str, Any] | None:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        return json.loads(line) if line.strip() else None

    def serves(self, argv: list[str]) -> bool:
        return argv[:3] == self.MODULE_ARGV

    def run(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None, target: str | None = None
            ) -> int:
        """Run ``python -m mmbalance.run`` ``argv[3:]`` in a process forked from the worker; its exit code.
        ``target`` (``FILE.py:FUNCTION``) replaces ``mmbalance.run.main`` (tests)."""
        self._start()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"argv": argv[3:], "log": str(log_path), "target": target,
                                              "env": {**self.env, **(env or {})}}) + "\n")
            self.proc.stdin.flush()
            started = self._read()
        except (OSError, ValueError):
            started = None
        if started is None:
            self.close()
            raise OSError("the warm leaderboard worker died before starting the run")
        handle = _ForkedRun(int(started["pid"]))
        with _LIVE_LOCK:
            _LIVE.add(handle)
        try:
            try:
                ended = self._read()
            except (OSError, ValueError):
                ended = None
            if ended is None:  # the worker died: its child got SIGTERM from the kernel (or died with it)
                self.close()
                return -signal.SIGKILL
            return int(ended["exit_code"])
        finally:
            handle.ended.set()
            with _LIVE_LOCK:
                _LIVE.discard(handle)

    def close(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def _call(argv: list[str], **kwargs: Any) -> int:
    """Run ``argv`` to completion through :mod:`mmbalance.procs`, so that it dies with this process."""
    wrapped = [sys.executable, "-m", "mmbalance.procs", str(os.getpid()), "SIGTERM", "--", *argv]
    proc = subprocess.Popen(wrapped, **kwargs)
    with _LIVE_LOCK:
        _LIVE.add(proc)
    try:
        return proc.wait()
    finally:
        with _LIVE_LOCK:
            _LIVE.discard(proc)


#: What ``mmbalance.run`` says when another process holds the run folder's lock (see mmbalance.locks).
BUSY_TEXT = "is in use by another process"


def run_folder_busy(run_dir: Path) -> bool:
    """Whether another process holds the run folder's own lock (``RUN_DIR/.lock``, taken by ``mmbalance.run``)."""
    if not (run_dir / ".lock").exists():
        return False
    lock = FolderLock(run_dir)
    try:
        lock.acquire()
    except FolderBusyError:
        return True
    except OSError:
        return False  # cannot tell; the run itself reports it
    lock.release()
    return False


def execute_run(spec: RunSpec | dict[str, Any], *, data_dir: str | None = None, env: dict[str, str] | None = None,
                retry_failed: bool = True, worker: WarmWorker | None = None) -> RunState:
    """Run one planned run unless it is done; record its outcome in ``status.json``. Picklable for submitit.

    The run folder's sweep lock is held throughout, so two sweeps on one suite never run a cell twice:
    the second finds the cell ``busy`` and leaves it to the first."""
    if isinstance(spec, dict):
        spec = RunSpec.from_dict(spec)
    if not Path(spec.run_dir).is_dir():  # a run only the compact store holds: done without touching the disk
        stored = read_state(spec)
        if stored.done:
            return stored
    try:
        lock = FolderLock(spec.run_dir, SWEEP_LOCK, what="leaderboard run folder")
        lock.acquire()
    except FolderBusyError:
        return RunState(spec, "busy", None, None)
    try:
        return _execute_locked(spec, data_dir=data_dir, env=env, retry_failed=retry_failed, worker=worker)
    finally:
        lock.release()


def _execute_locked(spec: RunSpec, *, data_dir: str | None, env: dict[str, str] | None,
                    retry_failed: bool, worker: WarmWorker | None = None) -> RunState:
    before = read_state(spec)
    if before.done or (before.state == "failed" and not retry_failed):
        return before
    run_dir = Path(spec.run_dir)
    if run_folder_busy(run_dir):  # a run of an earlier (killed) sweep still finishing there: not ours
        return RunState(spec, "busy", before.status, before.result)
    run_dir.mkdir(parents=True, exist_ok=True)
    killed = before.state == "running" or (before.state == "failed" and _killed((before.status or {}).get("exit_code")))
    resume = killed and (run_dir / CHECKPOINT_DIR / "last.pt").is_file()
    attempt = int((before.status or {}).get("attempt", 0)) + 1 if before.state != "stale" else 1
    for _ in range(2):  # a resume refused by the engine is retried once from scratch
        argv = build_command(spec, resume=resume, data_dir=data_dir)
        warm = worker is not None and worker.serves(argv)
        status = {"suite": spec.suite, "dataset": spec.dataset, "row": spec.row, "method": spec.method,
                  "seed": spec.seed, "plan_hash": spec.plan_hash, "argv": argv, "state": "running",
                  "attempt": attempt, "resumed": resume, "started": utc_now(), "finished": None,
                  "exit_code": None, "error": None, "wall_seconds": None, "warm_worker": warm}
        atomic_write_json(run_dir / STATUS_FILE, status)
        log_path = run_dir / LOG_FILE
        with open(log_path, "a") as log:
            log.write(f"=== attempt {attempt} ({status['started']}): {shlex.join(argv)}\n")
            log.flush()
            t0 = time.perf_counter()
            try:
                code = None
                if warm:
                    assert worker is not None
                    try:
                        code = worker.run(argv, log_path, env)
                    except OSError as exc:  # no warm worker: start this run cold instead
                        log.write(f"warm worker unavailable ({exc}); starting the run as its own process\n")
                        log.flush()
                        status["warm_worker"] = False
                if code is None:
                    code = _call(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, **(env or {})})
            except OSError as exc:  # the runner (or the warm worker) could not be started at all
                log.write(f"error: cannot start {argv[0]!r}: {exc}\n")
                code = 127
        text = _attempt_log(log_path, attempt)
        result = read_json_or_none(run_dir / RESULT_FILE)
        status.update(exit_code=code, finished=utc_now(), wall_seconds=round(time.perf_counter() - t0, 3))
        if (code == 0 or _killed(code)) and result is not None and result.get("status") == "ok":
            status["state"] = "ok"  # a signal after the last epoch: the result is complete
        elif code == 2 and BUSY_TEXT in text:  # the run folder was taken between our check and the run
            if before.status:
                atomic_write_json(run_dir / STATUS_FILE, before.status)
            else:
                (run_dir / STATUS_FILE).unlink(missing_ok=True)
            return RunState(spec, "busy", before.status, before.result)
        elif code == 2 and NA_PREFIX in text:
            status["state"] = "n/a"
            status["error"] = text[text.rfind(NA_PREFIX) + len(NA_PREFIX):].strip().splitlines()[0]
        else:
            status["state"] = "failed"
            if result is not None and result.get("status") == "failed" and result.get("error"):
                status["error"] = str(result["error"])
            elif code == 0:
                status["error"] = f"exit code 0 but {RESULT_FILE} is missing or not ok"
            else:
                status["error"] = f"exit code {code}: {_error_from_log(text)}"
        atomic_write_json(run_dir / STATUS_FILE, status)
        if status["state"] == "failed" and resume and "--resume" in _error_from_log(text):
            resume, attempt = False, attempt + 1
            continue
        break
    return read_state(spec)


def mark_not_applicable(spec: RunSpec, reason: str) -> RunState:
    """Record ``n/a`` without running (another seed of the same row already proved it n/a)."""
    now = utc_now()
    atomic_write_json(Path(spec.run_dir) / STATUS_FILE, {
        "suite": spec.suite, "dataset": spec.dataset, "row": spec.row, "method": spec.method, "seed": spec.seed,
        "plan_hash": spec.plan_hash, "argv": None, "state": "n/a", "attempt": 0, "resumed": False,
        "started": now, "finished": now, "exit_code": None, "error": reason, "wall_seconds": 0.0})
    return read_state(spec)


def _worker_env(workers: int, gpus: list[str] | None) -> dict[str, str]:
    env = {"MMBALANCE_NO_PROGRESS": "1"}
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, workers)))
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return env


def visible_gpus() -> list[str]:
    """GPU ids this process may hand out (CUDA_VISIBLE_DEVICES order), empty without CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return []
    if not Path("/dev/nvidiactl").exists() and not shutil.which("nvidia-smi"):
        return []  # no NVIDIA driver: skip importing torch
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:  # pragma: no cover - broken torch install
        n = 0
    if n == 0:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in visible.split(",") if x.strip()] if visible else [str(i) for i in range(n)]
    return ids[:n]


def run_local(specs: list[RunSpec], *, workers: int = 1, data_dir: str | None = None, retry_failed: bool = True,
              per_run_gpus: int = 1, progress: bool = True, on_done: Callable[[RunState], None] | None = None,
              warm_workers: bool | None = None) -> list[RunState]:
    """Run ``specs`` in ``workers`` parallel slots (one GPU group per slot where GPUs exist).

    ``warm_workers`` (default: :func:`warm_workers_enabled`): each slot forks its runs from one warm worker
    process instead of starting ``python -m mmbalance.run`` cold per run (same runs, same files).

    A row that turns out ``n/a`` for one seed is recorded ``n/a`` for its remaining seeds without running.
    """
    import queue
    import threading
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm.auto import tqdm

    gpus = visible_gpus()
    slots: queue.Queue = queue.Queue()
    slot_gpus: list[list[str] | None]
    if gpus:
        groups = [gpus[i:i + per_run_gpus] for i in range(0, len(gpus) - per_run_gpus + 1, per_run_gpus)]
        if not groups:
            raise ConfigError(f"each run needs {per_run_gpus} GPUs (num_processes) but only {len(gpus)} are visible")
        workers = max(1, min(workers, len(groups)))
        slot_gpus = list(groups[:workers])
    else:
        slot_gpus = [None] * workers
    warm = warm_workers_enabled() if warm_workers is None else warm_workers
    pool_workers: list[WarmWorker | None] = [WarmWorker(_worker_env(workers, g)) if warm else None for g in slot_gpus]
    pending = warm and any(not read_state(s).done for s in specs)  # nothing to run: no worker start-up
    for i, w in enumerate(pool_workers):
        if w is not None and pending:
            w.spawn()  # from this thread, which outlives the sweep's runs (see WarmWorker.spawn)
        slots.put(i)
    na_reason: dict[tuple[str, str], str] = {}
    lock = threading.Lock()

    def one(spec: RunSpec) -> RunState:
        with lock:
            reason = na_reason.get(spec.key)
        if reason is not None and not read_state(spec).done:
            return mark_not_applicable(spec, reason)
        slot = slots.get()
        try:
            state = execute_run(spec, data_dir=data_dir, env=_worker_env(workers, slot_gpus[slot]),
                                retry_failed=retry_failed, worker=pool_workers[slot])
        finally:
            slots.put(slot)
        if state.state == "n/a":
            with lock:
                na_reason.setdefault(spec.key, state.error)
        return state

    states: list[RunState] = []
    bar = tqdm(total=len(specs), desc="leaderboard runs", unit="run", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(one, s): s for s in specs}
        try:
            for fut in as_completed(futures):
                st = fut.result()
                states.append(st)
                bar.update(1)
                bar.set_postfix_str(f"{st.spec.dataset}/{st.spec.row}/seed{st.spec.seed}: {st.state}")
                if on_done is not None:
                    on_done(st)
        except BaseException:  # Ctrl-C / an error in the sweep: stop the runs it started, then re-raise
            for f in futures:
                f.cancel()
            stop_live_runs()
            raise
        finally:
            bar.close()
            for w in pool_workers:
                if w is not None:
                    w.close()
    return states


def run_submitit(specs: list[RunSpec], *, folder: str | Path, cluster: str | None = None,
                 data_dir: str | None = None, retry_failed: bool = True, slurm: dict[str, Any] | None = None,
                 workers: int | None = None, progress: bool = True) -> list[RunState]:
    """Submit one job per run through submitit (SLURM, or its local executor with ``cluster="local"``).

    ``slurm`` holds submitit parameters: generic ones (``timeout_min``, ``gpus_per_node``,
    ``cpus_per_task``, ``mem_gb``) and ``slurm_*`` ones (``slurm_partition``, ``slurm_array_parallelism``)."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("--executor submitit needs the 'submitit' package: pip install 'mmbalance[slurm]'") from None
    from tqdm.auto import tqdm

    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = {"timeout_min": 240, "name": "mmbalance-lb", **(slurm or {})}
    if workers and "slurm_array_parallelism" not in params:
        params["slurm_array_parallelism"] = workers
    if executor.cluster != "slurm":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    executor.update_parameters(**params)
    todo = [s for s in specs if not read_state(s).done]
    jobs = []
    with executor.batch():
        for s in todo:
            jobs.append(executor.submit(execute_run, s.to_dict(), data_dir=data_dir,
                                        env={"MMBALANCE_NO_PROGRESS": "1"}, retry_failed=retry_failed))
    spec_of = {id(job): s for job, s in zip(jobs, todo)}
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc="leaderboard runs (submitit)", unit="run",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for job in submitit.helpers.as_completed(jobs):
            try:
                job.result()
            except Exception as exc:  # the job itself died (time limit, node failure): record it
                spec = spec_of[id(job)]
                st = read_state(spec)
                if not st.done:
                    status = dict(st.status or {"plan_hash": spec.plan_hash, "attempt": 1})
                    status.update(state="failed", finished=utc_now(), error=f"submitit job failed: {exc}")
                    atomic_write_json(Path(spec.run_dir) / STATUS_FILE, status)
            bar.update(1)
    finally:
        bar.close()
    return [read_state(s) for s in specs]
