"""A real 2-process CPU DDP run (gloo): identical parameters on both ranks, one set of run files."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_2proc(args: list[str], dump_dir, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "MMBALANCE_DUMP_PARAMS_DIR": str(dump_dir),
           "MMBALANCE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "mmbalance.run", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def assert_identical_ranks(dump_dir) -> None:
    r0 = torch.load(dump_dir / "rank0.pt", weights_only=False)
    r1 = torch.load(dump_dir / "rank1.pt", weights_only=False)
    flat0 = {**r0["model"], **{f"{k}.{n}": t for k, sd in r0["extra"].items() for n, t in sd.items()}}
    flat1 = {**r1["model"], **{f"{k}.{n}": t for k, sd in r1["extra"].items() for n, t in sd.items()}}
    assert flat0.keys() == flat1.keys()
    for k in flat0:
        assert torch.equal(flat0[k], flat1[k]), k


@pytest.mark.ddp
def test_two_process_baseline(tmp_path):
    rd = tmp_path / "run"
    proc = launch_2proc(["--method", "baseline", "--dataset", "mfeat", "--epochs", "2", "--set",
                         "dataset.limit_per_class=20", "--run-dir", str(rd), "--quiet"], tmp_path / "dump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_identical_ranks(tmp_path / "dump")
    res = json.loads((rd / "result.json").read_text())
    assert res["world_size"] == 2 and res["status"] == "ok"
    assert sorted(p.name for p in rd.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl", "result.json"]
    # gather without duplicates: the metric is computed on exactly the 40 test samples
    assert abs(res["test"]["accuracy"] * 40 - round(res["test"]["accuracy"] * 40)) < 1e-9


def _flat_state(obj, prefix: str = "") -> dict:
    """Nested method state (dicts, lists, tensors, numbers) → {dotted path: leaf}."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flat_state(val, f"{prefix}{key}.").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _flat_state(val, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): obj}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # NaN on both ranks
    return a == b


#: Per-rank quantities that MUST differ across ranks (each rank draws its own rows of the global mask).
RANK_OWN = {"mrd": ["method_metrics.drop_rate_total"] + [f"method_metrics.drop_rate_{m}" for m in ("fac", "fou", "mor")],
            "opm": [f"method_metrics.drop_rate_{m}" for m in ("fac", "fou", "mor")]}
#: Per-method structural checks of the dumped state (a rank-local update would fail them too).
STATE_CHECKS = {
    # QMF: every rank applies every rank's (idx, loss) pairs, so the history covers all of TRAIN
    "qmf": lambda st, res: bool((st["method_state"]["history"] > 0).all()) and st["method_state"]["history"].shape[1] == res["num_train_samples"],
    # PMR: class means of both ranks' subsets; every class present
    "pmr": lambda st, res: st["method_state"]["prototypes"].abs().sum(-1).gt(0).all().item(),
    # OPM: one keep mask for the global batch (both ranks' rows), drawn in an executed step with q > 0
    "opm": lambda st, res: st["method_state"]["q"].max().item() > 0 and st["method_state"]["keep_global"].shape[0] > 1,
    # SMV: every training sample valued (gathered from both ranks) and the same copies → the same plan
    "smv": lambda st, res: (not st["method_state"]["phi"].isnan().any().item()
                            and st["method_state"]["copies"].shape[0] == res["num_train_samples"]),
    # LFM: the same 8 held-out samples and the same α on both ranks (α compared above)
    "lfm_learnable": lambda st, res: len(st["method_state"]["heldout_idx"]) == 8,
    # AMCo: the dependence flags come from shares of the global batch (some modality is dependent at σ = 0.335)
    "amco": lambda st, res: bool(st["method_state"]["flags"].any()) or bool((st["method_state"]["shares"] > 0.335).any()),
}


#: Extra settings so that the method's statistic is live within the 2 epochs.
METHOD_SETS = {"greedy": ["start_epoch=0"], "opm": ["p_exe=1"], "arl": ["start=-1"], "amco": ["sigma=0.335"],
               "midas": ["warmup_epochs=0"]}


