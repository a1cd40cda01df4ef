"""Leaderboard suites, run planning and run execution (used by :mod:`mmbalance.leaderboard`).

A *suite* (``leaderboard/suites/NAME.toml``) is datasets × method rows × seeds with a training budget
(an epochs override) and ``--set`` overrides. Planning turns it into :class:`RunSpec` objects, one per
(dataset, row, seed); each has a *plan hash* (:func:`mmbalance.config.config_hash` over the planned
arguments) and a run directory ``RESULTS/<dataset>/<row>/seed<k>/``.

Each run directory holds the three run files the engine writes (``config.json``, ``metrics.jsonl``,
``result.json``) plus two files of the leaderboard's own:

* ``status.json`` (written atomically): ``plan_hash``, ``argv``, ``state`` (``running`` / ``ok`` /
  ``failed`` / ``n/a``), ``exit_code``, ``error`` (the reason for ``failed`` and ``n/a``), ``attempt``,
  ``resumed``, ``started``/``finished`` (UTC, ISO 8601) and ``wall_seconds``;
* ``run.log``: stdout and stderr of every attempt, each after a ``=== attempt K`` header.

A run is *done* when its ``result.json`` says ``ok`` and ``status.json`` carries the same plan hash, or
when ``status.json`` says ``n/a`` for that hash; done runs are skipped. A run killed half-way (state
``running``, or failed by a signal, with a ``checkpoints/last.pt``) is restarted with ``--resume``; other
failed runs are retried from scratch (unless ``retry_failed=False``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from .config import config_hash
from .errors import ConfigError
from .runfiles import CHECKPOINT_DIR, RESULT_FILE, atomic_write_json, read_json

STATUS_FILE = "status.json"
LOG_FILE = "run.log"
#: Test/debug hook: replaces ``python -m mmbalance.run`` (a shell-quoted command line).
RUNNER_ENV = "MMBALANCE_LEADERBOARD_RUNNER"
NA_PREFIX = "error: not applicable:"
DEFAULT_SEEDS = 5
SUITE_KEYS = {"name", "description", "seeds", "epochs", "methods", "exclude", "baseline", "datasets", "sets",
              "method_sets", "variants", "output", "launcher", "num_processes", "accelerate_args", "data_dir",
              "slurm", "retry_failed"}


# ------------------------------------------------------------------------------------------ suites
@dataclass
class DatasetEntry:
    name: str
    sets: dict[str, Any] = field(default_factory=dict)
    modalities: list[str] | None = None


@dataclass
class Suite:
    """A parsed suite file. ``methods`` is the raw request ("all" or a list of row names)."""

    name: str
    path: Path
    description: str = ""
    seeds: list[int] = field(default_factory=lambda: list(range(DEFAULT_SEEDS)))
    epochs: int | None = None
    methods: str | list[str] = "all"
    exclude: list[str] = field(default_factory=list)
    baseline: str = "baseline"
    datasets: list[DatasetEntry] = field(default_factory=list)
    sets: dict[str, Any] = field(default_factory=dict)
    method_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    output: str | None = None
    launcher: str = "python"
    num_processes: int = 1
    accelerate_args: list[str] = field(default_factory=list)
    data_dir: str | None = None
    slurm: dict[str, Any] = field(default_factory=dict)

    @property
    def leaderboard_dir(self) -> Path:
        """The folder that holds ``suites/`` (``leaderboard/`` in a checkout)."""
        return self.path.resolve().parent.parent

    def default_results_dir(self) -> Path:
        return self.leaderboard_dir / "results" / self.name

    def default_out_dir(self) -> Path:
        return (self.leaderboard_dir / (self.output if self.output is not None else self.name)).resolve()

    def display_path(self) -> str:
        """The suite file as shown in reports: relative to the leaderboard's parent when inside it."""
        p = self.path.resolve()
        try:
            return p.relative_to(self.leaderboard_dir.parent).as_posix()
        except ValueError:
            return p.name


