"""The three run files and atomic writing.

``config.json`` (fully resolved configuration), ``metrics.jsonl`` (one line per epoch) and
``result.json`` (validation best, test, per-modality, timings, versions, config hash). Every file is
written to a temporary file in the same folder and renamed into place, so a reader never sees a
half-written file.
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import RunFileWriteError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
CHECKPOINT_DIR = "checkpoints"


def _clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become the strings 'nan'/'inf'/'-inf'."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is set-and-return)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_error(path: Path, exc: BaseException) -> RunFileWriteError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return RunFileWriteError(f"cannot write {str(path)!r}: {reason}; the previous version of the file (if any) "
                             "is unchanged (free disk space or fix the folder's permissions, then re-run; "
                             "--resume continues from the last complete checkpoint)")


def _atomic_write(path: str | Path, write: Callable[[Any], None], binary: bool) -> None:
    """Write through ``write(fh)`` to a temporary file in the same folder, fsync, rename into place.
    The file gets the permissions a plain ``open`` would (0666 less the umask; mkstemp's are 0600).
    Any failure (ENOSPC, EACCES, ...) removes the temporary file and raises :class:`RunFileWriteError`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports write failures as RuntimeError
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise _write_error(path, exc) from exc
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(path, lambda fh: fh.write(text), binary=False)


class _RecordingWriter:
    """A binary file wrapper that keeps the first write error: ``torch.save`` reports a failed write (full
    disk) as its own "[enforce fail at inline_container.cc] unexpected pos" RuntimeError, which says nothing
    to a user; :func:`atomic_torch_save` raises the recorded OSError (``No space left on device``) instead."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def atomic_torch_save(payload: Any, path: str | Path) -> None:
    """``torch.save`` with the same write-then-rename guarantee as the JSON run files."""
    import torch

    def write(fh: Any) -> None:
        rec = _RecordingWriter(fh)
        try:
            torch.save(payload, rec)
        except RuntimeError as exc:
            if rec.error is not None:
                raise rec.error from exc
            raise

    _atomic_write(path, write, binary=True)


def atomic_write_json(path: str | Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(payload), indent=2, sort_keys=True) + "\n")


def write_metrics_lines(path: str | Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(_clean(r), sort_keys=True) + "\n" for r in rows))


def read_json(path: str | Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


@functools.lru_cache(maxsize=1)
def _package_versions() -> tuple[tuple[str, str], ...]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("mmbalance", "torch", "accelerate", "numpy", "transformers", "timm",
                 "segmentation-models-pytorch", "datasets", "scipy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return tuple(out.items())


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages that matter for the numbers (read once per process: a warm
    leaderboard worker reads them once for all the runs it forks, which run the code it imported)."""
    return dict(_package_versions())


def code_provenance() -> dict[str, Any]:
    """The git commit of the code that produced a result, and whether the checkout had uncommitted changes
    (``dirty``); ``{"git_commit": None}`` outside a git checkout (an installed wheel). Asked once per process
    (the code a process runs is the code it imported: a warm worker asks once, before its first run)."""
    return dict(_code_provenance())


@functools.lru_cache(maxsize=1)
def _code_provenance() -> tuple[tuple[str, Any], ...]:
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out: dict[str, Any] = {"git_commit": None, "dirty": None}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return tuple(out.items())
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        out["git_commit"] = commit.stdout.strip()
        out["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return tuple(out.items())


def hardware_summary() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    except Exception:  # pragma: no cover - non-POSIX
        return float("nan")
