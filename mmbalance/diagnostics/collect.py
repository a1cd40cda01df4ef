"""Reading finished runs' diagnostics and aggregating them per (dataset, row) — shared by
``python -m mmbalance.diagnose`` and the leaderboard report.

Per run (one seed) the scalar quantities are (all oriented: higher = better/more):
``probe[m]`` (test probe score), ``gap[m]`` = probe_m(``unimodal:m``, same seed) − probe[m],
``alone_gap[m]`` = v_test(``unimodal:m``) − probe[m], ``phi[m]``, ``share[m]``, ``imbalance_index``,
``drop[m]``, ``rel_drop[m]`` and the last epoch's ``conf_ratio[m]``, ``grad_ratio[m]``, ``cos[m]``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..runfiles import METRICS_FILE, RESULT_FILE


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class RunRecord:
    """One finished run: its folder, result.json, metrics.jsonl rows and leaderboard row name."""

    path: Path
    result: dict[str, Any]
    rows: list[dict[str, Any]]
    row: str

    @property
    def dataset(self) -> str:
        return str(self.result.get("dataset"))

    @property
    def seed(self) -> int:
        return int(self.result.get("seed", 0))

    @property
    def modalities(self) -> list[str]:
        return list(self.result.get("modalities") or [])

    @property
    def diagnostics(self) -> dict[str, Any] | None:
        return self.result.get("diagnostics")

    @property
    def unimodal_of(self) -> str | None:
        method = str(self.result.get("method", ""))
        return method.split(":", 1)[1] if method.startswith("unimodal:") else None


def row_name(run_dir: Path, result: dict[str, Any]) -> str:
    """``status.json``'s row (leaderboard runs), else the method name."""
    status = run_dir / "status.json"
    if status.is_file():
        try:
            row = json.loads(status.read_text()).get("row")
            if row:
                return str(row)
        except (OSError, ValueError):
            pass
    return str(result.get("method", "?"))