def find_suite(name_or_path: str | Path) -> Path:
    """``quick`` → ``leaderboard/suites/quick.toml`` (checkout or cwd); a path is used as given."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.is_file():
        if not p.is_file():
            raise ConfigError(f"suite file {str(p)!r} does not exist")
        return p
    candidates = [Path.cwd() / "leaderboard" / "suites" / f"{p}.toml",
                  Path(__file__).resolve().parents[1] / "leaderboard" / "suites" / f"{p}.toml"]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"unknown suite {str(name_or_path)!r}: none of {', '.join(map(str, candidates))} exists; "
                      "give a suite name from leaderboard/suites/ or a path to a .toml file")


def _table(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table (mapping), got {value!r}")
    return dict(value)


def load_suite(name_or_path: str | Path) -> Suite:
    """Parse a suite TOML file (schema: leaderboard/suites/quick.toml's header comment)."""
    import tomllib

    path = find_suite(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"suite {str(path)!r} is not valid TOML: {exc}") from None
    where = f"suite {str(path)!r}"
    unknown = sorted(set(raw) - SUITE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(SUITE_KEYS))}")
    seeds = raw.get("seeds", DEFAULT_SEEDS)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{where}: 'seeds' must be a positive count or a list of integers, got {seeds!r}")
    datasets_raw = raw.get("datasets")
    if isinstance(datasets_raw, list):
        datasets_raw = {d: {} for d in datasets_raw}
    datasets_raw = _table(datasets_raw, f"{where} 'datasets'")
    if not datasets_raw:
        raise ConfigError(f"{where}: 'datasets' names no dataset")
    datasets = []
    for dname, dval in datasets_raw.items():
        dval = _table(dval, f"{where} datasets.{dname}")
        bad = sorted(set(dval) - {"sets", "modalities"})
        if bad:
            raise ConfigError(f"{where} datasets.{dname}: unknown key(s) {', '.join(bad)}; valid: modalities, sets")
        datasets.append(DatasetEntry(dname, _table(dval.get("sets"), f"{where} datasets.{dname}.sets"),
                                     list(dval["modalities"]) if dval.get("modalities") else None))
    methods = raw.get("methods", "all")
    if not (methods == "all" or (isinstance(methods, list) and methods and all(isinstance(m, str) for m in methods))):
        raise ConfigError(f"{where}: 'methods' must be \"all\" or a non-empty list of names, got {methods!r}")
    variants = {}
    for vname, v in _table(raw.get("variants"), f"{where} 'variants'").items():
        v = _table(v, f"{where} variants.{vname}")
        if "method" not in v:
            raise ConfigError(f"{where} variants.{vname}: needs 'method' (a registered method name)")
        variants[vname] = {"method": v["method"], "sets": _table(v.get("sets"), f"{where} variants.{vname}.sets")}
    launcher = raw.get("launcher", "python")
    if launcher not in ("python", "accelerate"):
        raise ConfigError(f"{where}: 'launcher' must be \"python\" or \"accelerate\", got {launcher!r}")
    epochs = raw.get("epochs")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ConfigError(f"{where}: 'epochs' must be a positive integer, got {epochs!r}")
    return Suite(
        name=str(raw.get("name", path.stem)), path=path, description=str(raw.get("description", "")).strip(),
        seeds=list(seeds), epochs=epochs, methods=methods, exclude=list(raw.get("exclude", [])),
        baseline=str(raw.get("baseline", "baseline")), datasets=datasets,
        sets=_table(raw.get("sets"), f"{where} 'sets'"),
        method_sets={k: _table(v, f"{where} method_sets.{k}")
                     for k, v in _table(raw.get("method_sets"), f"{where} 'method_sets'").items()},
        variants=variants, output=raw.get("output"), launcher=launcher,
        num_processes=int(raw.get("num_processes", 1)), accelerate_args=list(raw.get("accelerate_args", [])),
        data_dir=raw.get("data_dir"), slurm=_table(raw.get("slurm"), f"{where} 'slurm'"))


