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


@pytest.mark.ddp
@pytest.mark.parametrize("method", ["ogm_ge", "agm", "pmr", "gblending", "qmf", "mslr", "mrd"])
def test_two_process_methods_keep_replicas_identical(tmp_path, method):
    """Every statistic that sets a coefficient is reduced across ranks (and noise/masks come from a
    generator seeded identically everywhere), so the replicas must not drift apart."""
    rd = tmp_path / "run"
    proc = launch_2proc(["--method", method, "--dataset", "mfeat", "--epochs", "2", "--set",
                         "dataset.limit_per_class=20", "--run-dir", str(rd), "--output-dir", str(tmp_path), "--quiet"],
                        tmp_path / "dump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_identical_ranks(tmp_path / "dump")
    assert json.loads((rd / "result.json").read_text())["world_size"] == 2


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
