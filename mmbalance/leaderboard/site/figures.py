"""The site's figures, drawn at build time as SVG with matplotlib (Agg-free SVG canvas, no pyplot).

Byte-reproducible: the default style (no user rcParams), a fixed ``svg.hashsalt`` for the element ids, no
date or creator in the metadata, text kept as text (``svg.fonttype = none``: small files, selectable).

* :func:`forest` — Δ vs the baseline with its 95 % t interval, one line per method row of a dataset;
* :func:`probe_scatter` — fused test metric vs the weak modality's probe, 95 % t intervals of both means;
* :func:`poi_chart` — probability of improvement over the baseline across datasets, with its interval;
* :func:`curves` — one row on one dataset over epochs: validation metric (fused and per modality), training
  loss, gradient ratio and confidence ratio per modality; mean over seeds, band = min–max over seeds.
"""
from __future__ import annotations

import contextlib
import io
import math
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .model import DatasetData, mean_ci

RC = {"svg.hashsalt": "mmbalance-site", "svg.fonttype": "none", "font.size": 8, "axes.titlesize": 9,
      "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7}
BASE_COLOR, SIG_COLOR, NS_COLOR, REF_COLOR = "#333333", "#1f5fa8", "#8a9aab", "#b0b0b0"
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasSVG(fig)
    return fig


_NUMBER = re.compile(r"(-?\d+\.\d\d)\d+")
_PATH = re.compile(r'( d=")([^"]*)(")')


def _compact_path(m: re.Match) -> str:
    """A path's coordinates to 1/100 pt (invisible at any zoom a page uses), one line: files ~40 % smaller."""
    return m.group(1) + " ".join(_NUMBER.sub(r"\1", m.group(2)).split()) + m.group(3)


def _save(fig, path: Path) -> None:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _PATH.sub(_compact_path, buf.getvalue())
    path.write_text(re.sub(r"\n[ \t]+<", "\n<", text), encoding="utf-8")  # no indentation between elements


@contextlib.contextmanager
def _style() -> Iterator[None]:
    import matplotlib
    import matplotlib.style

    with matplotlib.style.context("default"), matplotlib.rc_context(RC):
        yield


def forest(ds: DatasetData, path: Path) -> bool:
    """Δ (row − baseline) with its CI per method row; significant rows (Holm marker) in blue."""
    pts = []
    for r in ds.rows:
        if r.name == ds.summary.baseline or ":" in r.name:
            continue
        d, lo, hi = r.get("delta"), r.get("ci_low"), r.get("ci_high")
        if math.isfinite(d):
            pts.append((r.name, d, lo, hi, r.record.get("marker", "")))
    if not pts:
        return False
    pts.sort(key=lambda p: -p[1])
    with _style():
        height = 0.9 + 0.19 * len(pts)
        fig = _figure(6.4, height)
        ax = fig.add_axes((0.3, 0.55 / height, 0.66, 1.0 - 0.85 / height))
        y = np.arange(len(pts))
        for i, (_, d, lo, hi, mark) in enumerate(pts):
            color = SIG_COLOR if mark else NS_COLOR
            if math.isfinite(lo) and math.isfinite(hi):
                ax.plot([lo, hi], [i, i], color=color, lw=1.2)
            ax.plot([d], [i], "o", color=color, ms=3.5)
            if mark:
                ax.annotate(mark, (hi if math.isfinite(hi) else d, i), xytext=(3, -2.5), textcoords="offset points",
                            fontsize=7, color=color)
        ax.axvline(0.0, color=BASE_COLOR, lw=0.8, ls="--")
        ax.set_yticks(y, [p[0] for p in pts])
        ax.set_ylim(len(pts) - 0.5, -0.5)
        ax.set_xlabel(f"Δ test {ds.metric} vs {ds.summary.baseline} (mean of paired differences, 95 % CI)")
        ax.set_title(f"{ds.name}: difference to the baseline (blue: Holm-significant)")
        ax.grid(axis="x", color="#e5e5e5", lw=0.6)
        _save(fig, path)
    return True


def probe_scatter(ds: DatasetData, path: Path) -> bool:
    """Fused test metric (y) vs the weak modality's probe (x), mean with 95 % t intervals."""
    dd, weak = ds.summary.diag, ds.weak
    if dd is None or weak is None:
        return False
    pts = []
    for r in ds.rows:
        if ":" in r.name:
            continue
        px = mean_ci(list(dd.values(r.name, f"probe[{weak}]").values()))
        py = mean_ci(list(r.summary.primary_values(ds.metric).values()))
        if math.isfinite(px[0]) and math.isfinite(py[0]):
            pts.append((r.name, px, py, r.record.get("marker", "")))
    if not pts:
        return False
    with _style():
        fig = _figure(6.4, 4.8)
        ax = fig.subplots()
        for name, (x, hx), (y, hy), mark in pts:
            base = name == ds.summary.baseline
            color = BASE_COLOR if base else (SIG_COLOR if mark else NS_COLOR)
            ax.errorbar(x, y, xerr=hx if math.isfinite(hx) else None, yerr=hy if math.isfinite(hy) else None,
                        fmt="s" if base else "o", color=color, ms=4, capsize=1.5, lw=0.7)
            ax.annotate(name, (x, y), fontsize=5.5, xytext=(3, 2), textcoords="offset points", color=color)
        ax.set_xlabel(f"probe [{weak}]: linear-probe test score of the {weak} encoder (mean, 95 % CI)")
        ax.set_ylabel(f"fused test {ds.metric} (mean, 95 % CI)")
        ax.set_title(f"{ds.name}: fused score vs weak-modality probe (square: baseline; blue: Holm-significant Δ)")
        ax.grid(color="#eeeeee", lw=0.6)
        fig.tight_layout()
        _save(fig, path)
    return True


def poi_chart(points: list[tuple[str, float, float, float]], baseline: str, n_datasets: int, path: Path) -> bool:
    """(row, P(row > baseline), CI low, CI high), sorted by P."""
    pts = sorted((p for p in points if math.isfinite(p[1])), key=lambda p: (-p[1], p[0]))
    if not pts:
        return False
    with _style():
        height = 0.9 + 0.19 * len(pts)
        fig = _figure(6.4, height)
        ax = fig.add_axes((0.3, 0.55 / height, 0.66, 1.0 - 0.85 / height))
        for i, (_, p, lo, hi) in enumerate(pts):
            color = SIG_COLOR if lo > 0.5 or hi < 0.5 else NS_COLOR
            ax.plot([lo, hi], [i, i], color=color, lw=1.2)
            ax.plot([p], [i], "o", color=color, ms=3.5)
        ax.axvline(0.5, color=BASE_COLOR, lw=0.8, ls="--")
        ax.set_xlim(0.0, 1.0)
        ax.set_yticks(np.arange(len(pts)), [p[0] for p in pts])
        ax.set_ylim(len(pts) - 0.5, -0.5)
        ax.set_xlabel(f"P(row > {baseline}) over seeds, averaged over {n_datasets} dataset(s); 95 % stratified "
                      "bootstrap CI")
        ax.set_title("Probability of improvement over the baseline (blue: interval excludes 0.5)")
        ax.grid(axis="x", color="#e5e5e5", lw=0.6)
        _save(fig, path)
    return True


def _band(ax, x: np.ndarray, seeds: list[list[float]], color: str, label: str, ls: str = "-") -> bool:
    arr = np.array([s for s in seeds if len(s) == len(x)], dtype=float)
    if arr.size == 0 or np.all(np.isnan(arr)):
        return False
    with warnings.catch_warnings():  # an epoch where every seed is nan stays nan (a gap in the line)
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, lo, hi = np.nanmean(arr, 0), np.nanmin(arr, 0), np.nanmax(arr, 0)
    ax.plot(x, mean, color=color, lw=1.1, ls=ls, label=label)
    if len(arr) > 1:
        ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
    return True


def curves(row: str, dataset: str, metric: str, modalities: list[str], per_seed: dict[int, dict[str, list[float]]],
           path: Path) -> bool:
    """Training curves of one row on one dataset (see the module docstring); False without curves."""
    runs = [c for _, c in sorted(per_seed.items()) if c.get("epoch")]
    if not runs:
        return False
    n = max(len(c["epoch"]) for c in runs)
    runs = [c for c in runs if len(c["epoch"]) == n]
    x = np.array(runs[0]["epoch"])
    mods = [m for m in modalities if any(f"val[{m}]" in c or f"grad_ratio[{m}]" in c for c in runs)]
    panels = [("val", f"validation {metric} (dashed: the modality alone)"), ("train_loss", "training loss"),
              ("grad_ratio", "gradient ratio per modality"), ("conf_ratio", "confidence ratio per modality")]
    with _style():
        fig = _figure(7.2, 4.8)
        # a fixed layout (tight_layout and legend placement "best" cost most of the drawing time); one legend for
        # the figure: a modality has the same colour in every panel
        axes = fig.subplots(2, 2, sharex=True, gridspec_kw={"left": 0.07, "right": 0.98, "bottom": 0.1, "top": 0.83,
                                                             "wspace": 0.18, "hspace": 0.3}).ravel()
        for ax, (key, title) in zip(axes, panels):
            drawn = False
            if key in ("val", "train_loss"):
                drawn = _band(ax, x, [c.get(key, []) for c in runs], BASE_COLOR, "fused model")
            if key != "train_loss":
                q = "val" if key == "val" else key
                for i, m in enumerate(mods):
                    drawn |= _band(ax, x, [c.get(f"{q}[{m}]", []) for c in runs], PALETTE[i % len(PALETTE)], m,
                                   "--" if key == "val" else "-")
            ax.set_title(title)
            if drawn:
                ax.grid(color="#eeeeee", lw=0.6)
            else:
                ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="#777777")
                ax.set_yticks([])
        for ax in axes[2:]:
            ax.set_xlabel("epoch")
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=BASE_COLOR, lw=1.1, label="fused model")]
        handles += [Line2D([], [], color=PALETTE[i % len(PALETTE)], lw=1.1, label=m) for i, m in enumerate(mods)]
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.945), ncol=len(handles), frameon=False)
        fig.suptitle(f"{row} on {dataset}: mean over {len(runs)} seed(s), band = min–max over seeds", fontsize=9)
        _save(fig, path)
    return True
