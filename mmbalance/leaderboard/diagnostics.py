"""Imbalance-diagnostics quantities of the leaderboard, and the divergent-seeds flag.

Per dataset: every run's diagnostics quantities (test split) grouped by row and replicate, for the report's
detail tables and for the two pre-declared tested columns ``probe [m*]`` and ``φ-share [m*]`` whose tests
live in :mod:`mmbalance.leaderboard.verdict` (so is the choice of m*: declared in the suite or derived from the
baseline's *validation* Shapley shares, never from test). The detail table shows probe [m] and φ [m] for every
m, gap [m*], the imbalance index, perm drop [m*] and the final conf_ratio [m*] (descriptive).

Divergent seeds (a row is flagged ⚠ with a footnote): with ≥ 3 seeds, some seed's oriented primary
score lies more than max(``DIVERGE_GAP``, 5 × 1.4826 × MAD) below the median of the other seeds (MAD of
the others: a robust sd); or, with ≥ 2 seeds, the sample std exceeds ``DIVERGE_STD``. Both thresholds
are in units of the primary metric.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..diagnostics.collect import Group, RunRecord, add_gaps, run_quantities

DIVERGE_GAP = 0.05
DIVERGE_STD = 0.10
TESTED = ("probe", "share")
LABELS = {"probe": "probe", "share": "φ-share"}


@dataclass
class DatasetDiagnostics:
    weak: str | None  # m*, set by the report from its verdict (declared, or baseline validation shares)
    groups: dict[str, Group]  # row → Group
    missing_rows: list[str] = field(default_factory=list)  # rows with ok runs but no diagnostics

    def values(self, row: str, q: str) -> dict[int, float]:
        g = self.groups.get(row)
        return dict(g.values.get(q, {})) if g else {}


def summarise_dataset(ds) -> DatasetDiagnostics:
    """Per-seed diagnostics quantities of every row of a :class:`~.report.DatasetSummary`."""
    runs: list[RunRecord] = []
    missing: list[str] = []
    for row in ds.rows.values():
        for st in row.states:
            if st.state == "ok" and st.result is not None:
                if not st.result.get("diagnostics"):
                    if row.row not in missing:
                        missing.append(row.row)
                    continue
                runs.append(RunRecord(Path(st.spec.run_dir), st.result, [], row.row))
    table = {id(r): run_quantities(r) for r in runs}
    by_path = {r.path: table[id(r)] for r in runs}
    add_gaps(runs, by_path)
    groups: dict[str, Group] = {}
    for r in runs:
        g = groups.setdefault(r.row, Group(ds.name, r.row))
        g.runs.append(r)
        for q, v in by_path[r.path].items():
            g.values.setdefault(q, {})[r.seed] = v
    return DatasetDiagnostics(None, groups, missing_rows=missing)


# ------------------------------------------------------------------------------------------ divergence
def divergent_seeds(values: dict[int, float], higher_is_better: bool) -> tuple[list[int], float]:
    """(seeds far below the others, sample std) — see the module docstring for the rule."""
    sign = 1.0 if higher_is_better else -1.0
    v = {s: sign * x for s, x in values.items() if math.isfinite(x)}
    flagged = []
    if len(v) >= 3:
        for s, x in sorted(v.items()):
            others = np.array([y for t, y in v.items() if t != s])
            med = float(np.median(others))
            mad = float(np.median(np.abs(others - med)))
            if med - x > max(DIVERGE_GAP, 5 * 1.4826 * mad):
                flagged.append(s)
    std = float(np.std(list(v.values()), ddof=1)) if len(v) >= 2 else math.nan
    return flagged, std


def divergence_note(row, metric: str, higher_is_better: bool) -> str | None:
    """Footnote text when the row's seeds diverge, else None."""
    vals = row.primary_values(metric)
    flagged, std = divergent_seeds(vals, higher_is_better)
    if not flagged and not (math.isfinite(std) and std > DIVERGE_STD):
        return None
    parts = []
    if flagged:
        parts.append(", ".join(f"seed {s} ({vals[s]:.4f})" for s in flagged) + " far from the other seeds")
    if math.isfinite(std) and std > DIVERGE_STD:
        parts.append(f"std over seeds {std:.4f} > {DIVERGE_STD}")
    return (f"{row.row}: seeds diverge ({'; '.join(parts)}); the mean hides a bimodal outcome — read the "
            "per-seed values in results.csv")


# ------------------------------------------------------------------------------------------ cells
def _fmt(vals: dict[int, float]) -> str:
    v = [x for x in vals.values() if math.isfinite(x)]
    if not v:
        return "—"
    return f"{v[0]:.4f}" if len(v) == 1 else f"{np.mean(v):.4f} ± {np.std(v, ddof=1):.4f}"