@pytest.mark.ddp
@pytest.mark.parametrize("method", ["ogm_ge", "agm", "pmr", "gblending", "qmf", "mslr", "mrd", "greedy", "opm",
                                    "arl", "smv", "lfm_learnable", "cml", "mmpareto", "amco", "g2d",
                                    "midas"])
def test_two_process_methods_keep_replicas_identical(tmp_path, method):
    """Every statistic that sets a coefficient is reduced across ranks (and noise/masks come from a
    generator seeded identically everywhere), so the replicas must not drift apart. Identical
    parameters prove little on their own (DDP averages the gradients, a rank-local coefficient only
    changes the average), so the METHOD state of each rank (``state_dict()`` and ``metrics()``:
    running means, prototypes, loss histories, memories, coefficients) must be identical too. The
    ranks see disjoint halves of TRAIN, so a statistic left rank-local differs between them."""
    rd = tmp_path / "run"
    extra = [x for kv in METHOD_SETS.get(method, []) for x in ("--set", kv)]
    proc = launch_2proc(["--method", method, "--dataset", "mfeat", "--epochs", "2", "--set",
                         "dataset.limit_per_class=20", *extra, "--run-dir", str(rd), "--output-dir", str(tmp_path),
                         "--quiet"], tmp_path / "dump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_identical_ranks(tmp_path / "dump")
    res = json.loads((rd / "result.json").read_text())
    assert res["world_size"] == 2
    st0 = torch.load(tmp_path / "dump" / "rank0.pt", weights_only=False)
    st1 = torch.load(tmp_path / "dump" / "rank1.pt", weights_only=False)
    f0 = _flat_state({"method": st0["method_state"], "method_metrics": st0["method_metrics"]})
    f1 = _flat_state({"method": st1["method_state"], "method_metrics": st1["method_metrics"]})
    assert f0.keys() == f1.keys()
    assert st0["method_state"] or st0["method_metrics"], "the method exposes no state to compare"
    own = RANK_OWN.get(method, [])
    for k in f0:
        if k not in own:
            assert _same(f0[k], f1[k]), f"{k} differs between ranks: {f0[k]!r} vs {f1[k]!r}"
    if own:
        assert all(k in f0 for k in own), own
        assert [f0[k] for k in own] != [f1[k] for k in own], "both ranks drew the same mask rows"
    check = STATE_CHECKS.get(method)
    if check is not None:
        assert check(st0, res)


@pytest.mark.ddp
def test_two_process_diagnostics_equal_one_process_on_the_same_checkpoint(tmp_path):
    """The distributed diagnostics (sharded, gathered evaluation passes; probes on the main process)
    equal a single-process recomputation from the same selected checkpoint; replicas stay identical."""
    from mmbalance.diagnostics.cli import recompute
    from mmbalance.diagnostics.collect import load_run

    rd = tmp_path / "run"
    proc = launch_2proc(["--method", "ogm_ge", "--dataset", "mfeat", "--epochs", "2", "--set",
                         "dataset.limit_per_class=20", "--run-dir", str(rd), "--quiet"], tmp_path / "dump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_identical_ranks(tmp_path / "dump")
    ddp = json.loads((rd / "result.json").read_text())["diagnostics"]
    one = recompute(load_run(rd))
    for split in ("test", "val"):
        for m, phi in ddp["shapley"][split]["phi"].items():
            assert abs(phi - one["shapley"][split]["phi"][m]) <= 1e-6
        for m, r in ddp["probe"][split].items():
            assert abs(r["accuracy"] - one["probe"][split][m]["accuracy"]) <= 1e-6
    for m, d in ddp["permutation"]["test"]["drop"].items():
        assert abs(d - one["permutation"]["test"]["drop"][m]) <= 1e-6
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["diag"]["conflict_rate"]["fac"] <= 1 for r in rows)
