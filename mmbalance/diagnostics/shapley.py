"""Modality Shapley values of a value function over modality subsets (pure functions).

v maps a subset key (modality names in dataset order joined by ``+``, ``none`` for ∅) to the
oriented score of the model with only that subset present. Exact enumeration for M ≤ 6, antithetic
Monte-Carlo over orderings above.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

EXACT_MAX = 6


def subset_key(subset: Sequence[str] | frozenset[str], order: Sequence[str]) -> str:
    """``"a+c"`` in dataset order; ``"none"`` for the empty set."""
    names = [m for m in order if m in set(subset)]
    return "+".join(names) if names else "none"


def all_subsets(order: Sequence[str]) -> list[tuple[str, ...]]:
    return [c for r in range(len(order) + 1) for c in itertools.combinations(order, r)]


def exact_shapley(value: Callable[[tuple[str, ...]], float], order: Sequence[str]) -> dict[str, float]:
    """φ_m = Σ_{S ⊆ M∖{m}} |S|!(M−|S|−1)!/M! · (v(S ∪ {m}) − v(S)) (Shapley 1953, eq. of the
    permutation-weighted marginal contribution). ``value`` is called with tuples in dataset order."""
    mods = list(order)
    n = len(mods)
    cache: dict[tuple[str, ...], float] = {}

    def v(s: set[str]) -> float:
        key = tuple(m for m in mods if m in s)
        if key not in cache:
            cache[key] = float(value(key))
        return cache[key]

    phi = {}
    for m in mods:
        others = [o for o in mods if o != m]
        total = 0.0
        for r in range(n):
            w = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
            for s in itertools.combinations(others, r):
                total += w * (v(set(s) | {m}) - v(set(s)))
        phi[m] = total
    return phi


def mc_shapley(value: Callable[[tuple[str, ...]], float], order: Sequence[str], n_orderings: int,
               seed: int) -> dict[str, float]:
    """Monte-Carlo Shapley: mean over orderings π of v(pre_π(m) ∪ {m}) − v(pre_π(m)); antithetic (each
    drawn ordering is followed by its reverse), ``n_orderings`` in total (rounded up to even); each
    subset evaluated once. Efficiency holds exactly for every ordering."""
    mods = list(order)
    rs = np.random.RandomState(seed)
    cache: dict[tuple[str, ...], float] = {}

    def v(s: set[str]) -> float:
        key = tuple(m for m in mods if m in s)
        if key not in cache:
            cache[key] = float(value(key))
        return cache[key]

    sums = dict.fromkeys(mods, 0.0)
    count = 0
    for _ in range(max(1, (n_orderings + 1) // 2)):
        perm = [mods[i] for i in rs.permutation(len(mods))]
        for ordering in (perm, perm[::-1]):
            pre: set[str] = set()
            prev = v(pre)
            for m in ordering:
                pre = pre | {m}
                cur = v(pre)
                sums[m] += cur - prev
                prev = cur
            count += 1
    return {m: sums[m] / count for m in mods}


def shapley(value: Callable[[tuple[str, ...]], float], order: Sequence[str], *, n_orderings: int = 64,
            seed: int = 0) -> tuple[dict[str, float], str]:
    """(φ, "exact" | "monte_carlo")."""
    if len(order) <= EXACT_MAX:
        return exact_shapley(value, order), "exact"
    return mc_shapley(value, order, n_orderings, seed), "monte_carlo"


def share_and_index(phi: dict[str, float]) -> tuple[dict[str, float | None], float | None]:
    """share_m = φ_m / Σφ (None when Σφ ≤ 1e-12); imbalance index I = (max φ − min φ) / Σ|φ|
    (0 = equal use, 1 = one modality does all, up to 2 with negative φ; None when Σ|φ| ≤ 1e-12)."""
    total = sum(phi.values())
    share = {m: (x / total if total > 1e-12 else None) for m, x in phi.items()}
    abs_total = sum(abs(x) for x in phi.values())
    index = (max(phi.values()) - min(phi.values())) / abs_total if phi and abs_total > 1e-12 else None
    return share, index
