"""Imbalance diagnostics (mmbalance/diagnostics): Shapley on toy games with known values, the probe
solver, planted useless modality, non-interference with training, determinism and pairing."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from mmbalance.diagnostics import probes as P
from mmbalance.diagnostics.seeds import seed_hash, stratified_subset
from mmbalance.diagnostics.shapley import exact_shapley, mc_shapley, share_and_index

SYN = {"dataset.n_samples": 200}


# ----------------------------------------------------------------------------- Shapley (pure)
def _table_game(table: dict[frozenset, float]):
    return lambda s: table[frozenset(s)]


def test_seed_hash_is_the_documented_sha256_prefix():
    # sha256("1|probe")[:8] computed by hand with hashlib on the literal string
    import hashlib

    assert seed_hash(1, "probe") == int(hashlib.sha256(b"1|probe").hexdigest()[:8], 16)
    assert seed_hash(0, "perm", 2, 3) != seed_hash(0, "perm", 3, 2)


def test_shapley_known_value_table_three_players():
    # v(∅)=0, v(a)=0.1, v(b)=0.2, v(c)=0, v(ab)=0.6, v(ac)=0.1, v(bc)=0.2, v(abc)=0.9
    t = {frozenset(): 0.0, frozenset("a"): 0.1, frozenset("b"): 0.2, frozenset("c"): 0.0,
         frozenset("ab"): 0.6, frozenset("ac"): 0.1, frozenset("bc"): 0.2, frozenset("abc"): 0.9}
    phi = exact_shapley(_table_game(t), ["a", "b", "c"])
    # hand computation, weights 1/3 (|S|=0), 1/6 (|S|=1), 1/3 (|S|=2):
    # a: 1/3·0.1 + 1/6·(0.6−0.2) + 1/6·(0.1−0) + 1/3·(0.9−0.2) = 0.0333.. + 0.0666.. + 0.0166.. + 0.2333..
    assert phi["a"] == pytest.approx(0.35, abs=1e-12)
    # b: 1/3·0.2 + 1/6·(0.6−0.1) + 1/6·(0.2−0) + 1/3·(0.9−0.1)
    assert phi["b"] == pytest.approx(0.2 / 3 + 0.5 / 6 + 0.2 / 6 + 0.8 / 3, abs=1e-12)
    # c: 1/3·0 + 1/6·(0.1−0.1) + 1/6·(0.2−0.2) + 1/3·(0.9−0.6)
    assert phi["c"] == pytest.approx(0.1, abs=1e-12)
    assert sum(phi.values()) == pytest.approx(0.9, abs=1e-12)


@pytest.mark.parametrize("mc", [False, True])
def test_additive_game_gives_its_coefficients(mc):
    a = {"x": 0.3, "y": -0.1, "z": 0.25, "w": 0.0}
    v = lambda s: sum(a[m] for m in s)  # noqa: E731
    phi = mc_shapley(v, list(a), 10, seed=3) if mc else exact_shapley(v, list(a))
    for m in a:
        assert phi[m] == pytest.approx(a[m], abs=1e-12)


def test_null_and_symmetric_players():
    # u, v symmetric (only their count matters), n is a null player
    def game(s):
        k = len(set(s) & {"u", "v"})
        return [0.0, 0.3, 1.0][k]

    phi = exact_shapley(game, ["u", "n", "v"])
    assert phi["n"] == 0.0
    assert phi["u"] == pytest.approx(phi["v"], abs=1e-15) and phi["u"] == pytest.approx(0.5)


def _random_game(m: int, seed: int):
    rs = np.random.RandomState(seed)
    names = [f"p{i}" for i in range(m)]
    table = {frozenset(c): float(rs.uniform()) for r in range(m + 1) for c in itertools.combinations(names, r)}
    table[frozenset()] = 0.05
    return names, table


def test_monte_carlo_matches_exact_for_five_players():
    # an accuracy-like saturating game, v(S) = 1 − Π_{m∈S}(1 − a_m), plus a small random interaction
    names, noise = _random_game(5, 0)
    a = dict(zip(names, [0.6, 0.3, 0.2, 0.1, 0.05]))
    table = {s: 1 - float(np.prod([1 - a[m] for m in s])) + 0.05 * x for s, x in noise.items()}
    exact = exact_shapley(_table_game(table), names)
    mc = mc_shapley(_table_game(table), names, 2000, seed=1)
    for m in names:
        assert abs(exact[m] - mc[m]) < 0.01


@pytest.mark.parametrize("m", [1, 2, 3, 7])
def test_efficiency_exact_and_monte_carlo(m):
    names, table = _random_game(m, m)
    target = table[frozenset(names)] - table[frozenset()]
    if m <= 6:
        assert sum(exact_shapley(_table_game(table), names).values()) == pytest.approx(target, abs=1e-12)
    assert sum(mc_shapley(_table_game(table), names, 6, seed=0).values()) == pytest.approx(target, abs=1e-12)


def test_share_and_imbalance_index_by_hand():
    share, idx = share_and_index({"a": 0.6, "b": 0.2, "c": -0.2})
    assert share == pytest.approx({"a": 1.0, "b": 1 / 3, "c": -1 / 3})
    assert idx == pytest.approx((0.6 + 0.2) / 1.0)
    share, idx = share_and_index({"a": 0.0, "b": 0.0})
    assert share == {"a": None, "b": None} and idx is None


def test_stratified_subset_is_proportional_and_seeded():
    keys = np.array([0] * 60 + [1] * 30 + [2] * 10)
    idx = stratified_subset(keys, 50, 7)
    assert np.bincount(keys[idx]).tolist() == [30, 15, 5]
    assert np.array_equal(idx, stratified_subset(keys, 50, 7)) and len(set(idx)) == 50


# ----------------------------------------------------------------------------- probe solver
def _blobs(n=300, d=8, c=3, sep=3.0, seed=0):
    rs = np.random.RandomState(seed)
    y = rs.randint(0, c, n)
    means = rs.normal(size=(c, d)) * sep
    return means[y] + rs.normal(size=(n, d)), y


def test_probe_linearly_separable_scores_one():
    x, y = _blobs(sep=20.0)
    probe = P.fit_logreg(x, y, 3)
    assert probe.converged and (probe.logits(x).argmax(1) == y).all()


def test_probe_independent_of_row_order_and_repeatable():
    x, y = _blobs(sep=0.7)  # overlapping: the decision boundary depends on every row
    xt, _ = _blobs(n=200, sep=0.7, seed=1)
    a = P.fit_logreg(x, y, 3)
    perm = np.random.RandomState(5).permutation(len(y))
    b = P.fit_logreg(x[perm], y[perm], 3)
    c = P.fit_logreg(x, y, 3)
    assert np.array_equal(a.logits(xt), b.logits(xt))
    assert np.array_equal(a.logits(xt), c.logits(xt))
    r1, r2 = P.fit_ridge(x, y.astype(float)), P.fit_ridge(x[perm], y[perm].astype(float))
    assert np.array_equal(r1.logits(xt), r2.logits(xt))


def test_probe_objective_gradient_is_analytic():
    x, y = _blobs(n=40, d=3)
    onehot = np.eye(3)[y]
    theta = np.random.RandomState(0).normal(size=3 * 3 + 3)
    _, g = P._softmax_objective(theta, x, onehot, 1e-3)
    eps = 1e-6
    for i in range(len(theta)):
        e = np.zeros_like(theta)
        e[i] = eps
        num = (P._softmax_objective(theta + e, x, onehot, 1e-3)[0] - P._softmax_objective(theta - e, x, onehot, 1e-3)[0]) / (2 * eps)
        assert g[i] == pytest.approx(num, abs=1e-6)


def test_probe_matches_sklearn():
    sk = pytest.importorskip("sklearn.linear_model")
    x, y = _blobs(n=400, d=10, c=4, sep=0.8)
    xt, yt = _blobs(n=400, d=10, c=4, sep=0.8, seed=0)
    scaler = P.Standardiser.fit(x)
    ours = P.fit_logreg(x, y, 4)
    ref = sk.LogisticRegression(C=1 / (P.LAMBDA * len(y)), max_iter=5000, tol=1e-8).fit(scaler(x), y)
    acc_ours = (ours.logits(xt).argmax(1) == yt).mean()
    acc_ref = (ref.predict(scaler(xt)) == yt).mean()
    assert abs(acc_ours - acc_ref) <= 0.01


def test_ridge_closed_form_by_hand():
    # one standardised feature x = ±1, y = 2x + 1: ridge slope = 2n/(n + λn) = 2/(1+λ), bias 1
    x = np.array([[-1.0], [1.0], [-1.0], [1.0]])
    y = 2 * x[:, 0] + 1
    r = P.fit_ridge(x, y, lam=0.5)
    assert r.weight[0, 0] == pytest.approx(2 / 1.5) and r.bias[0] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- end to end
def _result(rd):
    return json.loads((rd / "result.json").read_text())


def _rows(rd):
    return [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]


def test_synthetic_run_efficiency_and_singletons(run_cli):
    # `full`: with 3 modalities the per-epoch validation φ (three extra passes per epoch) is a `full` diagnostic
    code, rd, res = run_cli("baseline", "synthetic", epochs=2, sets={**SYN, "train.diagnostics": "full"})
    assert code == 0
    d = res["diagnostics"]
    for split in ("test", "val"):
        sh = d["shapley"][split]
        full = res[split]["accuracy"]
        assert sum(sh["phi"].values()) == pytest.approx(full - sh["v"]["none"], abs=1e-9)
        pm = res[f"{split}_per_modality"]
        for m in ("m0", "m1", "m2"):
            assert sh["v"][m] == pm[m]["accuracy"]
        assert set(sh["v"]) == {"none", "m0", "m1", "m2", "m0+m1", "m0+m2", "m1+m2", "m0+m1+m2"}
    # v(∅) = the training-prior predictor: the majority training class's share of the test split
    from mmbalance.registry import create_dataset

    data = create_dataset("synthetic", None, n_samples=200)
    major = int(torch.bincount(data.train.labels).argmax())
    assert d["shapley"]["test"]["v"]["none"] == pytest.approx(float((data.test.labels == major).double().mean()))
    rows = _rows(rd)
    keys = {"grad_norm_raw", "grad_norm", "grad_sq", "grad_ratio", "edit_ratio", "conf", "conf_ratio",
            "cos_uni_fused", "conflict_rate", "shapley_val", "seconds"}
    assert all(keys <= set(r["diag"]) for r in rows)
    assert set(rows[0]["diag"]["grad_norm_raw"]) == {"m0", "m1", "m2", "head"}  # run files sort keys
    # per-epoch val φ at the selected epoch equals the final val φ (same weights, same passes)
    sel = res["selected"]["epoch"]
    assert rows[sel]["diag"]["shapley_val"] == pytest.approx(d["shapley"]["val"]["phi"], abs=1e-12)
    assert res["timings"]["diagnostics_seconds"] > 0


def test_planted_noise_modality(run_cli):
    sets = {"dataset.n_samples": 600, "dataset.noise_modalities": 1}
    code, rd, res = run_cli("baseline", "synthetic", epochs=10, sets=sets)
    assert code == 0
    d = res["diagnostics"]
    n_test = 120
    chance = 1 / 4
    bound = chance + 3 * math.sqrt(chance * (1 - chance) / n_test)
    assert abs(d["shapley"]["test"]["phi"]["n0"]) <= 0.03
    assert abs(d["permutation"]["test"]["drop"]["n0"]) <= 0.03
    assert d["probe"]["test"]["n0"]["accuracy"] <= bound
    assert d["shapley"]["test"]["phi"]["m0"] >= 0.1
    assert d["probe"]["test"]["m0"]["accuracy"] > bound


def test_random_encoder_probe(tmp_path):
    """A frozen random encoder: at chance on the noise modality, clearly above on m0."""
    from mmbalance.diagnostics.final import run_probes
    from mmbalance.testing import build_trainer

    tr = build_trainer("baseline", "synthetic", run_dir=tmp_path / "r",
                       sets={"dataset.n_samples": 600, "dataset.noise_modalities": 1})
    out = run_probes(tr, 0, {"test": tr.data.test})
    bound = 0.25 + 3 * math.sqrt(0.25 * 0.75 / 120)
    assert out["test"]["n0"]["accuracy"] <= bound
    assert out["test"]["m0"]["accuracy"] > bound + 0.1
    assert all(out["converged"].values())


def test_zeroed_head_block_gives_offset_phi_and_zero_drop(tmp_path):
    """Concat-linear head with modality m's weight block zeroed: m is ignored, so drop_m = 0 and
    φ_m = (v_all_absent − v(∅))/M exactly (and 0 when v(∅) := v_all_absent)."""
    from mmbalance.diagnostics.final import final_diagnostics
    from mmbalance.testing import build_trainer

    for empty in ("prior", "all_absent"):
        tr = build_trainer("baseline", "synthetic", run_dir=tmp_path / empty, epochs=1,
                           sets={**SYN, "train.diag_shapley_empty": empty, "dataset.num_classes": 3})
        tr.fit()
        model = tr.ctx.raw_model
        sl = model.split_head()["m1"]
        with torch.no_grad():
            model.final_layer().weight[:, sl] = 0.0
        test, val = tr.evaluate(tr.data.test), tr.evaluate(tr.data.val)
        d = final_diagnostics(tr, test=test, val=val, test_pm=tr.evaluate_per_modality(tr.data.test),
                              val_pm=tr.evaluate_per_modality(tr.data.val), level="default")
        sh = d["shapley"]["test"]
        assert d["permutation"]["test"]["drop"]["m1"] == 0.0
        expected = (sh["v_all_absent"] - sh["v"]["none"]) / 3
        assert sh["phi"]["m1"] == pytest.approx(expected, abs=1e-12)
        if empty == "all_absent":
            assert sh["phi"]["m1"] == pytest.approx(0.0, abs=1e-12)
        else:
            assert sh["v"]["none"] == sh["v_prior"]


def _final_state(rd):
    best = torch.load(rd / "checkpoints" / "best.pt", weights_only=False)
    last = torch.load(rd / "checkpoints" / "last.pt", weights_only=False)
    return best, last


def _assert_same_tree(a, b, path="") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{path}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    else:
        assert a == b or (a != a and b != b), path


@pytest.mark.parametrize("method,dataset,sets", [
    ("baseline", "synthetic", {**SYN, "model.dropout": 0.3}),  # dropout: the RNG must be forked
    ("ogm_ge", "synthetic", SYN),
    ("mrd", "synthetic", SYN),
    ("baseline", "synthetic-seg", {"dataset.n_samples": 40}),  # BatchNorm: buffers must be restored
])
def test_non_interference(tmp_path, method, dataset, sets):
    """train.diagnostics=none and =default end bitwise identical (weights, optimizer, RNG, metrics)."""
    from mmbalance.run import main
    from mmbalance.testing import cli_args

    results = {}
    for level in ("none", "default"):
        rd = tmp_path / level
        assert main(cli_args(method, dataset, epochs=2, run_dir=rd, sets={**sets, "train.diagnostics": level})) == 0
        results[level] = (rd, _result(rd))
    (rd_n, res_n), (rd_d, res_d) = results["none"], results["default"]
    assert "diagnostics" not in res_n and "diagnostics" in res_d
    for key in ("val", "test", "val_per_modality", "test_per_modality", "selected", "method_metrics"):
        assert res_n[key] == res_d[key], key
    best_n, last_n = _final_state(rd_n)
    best_d, last_d = _final_state(rd_d)
    _assert_same_tree(best_n, best_d)
    for key in ("weights", "optimizer", "extra_optimizers", "rng", "schedule"):
        _assert_same_tree(last_n[key], last_d[key], key)
    rows_n, rows_d = _rows(rd_n), _rows(rd_d)
    for a, b in zip(rows_n, rows_d):
        for k in a:
            if k != "epoch_seconds":
                assert a[k] == b[k], k


def test_determinism_and_pairing(tmp_path):
    """Same config twice → identical diagnostics; another method and another training seed see the
    same diagnostic subset, probe fit rows and permutations."""
    from mmbalance.run import main
    from mmbalance.testing import cli_args

    def run(method, seed, name):
        rd = tmp_path / name
        assert main(cli_args(method, "synthetic", seed=seed, epochs=1, run_dir=rd, sets=SYN)) == 0
        return _result(rd)["diagnostics"], _rows(rd)

    (a, ra), (b, rb) = run("baseline", 0, "a"), run("baseline", 0, "b")
    for blk in (a, b):
        blk.pop("seconds")
    assert a == b
    strip = lambda rows: [{k: v for k, v in r["diag"].items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(ra) == strip(rb)
    (c, _), (e, _) = run("ogm_ge", 0, "c"), run("baseline", 1, "e")
    assert a["fingerprints"] == c["fingerprints"] == e["fingerprints"]
    assert a["probe"]["n_fit"] == 140


def test_unimodal_cosine_is_one_and_edit_ratio(run_cli):
    code, rd, _ = run_cli("unimodal:m0", "synthetic", epochs=2, sets=SYN)
    assert code == 0
    for r in _rows(rd):
        assert r["diag"]["cos_uni_fused"]["m0"] == pytest.approx(1.0, abs=1e-6)
        assert math.isnan(r["diag"]["grad_ratio"]["m0"]) if isinstance(r["diag"]["grad_ratio"]["m0"], float) \
            else r["diag"]["grad_ratio"]["m0"] == "nan"
    code, rd, _ = run_cli("baseline", "synthetic", epochs=2, sets=SYN)
    assert all(all(v == 1.0 for v in r["diag"]["edit_ratio"].values()) for r in _rows(rd))
    code, rd, _ = run_cli("ogm", "synthetic", epochs=3, sets=SYN)
    assert code == 0
    assert any(r["diag"]["edit_ratio"]["m0"] < 1.0 for r in _rows(rd))


# ----------------------------------------------------------------------------- diagnose CLI
def _tiny_run(tmp_path, name, method="baseline", sets=None, epochs=2):
    from mmbalance.run import main
    from mmbalance.testing import cli_args

    rd = tmp_path / "runs" / name
    assert main(cli_args(method, "synthetic", epochs=epochs, run_dir=rd, sets={**SYN, **(sets or {})})) == 0
    return rd


def test_diagnose_cli_writes_figures_deterministically(tmp_path, capsys):
    from mmbalance.diagnose import main

    _tiny_run(tmp_path, "baseline")
    _tiny_run(tmp_path, "ogm_ge", method="ogm_ge")
    _tiny_run(tmp_path, "uni", method="unimodal:m1")
    outs = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        assert main([str(tmp_path / "runs"), "--out", str(out)]) == 0
        outs.append(out)
    names = sorted(p.name for p in outs[0].iterdir())
    assert {"summary.md", "summary.csv", "summary.json", "shapley_synthetic.png", "probe_gap_synthetic.png",
            "compare_synthetic.png", "dynamics_synthetic_baseline.png", "dynamics_synthetic_ogm_ge.png"} <= set(names)
    for n in names:
        assert (outs[0] / n).read_bytes() == (outs[1] / n).read_bytes(), n
    md = (outs[0] / "summary.md").read_text()
    assert "weak modality:" in md and "| baseline | 1 |" in md
    # the unimodal:m1 row provides the m1 gap: probe(unimodal:m1) − probe(baseline)
    summary = json.loads((outs[0] / "summary.json").read_text())["synthetic"]
    base = _result(tmp_path / "runs" / "baseline")["diagnostics"]["probe"]["test"]["m1"]["accuracy"]
    uni = _result(tmp_path / "runs" / "uni")["diagnostics"]["probe"]["test"]["m1"]["accuracy"]
    assert summary["baseline"]["gap[m1]"]["mean"] == pytest.approx(uni - base, abs=1e-12)


def test_diagnose_bad_input(tmp_path, capsys):
    from mmbalance.diagnose import main

    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    assert main([str(empty), "--out", str(out)]) == 2
    assert str(empty) in capsys.readouterr().err and not out.exists()
    assert main([str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "not a folder" in capsys.readouterr().err and not out.exists()
    # a run without diagnostics: refused without --recompute; with it but no checkpoint: refused too
    rd = _tiny_run(tmp_path, "old", sets={"train.diagnostics": "none"}, epochs=1)
    before = (rd / "result.json").read_bytes()
    assert main([str(rd), "--out", str(out)]) == 2
    assert "--recompute" in capsys.readouterr().err and not out.exists()
    import shutil

    shutil.move(str(rd / "checkpoints"), str(tmp_path / "ckpt"))
    assert main([str(rd), "--out", str(out), "--recompute"]) == 2
    err = capsys.readouterr().err
    assert "best.pt" in err and str(rd) in err and not out.exists()
    assert (rd / "result.json").read_bytes() == before
    # with the checkpoint back, --recompute back-fills probes, Shapley and drops into result.json
    shutil.move(str(tmp_path / "ckpt"), str(rd / "checkpoints"))
    assert main([str(rd), "--out", str(out), "--recompute"]) == 0
    d = _result(rd)["diagnostics"]
    assert d["recomputed"] and "dynamics_missing" in d and set(d["probe"]["test"]) == {"m0", "m1", "m2"}
    ref = _result(_tiny_run(tmp_path, "fresh", epochs=1))["diagnostics"]
    assert d["shapley"]["test"]["phi"] == ref["shapley"]["test"]["phi"]
    assert d["probe"]["test"] == ref["probe"]["test"]


def test_full_level_logs_validation_probe_curves(run_cli):
    """full: validation probes every diag_probe_every epochs and at the last epoch."""
    code, rd, res = run_cli("baseline", "synthetic", epochs=3,
                            sets={**SYN, "train.diagnostics": "full", "train.diag_probe_every": 2})
    assert code == 0 and res["diagnostics"]["level"] == "full"
    has = ["probe_val" in r["diag"] for r in _rows(rd)]
    assert has == [False, True, True]  # epoch 2 (every 2) and the last epoch (3)
    last = _rows(rd)[-1]["diag"]["probe_val"]
    assert set(last) == {"m0", "m1", "m2"} and 0 <= last["m0"]["accuracy"] <= 1


def test_regression_and_segmentation_analogues(run_cli):
    code, _, res = run_cli("baseline", "synthetic-regression", epochs=1, sets=SYN)
    assert code == 0
    d = res["diagnostics"]
    assert d["probe"]["solver"] == "ridge" and "mae" in d["probe"]["test"]["m0"]
    # oriented: v = −MAE, so Σφ = −MAE(test) − (−MAE(prior))
    assert sum(d["shapley"]["test"]["phi"].values()) == pytest.approx(-res["test"]["mae"] - d["shapley"]["test"]["v"]["none"], abs=1e-9)
    code, _, res = run_cli("baseline", "synthetic-seg", epochs=1, sets={"dataset.n_samples": 40})
    assert code == 0
    d = res["diagnostics"]
    assert "dice_mean" in d["probe"]["test"]["m0"] and d["probe"]["n_fit"] > 0


def test_diagnose_weak_modality_is_chosen_on_validation_even_for_the_test_summary(tmp_path):
    """m* follows the baseline's validation Shapley shares (and, without a baseline, the unimodal rows' validation
    scores); a test split poisoned to point at the other modality changes nothing, in either summary split."""
    from pathlib import Path

    from mmbalance.diagnostics.collect import RunRecord, group_runs, weak_modality

    def rec(row, seed, val_share, test_share, val_score=0.5, test_score=0.5, uni=None):
        res = {"dataset": "toy", "seed": seed, "modalities": [uni] if uni else ["a", "b"], "primary_metric": "accuracy",
               "higher_is_better": True, "method": uni and f"unimodal:{uni}" or row,
               "val": {"accuracy": val_score}, "test": {"accuracy": test_score},
               "diagnostics": {} if uni else {"shapley": {"val": {"share": val_share}, "test": {"share": test_share}}}}
        return RunRecord(Path(f"/x/{row}/{seed}"), res, [], row)

    runs = [rec("baseline", s, {"a": 0.3, "b": 0.7}, {"a": 0.8, "b": 0.2}) for s in (0, 1)]
    for split in ("test", "val"):
        assert weak_modality(group_runs(runs, split), "toy") == "a"
    # without a baseline: the unimodal row that is weaker on validation (test says the opposite)
    uni = [rec("unimodal:a", 0, {}, {}, val_score=0.4, test_score=0.9, uni="a"),
           rec("unimodal:b", 0, {}, {}, val_score=0.6, test_score=0.1, uni="b")]
    assert weak_modality(group_runs(uni, "test"), "toy") == "a"
