"""Imbalance diagnostics computed by the engine for every run and every method (docs/diagnostics.md).

Layout: ``seeds`` (stable draws), ``probes`` (convex linear-probe solvers), ``shapley`` (exact and
Monte-Carlo modality Shapley values), ``splits`` (permuted/sub-sampled splits), ``dynamics`` (gradient
norms, confidence, gradient alignment), ``final`` (end-of-run probes/Shapley/permutation),
``runtime`` (:class:`Diagnostics`, the engine's single entry point), ``figures`` and ``cli``
(``python -m mmbalance.diagnose``).
"""
from .runtime import LEVELS, Diagnostics, total_seconds
from .seeds import seed_hash

__all__ = ["Diagnostics", "LEVELS", "seed_hash", "total_seconds"]
