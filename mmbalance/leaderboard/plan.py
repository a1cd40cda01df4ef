"""Run planning and on-disk run state (used by :mod:`mmbalance.leaderboard`).

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
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from ..config import config_hash
from ..errors import ConfigError
from ..runfiles import RESULT_FILE, read_json
from .suite import DatasetEntry, Suite

STATUS_FILE = "status.json"
LOG_FILE = "run.log"
NA_PREFIX = "error: not applicable:"


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
    plugins: tuple[str, ...] = ()  # --plugin modules/files (the suite's `plugins`), absolute paths for files
    results_dir: str = ""  # the suite's results folder (its _store/ holds the compact store); not hashed

    @property
    def key(self) -> tuple[str, str]:
        return (self.dataset, self.row)

    def run_args(self) -> list[str]:
        """Arguments for ``mmbalance.run`` (without --run-dir/--quiet/--resume)."""
        argv = [a for p in self.plugins for a in ("--plugin", p)]
        argv += ["--method", self.method, "--dataset", self.dataset, "--seed", str(self.seed)]
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
        d["plugins"] = tuple(d.get("plugins", ()))
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
    from ..registry import METHODS, list_methods

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
    from ..config import parse_set_items
    from ..registry import create_dataset

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
            "sets": dict(spec.sets), "launcher": list(spec.launcher),
            **({"plugins": list(spec.plugins)} if spec.plugins else {})}


def plan_runs(suite: Suite, results_dir: str | Path, *, datasets: Iterable[str] | None = None,
              rows: Iterable[str] | None = None, data_dir: str | None = None, validate: bool = False
              ) -> list[RunSpec]:
    """Every run of the suite, seed-major (all rows of seed 0 first, so partial sweeps are comparable).

    ``datasets``/``rows`` restrict the plan (the CLI's --datasets/--methods); ``validate`` checks that every
    method and dataset name is registered (``run`` does; ``build`` needs no registry)."""
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
    plugins = tuple(getattr(suite, "plugins", ()) or ())
    if validate and plugins:
        from ..registry import load_plugins

        load_plugins(list(plugins))
    order = {r: i for i, r in enumerate(suite.all_replicates())}  # replicate-major: early parts finish prefixes
    per_seed: list[list[RunSpec]] = [[] for _ in order]
    for entry in suite.datasets:
        if want_ds is not None and entry.name not in want_ds:
            continue
        if validate:
            from ..registry import DATASETS

            DATASETS.get(entry.name)  # unknown name → RegistryError listing the known ones, before any run
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
                from ..registry import method_entry

                method_entry(method)  # unknown name → RegistryError listing the known ones
            tables = (suite.sets, entry.sets, variant["sets"] if variant else {},
                      suite.method_sets.get(row, {}), suite.method_sets.get(f"{row}@{entry.name}", {}))
            sets = _merge_sets(*tables)
            for seed in suite.row_replicates(entry.name, row):
                i = order[seed]
                run_sets = sets
                if entry.split == "sampled":  # replicate r: split seed r and training seed r (paired by r)
                    if any(entry.split_key in t for t in tables):
                        raise ConfigError(f"suite {suite.name!r}: dataset {entry.name!r} samples its split per "
                                          f"replicate, so {entry.split_key} cannot also be set for row {row!r}")
                    run_sets = _merge_sets(*tables, {entry.split_key: seed})
                spec = RunSpec(suite.name, entry.name, row, method, seed, suite.epochs, run_sets, launcher,
                               plugins=plugins)
                h = config_hash(plan_hash_payload(spec))
                run_dir = results_dir / entry.name / safe_name(row) / f"seed{seed}"
                per_seed[i].append(dataclasses.replace(spec, plan_hash=h, run_dir=str(run_dir),
                                                       results_dir=str(results_dir)))
    return [s for group in per_seed for s in group]


TUNED_DIR = "tuned"


def with_sets(spec: RunSpec, sets: tuple[tuple[str, str], ...], results_dir: str | Path) -> RunSpec:
    """``spec`` with other --set values: a new plan hash, and a run folder under ``RESULTS/tuned/`` when the
    values differ (the defaults' runs stay where they are, so both tables can be built)."""
    if tuple(sets) == tuple(spec.sets):
        return spec
    new = dataclasses.replace(spec, sets=tuple(sets), plan_hash="", run_dir="")
    run_dir = Path(results_dir) / TUNED_DIR / spec.dataset / safe_name(spec.row) / f"seed{spec.seed}"
    return dataclasses.replace(new, plan_hash=config_hash(plan_hash_payload(new)), run_dir=str(run_dir),
                               results_dir=str(Path(results_dir).resolve()))


# ------------------------------------------------------------------------------------------ run state
def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_json_or_none(path: Path) -> dict[str, Any] | None:
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
    #: a run file that exists but cannot be read ("PATH is unreadable: REASON"); the state is then "failed"
    problem: str = ""
    curve: list[dict[str, Any]] | None = None  # per-epoch records from the store; None: the folder's metrics.jsonl

    @property
    def error(self) -> str:
        if self.problem:
            return self.problem
        if self.status and self.status.get("error"):
            return str(self.status["error"])
        if self.result and self.result.get("error"):
            return str(self.result["error"])
        return ""

    @property
    def done(self) -> bool:
        return self.state in ("ok", "n/a")


def unreadable(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(content, "") or, for a file that exists but is not a readable JSON object, (None, "PATH is unreadable:
    REASON"); (None, "") when it does not exist."""
    if not path.is_file():
        return None, ""
    try:
        content = read_json(path)
    except ValueError as exc:
        return None, f"{path} is unreadable: not valid JSON ({exc})"
    except OSError as exc:
        return None, f"{path} is unreadable: {exc.strerror or exc}"
    if not isinstance(content, dict):
        return None, f"{path} is unreadable: expected a JSON object, got {type(content).__name__}"
    return content, ""


def read_state(spec: RunSpec) -> RunState:
    """The run's state from its folder; where the folder has no status for this plan, from the suite's compact
    store (:mod:`mmbalance.leaderboard.store`) when it holds the run under this plan hash. A ``result.json``
    that exists but cannot be read (truncated, not JSON) makes the run ``failed`` with ``problem`` naming the
    file and the reason: it is neither finished nor silently "not run" (a sweep re-runs it; the engine keeps
    the unreadable file in ``previous/`` until the new run finishes)."""
    run_dir = Path(spec.run_dir)
    status = read_json_or_none(run_dir / STATUS_FILE)
    result, problem = unreadable(run_dir / RESULT_FILE)
    if (status is None or status.get("plan_hash") != spec.plan_hash) and spec.results_dir:
        from . import store

        rec = store.lookup(spec.results_dir, spec.dataset, run_dir)
        if rec is not None and rec.get("plan_hash") == spec.plan_hash:
            return RunState(spec, rec["state"], rec.get("status"), rec.get("result"), curve=rec.get("curve") or [])
    if problem:
        return RunState(spec, "failed" if status is None or status.get("plan_hash") == spec.plan_hash else "stale",
                        status, None, problem)
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


