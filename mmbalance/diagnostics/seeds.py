"""Stable seeds and subsets shared by every diagnostic (so all methods and training seeds see the
same subsets and permutations: comparisons between runs are paired)."""
from __future__ import annotations

import hashlib

import numpy as np

from ..search import seed_hash  # noqa: F401 - re-exported: one definition for diagnostics and tuning draws


def stratified_subset(keys: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Sorted indices of ``k`` rows drawn without replacement, proportionally from each key (label)
    group (largest-remainder allocation, at least 0 per group); all rows when ``k >= len(keys)``."""
    keys = np.asarray(keys)
    n = len(keys)
    if k >= n:
        return np.arange(n)
    rs = np.random.RandomState(seed)
    groups, inverse = np.unique(keys, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(groups))
    quota = counts * k / n
    take = np.floor(quota).astype(int)
    rest = k - int(take.sum())
    if rest > 0:  # largest remainders first, ties → lower group index
        order = np.lexsort((np.arange(len(groups)), -(quota - take)))
        take[order[:rest]] += 1
    chosen = []
    for g in range(len(groups)):
        members = np.flatnonzero(inverse == g)
        chosen.append(members[rs.permutation(len(members))[:take[g]]])
    return np.sort(np.concatenate(chosen))


def fingerprint(idx: np.ndarray) -> str:
    """Short digest of an index array (logged so a test can check pairing across runs)."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(idx, dtype=np.int64)).tobytes()).hexdigest()[:12]
