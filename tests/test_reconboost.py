"""ReconBoost (docs/methods/reconboost.md §8)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmbalance.testing import build_trainer, first_batch
from tests.conftest import SMALL_MFEAT


def _rb(tmp_path, epochs=2, sets=None, dataset="mfeat", name="run", method="reconboost"):
    base = SMALL_MFEAT if dataset.startswith("mfeat") else {}
    return build_trainer(method, dataset, run_dir=tmp_path / name, epochs=epochs, sets={**base, **(sets or {})})


def test_round_robin_budget_and_phases(tmp_path):
    """§8 tests 1 and 7: M = 3, S = 6 → order[0,1,2,0,1,2]; E = 30, e1 = e2 = 1 → 15 stages, 30 passes."""
    tr = _rb(tmp_path, epochs=12, dataset="synthetic", sets={"dataset.n_samples": 40})
    assert tr.method.stage_modalities() == ["m0", "m1", "m2", "m0", "m1", "m2"]
    tr = _rb(tmp_path, epochs=30, name="b")
    phases = tr.method.phases()
    assert len(tr.method.stage_modalities()) == 15
    assert sum(p.epochs for p in phases) == 30
    assert [p.evaluate for p in phases] == [False, True] * 15
    tr = _rb(tmp_path, epochs=6, sets={"e2": 2}, name="c")  # e1 + e2 = 3 → 2 stages, evaluated once per stage
    assert [(p.epochs, p.evaluate) for p in tr.method.phases()] == [(1, False), (1, False), (1, True)] * 2


def test_phase_locality_and_rectification_updates_all(tmp_path):
    """§8 tests 2 and 4 (one stage: boost 'fac', then rectify)."""
    tr = _rb(tmp_path, epochs=2)
    model = tr.ctx.raw_model
    snaps = [{k: v.clone() for k, v in model.state_dict().items()}]
    orig = tr.method.on_phase_end

    def hook(ctx):
        snaps.append({k: v.clone() for k, v in model.state_dict().items()})
        orig(ctx)

    tr.method.on_phase_end = hook
    tr.fit()
    init, after1, after2 = snaps

    def changed(a, b, prefix):
        return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))

    assert changed(init, after1, "encoders.fac.") and changed(init, after1, "head.")
    assert not changed(init, after1, "encoders.fou.") and not changed(init, after1, "encoders.mor.")
    assert torch.equal(init["beta"], after1["beta"])
    for prefix in ("encoders.fac.", "encoders.fou.", "encoders.mor.", "head.", "beta"):
        assert changed(after1, after2, prefix), prefix


def test_weights_and_boost_loss_with_s_forced_to_one(tmp_path, monkeypatch):
    """§8 test 3: a_i ∈ [w1 − w2, w1]; with s = 1 the loss is (w1 − w2)·CE/C."""
    tr = _rb(tmp_path)
    ctx, meth = tr.ctx, tr.method
    ctx.phase_index = 0
    batch = first_batch(tr)
    out = meth.training_step(ctx, batch)
    assert 4.0 - 1e-6 <= out.logs["mean_weight"] <= 5.0 + 1e-6
    monkeypatch.setattr(meth, "_agreement", lambda *a, **k: torch.ones(len(batch["label"])))
    out = meth.training_step(ctx, batch)
    with torch.no_grad():
        f = ctx.raw_model.head(ctx.raw_model.encoders["fac"](batch["fac"]))
    want = (5.0 - 1.0) * F.cross_entropy(f, batch["label"]) / 10
    torch.testing.assert_close(out.loss.detach(), want)


def test_memory_consolidation_switch(tmp_path):
    """§8 test 5: ga_grad=false → α has no effect; ga_grad=true → gradients differ, previous learner gets none."""
    grads = {}
    for ga, alpha in ((False, 0.0), (False, 0.5), (True, 0.5)):
        tr = _rb(tmp_path, epochs=4, sets={"ga_grad": ga, "alpha": alpha}, name=f"{ga}{alpha}")
        ctx, model = tr.ctx, tr.ctx.raw_model
        ctx.phase_index = 2  # stage 1 boosts 'fou'; previous learner 'fac'
        loss = tr.method.training_step(ctx, first_batch(tr)).loss
        params = list(model.encoders["fou"].parameters()) + list(model.encoders["fac"].parameters())
        g = torch.autograd.grad(loss, params, allow_unused=True)
        n_fou = len(list(model.encoders["fou"].parameters()))
        assert all(x is None for x in g[n_fou:])
        grads[(ga, alpha)] = torch.cat([x.flatten() for x in g[:n_fou]])
    assert torch.equal(grads[(False, 0.0)], grads[(False, 0.5)])
    assert not torch.allclose(grads[(False, 0.5)], grads[(True, 0.5)])


def test_stage_selection_on_validation_and_single_test(tmp_path):
    """§8 test 6: validation sequence (0.5, 0.7, 0.6) → stage 1's model; test evaluated exactly once."""
    # diagnostics off: their extra validation passes would consume the mocked metric sequence
    tr = _rb(tmp_path, epochs=6, sets={"train.modality_eval": "none", "train.diagnostics": "none"})
    real = tr.evaluate
    seq = iter([0.5, 0.7, 0.6])
    calls = {"test": 0}

    def fake(split, absent=()):
        res = real(split, absent)
        if split is tr.data.test:
            calls["test"] += 1
        elif split is tr.data.val:
            res["accuracy"] = next(seq)
        return res

    tr.evaluate = fake
    res = tr.fit()
    assert res["selected"]["phase"] == "s1_rectify_eval" and res["val"]["accuracy"] == 0.7
    assert calls["test"] == 1


