"""The benchmark scripts' CPU-side parts: the plain loop does the engine's exact work, the goal logic of the
method table, run_all.sh's and gpu.sh's argument handling, gpu.sh's no-GPU exit, and the GPU throughput
helper's whole path on CPU (``--cpu-smoke``), the pass clock of method_passes.py (each pass counted once) and
the probe_solver.py reference fit's Hessian-vector product (against finite differences)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))


def _sh(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_plain_loop_ends_with_the_engines_parameters():
    """A plain loop that drifted from the engine (another batch order, init seed, optimizer, gather) would
    make the ratio meaningless; the benchmark refuses above 1e-6, here it must be exact."""
    import loop_overhead

    from mmbalance.registry import create_dataset

    assert loop_overhead.check_same_work(create_dataset("mfeat"), 1) == 0.0


def test_method_table_goals_per_dataset_column():
    from _paired import Ratio
    from method_overhead import GOALS, met

    mfeat, seq = GOALS["cggm"]
    assert (mfeat, seq) == (1.5, 1.3)
    assert met([Ratio(1.45, 1.4, 1.5, 3), Ratio(1.25, 1.2, 1.3, 3)], (mfeat, seq)) == "yes"
    assert met([Ratio(1.45, 1.4, 1.5, 3), Ratio(1.35, 1.2, 1.4, 3)], (mfeat, seq)) == "no"  # seq goal is 1.3
    assert met([Ratio(1.45, 1.4, 1.5, 3), "n/a"], (mfeat, seq)) == "yes"  # n/a is not a failure
    assert met(["n/a", "n/a"], (mfeat, seq)) == "—"


def test_method_passes_counts_each_pass_once():
    """The pass clock counts outermost calls only: the baseline makes one forward (the model; its encoders,
    fusion and head are inside it), one backward and one optimizer step per step (zero_grad is timed, not
    counted); MMPareto adds its autograd.grad (2 backward) and its unimodal heads' call (2 forward)."""
    from method_passes import measure

    base, mmp = measure("baseline", 1), measure("mmpareto", 1)
    assert (base["n_forward"], base["n_backward"], base["n_optimizer"]) == (1.0, 1.0, 1.0)
    assert (mmp["n_forward"], mmp["n_backward"], mmp["n_optimizer"]) == (2.0, 2.0, 1.0)
    for r in (base, mmp):
        assert 0 < r["passes"] < r["total"] and r["rest"] == pytest.approx(r["total"] - r["passes"])


def test_probe_solver_hessian_vector_product_is_the_gradients_derivative():
    """The Newton reference fit uses an exact Hessian-vector product; a wrong one would still stop somewhere.
    Oracle: central finite differences of the probe objective's analytic gradient along v."""
    import numpy as np
    from probe_solver import _hessp

    from mmbalance.diagnostics.probes import _softmax_objective

    rs = np.random.RandomState(0)
    n, d, c = 40, 5, 3
    x, y = rs.randn(n, d), rs.randint(0, c, n)
    onehot = np.eye(c)[y]
    theta, v = rs.randn(d * c + c) * 0.3, rs.randn(d * c + c)
    h = 1e-5
    fd = (_softmax_objective(theta + h * v, x, onehot, 1e-3, y)[1]
          - _softmax_objective(theta - h * v, x, onehot, 1e-3, y)[1]) / (2 * h)
    assert np.allclose(_hessp(theta, v, x, onehot, 1e-3), fd, rtol=1e-6, atol=1e-8)


def test_run_all_dry_run_lists_every_benchmark_and_the_estimate():
    ok = _sh("run_all.sh", "--dry-run", "--out", "x.md")
    assert ok.returncode == 0, ok.stderr
    for script in ("loop_overhead.py", "method_overhead.py", "host_syncs.py", "diagnostics_overhead.py",
                   "leaderboard_throughput.py", "method_passes.py", "probe_solver.py"):
        assert script in ok.stdout
    assert "total ~20.5 min" in ok.stdout and not (REPO / "x.md").exists()
    bad = _sh("run_all.sh", "--bogus")
    assert bad.returncode == 2 and "'--bogus'" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_gpu_sh_arguments_and_no_gpu_exit(tmp_path):
    assert "Exit codes" in _sh("gpu.sh", "--help").stdout
    bad = _sh("gpu.sh", "--methods")
    assert bad.returncode == 2 and "--methods needs a value" in bad.stderr
    bad = _sh("gpu.sh", "--steps", "0")
    assert bad.returncode == 2 and "'0'" in bad.stderr
    bad = _sh("gpu.sh", "--frobnicate")
    assert bad.returncode == 2 and "'--frobnicate'" in bad.stderr
    out = tmp_path / "gpu.md"
    none = _sh("gpu.sh", "--out", str(out))
    assert none.returncode == 3
    assert "no CUDA device" in none.stderr and "nothing was measured" in none.stderr
    assert not out.exists()


def test_gpu_throughput_helper_runs_on_cpu(tmp_path, monkeypatch, capsys):
    import gpu_throughput

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    threads = torch.get_num_threads()
    try:
        assert gpu_throughput.main(["--cpu-smoke"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert sum("steps/s" in x for x in lines) == 2 and " no x1 " in lines[0] and "bf16 x1" in lines[1]
        assert lines[2].startswith("bf16/fp32 samples/s: ")
        report = tmp_path / "r.json"
        assert gpu_throughput.main(["--steps", "1", "--epochs", "2", "--batch-size", "4", "--seq-len", "2",
                                    "--samples", "40", "--json", str(report)]) == 0
        capsys.readouterr()
        import json

        r = json.loads(report.read_text())
        assert r["status"] == "ok" and r["steps_per_epoch"] == 1 and r["timed_epochs"] == 1
        assert r["samples_per_s"] == pytest.approx(4 * r["steps_per_s"])
        assert gpu_throughput.main(["--ratio", str(report), str(report)]) == 0
        assert capsys.readouterr().out.strip() == "1.000"
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(SystemExit) as exc:
        gpu_throughput.main(["--steps", "0"])
    assert exc.value.code == 2


@pytest.mark.ddp
def test_gpu_throughput_helper_under_two_process_launch(tmp_path):
    """gpu.sh's DDP scaling path (accelerate launch --num_processes 2) on CPU: the ranks share one run
    folder, rank 0 reports the samples of both processes."""
    import json

    from test_ddp import free_port

    out = tmp_path / "ddp.json"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "MMBALANCE_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(REPO / "benchmarks" / "gpu_throughput.py"), "--steps", "2", "--epochs", "2",
           "--batch-size", "4", "--seq-len", "2", "--samples", "60", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["world_size"] == 2 and r["steps_per_epoch"] == 2 and r["batch_per_process"] == 4
    assert r["samples_per_s"] == pytest.approx(2 * 4 * r["steps_per_s"])
