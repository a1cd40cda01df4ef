"""Probe solver: how far the final diagnostics' linear probes (L-BFGS-B, gtol 1e-6) are from the converged fit,
and what a converged fit costs, on realistic probe problems.

The probes (``mmbalance/diagnostics/probes.py``) fit a multinomial logistic regression to each modality's frozen
features; the solver and its tolerance are part of the committed numbers, so they stay as they are. This script
is the measurement behind that decision (docs/diagnostics.md, docs/performance.md).

Problems: the features of short real runs — ``--datasets`` (default mfeat-hard and avdigits-small) × ``--methods``
× ``--seeds`` × ``--epochs`` (a run per combination, diagnostics off, then the final diagnostics' own probe step
``run_probes`` on the selected model: the same fit rows, standardisation, row order and scoring as a report run).
Each modality's fit is one problem. Per problem the probe is fitted three ways, on the same objective:

- ``current``: ``fit_logreg`` as shipped (L-BFGS-B, maxiter 1000, maxcor 20, gtol 1e-6, scipy's default ftol);
- ``lbfgsb-tight``: L-BFGS-B with gtol 1e-12, ftol 0, maxiter 100000 (runs until the line search cannot improve);
- ``newton``: scipy ``trust-krylov`` (a Newton trust-region method) with the exact Hessian-vector product, gtol 1e-10;

and each probe is scored on val and test through the task meter, as in a report run. Printed: per problem the
accuracy of each (and the difference in samples), the objective gap f(current) − f(newton), the gradient norm at
the current solution, the iterations and the CPU seconds of each fit; then a summary: how many problems change
their val/test probe accuracy, by how much, and the converged fits' cost over the current one. The two converged
solvers cross-check each other (their accuracies must agree).

    python benchmarks/probe_solver.py [--datasets mfeat-hard avdigits-small] [--methods baseline ogm_ge cggm]
                                      [--seeds 0 1 2 3] [--epochs 5 30]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MMBALANCE_NO_PROGRESS", "1")

SOLVERS = ("current", "lbfgsb-tight", "newton")


def _hessp(theta: np.ndarray, v: np.ndarray, x: np.ndarray, onehot: np.ndarray, lam: float, labels=None) -> np.ndarray:
    """Hessian-vector product of the probe objective at theta (W: d×C, b: C) along v."""
    n, d = x.shape
    c = onehot.shape[1]
    w, b = theta[:d * c].reshape(d, c), theta[d * c:]
    vw, vb = v[:d * c].reshape(d, c), v[d * c:]
    z = x @ w + b
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    dz = x @ vw + vb
    dp = p * (dz - (p * dz).sum(axis=1, keepdims=True)) / n
    return np.concatenate([(x.T @ dp + lam * vw).ravel(), dp.sum(axis=0)])


def make_fit(solver: str, record: list):
    """A drop-in for ``probes.fit_logreg`` that fits with ``solver`` and records (iterations, CPU s, f, ‖∇f‖)."""
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    from mmbalance.diagnostics import probes as P

    shipped = P.fit_logreg  # make_fit is called before the module attribute is replaced

    def fit(z, y, num_classes, lam=P.LAMBDA):
        t0 = time.process_time()
        if solver == "current":
            probe = shipped(z, y, num_classes, lam)
            theta = np.concatenate([probe.weight.ravel(), probe.bias])
            order = P.canonical_order(z, y)
            zs, ys = np.asarray(z)[order], np.asarray(y, dtype=np.int64)[order]
            x = probe.scaler(zs)
        else:  # the same problem set-up as fit_logreg
            order = P.canonical_order(z, y)
            zs, ys = np.asarray(z)[order], np.asarray(y, dtype=np.int64)[order]
            scaler = P.Standardiser.fit(zs)
            x = scaler(zs)
            d = x.shape[1]
            onehot = np.zeros((len(ys), num_classes))
            onehot[np.arange(len(ys)), ys] = 1.0
            theta0 = np.zeros(d * num_classes + num_classes)
            with threadpool_limits(1):
                if solver == "lbfgsb-tight":
                    res = minimize(P._softmax_objective, theta0, args=(x, onehot, lam, ys), jac=True, method="L-BFGS-B",
                                   options={"maxiter": 100_000, "maxcor": 20, "gtol": 1e-12, "ftol": 0.0})
                else:
                    res = minimize(P._softmax_objective, theta0, args=(x, onehot, lam, ys), jac=True,
                                   hessp=_hessp, method="trust-krylov", options={"gtol": 1e-10, "maxiter": 1000})
            theta = res.x
            probe = P.LinearProbe(scaler, theta[:d * num_classes].reshape(d, num_classes), theta[d * num_classes:],
                                  bool(res.success), int(res.nit))
        seconds = time.process_time() - t0
        onehot = np.zeros((len(ys), num_classes))
        onehot[np.arange(len(ys)), ys] = 1.0
        f, g = P._softmax_objective(theta, x, onehot, lam, ys)
        record.append({"iterations": probe.iterations, "seconds": seconds, "f": f, "gnorm": float(np.abs(g).max()),
                       "n": len(ys), "d": x.shape[1]})
        return probe

    return fit


def problems(dataset: str, method: str, seed: int, epochs: int) -> list[dict]:
    """One run, then its probe step once per solver: a row per modality with every solver's scores."""
    from mmbalance.diagnostics import final
    from mmbalance.diagnostics import probes as P
    from mmbalance.testing import build_trainer

    with tempfile.TemporaryDirectory() as tmp:
        tr = build_trainer(method, dataset, run_dir=Path(tmp), seed=seed, epochs=epochs,
                           sets={"train.modality_eval": "none", "train.diagnostics": "none"})
        tr.fit()
        data, task = tr.data, tr.task
        split_seed = int(data.info.get("split_seed", 0))
        results = {}
        original = P.fit_logreg
        try:
            for solver in SOLVERS:
                record: list = []
                P.fit_logreg = make_fit(solver, record)
                with torch.random.fork_rng(devices=[]):
                    out = final.run_probes(tr, split_seed, {"val": data.val, "test": data.test})
                results[solver] = (out, record)
        finally:
            P.fit_logreg = original
        rows = []
        for i, m in enumerate(tr.ctx.modalities):
            row = {"problem": f"{dataset} {method} s{seed} e{epochs} {m}", "n_val": len(data.val),
                   "n_test": len(data.test), "metric": task.primary_metric}
            for solver, (out, record) in results.items():
                row[solver] = {"val": out["val"][m][task.primary_metric], "test": out["test"][m][task.primary_metric],
                               **record[i]}
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["mfeat-hard", "avdigits-small"])
    ap.add_argument("--methods", nargs="+", default=["baseline", "ogm_ge", "cggm"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    ap.add_argument("--epochs", nargs="+", type=int, default=[5, 30])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    rows = []
    print("| problem (dataset method seed epochs modality) | n fit × d | val: current / converged | test: current / "
          "converged | f(current) − f(newton) | max abs ∇f at current | iterations current / tight / newton | "
          "CPU s current / tight / newton |")
    print("|---|---|---|---|---|---|---|---|")
    for ds in args.datasets:
        for method in args.methods:
            for seed in args.seeds:
                for epochs in args.epochs:
                    for r in problems(ds, method, seed, epochs):
                        rows.append(r)
                        cur, tight, newt = (r[s] for s in SOLVERS)
                        for split in ("val", "test"):
                            if abs(tight[split] - newt[split]) > 1e-12:
                                print(f"  note: {r['problem']} {split}: the converged solvers disagree "
                                      f"({tight[split]:.6f} vs {newt[split]:.6f})")
                        print(f"| {r['problem']} | {cur['n']} × {cur['d']} | {cur['val']:.4f} / {newt['val']:.4f} | "
                              f"{cur['test']:.4f} / {newt['test']:.4f} | {cur['f'] - newt['f']:.2e} | {cur['gnorm']:.1e} | "
                              f"{cur['iterations']} / {tight['iterations']} / {newt['iterations']} | "
                              f"{cur['seconds']:.2f} / {tight['seconds']:.2f} / {newt['seconds']:.2f} |", flush=True)
    print()
    for split in ("val", "test"):
        diffs = [(abs(r["current"][split] - r["newton"][split]), r[f"n_{split}"]) for r in rows]
        changed = [(d, n) for d, n in diffs if d > 0]
        worst = max(diffs)
        print(f"{split}: probe {rows[0]['metric']} differs from the converged fit in {len(changed)} of {len(rows)} "
              f"problems; largest difference {worst[0]:.4f} ({round(worst[0] * worst[1])} of {worst[1]} samples); "
              f"median over the changed ones {statistics.median([d for d, _ in changed]) if changed else 0:.4f}; "
              f"changed at the printed precision (4 decimals): "
              f"{sum(round(r['current'][split], 4) != round(r['newton'][split], 4) for r in rows)}")
    for solver in SOLVERS[1:]:
        ratio = [r[solver]["seconds"] / r["current"]["seconds"] for r in rows]
        print(f"{solver} CPU time / current: median {statistics.median(ratio):.2f} (min {min(ratio):.2f}, "
              f"max {max(ratio):.2f}); total {sum(r[solver]['seconds'] for r in rows):.1f} s vs "
              f"{sum(r['current']['seconds'] for r in rows):.1f} s")
    print(f"\n({time.perf_counter() - t_start:.0f} s; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())})")


if __name__ == "__main__":
    main()