def test_resume_across_phase_boundary_equals_uninterrupted(tmp_path):
    """Kill at the start of stage 1 (after stage 0's evaluated phase), resume → identical numbers."""
    full = _rb(tmp_path, epochs=4, name="full").fit()
    tr = _rb(tmp_path, epochs=4, name="cut")
    orig = tr.method.on_epoch_start

    def killer(ctx):
        if ctx.phase_index == 2:
            raise KeyboardInterrupt
        orig(ctx)

    tr.method.on_epoch_start = killer
    try:
        tr.fit()
        raise AssertionError("expected the simulated kill")
    except KeyboardInterrupt:
        pass
    tr2 = _rb(tmp_path, epochs=4, name="cut")
    tr2.resume = True
    res = tr2.fit()
    assert res["test"] == full["test"] and res["val"] == full["val"] and res["selected"] == full["selected"]


def test_regression_and_segmentation_generalisation_runs(tmp_path):
    """§5 generalisations: β init 1/M for regression; per-pixel weights for segmentation."""
    tr = _rb(tmp_path, epochs=2, dataset="synthetic-regression", sets={"dataset.n_samples": 60}, name="r")
    assert abs(float(tr.ctx.raw_model.beta) - 1 / 3) < 1e-6
    res = tr.fit()
    assert res["status"] == "ok" and res["method_metrics"]["beta"] > 0
    res = _rb(tmp_path, epochs=2, dataset="synthetic-seg", sets={"dataset.n_samples": 30, "dataset.image_size": 8},
              name="s").fit()
    assert res["status"] == "ok"


DDP_DRIVER = """
import os, sys
from pathlib import Path
from mmbalance.run import main
out = Path(sys.argv[1])
for method in ("reconboost", "greedy"):
    os.environ["MMBALANCE_DUMP_PARAMS_DIR"] = str(out / method / "params")
    code = main(["--method", method, "--dataset", "mfeat", "--epochs", "3", "--quiet", "--run-dir", str(out / method / "run"),
                 "--set", "dataset.limit_per_class=20", "--set", "train.modality_eval=none", "--set", "start_epoch=0"]
                if method == "greedy" else
                ["--method", method, "--dataset", "mfeat", "--epochs", "4", "--quiet", "--run-dir", str(out / method / "run"),
                 "--set", "dataset.limit_per_class=20", "--set", "train.modality_eval=none"])
    assert code == 0, (method, code)
"""


