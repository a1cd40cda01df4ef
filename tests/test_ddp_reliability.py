"""2-process CPU DDP: batch_size is the global batch (1 and 2 processes take the same optimizer steps
with the same samples per step), and killing `accelerate launch` stops its ranks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_ddp import free_port, launch_2proc

from mmbalance.run import main

ARGS = ["--method", "baseline", "--dataset", "mfeat", "--epochs", "2", "--set", "dataset.limit_per_class=20",
        "--set", "train.modality_eval=none", "--set", "train.batch_size=32", "--quiet"]


def steps(rd: Path) -> list[int]:
    return [json.loads(ln)["global_step"] for ln in (rd / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.ddp
def test_global_batch_gives_the_same_optimizer_steps_on_one_and_two_processes(tmp_path):
    # 140 training samples, global batch 32: ceil(140/32) = 5 steps per epoch on 1 process; on 2, each
    # rank takes 16 of its 70 samples per step: ceil(70/16) = 5 (per-process batches would give 3)
    assert main(ARGS + ["--run-dir", str(tmp_path / "one")]) == 0
    assert steps(tmp_path / "one") == [5, 10]
    proc = launch_2proc(ARGS + ["--run-dir", str(tmp_path / "two")], tmp_path / "dump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert steps(tmp_path / "two") == [5, 10]
    cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["train"]["batch_semantics"] == "global"


def test_global_batch_split_and_per_process_switch(tmp_path):
    from types import SimpleNamespace

    from mmbalance.errors import ConfigError
    from mmbalance.testing import build_trainer

    tr = build_trainer("baseline", run_dir=tmp_path / "r", epochs=1, sets={"dataset.limit_per_class": 20})
    tr.accelerator = SimpleNamespace(num_processes=2)
    assert tr._per_process_batch(32) == 16
    with pytest.raises(ConfigError, match="batch_size=33 is the global batch .* divisible by the 2 processes"):
        tr._per_process_batch(33)
    tr.cfg.batch_semantics = "per_process"
    assert tr._per_process_batch(33) == 33


@pytest.mark.ddp
def test_killing_the_launcher_stops_the_ranks(tmp_path):
    pids = tmp_path / "pids"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "MMBALANCE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    # a long run; each rank records its pid once training has started (the per-rank dump hook is too late)
    code = ("import os, sys, pathlib, runpy; p = pathlib.Path(sys.argv.pop(1)); p.mkdir(exist_ok=True); "
            "(p / str(os.getpid())).write_text(''); sys.argv[0] = 'mmbalance.run'; "
            "runpy.run_module('mmbalance.run', run_name='__main__')")
    script = tmp_path / "rank.py"
    script.write_text(code)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(script), str(pids),
           "--method", "baseline", "--dataset", "mfeat", "--epochs", "500", "--run-dir", str(tmp_path / "r"), "--quiet"]
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not (pids.is_dir() and len(list(pids.iterdir())) == 2 and (tmp_path / "r" / "config.json").exists()):
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    ranks = [int(p.name) for p in pids.iterdir()]
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()

    def alive(pid: int) -> bool:
        try:
            return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False

    deadline = time.monotonic() + 30
    while any(alive(r) for r in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(r) for r in ranks), "a rank outlived accelerate launch"


@pytest.mark.ddp
def test_skip_finished_under_ddp_keeps_only_a_result_of_the_same_process_count(tmp_path):
    """``--overwrite --skip-finished`` under ``accelerate launch --num_processes 2``: a finished 1-process result
    is recomputed on 2 processes (every rank takes the same decision: none waits in a collective for a rank
    that left), and the finished 2-process result is then kept (nothing to do, exit 0, files unchanged)."""
    import hashlib

    def snapshot(folder: Path) -> dict[str, str]:
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}

    rd = tmp_path / "r"
    sweep = ARGS + ["--run-dir", str(rd), "--overwrite", "--skip-finished"]
    assert main(ARGS + ["--run-dir", str(rd)]) == 0
    proc = launch_2proc(sweep, tmp_path / "dump1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 process(es), this run uses 2" in proc.stderr
    assert json.loads((rd / "result.json").read_text())["world_size"] == 2
    before = snapshot(rd)
    proc = launch_2proc(sweep, tmp_path / "dump2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to do" in proc.stderr and snapshot(rd) == before
