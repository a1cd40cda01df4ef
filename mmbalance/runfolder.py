"""Run-folder identity and safety: which folder a run writes to, and when it may write there.

* The default folder is ``OUTPUT_DIR/DATASET/METHOD/seedSEED-HASH8`` where HASH8 starts the run's
  config hash (every resolved setting that changes what is computed), so runs with different
  settings never share a default folder; ``--run-dir`` names one explicitly.
* :func:`prepare` decides, before anything is written, whether a run may use a folder (the rules are in
  its docstring). A finished result is never deleted or replaced implicitly; ``--overwrite`` moves it to
  ``RUN_DIR/previous/``, which is removed only once the new run has finished.
* The caller holds the folder's :class:`~mmbalance.locks.FolderLock` (one writer per folder) around the
  whole run; :func:`clean_temp_files` then removes half-written temporary files of killed writers.
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import runfiles
from .config import RunConfig, config_hash, to_jsonable
from .errors import ConfigError

PREVIOUS_DIR = "previous"
#: The settings that make up the config hash (what is computed; not where files go).
IDENTITY_EXCLUDE = {"run_dir", "output_dir", "data_dir"}
ENGINE_FILES = (runfiles.CONFIG_FILE, runfiles.METRICS_FILE, runfiles.RESULT_FILE)


def identity(config: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in to_jsonable(config).items() if k not in IDENTITY_EXCLUDE}


def identity_hash(config: RunConfig) -> str:
    """The run's config hash (the same value the engine writes to config.json and result.json)."""
    return config_hash(identity(config))


def default_run_dir(output_dir: str | Path, config: RunConfig) -> Path:
    """``OUTPUT_DIR/DATASET/METHOD/seedSEED-HASH8``."""
    method = config.method.replace(":", "-").replace("/", "_")
    return Path(output_dir) / config.dataset / method / f"seed{config.seed}-{identity_hash(config)[:8]}"


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


_SECTION_NAMES = {"method_options": "method", "dataset_options": "dataset", "train": "train", "model": "model"}