# ------------------------------------------------------------------------------------------ planning
@dataclass(frozen=True)
class RunSpec:
    """One planned run. ``row`` is the leaderboard row; ``method`` the registered name passed to --method."""

    suite: str
    dataset: str
    row: str
    method: str
    seed: int
    epochs: int | None
    sets: tuple[tuple[str, str], ...]
    launcher: tuple[str, ...] = ()  # empty for plain python runs, else accelerate's settings
    plan_hash: str = ""
    run_dir: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.dataset, self.row)

    def run_args(self) -> list[str]:
        """Arguments for ``mmbalance.run`` (without --run-dir/--quiet/--resume)."""
        argv = ["--method", self.method, "--dataset", self.dataset, "--seed", str(self.seed)]
        if self.epochs is not None:
            argv += ["--epochs", str(self.epochs)]
        for k, v in self.sets:
            argv += ["--set", f"{k}={v}"]
        return argv

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        d = dict(d)
        d["sets"] = tuple(tuple(x) for x in d["sets"])
        d["launcher"] = tuple(d["launcher"])
        return cls(**d)


def format_set_value(value: Any) -> str:
    """A TOML value as the text of a ``--set`` value that :func:`yaml.safe_load` reads back unchanged."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same else json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_set_value(v) for v in value) + "]"
    raise ConfigError(f"--set value {value!r}: expected a number, string, boolean or list")


def row_modality_expansion(row: str) -> bool:
    """``unimodal:*`` (or any ``name:*`` whose method takes a modality argument) expands per modality."""
    return row.endswith(":*")


def expand_all_methods(exclude: Iterable[str] = ()) -> list[str]:
    """``methods = "all"``: every registered method and preset, plus ``<name>:*`` for methods that take a
    modality argument (``unimodal:*`` → one ``unimodal:<m>`` row per modality of each dataset)."""
    from .registry import METHODS, list_methods

    excluded = set(exclude)
    rows = []
    for name in list_methods():
        if name in excluded:
            continue
        factory = METHODS.get(name).factory
        if getattr(factory, "accepts_name_argument", False):
            if getattr(factory, "name_argument", "") == "modality" and f"{name}:*" not in excluded:
                rows.append(f"{name}:*")
            continue
        rows.append(name)
    return rows


def dataset_modalities(entry: DatasetEntry, data_dir: str | None) -> list[str]:
    """Modalities of a dataset: the suite's ``modalities`` list, else loaded from the dataset itself."""
    if entry.modalities:
        return list(entry.modalities)
    from .config import parse_set_items
    from .registry import create_dataset

    options = parse_set_items([f"{k}={format_set_value(v)}" for k, v in entry.sets.items()])["dataset"]
    try:
        return list(create_dataset(entry.name, data_dir or os.environ.get("MMBALANCE_DATA"), **options).modalities)
    except Exception as exc:
        raise ConfigError(f"suite: cannot expand unimodal rows for dataset {entry.name!r} ({exc}); "
                          f"add `modalities = [...]` to [datasets.{entry.name}]") from None


