"""LaTeX export of a leaderboard report: ``python -m mmbalance.leaderboard build SUITE --format latex``.

One booktabs table per dataset (needs ``\\usepackage{booktabs}``): method, test primary metric mean ± std over
seeds with the significance mark of the Holm-adjusted paired t-test against the baseline (``$^{*}$``,
``$^{**}$``, ``$^{***}$``), Δ vs the baseline, one column per modality (the fused model with only that modality
present) and the parameter count of the row's runs (model + method-owned modules). The best mean of every
numeric column is bold (direction from the task: accuracy up, MAE down). Unimodal reference rows sit below a
``\\midrule`` and take no part in the bolding of the fused column.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .report import DatasetSummary, Report, RowSummary, is_reference_row

_ESC = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    return "".join(_ESC.get(c, c) for c in text)


def _mean_std(values: dict[int, float]) -> tuple[float, float]:
    v = [x for x in values.values() if math.isfinite(x)]
    if not v:
        return math.nan, math.nan
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def _params(row: RowSummary) -> int | None:
    counts = []
    for st in row.states:
        p = (st.result or {}).get("parameters") if st.state == "ok" else None
        if isinstance(p, dict) and "model" in p:
            counts.append(int(p["model"]) + int(p.get("method_modules", 0)))
    return max(counts) if counts else None


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "--"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _marks(row: RowSummary) -> str:
    return f"$^{{{row.marker}}}$" if row.marker else ""


def dataset_table(ds: DatasetSummary, baseline: str) -> str:
    rows = [r for r in ds.ordered_rows() if r.n_ok]
    if not rows or not ds.metric:
        return ""
    sign = 1.0 if ds.higher_is_better else -1.0
    cols = [ds.metric] + [f"{ds.metric} [{m}]" for m in ds.modalities]
    cells: dict[tuple[str, str], tuple[float, float]] = {}
    for r in rows:
        cells[(r.row, ds.metric)] = _mean_std(r.primary_values(ds.metric))
        for m in ds.modalities:
            cells[(r.row, f"{ds.metric} [{m}]")] = _mean_std(r.per_modality.get(m, {}))
    best: dict[str, float] = {}
    for c in cols:
        pool = [cells[(r.row, c)][0] for r in rows
                if math.isfinite(cells[(r.row, c)][0]) and not (c == ds.metric and is_reference_row(r.row))]
        if pool:
            best[c] = max(pool, key=lambda v: sign * v)

    def cell(r: RowSummary, c: str) -> str:
        m, s = cells[(r.row, c)]
        if not math.isfinite(m):
            return "--"
        text = f"{m:.4f} $\\pm$ {s:.4f}"
        if c in best and m == best[c] and not (c == ds.metric and is_reference_row(r.row)):
            text = f"\\textbf{{{m:.4f}}} $\\pm$ {s:.4f}"
        if c == ds.metric:
            text += _marks(r)
        return text

    arrow = "$\\uparrow$" if ds.higher_is_better else "$\\downarrow$"
    header = ["method", f"{tex_escape(ds.metric)} ({arrow})",
              "$\\Delta$ vs baseline"] + [tex_escape(f"[{m}]") for m in ds.modalities] + ["params"]
    label = "".join(ch for ch in ds.name if ch.isalnum() or ch in "-:")
    lines = [f"% {ds.name}: test {ds.metric}, mean $\\pm$ std over seeds",
             "\\begin{table}[t]", "\\centering",
             f"\\caption{{{tex_escape(ds.name)}: test {tex_escape(ds.metric)} (mean $\\pm$ std over seeds). "
             "Marks: Holm-adjusted paired t-test vs the baseline, $^{*}$ $p<0.05$, $^{**}$ $p<0.01$, "
             "$^{***}$ $p<0.001$. Per-modality columns: the fused model with only that modality present.}",
             f"\\label{{tab:{label}}}",
             "\\begin{tabular}{l" + "r" * (len(header) - 1) + "}", "\\toprule",
             " & ".join(header) + " \\\\", "\\midrule"]
    in_refs = False
    for r in rows:
        if is_reference_row(r.row) and not in_refs:
            lines.append("\\midrule")
            in_refs = True
        c = r.comparison
        delta = "--" if r.row == baseline or c is None else f"{c.mean_diff:+.4f}"
        body = [tex_escape(r.row), cell(r, ds.metric), delta] + [cell(r, f"{ds.metric} [{m}]") for m in ds.modalities]
        lines.append(" & ".join(body + [_fmt_params(_params(r))]) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(lines)


def render_latex(rep: Report) -> str:
    parts: list[Any] = [f"% mmbalance leaderboard: suite {rep.suite.name} (generated; needs \\usepackage{{booktabs}})", ""]
    for ds in rep.datasets:
        t = dataset_table(ds, rep.suite.baseline)
        if t:
            parts.append(t)
    return "\n".join(parts).rstrip("\n") + "\n"
