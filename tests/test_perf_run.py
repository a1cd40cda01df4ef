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
    assert np.array_equal(P.logsumexp_rows(z[3:]), logsumexp(z[3:], axis=1))  # no ties: the fast path


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


@pytest.mark.parametrize("method, model", [("baseline", {}), ("baseline", {"model.name": "mlp_transformer_fusion"}),
                                           ("qmf", {})])
def test_per_modality_evaluation_shares_the_encoders_and_gives_the_same_numbers(tmp_path, method, model):
    """Concat fusion of pooled features, transformer fusion of the features themselves, and a method with its
    own predict (which keeps one pass per modality)."""
    import torch

    from mmbalance.testing import build_trainer

    tr = build_trainer(method, "mfeat", run_dir=tmp_path, epochs=1,
                       sets={"dataset.limit_per_class": 20, "train.diagnostics": "none", "train.eval_batch_size": 24,
                             **model})
    tr.fit()
    mods = tr.ctx.modalities
    assert len(mods) == 3 and tr._shares_encoders() == (method == "baseline")  # QMF predicts with its own heads
    split = tr.data.test  # 40 samples: two batches of 24 and 16
    # the oracle: one pass per modality with the others absent (their neutral input through the whole model)
    want_full = tr.evaluate(split)
    want = {m: tr.evaluate(split, tuple(o for o in mods if o != m)) for m in mods}
    rows: dict[str, list[int]] = {m: [] for m in mods}
    raw = tr.ctx.raw_model
    hooks = [raw.encoders[m].register_forward_hook(lambda mod, inp, out, m=m: rows[m].append(len(inp[0])))
             for m in mods]
    try:
        full, per_mod = tr.evaluate_with_modalities(split)
    finally:
        for h in hooks:
            h.remove()
    assert full == want_full
    for m in mods:
        assert per_mod[m]["accuracy"] == want[m]["accuracy"], m
        assert per_mod[m]["loss"] == pytest.approx(want[m]["loss"], rel=1e-6, abs=1e-7), m
    if method == "baseline":  # each encoder: the two real batches once, plus one neutral sample per call
        assert all(sorted(rows[m]) == [1, 16, 24] for m in mods), rows
    assert tr.ctx.model.training and torch.is_grad_enabled()  # train mode and gradients back on


@pytest.mark.parametrize("method", ["baseline", "ogm_ge"])  # ogm_ge edits the encoders' gradients
def test_compiled_model_trains_to_the_same_numbers(run_cli, tmp_path, method):
    import json

    sets = {"dataset.limit_per_class": 20, "train.max_steps_per_epoch": 3, "train.diagnostics": "none",
            "train.modality_eval": "none"}
    _, _, plain = run_cli(method, sets=sets, epochs=2, run_dir=tmp_path / "plain")
    code, rd, compiled = run_cli(method, sets={**sets, "train.compile": True, "train.compile_backend": "eager"},
                                 epochs=2, run_dir=tmp_path / "compiled")
    assert code == 0
    assert json.loads((rd / "config.json").read_text())["acceleration"]["compile"] == "eager"
    for split in ("val", "test"):
        for k, v in plain[split].items():
            assert compiled[split][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (split, k)
    assert compiled["method_metrics"].keys() == plain["method_metrics"].keys()
    assert compiled["config_hash"] != plain["config_hash"]  # a compiled run is its own configuration


def test_edited_gradient_norms_are_recomputed_only_for_methods_that_edit(run_cli, tmp_path):
    import json

    sets = {"dataset.limit_per_class": 20, "train.max_steps_per_epoch": 4, "train.modality_eval": "none"}
    for method, edits in (("baseline", False), ("ogm_ge", True)):
        _, rd, _ = run_cli(method, sets=sets, epochs=2, run_dir=tmp_path / method)
        for line in (rd / "metrics.jsonl").read_text().splitlines():
            d = json.loads(line)["diag"]
            same = all(d["grad_norm"][k] == d["grad_norm_raw"][k] for k in d["grad_norm"])
            assert same != edits, (method, d["grad_norm"], d["grad_norm_raw"])


def test_fp16_with_fused_adam_skips_on_the_device_without_a_host_read(tmp_path, monkeypatch):
    """Fused Adam (model and CGGM's classifiers): an overflow skips every optimizer's update, decided on the
    device (no .item()/bool() in the optimizer step); without overflow the update is the float32 one."""
    import torch
    from test_precision import SCALE, _params, emulate_fp16

    from mmbalance.testing import build_trainer

    sets = {"dataset.limit_per_class": 20, "train.optimizer": "adam", "train.lr": 1e-3, "train.weight_decay": 0.0,
            "train.diagnostics": "none", "train.modality_eval": "none"}

    def trainer(name, steps):
        return build_trainer("cggm", run_dir=tmp_path / name, epochs=1,
                             sets={**sets, "train.max_steps_per_epoch": steps})

    ref = trainer("ref", 3)
    ref.fit()
    want = _params(ref)
    reads = []
    for name, inf in (("ok", False), ("inf", True)):
        tr = trainer(name, 3 if not inf else 1)
        scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)
        emulate_fp16(tr, scaler)
        if inf:
            next(iter(tr.ctx.raw_model.parameters())).register_hook(lambda g: torch.full_like(g, float("inf")))
        before = _params(tr)
        step = tr._step_optimizers

        def no_read_step(opts, step=step):
            with monkeypatch.context() as m:
                for attr in ("item", "__bool__", "tolist"):
                    m.setattr(torch.Tensor, attr, lambda *a, attr=attr: reads.append(attr) or 0)
                return step(opts)

        monkeypatch.setattr(tr, "_step_optimizers", no_read_step)
        tr.fit()
        got = _params(tr)
        for part in ("model", "extra"):
            for b, g, w in zip(before[part], got[part], want[part]):
                if inf:
                    assert torch.equal(g, b), part
                else:
                    torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
        assert scaler.get_scale() == (SCALE * 0.5 if inf else SCALE)
    assert reads == []
