"""The fixed work of a run made cheap without changing a number: the probe solver's objective, the shared
per-modality evaluation, the warm worker's preloading."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp

from mmbalance.diagnostics import probes as P


def test_logsumexp_rows_is_scipys_bit_for_bit():
    rs = np.random.RandomState(0)
    z = rs.randn(300, 10) * 30
    z[0] = 5.0  # a row that is all ties
    z[1, :2] = z[1].max() + 1  # two entries tie at the maximum
    z[2] = [-1e300] * 9 + [0.0]  # every other entry underflows: the sum is 0
    assert np.array_equal(P.logsumexp_rows(z), logsumexp(z, axis=1))


def test_probe_objective_with_labels_equals_the_one_hot_form():
    rs = np.random.RandomState(1)
    x, y = rs.randn(50, 6), rs.randint(0, 4, 50)
    onehot = np.eye(4)[y]
    theta = rs.randn(6 * 4 + 4)
    f1, g1 = P._softmax_objective(theta, x, onehot, 1e-3)
    f2, g2 = P._softmax_objective(theta, x, onehot, 1e-3, y)
    assert f1 == f2 and np.array_equal(g1, g2)
    # and the value is the cross-entropy + (λ/2)‖W‖² computed by hand
    w, b = theta[:24].reshape(6, 4), theta[24:]
    logits = x @ w + b
    ce = np.mean([np.log(np.exp(r).sum()) - r[t] for r, t in zip(logits, y)])
    assert f1 == pytest.approx(ce + 0.5e-3 * (w * w).sum(), rel=1e-12)


def test_worker_preloads_a_dataset_once_and_the_run_uses_that_copy(monkeypatch):
    import torch

    from mmbalance import registry
    from mmbalance.leaderboard import worker
    from mmbalance.run import build_parser, resolve

    monkeypatch.setattr(registry, "_PRELOADED", {})
    loads = []
    real = registry.DATASETS.get("mfeat").factory

    def counting(opts, data_dir):
        loads.append(opts)
        return real(opts, data_dir)

    counting.options_cls = real.options_cls
    monkeypatch.setattr(registry.DATASETS.get("mfeat"), "factory", counting)
    argv = ["--method", "baseline", "--dataset", "mfeat", "--set", "dataset.limit_per_class=20", "--epochs", "1"]
    threads = torch.get_num_threads()
    assert worker.preload_dataset(argv) and worker.preload_dataset(argv + ["--seed", "3"])  # same data request
    assert len(loads) == 1 and torch.get_num_threads() == threads
    _, _, data, _, _ = resolve(build_parser().parse_args(argv + ["--seed", "1"]))
    assert len(loads) == 1 and data is next(iter(registry._PRELOADED.values()))
    other = resolve(build_parser().parse_args(["--dataset", "mfeat", "--set", "dataset.limit_per_class=25"]))[2]
    assert len(loads) == 2 and other is not data and len(other.train) != len(data.train)
    assert not worker.preload_dataset(["--dataset", "no-such-dataset"])  # left to the run to report
    assert not worker.preload_dataset(["--bad-flag"])
