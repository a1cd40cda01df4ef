"""Diagnostics figures (matplotlib Agg, fixed size and dpi, no timestamp in the PNG metadata, so the
same inputs give byte-identical files)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from .collect import Group, epoch_curves, weak_modality

DPI = 110
DYNAMICS_PANELS = (("val", "val per-modality metric"), ("conf_ratio", "confidence ratio"),
                   ("grad_norm_raw", "encoder gradient norm"), ("edit_ratio", "edit ratio (applied / raw)"),
                   ("cos_uni_fused", "cos(unimodal, fused) gradient"))


def safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI)


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})


def _colors(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _seed_band(runs, quantity: str, m: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(epochs, mean, min, max) over seeds of one modality's curve (epochs common to every seed)."""
    curves = [dict(epoch_curves(r, quantity).get(m, [])) for r in runs]
    curves = [c for c in curves if c]
    if not curves:
        return None
    epochs = sorted(set.intersection(*(set(c) for c in curves)))
    if not epochs:
        return None
    vals = np.array([[c[e] for e in epochs] for c in curves], dtype=float)
    import warnings

    with warnings.catch_warnings():  # all-NaN epochs (e.g. UME's cosines) stay NaN, silently
        warnings.simplefilter("ignore", RuntimeWarning)
        return (np.array(epochs), np.nanmean(vals, 0), np.nanmin(vals, 0), np.nanmax(vals, 0))


def dynamics_figure(group: Group, path: Path) -> bool:
    """Per-modality curves over epochs: validation metric, conf_ratio, grad_norm_raw, edit_ratio,
    cos_uni_fused (seed mean, min–max band)."""
    import matplotlib.style

    mods = group.modalities
    if not any(r.rows for r in group.runs):
        return False
    with matplotlib.style.context("default"):
        fig = _figure(13.0, 3.0)
        axes = fig.subplots(1, len(DYNAMICS_PANELS))
        colors = _colors(len(mods))
        for ax, (q, title) in zip(axes, DYNAMICS_PANELS):
            drawn = False
            for m, c in zip(mods, colors):
                band = _seed_band(group.runs, q, m)
                if band is None:
                    continue
                e, mean, lo, hi = band
                ax.plot(e, mean, color=c, label=m, lw=1.4)
                ax.fill_between(e, lo, hi, color=c, alpha=0.18, lw=0)
                drawn = True
            if q == "edit_ratio" or q == "conf_ratio":
                ax.axhline(1.0, color="0.5", lw=0.7, ls=":")
            if q == "cos_uni_fused":
                ax.axhline(0.0, color="0.5", lw=0.7, ls=":")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.tick_params(labelsize=7)
            if not drawn:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        if axes[0].get_legend_handles_labels()[0]:
            axes[0].legend(fontsize=7, loc="best")
        fig.suptitle(f"{group.dataset} · {group.row} ({len(group.runs)} seed(s))", fontsize=10)
        fig.tight_layout()
        _save(fig, path)
    return True


def _grouped_bars(ax, rows: list[Group], mods: list[str], q: str) -> None:
    width = 0.8 / max(1, len(mods))
    x = np.arange(len(rows))
    for j, (m, c) in enumerate(zip(mods, _colors(len(mods)))):
        means = [g.mean(f"{q}[{m}]") for g in rows]
        stds = [g.std(f"{q}[{m}]") for g in rows]
        ax.bar(x + (j - (len(mods) - 1) / 2) * width, np.nan_to_num(means), width, color=c, label=m,
               yerr=[0 if not math.isfinite(s) else s for s in stds], capsize=2, error_kw={"lw": 0.7})
    ax.set_xticks(x)
    ax.set_xticklabels([g.row for g in rows], rotation=60, ha="right", fontsize=7)
    ax.tick_params(axis="y", labelsize=7)


def shapley_figure(groups: list[Group], path: Path) -> bool:
    """Grouped bars φ_m per row, with each row's Σφ = v(M) − v(∅) marked."""
    import matplotlib.style

    rows = [g for g in groups if len(g.modalities) > 1]
    if not rows:
        return False
    mods = rows[0].modalities
    with matplotlib.style.context("default"):
        fig = _figure(max(6.0, 0.45 * len(rows) + 2), 4.2)
        ax = fig.subplots()
        _grouped_bars(ax, rows, mods, "phi")
        total = [sum(g.mean(f"phi[{m}]") for m in mods) for g in rows]
        ax.scatter(np.arange(len(rows)), total, marker="_", s=220, color="k", zorder=3, label="Σφ = v(M) − v(∅)")
        ax.axhline(0, color="0.4", lw=0.6)
        finite = [t for t in total if math.isfinite(t)]
        if finite:
            ax.set_ylim(top=max(finite) * 1.25 if max(finite) > 0 else 0.1)
        ax.set_ylabel("Shapley value φ (oriented primary metric)", fontsize=8)
        ax.set_title(f"{rows[0].dataset}: modality Shapley values (test)", fontsize=10)
        ax.legend(fontsize=7, ncol=len(mods) + 1, loc="upper right")
        fig.tight_layout()
        _save(fig, path)
    return True


def probe_gap_figure(groups: list[Group], path: Path) -> bool:
    """Probe score of each encoder per row, beside the ``unimodal:m`` row's own probe (dashed line)."""
    import matplotlib.style

    rows = [g for g in groups if len(g.modalities) > 1]
    if not rows:
        return False
    mods = rows[0].modalities
    refs = {g.runs[0].unimodal_of: g for g in groups if g.runs and g.runs[0].unimodal_of}
    with matplotlib.style.context("default"):
        fig = _figure(max(6.0, 0.45 * len(rows) + 2), 4.2)
        ax = fig.subplots()
        _grouped_bars(ax, rows, mods, "probe")
        for m, c in zip(mods, _colors(len(mods))):
            if m in refs:
                ax.axhline(refs[m].mean(f"probe[{m}]"), color=c, ls="--", lw=1.0, label=f"unimodal:{m} probe")
        ax.set_ylabel("linear-probe score of the frozen encoder (test)", fontsize=8)
        ax.set_title(f"{rows[0].dataset}: encoder probes vs trained alone", fontsize=10)
        ax.legend(fontsize=7, ncol=2, loc="lower right")
        fig.tight_layout()
        _save(fig, path)
    return True


def compare_figure(groups: list[Group], quantity: str, path: Path) -> bool:
    """``quantity`` of the weak modality m* over epochs, one line per row (seed mean)."""
    import matplotlib.style

    rows = [g for g in groups if len(g.modalities) > 1]
    if not rows:
        return False
    dataset = rows[0].dataset
    m_star = weak_modality({(g.dataset, g.row): g for g in groups}, dataset) or rows[0].modalities[-1]
    with matplotlib.style.context("default"):
        fig = _figure(7.5, 4.2)
        ax = fig.subplots()
        drawn = False
        for g, c in zip(rows, _colors(len(rows))):
            band = _seed_band(g.runs, quantity, m_star)
            if band is None:
                continue
            e, mean, _, _ = band
            ax.plot(e, mean, color=c, lw=1.2, label=g.row, ls="-" if len(rows) <= 10 or rows.index(g) < 10 else "--")
            drawn = True
        if not drawn:
            return False
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel(f"{quantity} [{m_star}]", fontsize=8)
        ax.set_title(f"{dataset}: {quantity} of the weak modality {m_star}", fontsize=10)
        ax.legend(fontsize=6, ncol=2, loc="best")
        fig.tight_layout()
        _save(fig, path)
    return True
