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
from scipy.special import logsumexp
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


def _softmax_objective(theta: np.ndarray, x: np.ndarray, onehot: np.ndarray, lam: float):
    """(1/n) Σ CE + (λ/2)‖W‖² and its gradient; theta = [W (d×C) row-major, b (C)]."""
    n, d = x.shape
    c = onehot.shape[1]
    w = theta[:d * c].reshape(d, c)
    b = theta[d * c:]
    z = x @ w + b
    lse = logsumexp(z, axis=1)
    loss = float((lse - (z * onehot).sum(axis=1)).mean() + 0.5 * lam * (w * w).sum())
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
        res = minimize(_softmax_objective, theta0, args=(x, onehot, lam), jac=True, method="L-BFGS-B",
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