def section(ds, dd: DatasetDiagnostics | None, table, figure: str | None) -> list[str]:
    """The "Imbalance diagnostics (test)" sub-section of one dataset."""
    if dd is None or (not dd.groups and not dd.missing_rows):
        return []
    if not dd.groups:
        return ["### Imbalance diagnostics (test)", "",
                "— : none of these runs has diagnostics (made before they existed); back-fill them with "
                "`python -m mmbalance.diagnose --recompute RUN_DIR` and rebuild.", ""]
    m_star = dd.weak
    mods = list(ds.modalities)
    lines = ["### Imbalance diagnostics (test)", "",
             f"weak modality: {m_star or '—'} (pre-registered: see the main report). Probe: linear probe of "
             "the frozen encoder (test score); φ: Shapley value of the modality from `absent` evaluations, "
             "Σφ = v(all) − v(prior); gap = probe of the `unimodal:m` row − probe of this row (positive: the "
             "encoder is weaker than trained alone); imbalance index = (max φ − min φ) / Σ|φ|; perm drop = score "
             "lost when the modality's rows are shuffled; conf_ratio = the unimodal output's confidence in the "
             "truth relative to the other modalities (last epoch). Tested columns (main report, Holm within the primary "
             f"family): probe [{m_star}] and φ-share [{m_star}]; the rest is descriptive. Definitions: "
             "docs/diagnostics.md.", ""]
    headers = ["method"] + [f"probe [{m}]" for m in mods]
    if m_star:
        headers += [f"gap [{m_star}]"]
    headers += [f"φ [{m}]" for m in mods] + ["imbalance index"]
    if m_star:
        headers += [f"perm drop [{m_star}]", f"conf_ratio [{m_star}]"]
    body = []
    for r in ds.ordered_rows():
        if r.row not in dd.groups:
            continue
        cells = [r.row] + [_fmt(dd.values(r.row, f"probe[{m}]")) for m in mods]
        if m_star:
            cells.append(_fmt(dd.values(r.row, f"gap[{m_star}]")))
        cells += [_fmt(dd.values(r.row, f"phi[{m}]")) for m in mods] + [_fmt(dd.values(r.row, "imbalance_index"))]
        if m_star:
            cells += [_fmt(dd.values(r.row, f"drop[{m_star}]")), _fmt(dd.values(r.row, f"conf_ratio[{m_star}]"))]
        body.append(cells)
    lines += [table(headers, body), ""]
    if dd.missing_rows:
        lines += ["Runs without diagnostics (made before they existed) show no row here: "
                  + ", ".join(f"`{r}`" for r in dd.missing_rows)
                  + "; back-fill them with `python -m mmbalance.diagnose --recompute RUN_DIR`.", ""]
    if figure:
        lines += [f"![{ds.name}: fused score vs weak-modality probe]({figure})", ""]
    return lines


def csv_fields(dd: DatasetDiagnostics | None, row: str) -> dict[str, str]:
    """Every diagnostics quantity (mean/std); the tested columns' numbers come from the verdict."""
    if dd is None or row not in dd.groups:
        return {}
    g = dd.groups[row]
    out: dict[str, str] = {}
    for q in sorted(g.values):
        if q == "score":
            continue
        name = "diag_" + q.replace("[", "_").replace("]", "")
        m, s = g.mean(q), g.std(q)
        out[f"{name}_mean"] = repr(m) if math.isfinite(m) else ""
        out[f"{name}_std"] = repr(s) if math.isfinite(s) else ""
    if dd.weak:
        out["diag_weak_modality"] = dd.weak
    return out


def scatter_figure(ds, dd: DatasetDiagnostics | None, path: Path) -> bool:
    """Fused test score vs weak-modality probe, one point per row, error bars = std over seeds."""
    if dd is None or dd.weak is None:
        return False
    from .report import is_reference_row

    pts = []
    for r in ds.ordered_rows():
        if r.row not in dd.groups or is_reference_row(r.row):
            continue
        xs = [v for v in dd.values(r.row, f"probe[{dd.weak}]").values() if math.isfinite(v)]
        ys = [v for v in r.primary_values(ds.metric).values() if math.isfinite(v)]
        if xs and ys:
            pts.append((r.row, float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0,
                        float(np.mean(ys)), float(np.std(ys, ddof=1)) if len(ys) > 1 else 0.0))
    if not pts:
        return False
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.style.context("default"):
        fig = Figure(figsize=(7.0, 5.0), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for name, x, sx, y, sy in pts:
            color = "#444444" if name == ds.baseline else "#3182bd"
            ax.errorbar(x, y, xerr=sx, yerr=sy, fmt="o", color=color, ms=4, capsize=2, lw=0.8)
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"linear-probe score of the {dd.weak} encoder (test, mean ± std over seeds)", fontsize=8)
        ax.set_ylabel(f"fused test {ds.metric}", fontsize=8)
        ax.set_title(f"{ds.name}: fused score vs weak-modality ({dd.weak}) probe", fontsize=10)
        ax.tick_params(labelsize=7)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=110, metadata={"Software": None})
    return True
