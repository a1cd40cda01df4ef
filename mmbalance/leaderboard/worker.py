"""A warm run worker: start-up (``import torch``, accelerate, the engine) paid once per worker, not per run.

``python -m mmbalance.leaderboard.worker`` imports the heavy modules once and then serves runs one at a time:
it reads one JSON request per line on stdin — ``{"argv": [...], "log": PATH, "env": {...}}``, the arguments of
``python -m mmbalance.run`` — and for each one **forks** a fresh child that runs :func:`mmbalance.run.main`.
The worker replies with two JSON lines on stdout: ``{"pid": P}`` when the child has started and
``{"exit_code": C}`` when it ended (``-N`` for a child killed by signal N, as :class:`subprocess.Popen` reports).
A request may name another ``"target"`` (``FILE.py:FUNCTION``, called with the argv) instead of the run; the
tests use it.

Isolation is the one of a separate process, because each run *is* a separate process: its own memory, RNG
state, module globals (registries, caches), signal handlers, stdout/stderr (redirected at the file-descriptor
level to the run's log) and exit code; a crash, an ``os._exit`` or the OOM killer takes down that run only.
The worker imports every registered method, dataset and model module and reads the package versions and git
state once; before forking a run it loads the run's dataset (once per distinct dataset request, in-memory
datasets only), which the forked runs then share copy-on-write. It never trains or evaluates and loads data
with one intra-op thread, so no OpenMP/intra-op thread pool and no CUDA context exist when it forks (both are
created fresh in each child); ``OMP_NUM_THREADS`` in the request is applied with ``torch.set_num_threads``
because the OpenMP runtime read the variable when torch was loaded.

The child asks the kernel for SIGTERM when the worker dies (``prctl``), and the worker itself is started
through :mod:`mmbalance.procs`, so killing a sweep with any signal still stops its runs (they checkpoint at the
next epoch end). Linux only (``fork`` + ``prctl``); elsewhere the executor starts one process per run.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from typing import Any

#: What a typical run imports (the rest of a run's modules load in the child, as in a cold start).
PRELOAD = ("torch", "torch._dynamo", "torch.optim", "accelerate", "mmbalance.engine", "mmbalance.run",
           "mmbalance.methods", "mmbalance.datasets")


def preload() -> list[str]:
    """Import :data:`PRELOAD` and every registered method, dataset and model module (the registries' built-ins
    and plug-ins), and read the package versions and git state once (a run records them; every run forked
    from this worker runs the code imported here). Returns the names that could not be imported (an optional
    extra missing; a broken method module is recorded by its registry, as in a cold run)."""
    import importlib

    missing = []
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    try:
        from .. import registry, runfiles

        for reg in (registry.METHODS, registry.DATASETS, registry.MODELS):
            reg._load_builtins()
        runfiles.package_versions()
        runfiles.code_provenance()
    except ImportError as exc:
        missing.append(str(exc))
    return missing


def preload_dataset(argv: list[str]) -> bool:
    """Load the dataset of the run ``argv`` (``mmbalance.run`` arguments) in the worker, once per distinct
    request, so that every run forked later shares it copy-on-write instead of loading it again (in-memory
    datasets only: :func:`mmbalance.registry.preload_dataset`). Loaded with one intra-op thread, so that no
    thread pool exists when the worker forks. Anything unexpected is left to the run to meet and report."""
    import torch

    from .. import registry, run

    try:
        args = run.build_parser().parse_args(argv)
        if args.plugin or args.list or args.show_space:
            return False
        name, data_dir, options = run.dataset_request(args)
    except (Exception, SystemExit):
        return False
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return registry.preload_dataset(name, data_dir, **options)
    finally:
        torch.set_num_threads(threads)


def _target(spec: str | None) -> Any:
    """The function a child runs: ``mmbalance.run.main``, or ``FILE.py:FUNCTION`` (tests)."""
    if not spec:
        from .. import run as run_module

        return run_module.main
    import importlib.util

    path, _, func = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location("_mmbalance_worker_target", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, func)


def _child(argv: list[str], log: str, env: dict[str, str], target: str | None = None) -> int:
    """Body of the forked child: isolate stdio and signals, then run ``mmbalance.run.main(argv)``."""
    from ..procs import die_with_parent

    die_with_parent(signal.SIGTERM)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(devnull)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.update(env)
    if env.get("OMP_NUM_THREADS", "").isdigit():
        import torch

        torch.set_num_threads(max(1, int(env["OMP_NUM_THREADS"])))
    sys.argv = ["python -m mmbalance.run", *argv]
    try:
        code = _target(target)(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    return int(code)


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def serve(stdin: Any = None, stdout: Any = None) -> int:
    """The request loop; returns when stdin closes."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    for line in stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if not req.get("target"):
            preload_dataset(list(req["argv"]))
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the run
            code = 1
            try:
                code = _child(list(req["argv"]), str(req["log"]), dict(req.get("env") or {}), req.get("target"))
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        stdout.write(json.dumps({"pid": pid}) + "\n")
        stdout.flush()
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries already
                continue
        stdout.write(json.dumps({"exit_code": _exit_code(status)}) + "\n")
        stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sweep decides; its runs get SIGTERM from it
    missing = preload()
    sys.stdout.write(json.dumps({"ready": True, "pid": os.getpid(), "missing": missing}) + "\n")
    sys.stdout.flush()
    return serve()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