def _merge_sets(*tables: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    merged: dict[str, Any] = {}
    for t in tables:
        merged.update(t)
    return tuple((k, format_set_value(merged[k])) for k in sorted(merged))


def safe_name(row: str) -> str:
    return row.replace(":", "-").replace("/", "_")


def plan_hash_payload(spec: RunSpec) -> dict[str, Any]:
    return {"dataset": spec.dataset, "method": spec.method, "seed": spec.seed, "epochs": spec.epochs,
            "sets": dict(spec.sets), "launcher": list(spec.launcher)}


def plan_runs(suite: Suite, results_dir: str | Path, *, datasets: Iterable[str] | None = None,
              rows: Iterable[str] | None = None, data_dir: str | None = None, validate: bool = False
              ) -> list[RunSpec]:
    """Every run of the suite, seed-major (all rows of seed 0 first, so partial sweeps are comparable).

    ``datasets``/``rows`` restrict the plan (the CLI's --datasets/--methods); ``validate`` checks that every
    method name is registered (``run`` does; ``build`` needs no registry)."""
    results_dir = Path(results_dir).resolve()
    requested = suite.methods if suite.methods != "all" else expand_all_methods(suite.exclude)
    if suite.methods != "all":
        requested = [r for r in requested if r not in set(suite.exclude)]
    requested = list(dict.fromkeys(requested))  # a row listed twice runs once
    if suite.baseline in requested:  # baseline first
        requested = [suite.baseline] + [r for r in requested if r != suite.baseline]
    want_ds = set(datasets) if datasets else None
    want_rows = set(rows) if rows else None
    launcher: tuple[str, ...] = ()
    if suite.launcher == "accelerate":
        launcher = ("accelerate", f"num_processes={suite.num_processes}", *suite.accelerate_args)
    per_seed: list[list[RunSpec]] = [[] for _ in suite.seeds]
    for entry in suite.datasets:
        if want_ds is not None and entry.name not in want_ds:
            continue
        expanded: list[str] = []
        for row in requested:
            if row_modality_expansion(row):
                expanded += [f"{row[:-2]}:{m}" for m in dataset_modalities(entry, data_dir or suite.data_dir)]
            else:
                expanded.append(row)
        for row in expanded:
            if want_rows is not None and row not in want_rows:
                continue
            variant = suite.variants.get(row)
            method = variant["method"] if variant else row
            if validate:
                from .registry import method_entry

                method_entry(method)  # unknown name → RegistryError listing the known ones
            sets = _merge_sets(suite.sets, entry.sets, variant["sets"] if variant else {},
                               suite.method_sets.get(row, {}), suite.method_sets.get(f"{row}@{entry.name}", {}))
            for i, seed in enumerate(suite.seeds):
                spec = RunSpec(suite.name, entry.name, row, method, seed, suite.epochs, sets, launcher)
                h = config_hash(plan_hash_payload(spec))
                run_dir = results_dir / entry.name / safe_name(row) / f"seed{seed}"
                per_seed[i].append(dataclasses.replace(spec, plan_hash=h, run_dir=str(run_dir)))
    return [s for group in per_seed for s in group]


# ------------------------------------------------------------------------------------------ run state
def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


@dataclass
class RunState:
    """What is on disk for one planned run. ``state``: ok, failed, n/a, running (killed or in progress),
    stale (files of another plan hash) or missing."""

    spec: RunSpec
    state: str
    status: dict[str, Any] | None = None
    result: dict[str, Any] | None = None

    @property
    def error(self) -> str:
        if self.status and self.status.get("error"):
            return str(self.status["error"])
        if self.result and self.result.get("error"):
            return str(self.result["error"])
        return ""

    @property
    def done(self) -> bool:
        return self.state in ("ok", "n/a")


def read_state(spec: RunSpec) -> RunState:
    run_dir = Path(spec.run_dir)
    status = _read(run_dir / STATUS_FILE)
    result = _read(run_dir / RESULT_FILE)
    if status is None:
        return RunState(spec, "missing" if result is None else "stale", None, result)
    if status.get("plan_hash") != spec.plan_hash:
        return RunState(spec, "stale", status, result)
    if result is not None and result.get("status") == "ok" and status.get("state") in ("ok", "running"):
        return RunState(spec, "ok", status, result)  # "running": the sweep died after the run had finished
    state = status.get("state")
    if state == "n/a":
        return RunState(spec, "n/a", status, result)
    if state == "failed" or (result is not None and result.get("status") == "failed"):
        return RunState(spec, "failed", status, result)
    return RunState(spec, "running", status, result)


# ------------------------------------------------------------------------------------------ execution
def runner_command() -> list[str]:
    override = os.environ.get(RUNNER_ENV)
    return shlex.split(override) if override else [sys.executable, "-m", "mmbalance.run"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_command(spec: RunSpec, *, resume: bool, data_dir: str | None = None) -> list[str]:
    args = spec.run_args() + ["--run-dir", spec.run_dir, "--quiet"]
    if data_dir:
        args += ["--data-dir", data_dir]
    if resume:
        args.append("--resume")
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


def execute_run(spec: RunSpec | dict[str, Any], *, data_dir: str | None = None, env: dict[str, str] | None = None,
                retry_failed: bool = True) -> RunState:
    """Run one planned run unless it is done; record its outcome in ``status.json``. Picklable for submitit."""
    if isinstance(spec, dict):
        spec = RunSpec.from_dict(spec)
    before = read_state(spec)
    if before.done or (before.state == "failed" and not retry_failed):
        return before
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    killed = before.state == "running" or (before.state == "failed" and _killed((before.status or {}).get("exit_code")))
    resume = killed and (run_dir / CHECKPOINT_DIR / "last.pt").is_file()
    attempt = int((before.status or {}).get("attempt", 0)) + 1 if before.state != "stale" else 1
    for _ in range(2):  # a resume refused by the engine is retried once from scratch
        argv = build_command(spec, resume=resume, data_dir=data_dir)
        status = {"suite": spec.suite, "dataset": spec.dataset, "row": spec.row, "method": spec.method,
                  "seed": spec.seed, "plan_hash": spec.plan_hash, "argv": argv, "state": "running",
                  "attempt": attempt, "resumed": resume, "started": utc_now(), "finished": None,
                  "exit_code": None, "error": None, "wall_seconds": None}
        atomic_write_json(run_dir / STATUS_FILE, status)
        log_path = run_dir / LOG_FILE
        with open(log_path, "a") as log:
            log.write(f"=== attempt {attempt} ({status['started']}): {shlex.join(argv)}\n")
            log.flush()
            t0 = time.perf_counter()
            try:
                code = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env={**os.environ, **(env or {})})
            except OSError as exc:  # the runner could not be started at all
                log.write(f"error: cannot start {argv[0]!r}: {exc}\n")
                code = 127
        text = _attempt_log(log_path, attempt)
        result = _read(run_dir / RESULT_FILE)
        status.update(exit_code=code, finished=utc_now(), wall_seconds=round(time.perf_counter() - t0, 3))
        if code == 0 and result is not None and result.get("status") == "ok":
            status["state"] = "ok"
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
              per_run_gpus: int = 1, progress: bool = True, on_done: Callable[[RunState], None] | None = None
              ) -> list[RunState]:
    """Run ``specs`` in ``workers`` parallel subprocesses (one GPU group per worker where GPUs exist).

    A row that turns out ``n/a`` for one seed is recorded ``n/a`` for its remaining seeds without running.
    """
    import queue
    import threading
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm.auto import tqdm

    gpus = visible_gpus()
    slots: queue.Queue = queue.Queue()
    if gpus:
        groups = [gpus[i:i + per_run_gpus] for i in range(0, len(gpus) - per_run_gpus + 1, per_run_gpus)]
        if not groups:
            raise ConfigError(f"each run needs {per_run_gpus} GPUs (num_processes) but only {len(gpus)} are visible")
        workers = max(1, min(workers, len(groups)))
        for g in groups[:workers]:
            slots.put(g)
    else:
        for _ in range(workers):
            slots.put(None)
    na_reason: dict[tuple[str, str], str] = {}
    lock = threading.Lock()

    def one(spec: RunSpec) -> RunState:
        with lock:
            reason = na_reason.get(spec.key)
        if reason is not None and not read_state(spec).done:
            return mark_not_applicable(spec, reason)
        slot = slots.get()
        try:
            state = execute_run(spec, data_dir=data_dir, env=_worker_env(workers, slot), retry_failed=retry_failed)
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
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        finally:
            bar.close()
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
