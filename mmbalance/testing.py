"""Helpers for tests and notebooks: build a ready :class:`Trainer` (and its StepContext) in one call."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .run import build_parser, resolve


def cli_args(method: str = "baseline", dataset: str = "mfeat", *, seed: int = 0, epochs: int | None = None,
             run_dir: str | Path | None = None, sets: dict[str, Any] | None = None, extra: list[str] | None = None) -> list[str]:
    """Argument list for ``mmbalance.run`` (``sets`` maps NAME or section.NAME → value)."""
    argv = ["--method", method, "--dataset", dataset, "--seed", str(seed), "--quiet"]
    if epochs is not None:
        argv += ["--epochs", str(epochs)]
    if run_dir is not None:
        argv += ["--run-dir", str(run_dir)]
    for k, v in (sets or {}).items():
        if isinstance(v, (list, tuple)):
            v = "[" + ",".join(map(str, v)) + "]"
        argv += ["--set", f"{k}={v}"]
    return argv + list(extra or [])


def build_trainer(method: str = "baseline", dataset: str = "mfeat", *, run_dir: str | Path, seed: int = 0,
                  epochs: int | None = None, sets: dict[str, Any] | None = None, output_dir: str | Path | None = None):
    """A constructed (not yet trained) Trainer; ``trainer.ctx`` is the method's StepContext. ``output_dir``
    is where shared artefacts go (the ``<m>-only`` teacher cache, ``OUTPUT_DIR/_teachers``); default ``runs``."""
    from .engine import Trainer

    extra = ["--output-dir", str(output_dir)] if output_dir is not None else None
    args = build_parser().parse_args(cli_args(method, dataset, seed=seed, epochs=epochs, run_dir=run_dir, sets=sets,
                                              extra=extra))
    config, train_cfg, data, meth, rdir = resolve(args)
    return Trainer(config, train_cfg, data, meth, rdir, quiet=True)


def first_batch(trainer) -> dict:
    """The first training batch of the trainer's epoch-0 order."""
    return next(iter(trainer.loader_train))
