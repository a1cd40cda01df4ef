"""Per-epoch curves of one run as equally long series, for the leaderboard's figures (the site's training curves).

The per-epoch records are the compact curve the results store keeps for each run
(:func:`mmbalance.leaderboard.store.curve`: training loss, validation metrics, the primary metric with one
modality present, gradient and confidence ratio per modality), taken from the store when the run's state came
from it and from the run folder's ``metrics.jsonl`` otherwise. Methods with phases (e.g. ReconBoost's boosting
stages) write several records per epoch; :func:`compact_curve` keeps each epoch's last value of each series
(``nan`` where no record has it):

* ``epoch``: 1, 2, ... (1-based, as plotted);
* ``train_loss``; ``val``: the primary metric on validation; ``val[m]``: the same with only modality m;
* ``grad_ratio[m]``, ``conf_ratio[m]``: the dynamics of modality m (see docs/diagnostics.md).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from . import store
from .plan import RunState

DYNAMICS = store.CURVE_DYNAMICS


def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def compact_curve(records: list[dict[str, Any]], metric: str) -> dict[str, list[float]]:
    """The series of :mod:`this module <.curves>` from a run's epoch records (any order, repeated epochs)."""
    by_epoch: dict[int, dict[str, float]] = {}
    for rec in records:
        try:
            ep = int(rec["epoch"])
        except (KeyError, TypeError, ValueError):
            continue
        row = by_epoch.setdefault(ep, {})
        if "train_loss" in rec:
            row["train_loss"] = _num(rec["train_loss"])
        val = rec.get("val")
        if isinstance(val, dict) and metric in val:
            row["val"] = _num(val[metric])
        for m, mv in (rec.get("val_per_modality") or {}).items():
            if isinstance(mv, dict) and metric in mv:
                row[f"val[{m}]"] = _num(mv[metric])
        diag = rec.get("diag") or {}
        for q in DYNAMICS:
            for m, v in (diag.get(q) or {}).items():
                row[f"{q}[{m}]"] = _num(v)
    if not by_epoch:
        return {}
    epochs = sorted(by_epoch)
    keys = sorted({k for row in by_epoch.values() for k in row})
    out: dict[str, list[float]] = {"epoch": [float(e + 1) for e in epochs]}
    for k in keys:
        out[k] = [by_epoch[e].get(k, math.nan) for e in epochs]
    return out


def run_curve(state: RunState, metric: str) -> dict[str, list[float]]:
    """:func:`compact_curve` of a run: the store's records when its state came from the store, else its folder's
    ``metrics.jsonl`` (``{}`` when there is none; a truncated last line is skipped)."""
    records = state.curve if state.curve is not None else store.curve(Path(state.spec.run_dir), metric)
    return compact_curve(records, metric)
