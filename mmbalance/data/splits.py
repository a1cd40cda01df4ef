"""Seeded stratified splits (numpy legacy RandomState: stream frozen across NumPy versions)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split indices per class in ascending class order; each part sorted ascending.

    For each class c: ``perm = idx_c[rs.permutation(n_c)]``, part sizes ``round(f·n_c)`` for all but the
    last part, which takes the rest (mfeat.md §5).
    """
    labels = np.asarray(labels)
    rs = np.random.RandomState(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for c in np.unique(labels):
        idx_c = np.flatnonzero(labels == c)
        perm = idx_c[rs.permutation(len(idx_c))]
        start = 0
        for k, frac in enumerate(fractions):
            if k == len(fractions) - 1:
                parts[k].extend(perm[start:].tolist())
            else:
                n_k = int(round(frac * len(idx_c)))
                parts[k].extend(perm[start:start + n_k].tolist())
                start += n_k
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def quantile_bins(values: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Stratification keys for regression targets: 10 quantile bins (README 'Evaluation protocol')."""
    values = np.asarray(values, dtype=np.float64).reshape(len(values), -1).mean(axis=1)
    edges = np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.searchsorted(edges, values, side="right")


def carve_heldout(keys: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Carve a held-out part of the TRAINING split (G-Blending, MSLR): returns (train_idx, heldout_idx).

    Stratified by ``keys`` (labels, or quantile bins for regression), seeded by the split seed.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {fraction}")
    held, rest = stratified_split(keys, [fraction, 1.0 - fraction], seed + 12345)
    if len(held) == 0:
        held, rest = rest[:1], rest[1:]
    return rest, held