def setting_differences(old: dict[str, Any], new: dict[str, Any], limit: int = 12) -> list[str]:
    """``name: old → new`` for every identity setting that differs (names as ``--set`` spells them)."""
    def view(cfg: dict[str, Any]) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key in ("method", "dataset", "seed"):
            if key in cfg:
                flat[key] = cfg[key]
        for section, shown in _SECTION_NAMES.items():
            for k, v in _flatten(cfg.get(section) or {}).items():
                flat[f"{shown}.{k}"] = v
        return flat

    a, b = view(old), view(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "(default)") != b.get(key, "(default)"):
            lines.append(f"{key}: {json.dumps(a.get(key, '(default)'))} → {json.dumps(b.get(key, '(default)'))}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"… and {len(lines) - limit} more"]
    return lines


def _read_json(path: Path) -> tuple[Any, bool]:
    """(content, readable); (None, True) when the file does not exist."""
    content, reason = read_json_reason(path)
    return content, reason is None


def read_json_reason(path: Path) -> tuple[Any, str | None]:
    """(content, None), or (None, why it cannot be read); (None, None) when the file does not exist."""
    if not path.is_file():
        return None, None
    try:
        return runfiles.read_json(path), None
    except ValueError as exc:
        return None, f"not valid JSON: {exc}"
    except OSError as exc:
        return None, exc.strerror or str(exc)


@dataclass
class FolderState:
    """What a run folder holds: ``empty``, ``finished`` (an ok result), ``unfinished`` (a checkpoint or an
    interrupted run), ``failed`` (a failed result) or ``partial`` (config.json only)."""

    kind: str
    config: dict[str, Any] | None
    result: dict[str, Any] | None
    same_config: bool | None  # None: cannot tell (no config.json)
    detail: str = ""


def inspect(run_dir: Path, new_hash: str) -> FolderState:
    cfg, _ = _read_json(run_dir / runfiles.CONFIG_FILE)
    res, res_reason = read_json_reason(run_dir / runfiles.RESULT_FILE)
    res_ok = res_reason is None
    old_hash = (res or {}).get("config_hash") or (cfg or {}).get("config_hash")
    same = None if old_hash is None else old_hash == new_hash
    has_ckpt = (run_dir / runfiles.CHECKPOINT_DIR / "last.pt").is_file()
    if not res_ok:
        return FolderState("finished", cfg, None, same, f"{runfiles.RESULT_FILE} is unreadable: {res_reason}")
    status = (res or {}).get("status")
    if status == "ok":
        return FolderState("finished", cfg, res, same)
    if status == "interrupted" or (has_ckpt and status != "failed"):
        return FolderState("unfinished", cfg, res, same)
    if status == "failed":
        return FolderState("failed", cfg, res, same)
    if cfg is not None:
        return FolderState("partial", cfg, res, same)
    return FolderState("empty", None, None, None)


def _describe_difference(state: FolderState, new_cfg: dict[str, Any], new_hash: str) -> str:
    if state.same_config:
        return "the same configuration"
    if state.config is None:
        return "a configuration that cannot be read back"
    diffs = setting_differences(state.config, new_cfg)
    if not diffs:
        return (f"another configuration (config hash {state.config.get('config_hash')} != {new_hash}, "
                "though no setting differs: the defaults of this version changed)")
    return "another configuration; differing settings (folder → this run):\n    " + "\n    ".join(diffs)


def recorded_world_size(result: dict[str, Any] | None) -> int | None:
    """The number of processes a result was computed with (``result.json`` → ``world_size``; a result that
    does not record it ran on one process); None when the value is not a positive integer."""
    value = (result or {}).get("world_size", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


def keeps_finished(state: FolderState, world_size: int) -> bool:
    """Whether ``--skip-finished`` keeps the folder's result: a finished result of this very run — the same
    config hash AND the same number of processes. The config hash leaves the process count out (a run's
    identity does not depend on where it runs), but a 2-process run's numbers differ from a 1-process run's
    (per-rank batches, reductions, the data order), so a finished 1-process result is no answer to a
    2-process request, nor the other way round."""
    return _finished_same_config(state) and recorded_world_size(state.result) == world_size


def _finished_same_config(state: FolderState) -> bool:
    """The folder holds a finished result of the same configuration (config hash), whatever its process count."""
    return state.kind == "finished" and bool(state.same_config) and state.result is not None


def prepare(run_dir: str | Path, config: RunConfig, *, resume: bool, overwrite: bool,
            skip_finished: bool = False, world_size: int = 1) -> str:
    """Decide whether this run may use ``run_dir``; returns ``"fresh"``, ``"resume"`` or ``"finished"``
    (``--resume`` of a run that has already finished: nothing to do). Raises :class:`ConfigError` (exit 2)
    with the reason otherwise. Call with the folder's lock held and before the engine writes anything.

    Without ``--resume``: an empty folder, a ``config.json`` alone, or a failed run are replaced; a
    finished result or an unfinished (resumable) run is refused unless ``--overwrite``, which moves a
    finished result to ``previous/`` (kept until the new run finishes). With ``--resume``: the folder's
    configuration must be this one (the refusal lists the settings that differ) and there must be
    something to resume. ``skip_finished`` (sweeps): with ``--overwrite``, a finished result of this very
    configuration (same config hash) computed with as many processes (``world_size``, the ``world_size``
    recorded in ``result.json``) is kept and ``"finished"`` returned: only another configuration's result, or
    the same configuration's from another process count, is replaced, so a sweep that lost track of a run
    never recomputes a finished one (:func:`keeps_finished`)."""
    run_dir = Path(run_dir)
    new_hash = identity_hash(config)
    new_cfg = identity(config)
    state = inspect(run_dir, new_hash)
    where = f"run folder {str(run_dir)!r}"
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the folder and --overwrite starts a new one; give one of them")
    if resume:
        if state.kind in ("empty", "partial"):
            raise ConfigError(f"--resume: nothing to resume in {where} (no checkpoints/last.pt"
                              + ("; the run was stopped before its first epoch ended" if state.kind == "partial"
                                 else "") + "); run without --resume to start it")
        if state.same_config is False:
            raise ConfigError(f"--resume: {where} holds a run of "
                              f"{_describe_difference(state, new_cfg, new_hash)}\nresume it with its own settings "
                              "(see its config.json), or run these settings elsewhere (another --run-dir, or drop "
                              "--run-dir for a folder named after them)")
        if state.kind == "finished" and state.result is None:  # result.json exists but cannot be read
            raise ConfigError(f"--resume: {str(run_dir / runfiles.RESULT_FILE)!r} is unreadable ({state.detail.split(': ', 1)[-1]}); "
                              "cannot tell whether the run finished. Move the file away to resume from the last "
                              "checkpoint, or re-run with --overwrite to start again")
        if state.kind == "finished":
            return "finished"
        if state.kind == "failed":
            raise ConfigError(f"--resume: the run in {where} failed ({(state.result or {}).get('error')}); "
                              "a failed run is not resumed; re-run it without --resume")
        return "resume"
    if state.kind in ("finished", "unfinished") and not overwrite:
        what = ("a finished result" + (f" ({state.detail})" if state.detail else "") if state.kind == "finished"
                else "an unfinished run (resumable with --resume)")
        raise ConfigError(f"{where} already holds {what} of {_describe_difference(state, new_cfg, new_hash)}\n"
                          "nothing was changed. Use another --run-dir (or drop --run-dir: the default folder is "
                          "named after the settings), --resume to continue an unfinished run, or --overwrite to "
                          f"replace it (a finished result is kept in {PREVIOUS_DIR}/ until the new run finishes)")
    if skip_finished and _finished_same_config(state):
        if recorded_world_size(state.result) == world_size:
            return "finished"
        print(f"{where}: its finished result was computed with {state.result.get('world_size', 1)} process(es), "
              f"this run uses {world_size}: recomputing (the old result is kept in {PREVIOUS_DIR}/ until the new "
              "one finishes)", file=sys.stderr)
    if state.kind == "finished":  # --overwrite
        set_aside(run_dir)
    return "fresh"


SET_ASIDE_TMP = f".{PREVIOUS_DIR}.tmp"


def set_aside(run_dir: Path) -> Path:
    """Move the engine's run files (and checkpoints) to ``run_dir/previous/`` (replacing an older one).

    The files are first gathered in ``.previous.tmp/`` and that folder is then renamed; a kill in between
    leaves the only copy of a finished result there, so :func:`recover_set_aside` (called under the lock
    before anything else looks at the folder) moves it back, and :func:`clean_temp_files` never deletes it."""
    prev = run_dir / PREVIOUS_DIR
    tmp = run_dir / SET_ASIDE_TMP
    recover_set_aside(run_dir)
    tmp.mkdir()
    for name in (*ENGINE_FILES, runfiles.CHECKPOINT_DIR):
        if (run_dir / name).exists():
            (run_dir / name).rename(tmp / name)
    if prev.exists():
        shutil.rmtree(prev)
    tmp.rename(prev)
    return prev


def recover_set_aside(run_dir: str | Path) -> list[str]:
    """Undo a set-aside that a kill interrupted: the files in ``.previous.tmp/`` go back into the folder
    (the new run had not started: the engine writes only after :func:`prepare` returned). Returns the
    names restored. A name present in both places is a conflict nothing here can resolve safely: refused
    (exit 2) with both paths, and nothing is moved or deleted."""
    run_dir = Path(run_dir)
    tmp = run_dir / SET_ASIDE_TMP
    if not tmp.is_dir():
        return []
    names = sorted(p.name for p in tmp.iterdir())
    clash = [n for n in names if (run_dir / n).exists()]
    if clash:
        raise ConfigError(f"run folder {str(run_dir)!r}: an interrupted --overwrite left {', '.join(clash)} both in "
                          f"{str(tmp)!r} and in the folder; nothing was changed. Keep the copy you want (the one in "
                          f"{SET_ASIDE_TMP}/ is the result the --overwrite was replacing) and remove the other")
    for n in names:
        (tmp / n).rename(run_dir / n)
    tmp.rmdir()
    if names:
        print(f"run folder {str(run_dir)!r}: restored {', '.join(names)} from an --overwrite that was interrupted "
              f"while setting them aside", file=sys.stderr)
    return names


def drop_previous(run_dir: str | Path) -> None:
    """The new run has finished: the result it replaced is no longer kept."""
    shutil.rmtree(Path(run_dir) / PREVIOUS_DIR, ignore_errors=True)


def clean_temp_files(folder: str | Path) -> list[Path]:
    """Remove half-written temporary files (``.NAME.*.tmp``) that killed writers left in ``folder`` and
    its ``checkpoints/``; call with the folder's lock held (no live writer can own them)."""
    removed = []
    folder = Path(folder)
    for d in (folder, folder / runfiles.CHECKPOINT_DIR):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp") and p.name != SET_ASIDE_TMP:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed
