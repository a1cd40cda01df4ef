"""The compact results store of a suite: what the report, the tuning tables and the site need from each
finished run, one gzip-compressed JSON-lines file per dataset, ``RESULTS/_store/<dataset>.jsonl.gz``.

Run folders (checkpoints, logs, per-step files) stay on the machine that ran them and out of git; the store is
what a leaderboard commits. One line per run folder, keyed by the folder's path relative to the results folder
(``mfeat/baseline/seed0``, ``tuned/…``, ``_tune/…/trial3/seed1000``) and carrying its plan hash:

``{"run": rel, "plan_hash": h, "state": "ok"|"failed"|"n/a", "status": {status.json}, "result": {result.json}
| null, "curve": [{"epoch", "phase", "train_loss", "lr", "val": {metric: x}, "val_per_modality": {m: {primary:
x}}, "diag": {"grad_ratio": {m: x}, "conf_ratio": {m: x}}}, …]}``

``status`` and ``result`` are the run's own files unchanged (config hash, code version and dirty flag, metrics,
diagnostics, timings), so a report built from the store is byte-identical to one built from the folders (tested);
``curve`` is the per-epoch training loss and validation metrics, the primary metric of each modality alone and
the two per-modality dynamics the site plots (gradient and confidence ratio); no other per-epoch diagnostics.

* Written atomically (temporary file, fsync, rename) under an exclusive ``flock`` on ``_store/.lock``, so
  concurrent sweeps (``tune`` and ``run`` at once) never lose each other's lines. ``gzip`` with mtime 0 and
  lines sorted by ``run``: the same runs give the same bytes.
* Deduplicated: a folder has one line, the newest finished one; a line whose plan hash differs from the plan's is
  ``stale`` and is re-run like a stale folder.
* :func:`mmbalance.leaderboard.plan.read_state` reads a run's folder first (a folder that exists always wins:
  ``run`` resumes from it) and falls back to the store only where the folder has no status for that plan, so a
  fresh clone skips every stored run and builds the committed report from the store alone.
"""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..runfiles import RESULT_FILE, _atomic_write

STORE_DIR = "_store"
STORE_SUFFIX = ".jsonl.gz"
METRICS_FILE = "metrics.jsonl"
FINISHED = ("ok", "failed", "n/a")

_CACHE: dict[str, tuple[tuple[int, int], dict[str, dict[str, Any]]]] = {}


def store_file(results_dir: str | Path, dataset: str) -> Path:
    return Path(results_dir) / STORE_DIR / f"{dataset}{STORE_SUFFIX}"


def relative_run(results_dir: str | Path, run_dir: str | Path) -> str:
    return Path(run_dir).resolve().relative_to(Path(results_dir).resolve()).as_posix()


def load(results_dir: str | Path, dataset: str) -> dict[str, dict[str, Any]]:
    """``{run: record}`` of one dataset's store (empty when there is none); cached per file size and mtime."""
    path = store_file(results_dir, dataset)
    try:
        st = path.stat()
    except OSError:
        return {}
    key = str(path.resolve())
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    records: dict[str, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                records[rec["run"]] = rec
    _CACHE[key] = (stamp, records)
    return records


def lookup(results_dir: str | Path, dataset: str, run_dir: str | Path) -> dict[str, Any] | None:
    try:
        rel = relative_run(results_dir, run_dir)
    except ValueError:
        return None
    return load(results_dir, dataset).get(rel)


CURVE_DYNAMICS = ("grad_ratio", "conf_ratio")


def curve(run_dir: Path, metric: str | None = None) -> list[dict[str, Any]]:
    """The compact per-epoch curve of ``metrics.jsonl``: the module docstring's keys; ``val_per_modality`` only
    with ``metric`` (the primary metric), ``diag`` only the :data:`CURVE_DYNAMICS`."""
    out = []
    try:
        text = (run_dir / METRICS_FILE).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or "epoch" not in row:
            continue
        rec = {k: row[k] for k in ("epoch", "phase", "train_loss", "lr", "val") if k in row}
        per_mod = row.get("val_per_modality")
        if metric and isinstance(per_mod, dict):
            kept = {m: {metric: v[metric]} for m, v in per_mod.items() if isinstance(v, dict) and metric in v}
            if kept:
                rec["val_per_modality"] = kept
        diag = row.get("diag") if isinstance(row.get("diag"), dict) else {}
        dyn = {q: diag[q] for q in CURVE_DYNAMICS if isinstance(diag.get(q), dict)}
        if dyn:
            rec["diag"] = dyn
        out.append(rec)
    return out


def record_from_folder(results_dir: str | Path, run_dir: str | Path, plan_hash: str) -> dict[str, Any] | None:
    """The store line of a finished run folder (its status has ``plan_hash``), else None."""
    from .plan import STATUS_FILE, read_json_or_none

    run_dir = Path(run_dir)
    status = read_json_or_none(run_dir / STATUS_FILE)
    if status is None or status.get("plan_hash") != plan_hash:
        return None
    result = read_json_or_none(run_dir / RESULT_FILE)
    if result is not None and result.get("status") == "ok" and status.get("state") in ("ok", "running"):
        state = "ok"
    elif status.get("state") == "n/a":
        state = "n/a"
    elif status.get("state") == "failed" or (result is not None and result.get("status") == "failed"):
        state = "failed"
    else:
        return None  # running or killed: nothing final to keep
    return {"run": relative_run(results_dir, run_dir), "plan_hash": plan_hash, "state": state, "status": status,
            "result": result, "curve": curve(run_dir, (result or {}).get("primary_metric"))}


@contextlib.contextmanager
def _locked(results_dir: Path) -> Iterator[None]:
    folder = results_dir / STORE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _encode(records: dict[str, dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        for rel in sorted(records):
            gz.write((json.dumps(records[rel], sort_keys=True, separators=(",", ":")) + "\n").encode())
    return buf.getvalue()


def add(results_dir: str | Path, records: Iterable[dict[str, Any]], dataset_of: dict[str, str]) -> int:
    """Merge ``records`` (each with ``run``) into their datasets' store files; ``dataset_of[run]`` names the
    file. Returns the number of lines added or replaced. Unchanged files are not rewritten."""
    results_dir = Path(results_dir).resolve()
    by_ds: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_ds.setdefault(dataset_of[rec["run"]], []).append(rec)
    changed = 0
    if not by_ds:
        return 0
    with _locked(results_dir):
        for ds, recs in sorted(by_ds.items()):
            current = dict(load(results_dir, ds))
            n = 0
            for rec in recs:
                if current.get(rec["run"]) != rec:
                    current[rec["run"]] = rec
                    n += 1
            if n:
                data = _encode(current)
                _atomic_write(store_file(results_dir, ds), lambda fh, data=data: fh.write(data), binary=True)
                changed += n
    return changed


def sync(specs: Iterable[Any]) -> int:
    """Add every finished run folder among ``specs`` (RunSpecs with ``results_dir``) to its suite's store."""
    groups: dict[str, tuple[list[dict[str, Any]], dict[str, str]]] = {}
    for s in specs:
        if not getattr(s, "results_dir", ""):
            continue
        rec = record_from_folder(s.results_dir, s.run_dir, s.plan_hash)
        if rec is None:
            continue
        recs, ds_of = groups.setdefault(s.results_dir, ([], {}))
        recs.append(rec)
        ds_of[rec["run"]] = s.dataset
    return sum(add(rd, recs, ds_of) for rd, (recs, ds_of) in groups.items())


class Writer:
    """Adds finished runs to the store as they finish, at most once per ``interval`` seconds (a store file is
    rewritten whole, which takes seconds for thousands of runs); :meth:`flush` writes what is pending."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self.pending: list[Any] = []
        self.last = 0.0

    def add(self, spec: Any) -> None:
        import time

        self.pending.append(spec)
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.flush()
            self.last = now

    def flush(self) -> int:
        specs, self.pending = self.pending, []
        return sync(specs) if specs else 0


def size_bytes(results_dir: str | Path) -> int:
    folder = Path(results_dir) / STORE_DIR
    return sum(p.stat().st_size for p in folder.glob(f"*{STORE_SUFFIX}")) if folder.is_dir() else 0