@pytest.mark.ddp
def test_ddp_two_ranks_identical_parameters_reconboost_and_greedy(tmp_path):
    """reconboost.md §8 test 9 / greedy.md §8 test 9: a real 2-rank gloo run; every parameter and buffer
    (β, MMTM running averages) identical on both ranks at the end."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "driver.py"
    script.write_text(DDP_DRIVER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "MMBALANCE_NO_PROGRESS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in ("reconboost", "greedy"):
        r0 = torch.load(tmp_path / method / "params" / "rank0.pt")
        r1 = torch.load(tmp_path / method / "params" / "rank1.pt")
        if "model" in r0:  # engine format {"model": state_dict, "extra": {...}}
            r0, r1 = r0["model"], r1["model"]
        assert r0.keys() == r1.keys()
        for k in r0:
            assert torch.equal(r0[k], r1[k]), (method, k)
        import json

        res = json.loads((tmp_path / method / "run" / "result.json").read_text())
        assert res["world_size"] == 2 and res["status"] == "ok"
    gate = [k for k in r0 if "gate_avg" in k]
    assert gate and any(r0[k].abs().sum() > 0 for k in gate)


# ---------------------------------------------------------------- oracles and state (mutation-tested)
def test_boost_loss_by_hand_with_beta_and_the_other_learners(tmp_path):
    """L_b = mean_i a_i·CE(f_m(x_i), y_i)/C, a_i = w1 − w2·softmax(β·Σ_{k≠m} f_k(x_i))[y_i] (true class,
    softmax over classes, the OTHER learners only, β included), written out here with β = 2."""
    tr = _rb(tmp_path)
    ctx, meth, model = tr.ctx, tr.method, tr.ctx.raw_model
    ctx.phase_index = 0  # stage 0 boosts 'fac'
    with torch.no_grad():
        model.beta.fill_(2.0)
    batch = first_batch(tr)
    out = meth.training_step(ctx, batch)
    y = batch["label"]
    with torch.no_grad():
        f = {m: model.head(model.encoders[m](batch[m])).double() for m in ctx.modalities}
        others = 2.0 * (f["fou"] + f["mor"])
        p = torch.exp(others - torch.logsumexp(others, 1, keepdim=True))
        s = torch.stack([p[i, int(y[i])] for i in range(len(y))])
        a = 5.0 - 1.0 * s
        ce = torch.stack([-torch.log_softmax(f["fac"][i], 0)[int(y[i])] for i in range(len(y))])
        want = (a * ce).mean() / 10
    assert float(out.loss) == pytest.approx(float(want), rel=1e-5)


def test_beta_carries_over_phases_and_momentum_is_reset_each_phase(tmp_path):
    tr = _rb(tmp_path, epochs=4)
    meth, model = tr.method, tr.ctx.raw_model
    ends, starts, states = [], [], []
    orig_end, orig_start = meth.on_phase_end, meth.on_phase_start

    def end(c):
        ends.append(float(model.beta))
        orig_end(c)

    def start(c):
        orig_start(c)
        starts.append(float(model.beta))
        states.append(len(getattr(c.optimizer, "optimizer", c.optimizer).state))

    meth.on_phase_end, meth.on_phase_start = end, start
    tr.fit()
    assert len(starts) == 4 and ends[1] != 1.0
    assert starts[1:] == ends[:-1]  # β at each phase start = β at the previous phase's end
    assert states == [0, 0, 0, 0]


@pytest.mark.parametrize("dataset,w", [("mosi-synth", (1.0, 0.25)), ("iemocap-synth", (1.0, 0.25)),
                                       ("food101-synth", (5.0, 1.0)), ("brats-synth", (5.0, 1.0))])
@pytest.mark.parametrize("method", ["reconboost", "reconboost_official_schedule"])
def test_sample_weight_defaults_per_dataset(method, dataset, w):
    """reconboost.md §4: w1/w2 = 1.0/0.25 on MOSI and IEMOCAP (official MSA script), 5/1 elsewhere; set by
    the dataset method defaults (every preset), a user value still wins."""
    from mmbalance.run import build_parser, resolve

    small = {"mosi-synth": ["dataset.n_samples=20", "dataset.seq_len=2"],
             "iemocap-synth": ["dataset.n_samples=40", "dataset.seq_len=2"],
             "food101-synth": ["dataset.num_classes=2", "dataset.n_samples=20", "dataset.image_tokens=2",
                               "dataset.text_tokens=2"],
             "brats-synth": ["dataset.n_samples=20", "dataset.image_size=16"]}[dataset]
    argv = ["--method", method, "--dataset", dataset] + [a for s in small for a in ("--set", s)]
    *_, meth, _ = resolve(build_parser().parse_args(argv))
    assert (meth.hp.w1, meth.hp.w2) == w
    *_, meth, _ = resolve(build_parser().parse_args(argv + ["--set", "w1=2.5"]))
    assert (meth.hp.w1, meth.hp.w2) == (2.5, w[1])


def test_official_schedule_runs_sgd_001_09_5e4_whatever_the_dataset_optimizer(tmp_path):
    """reconboost.md §2: ``optimizer=official`` = SGD lr 0.01, momentum 0.9, weight decay 5e-4 in both
    phases (MOSI's dataset optimizer is Adam 1e-3 with a plateau schedule); the plain preset keeps it."""
    import json

    sets = {"dataset.n_samples": 20, "dataset.seq_len": 4, "train.max_steps_per_epoch": 1, "train.modality_eval": "none"}
    tr = _rb(tmp_path, epochs=8, dataset="mosi-synth", method="reconboost_official_schedule",
             sets={**sets, "max_stages": 1})
    opt = tr.ctx.optimizer.optimizer
    assert type(opt) is torch.optim.SGD
    assert {(g["lr"], g["momentum"], g["weight_decay"]) for g in opt.param_groups} == {(0.01, 0.9, 5e-4)}
    tr.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["lr"] == pytest.approx(0.01, rel=1e-12) for r in rows)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (cfg["optimizer"], cfg["lr"], cfg["momentum"], cfg["weight_decay"]) == ("sgd", 0.01, 0.9, 5e-4)
    plain = _rb(tmp_path, epochs=2, dataset="mosi-synth", sets=sets, name="plain")
    assert type(plain.ctx.optimizer.optimizer) is torch.optim.Adam
    assert {g["lr"] for g in plain.ctx.optimizer.optimizer.param_groups} == {1e-3}