def load_run(run_dir: Path) -> RunRecord:
    """Read one run folder; raises ValueError naming the file when it is unreadable."""
    res_path = run_dir / RESULT_FILE
    try:
        result = json.loads(res_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{res_path}: not a readable result.json ({exc})") from None
    if not isinstance(result, dict):
        raise ValueError(f"{res_path}: expected a JSON object")
    rows: list[dict[str, Any]] = []
    mpath = run_dir / METRICS_FILE
    if mpath.is_file():
        for i, line in enumerate(mpath.read_text().splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise ValueError(f"{mpath}: line {i + 1} is not valid JSON") from None
    return RunRecord(run_dir, result, rows, row_name(run_dir, result))


def find_run_dirs(path: Path) -> list[Path]:
    """Run folders at or under ``path`` (folders holding a result.json), sorted."""
    if (path / RESULT_FILE).is_file():
        return [path]
    return sorted(p.parent for p in path.rglob(RESULT_FILE) if "checkpoints" not in p.parts)


# ------------------------------------------------------------------------------------------ per run
def _oriented(result: dict[str, Any], metrics: dict[str, Any] | None) -> float:
    if not metrics:
        return math.nan
    x = _num(metrics.get(result.get("primary_metric", "")))
    return x if result.get("higher_is_better", True) else -x


def run_quantities(run: RunRecord, split: str = "test") -> dict[str, float]:
    """Flat ``{quantity[m]: value}`` of one run (NaN where missing); gaps are filled by
    :func:`add_gaps`."""
    d = run.diagnostics or {}
    res = run.result
    out: dict[str, float] = {}
    probe = ((d.get("probe") or {}).get(split)) or {}
    sh = ((d.get("shapley") or {}).get(split)) or {}
    perm = ((d.get("permutation") or {}).get("test")) or {}
    dyn = d.get("dynamics_final") or {}
    for m in run.modalities:
        out[f"probe[{m}]"] = _oriented(res, probe.get(m))
        out[f"phi[{m}]"] = _num((sh.get("phi") or {}).get(m))
        out[f"share[{m}]"] = _num((sh.get("share") or {}).get(m))
        out[f"drop[{m}]"] = _num((perm.get("drop") or {}).get(m)) if split == "test" else math.nan
        out[f"rel_drop[{m}]"] = _num((perm.get("rel_drop") or {}).get(m)) if split == "test" else math.nan
        out[f"conf_ratio[{m}]"] = _num((dyn.get("conf_ratio") or {}).get(m))
        out[f"grad_ratio[{m}]"] = _num((dyn.get("grad_ratio") or {}).get(m))
        out[f"cos[{m}]"] = _num((dyn.get("cos_uni_fused") or {}).get(m))
    out["imbalance_index"] = _num(sh.get("imbalance_index"))
    out["score"] = _oriented(res, res.get(split))
    return out


def add_gaps(runs: list[RunRecord], table: dict[Path, dict[str, float]]) -> None:
    """gap[m] = probe_m(``unimodal:m``, same dataset and seed) − probe[m] (probe versus probe, same
    solver); alone_gap[m] = v(``unimodal:m``) − probe[m]."""
    ref = {(r.dataset, r.seed, r.unimodal_of): table[r.path] for r in runs if r.unimodal_of}
    for r in runs:
        q = table[r.path]
        for m in r.modalities:
            u = ref.get((r.dataset, r.seed, m))
            q[f"gap[{m}]"] = (u[f"probe[{m}]"] - q[f"probe[{m}]"]) if u else math.nan
            q[f"alone_gap[{m}]"] = (u["score"] - q[f"probe[{m}]"]) if u else math.nan


# ------------------------------------------------------------------------------------------ groups
@dataclass
class Group:
    """All seeds of one (dataset, row)."""

    dataset: str
    row: str
    runs: list[RunRecord] = field(default_factory=list)
    values: dict[str, dict[int, float]] = field(default_factory=dict)  # quantity → seed → value

    @property
    def modalities(self) -> list[str]:
        return self.runs[0].modalities if self.runs else []

    def mean(self, q: str) -> float:
        v = [x for x in self.values.get(q, {}).values() if math.isfinite(x)]
        return float(np.mean(v)) if v else math.nan

    def std(self, q: str) -> float:
        v = [x for x in self.values.get(q, {}).values() if math.isfinite(x)]
        return float(np.std(v, ddof=1)) if len(v) > 1 else math.nan


def group_runs(runs: list[RunRecord], split: str = "test") -> dict[tuple[str, str], Group]:
    """(dataset, row) → Group with per-seed quantities (sorted by dataset, then row)."""
    table = {r.path: run_quantities(r, split) for r in runs}
    add_gaps(runs, table)
    groups: dict[tuple[str, str], Group] = {}
    for r in sorted(runs, key=lambda r: (r.dataset, r.row, r.seed, str(r.path))):
        g = groups.setdefault((r.dataset, r.row), Group(r.dataset, r.row))
        g.runs.append(r)
        for q, v in table[r.path].items():
            g.values.setdefault(q, {})[r.seed] = v
    return dict(sorted(groups.items()))


def _on_validation(group: Group) -> Group:
    """The same runs' group with their validation-split quantities (whatever split ``group`` holds)."""
    return next(iter(group_runs(group.runs, "val").values()))


def weak_modality(groups: dict[tuple[str, str], Group], dataset: str, baseline: str = "baseline") -> str | None:
    """m*, chosen on the **validation** split whatever split the summary shows (a choice made on test would let
    the test split pick the column it is then judged on): the smallest mean validation Shapley share of the
    baseline row (ties → lower validation probe → dataset order); without a baseline (or without shares), the
    modality whose ``unimodal:m`` row scores lowest on validation."""
    base = groups.get((dataset, baseline))
    if base is not None and base.modalities:
        val = _on_validation(base)
        keyed = [(val.mean(f"share[{m}]"), val.mean(f"probe[{m}]"), i, m) for i, m in enumerate(base.modalities)]
        keyed = [k for k in keyed if math.isfinite(k[0])]
        if keyed:
            return min(keyed, key=lambda k: (k[0], k[1] if math.isfinite(k[1]) else math.inf, k[2]))[3]
    uni = [(_on_validation(g).mean("score"), g.runs[0].unimodal_of) for (d, _), g in groups.items()
           if d == dataset and g.runs and g.runs[0].unimodal_of]
    uni = [u for u in uni if math.isfinite(u[0])]
    return min(uni)[1] if uni else None


def epoch_curves(run: RunRecord, quantity: str) -> dict[str, list[tuple[int, float]]]:
    """Per-modality curve (epoch index over the whole run, value) of a metrics.jsonl quantity:
    ``val`` (per-modality validation primary metric) or a ``diag`` key (conf_ratio, grad_norm_raw, …)."""
    out: dict[str, list[tuple[int, float]]] = {m: [] for m in run.modalities}
    key = run.result.get("primary_metric", "")
    for i, row in enumerate(run.rows):
        if quantity == "val":
            src = {m: (v or {}).get(key) for m, v in (row.get("val_per_modality") or {}).items()}
            if len(run.modalities) == 1 and "val" in row:  # one modality: its metric is the fused one
                src = {run.modalities[0]: row["val"].get(key)}
        else:
            src = (row.get("diag") or {}).get(quantity) or {}
        for m in run.modalities:
            if m in src:
                out[m].append((i, _num(src[m])))
    return out
