"""Linear probes of frozen features (deterministic convex solvers, float64).

Classification: multinomial logistic regression, objective (1/n) Σ_i CE(W z_i + b, y_i) + (λ/2)‖W‖²
(bias unpenalised), zero init, scipy L-BFGS-B with the analytic gradient. Strictly convex in W and
convex in b, so the optimum does not depend on the initial point or on the row order (up to rounding).
Regression: closed-form ridge (Xᵀ X + λ n I′) w = Xᵀ y with the bias unpenalised.
Features are standardised with the fit set's mean and std (ddof 0; std < 1e-8 → 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

LAMBDA = 1e-3
SOLVER = "logreg-lbfgsb"


@dataclass
class Standardiser:
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardiser:
        x = np.asarray(x, dtype=np.float64)
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        std[std < 1e-8] = 1.0
        return cls(mean, std)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.std


@dataclass
class LinearProbe:
    """A fitted probe: ``logits(z)`` = standardise(z) @ W + b."""

    scaler: Standardiser
    weight: np.ndarray  # [d, C] (regression: [d, 1])
    bias: np.ndarray  # [C]
    converged: bool
    iterations: int

    def logits(self, z: np.ndarray) -> np.ndarray:
        return self.scaler(z) @ self.weight + self.bias


def logsumexp_rows(z: np.ndarray) -> np.ndarray:
    """``scipy.special.logsumexp(z, axis=1)`` for a real 2-D float64 array, computed by the same operations in
    the same order (so bit for bit the same values) without scipy's array-API dispatch, which costs more than
    the arithmetic on a probe's [n, C] logits: log1p(Σ_{j not a row maximum} exp(z_j − max) / k) + log k + max,
    k = the number of entries equal to the row maximum."""
    z_max = z.max(axis=1, keepdims=True)
    at_max = z == z_max
    s = np.exp(np.where(at_max, -np.inf, z) - z_max).sum(axis=1, keepdims=True, dtype=z.dtype)
    if np.count_nonzero(at_max) == len(z):  # no ties (the usual case): k = 1, s / 1 = s and log 1 = +0 are exact
        return (np.log1p(s) + z_max)[:, 0]
    k = at_max.sum(axis=1, keepdims=True, dtype=z.dtype)
    s = np.where(s == 0, s, s / k)
    out = np.log1p(s) + np.log(k) + z_max
    return out[:, 0]


def _softmax_objective(theta: np.ndarray, x: np.ndarray, onehot: np.ndarray, lam: float,
                       labels: np.ndarray | None = None):
    """(1/n) Σ CE + (λ/2)‖W‖² and its gradient; theta = [W (d×C) row-major, b (C)]. ``labels`` (the argmax of
    ``onehot``) picks the true-class logits directly (the same values as the row sums of z·onehot)."""
    n, d = x.shape
    c = onehot.shape[1]
    w = theta[:d * c].reshape(d, c)
    b = theta[d * c:]
    z = x @ w + b
    lse = logsumexp_rows(z)
    true = (z * onehot).sum(axis=1) if labels is None else z[np.arange(n), labels]
    loss = float((lse - true).mean() + 0.5 * lam * (w * w).sum())
    p = np.exp(z - lse[:, None])
    r = (p - onehot) / n
    gw = x.T @ r + lam * w
    gb = r.sum(axis=0)
    return loss, np.concatenate([gw.ravel(), gb])


def canonical_order(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row order sorted by (label, features): the fit sees the same rows in the same order whatever
    order they came in, so the result is bitwise independent of the row order."""
    keys = [np.asarray(z, dtype=np.float64)[:, j] for j in range(np.shape(z)[1] - 1, -1, -1)]
    return np.lexsort([*keys, np.asarray(y).reshape(len(y))])


def fit_logreg(z: np.ndarray, y: np.ndarray, num_classes: int, lam: float = LAMBDA) -> LinearProbe:
    """Multinomial logistic regression (objective in the module docstring) with scipy L-BFGS-B
    (maxiter 1000, maxcor 20, gtol 1e-6), zero init, rows in :func:`canonical_order`."""
    order = canonical_order(z, y)
    z, y = np.asarray(z)[order], np.asarray(y)[order]
    scaler = Standardiser.fit(z)
    x = scaler(z)
    y = np.asarray(y, dtype=np.int64)
    onehot = np.zeros((len(y), num_classes))
    onehot[np.arange(len(y)), y] = 1.0
    d = x.shape[1]
    theta0 = np.zeros(d * num_classes + num_classes)
    # one BLAS thread: these matrices are small, and on a shared CPU extra threads cost ~10x
    with threadpool_limits(1):
        res = minimize(_softmax_objective, theta0, args=(x, onehot, lam, y), jac=True, method="L-BFGS-B",
                       options={"maxiter": 1000, "maxcor": 20, "gtol": 1e-6})
    w = res.x[:d * num_classes].reshape(d, num_classes)
    return LinearProbe(scaler, w, res.x[d * num_classes:], bool(res.success), int(res.nit))


def fit_ridge(z: np.ndarray, y: np.ndarray, lam: float = LAMBDA) -> LinearProbe:
    """Closed-form ridge on standardised features: (XᵀX + λn·I′)θ = Xᵀy, I′ without the bias entry,
    solved with ``numpy.linalg.solve`` in float64, rows in :func:`canonical_order`."""
    order = canonical_order(z, y)
    z, y = np.asarray(z)[order], np.asarray(y)[order]
    scaler = Standardiser.fit(z)
    x = scaler(z)
    n, d = x.shape
    xb = np.concatenate([x, np.ones((n, 1))], axis=1)
    reg = lam * n * np.eye(d + 1)
    reg[d, d] = 0.0
    theta = np.linalg.solve(xb.T @ xb + reg, xb.T @ np.asarray(y, dtype=np.float64).reshape(n, 1))
    return LinearProbe(scaler, theta[:d], theta[d], True, 0)
