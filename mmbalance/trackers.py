"""Experiment tracking through Accelerate's trackers (``--log-with tensorboard``, ``wandb``, ``mlflow``, ...).

Nothing is hand-written: the engine hands Accelerate the same per-epoch values it writes to ``metrics.jsonl``
(nested keys joined with ``/``: ``val/accuracy``, ``val_per_modality/fac/accuracy``, ``method/cggm/B/fac``),
with the epoch count as the step. Tracker files go under ``RUN_DIR/trackers/``. W&B works offline with
``WANDB_MODE=offline`` (no network needed; ``wandb sync`` uploads later).
"""
from __future__ import annotations

import math
from typing import Any

TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


def flatten_scalars(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_scalars(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[key] = float(v)
    return out


def init_trackers(accelerator, config, config_hash: str, train_cfg) -> None:
    from .config import to_jsonable

    hp = {"method": config.method, "dataset": config.dataset, "seed": config.seed, "config_hash": config_hash}
    hp.update({f"train/{k}": v for k, v in to_jsonable(train_cfg).items() if isinstance(v, (int, float, str, bool))})
    hp.update({f"method/{k}": v for k, v in (config.method_options or {}).items()
               if isinstance(v, (int, float, str, bool))})
    accelerator.init_trackers(f"{config.dataset}-{config.method.replace(':', '-')}-seed{config.seed}", config=hp)
