"""Fault cases found by an independent audit, each reproduced: a killed ``--overwrite`` never deletes a finished
result, a restarted sweep never redoes a finished run, and every fault gets its documented exit code
(docs/cli.md "Exit codes", docs/reliability.md) with a one-line message and no traceback."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SMALL_MFEAT

from mmbalance import runfiles
from mmbalance.run import main
from mmbalance.testing import cli_args

FAST = {**SMALL_MFEAT, "train.modality_eval": "none", "train.diagnostics": "none"}


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def run(rd: Path, *, epochs: int = 1, sets=None, extra=()) -> int:
    return main(cli_args("baseline", "mfeat", epochs=epochs, run_dir=rd, sets={**FAST, **(sets or {})}) + list(extra))


@pytest.fixture
def finished(tmp_path):
    """A finished run folder and its byte snapshot."""
    rd = tmp_path / "r"
    assert run(rd) == 0
    return rd, snapshot(rd)


# ------------------------------------------------------------------------------------------ 1 set-aside
@pytest.mark.parametrize("moved", ["all", "some"])
def test_killed_overwrite_set_aside_is_restored_never_deleted(finished, capsys, moved):
    """A kill between moving the finished files into ``.previous.tmp/`` and renaming it to ``previous/``
    left the only copy in a folder the next start removed as a temporary leftover."""
    rd, before = finished
    tmp = rd / ".previous.tmp"
    tmp.mkdir()
    names = ["config.json", "metrics.jsonl", "result.json", "checkpoints"]
    for name in names if moved == "all" else names[1:3]:
        (rd / name).rename(tmp / name)
    capsys.readouterr()
    assert run(rd) == 2  # the next plain start finds the finished result again and refuses
    err = capsys.readouterr().err
    assert "restored" in err and "already holds a finished result" in err
    assert snapshot(rd) == before and not tmp.exists()


# ------------------------------------------------------------------------------------------ 2 sweeps
SWEEP_SUITE = """\
    seeds = 1
    epochs = 1
    methods = ["baseline"]
    sets = { "dataset.limit_per_class" = 20, "train.modality_eval" = "none", "train.diagnostics" = "none" }
    [datasets.mfeat]
    modalities = ["fac", "fou"]
"""


def _sweep_spec(tmp_path):
    from test_leaderboard import write_suite

    from mmbalance.leaderboard.plan import plan_runs
    from mmbalance.leaderboard.suite import load_suite

    return plan_runs(load_suite(write_suite(tmp_path, "s", SWEEP_SUITE)), tmp_path / "results")[0]


def test_restarted_sweep_meeting_a_locked_run_folder_records_busy_not_failed(tmp_path, monkeypatch):
    """The old sweep's run still holds RUN_DIR/.lock (finishing its evaluation after its parent was killed):
    the new sweep leaves the cell alone instead of recording it failed (and later redoing it)."""
    from mmbalance.leaderboard.execute import execute_run
    from mmbalance.leaderboard.plan import STATUS_FILE
    from mmbalance.locks import FolderLock

    monkeypatch.delenv("MMBALANCE_LEADERBOARD_RUNNER", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    spec = _sweep_spec(tmp_path)
    rd = Path(spec.run_dir)
    running = {"plan_hash": spec.plan_hash, "state": "running", "attempt": 1, "exit_code": None}
    runfiles.atomic_write_json(rd / STATUS_FILE, running)
    with FolderLock(rd):
        st = execute_run(spec)
    assert st.state == "busy"
    assert json.loads((rd / STATUS_FILE).read_text()) == running  # not marked failed


def test_a_finished_result_of_the_plan_is_done_never_rerun_with_overwrite(tmp_path, monkeypatch):
    """status.json says failed (the sweep lost track: e.g. an older version recorded the busy cell as
    failed) but the folder holds a finished result of these very settings: the retry keeps it."""
    from mmbalance.leaderboard.execute import build_command, execute_run
    from mmbalance.leaderboard.plan import STATUS_FILE

    monkeypatch.delenv("MMBALANCE_LEADERBOARD_RUNNER", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    spec = _sweep_spec(tmp_path)
    rd = Path(spec.run_dir)
    argv = build_command(spec, resume=False)
    assert main(argv[argv.index("--method"):]) == 0  # the old sweep's run, finished
    before = snapshot(rd)
    runfiles.atomic_write_json(rd / STATUS_FILE, {"plan_hash": spec.plan_hash, "state": "failed", "attempt": 1,
                                                  "exit_code": 2, "error": "run folder is in use by another process"})
    assert execute_run(spec).state == "ok"
    after = snapshot(rd)
    assert {k: v for k, v in after.items() if k in before} == before  # same result, byte for byte
    assert not (rd / "previous").exists()


# ------------------------------------------------------------------------------------------ 3 exit codes
@pytest.mark.parametrize("err", [errno.EACCES, errno.EROFS])
def test_lock_file_that_cannot_be_created_is_exit_4(tmp_path, capsys, monkeypatch, err):
    import mmbalance.locks as locks

    real_open = locks.os.open

    def refusing_open(path, *a, **k):
        if str(path).endswith(".lock"):
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(locks.os, "open", refusing_open)
    assert run(tmp_path / "r") == 4
    msg = capsys.readouterr().err
    assert os.strerror(err) in msg and ".lock" in msg and "Traceback" not in msg


def test_resume_on_a_truncated_result_is_exit_2_naming_the_file(finished, capsys):
    rd, _ = finished
    text = (rd / "result.json").read_text()
    (rd / "result.json").write_text(text[: len(text) // 2])
    capsys.readouterr()
    assert run(rd, extra=["--resume"]) == 2
    err = capsys.readouterr().err
    assert str(rd / "result.json") in err and "not valid JSON" in err
    assert (rd / "result.json").read_text() == text[: len(text) // 2]


@pytest.mark.parametrize("seed, shown", [("abc", "'abc'"), ("1.7", "1.7"), ("-1", "-1")])
def test_bad_seed_in_a_config_file_is_exit_2_naming_the_key(tmp_path, capsys, seed, shown):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"seed: {seed}\n")
    argv = ["--method", "baseline", "--dataset", "mfeat", "--epochs", "1", "--run-dir", str(tmp_path / "r")]
    assert main(argv + ["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "'seed'" in err and shown in err and str(cfg) in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("key, value", [("weight_decay", ".inf"), ("weight_decay", "-0.1"), ("momentum", ".nan"),
                                        ("grad_clip", ".inf"), ("gamma", "-.inf")])
def test_non_finite_or_negative_training_values_are_exit_2_naming_the_key(tmp_path, capsys, key, value):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{key}: {value}\n")
    assert main(cli_args("baseline", "mfeat", epochs=1, run_dir=tmp_path / "r") + ["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert key in err and "lr" not in err.replace(key, "") and not (tmp_path / "r").exists()


def test_full_disk_during_a_checkpoint_says_no_space_left(tmp_path, monkeypatch):
    """torch.save turns the failed write into "[enforce fail at inline_container.cc] unexpected pos"."""
    import io

    import torch

    real_fdopen = os.fdopen

    class FullDisk(io.FileIO):  # room for the first 1000 bytes (the zip header), then ENOSPC
        written = 0

        def write(self, b):
            if self.written + len(b) > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(b)
            return super().write(b)

    monkeypatch.setattr(runfiles.os, "fdopen", lambda fd, mode="r", *a, **k:
                        io.BufferedWriter(FullDisk(fd, "wb")) if "b" in mode else real_fdopen(fd, mode, *a, **k))
    with pytest.raises(runfiles.RunFileWriteError, match="No space left on device") as info:
        runfiles.atomic_torch_save({"w": torch.zeros(4096)}, tmp_path / "last.pt")
    assert "enforce fail" not in str(info.value) and list(tmp_path.iterdir()) == []


def test_a_crash_in_setup_leaves_a_failed_result(tmp_path, monkeypatch):
    from mmbalance.methods.baseline import Baseline

    def broken_setup(self, ctx):
        raise RuntimeError("plug-in bug in setup")

    monkeypatch.setattr(Baseline, "setup", broken_setup)
    with pytest.raises(RuntimeError, match="plug-in bug"):
        run(tmp_path / "r")
    res = json.loads((tmp_path / "r" / "result.json").read_text())
    assert res["status"] == "failed" and "plug-in bug in setup" in res["error"] and "broken_setup" in res["traceback"]


def test_a_signal_after_the_last_epoch_keeps_the_result_and_exits_128_plus_n(tmp_path, monkeypatch, capsys):
    """Final evaluation is running when SIGTERM arrives: the result is complete (ok, kept), and the exit code
    says the process was signalled, as the DDP launcher's does."""
    from mmbalance.engine import Trainer

    real_finish = Trainer._finish

    def finish_with_sigterm(self, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_finish(self, *a, **k)

    monkeypatch.setattr(Trainer, "_finish", finish_with_sigterm)
    rd = tmp_path / "r"
    assert run(rd, epochs=2) == 143
    out = capsys.readouterr()
    assert json.loads((rd / "result.json").read_text())["status"] == "ok"
    assert "after the last epoch" in out.err and "test accuracy" in out.out
    assert run(rd, epochs=2, extra=["--resume"]) == 0  # nothing to do


# ------------------------------------------------------------------------------------------ signals
SLOW_PLUGIN = '''
import os, time
from mmbalance.methods.baseline import Baseline
from mmbalance.registry import register_method


@register_method("slow_epoch", "baseline whose second epoch takes long (tests)")
class SlowEpoch(Baseline):
    def on_epoch_start(self, ctx):
        if ctx.epoch == 1 and os.environ.get("SLOW_EPOCH_MARKER"):
            open(os.environ["SLOW_EPOCH_MARKER"], "w").close()
            time.sleep(float(os.environ.get("SLOW_EPOCH_SECONDS", "60")))
'''


def _slow_argv(tmp_path: Path, rd: Path) -> list[str]:
    plugin = tmp_path / "slow_epoch.py"
    plugin.write_text(SLOW_PLUGIN)
    return ["--plugin", str(plugin)] + cli_args("slow_epoch", "mfeat", epochs=3, run_dir=rd,
                                                sets={**FAST, "train.checkpoint_interval": 0})


def _wait_for(path: Path, proc: subprocess.Popen, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "SLOW_EPOCH_MARKER": str(tmp_path / "slow"), **extra}


def test_second_sigterm_stops_at_once_with_143_checkpoint_kept_no_traceback(tmp_path):
    """A repeat within the launcher-echo window is ignored; a real second SIGTERM stops at once."""
    rd = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "mmbalance.run", *_slow_argv(tmp_path, rd)], cwd=tmp_path,
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "slow", proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # a launcher's forwarded copy: not a second request
    time.sleep(2.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "second SIGTERM" in err
    res = json.loads((rd / "result.json").read_text())
    assert res["status"] == "interrupted" and res["resumable"] and res["epochs_done"] == 1
    assert (rd / "checkpoints" / "last.pt").is_file()  # resuming from it: test_reliability's signal tests


def test_sigterm_under_accelerate_launch_with_an_epoch_longer_than_its_kill_grace(tmp_path):
    """``accelerate launch`` forwards SIGTERM to its child and SIGKILLs it 5 s later. Sent to the whole
    process group (as SLURM does), the child gets it twice: the forwarded copy is not a second signal, and
    the run is recorded interrupted (resumable) the moment the signal arrives, before the launcher kills it."""
    rd = tmp_path / "r"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mmbalance.run"]
    proc = subprocess.Popen(launch + _slow_argv(tmp_path, rd), cwd=tmp_path,
                            env=_env(tmp_path, ACCELERATE_USE_CPU="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(tmp_path / "slow", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "KeyboardInterrupt" not in err and "second SIGTERM" not in err
    res = json.loads((rd / "result.json").read_text())
    assert res["status"] == "interrupted" and res["resumable"] and res["epochs_done"] == 1
    assert (rd / "checkpoints" / "last.pt").is_file()


# ------------------------------------------------------------------------------------------ 5 launcher
def test_launch_returns_the_failing_ranks_code_not_a_terminated_ranks():
    """4 processes: rank 2 refuses its input (2); rank 0's collective breaks (1) and rank 3 is terminated
    (-15), all recorded in the same second: the run's code is rank 2's."""
    from types import SimpleNamespace

    from mmbalance.launch import _child_exit_code

    t = 1_700_000_000
    failed = SimpleNamespace(failures={0: SimpleNamespace(exitcode=1, timestamp=t),
                                       2: SimpleNamespace(exitcode=2, timestamp=t),
                                       3: SimpleNamespace(exitcode=-15, timestamp=t)})
    assert _child_exit_code(failed) == 2
    failed.failures[1] = SimpleNamespace(exitcode=3, timestamp=t - 1)  # an earlier failure wins
    assert _child_exit_code(failed) == 3


# ------------------------------------------------------------------------------------------ 4/5 build
def test_build_names_a_corrupt_result_and_refuses_a_results_dir_without_runs(tmp_path, capsys):
    from test_leaderboard import make_fixture

    from mmbalance.leaderboard import main as lb_main

    suite, specs = make_fixture(tmp_path)
    suite_path = tmp_path / "leaderboard" / "suites" / "fx.toml"
    out = tmp_path / "report"
    base = ["build", str(suite_path), "--out-dir", str(out), "--datasets", "mfeat", "--methods", "baseline", "alpha"]
    assert lb_main(base + ["--results-dir", str(tmp_path / "results")]) == 0
    good = snapshot(out)
    assert any(k.startswith("figures/") for k in good)
    # a typo in --results-dir: an error, and the report built from runs is not replaced (figures kept)
    capsys.readouterr()
    assert lb_main(base + ["--results-dir", str(tmp_path / "resluts")]) == 2
    assert "holds no run of this suite" in capsys.readouterr().err
    assert snapshot(out) == good
    # a truncated result.json: named (path and reason) on stderr and in the report; the row shows it failed
    victim = next(s for s in specs if s.row == "alpha" and s.dataset == "mfeat" and s.seed == 2)
    path = Path(victim.run_dir) / "result.json"
    path.write_text(path.read_text()[:40])
    assert lb_main(base + ["--results-dir", str(tmp_path / "results")]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "not valid JSON" in err
    readme = (out / "README.md").read_text()
    assert str(path) in readme and "alpha, seed 2: failed" in readme


@pytest.fixture
def scratch_registries(monkeypatch):
    """Plug-ins loaded in-process register into copies of the registries (restored after the test)."""
    from mmbalance.registry import DATASETS, METHODS, MODELS

    for reg in (METHODS, DATASETS, MODELS):
        reg._load_builtins()
        monkeypatch.setattr(reg, "_entries", dict(reg._entries))
        monkeypatch.setattr(reg, "_broken", dict(reg._broken))
    yield
    for name in [m for m in sys.modules if m.startswith("mmbalance_plugin_hard_")]:
        del sys.modules[name]


def test_list_with_a_broken_plugin_lists_it_with_exit_1(tmp_path, capsys, scratch_registries):
    bad = tmp_path / "hard_broken.py"
    bad.write_text("import not_a_module_anywhere\n")
    assert main(["--plugin", str(bad), "--list"]) == 1
    out = capsys.readouterr().out
    assert "baseline" in out and "broken" in out and "not_a_module_anywhere" in out


PLUGIN_DATASETS = '''
from dataclasses import dataclass
import torch
from mmbalance.data import ModelSpec, MultimodalData, TensorSplit
from mmbalance.registry import register_dataset


@dataclass
class Opts:
    n: int = 8


def _data(names, shapes, opts):
    split = lambda: TensorSplit({"a": torch.zeros(opts.n, 3), "b": torch.zeros(opts.n, 2)},
                                torch.arange(opts.n) % 2)
    return MultimodalData(names, "classification", {"num_classes": 2}, split(), split(), split(), shapes, 2,
                          ModelSpec("mlp_concat"))


def no_options(opts, data_dir):
    return _data(["a", "b"], {"a": (3,), "b": (2,)}, opts)


def code_bug(opts, data_dir):
    widths = {"a": 3}
    return _data(["a", "b"], {"a": (widths["a"],), "b": (widths["b"],)}, opts)


def renamed(opts, data_dir):
    return _data(["audio", "image"], {"audio": (3,), "image": (2,)}, opts)


def wrong_shape(opts, data_dir):
    return _data(["a", "b"], {"a": (3,), "b": (5,)}, opts)


for fn in (code_bug, renamed, wrong_shape):
    fn.options_cls = Opts
for fn in (no_options, code_bug, renamed, wrong_shape):
    register_dataset("hard_" + fn.__name__)(fn)
'''


@pytest.mark.parametrize("name, expected", [
    ("hard_no_options", "has no `options_cls` attribute"),
    ("hard_code_bug", "its loader raised KeyError: 'b' at"),
    ("hard_renamed", "the train split has no inputs for modalities ['audio', 'image'] (it has ['a', 'b'])"),
    ("hard_wrong_shape", "modality 'b' of the train split has per-sample shape (2,) but input_shapes['b'] = (5,)"),
])
def test_plugin_dataset_mistakes_are_clear_exit_2(tmp_path, capsys, scratch_registries, name, expected):
    plugin = tmp_path / "hard_datasets.py"
    plugin.write_text(PLUGIN_DATASETS)
    assert main(["--plugin", str(plugin), "--dataset", name, "--run-dir", str(tmp_path / "r"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "could not be read" not in err and not (tmp_path / "r").exists()
    if name == "hard_code_bug":
        assert f"{plugin}:" in err and "(in code_bug)" in err


def test_a_suite_with_an_unknown_dataset_is_refused_before_any_run(tmp_path, capsys):
    from test_leaderboard import write_suite

    from mmbalance.leaderboard import main as lb_main

    path = write_suite(tmp_path, "s", 'seeds = 1\nmethods = ["baseline"]\n[datasets.mfaet]\n')
    assert lb_main(["run", str(path), "--results-dir", str(tmp_path / "res"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'mfaet'" in err and "did you mean 'mfeat'" in err
    assert not (tmp_path / "res").exists()


def test_suite_folders_are_next_to_the_suite_file_or_its_suites_folder(tmp_path):
    from mmbalance.leaderboard.suite import load_suite

    loose = tmp_path / "proj" / "my.toml"
    loose.parent.mkdir()
    loose.write_text('seeds = 1\nmethods = ["baseline"]\n[datasets.mfeat]\n')
    suite = load_suite(loose)
    assert suite.default_results_dir() == (tmp_path / "proj" / "results" / "my").resolve()
    assert suite.default_out_dir() == (tmp_path / "proj" / "my").resolve()
    nested = tmp_path / "lb" / "suites" / "q.toml"
    nested.parent.mkdir(parents=True)
    nested.write_text(loose.read_text())
    assert load_suite(nested).default_results_dir() == (tmp_path / "lb" / "results" / "q").resolve()


def test_mosi_folder_with_only_the_unaligned_pickle_names_it_and_the_setting(tmp_path):
    from mmbalance.errors import DatasetNotFoundError
    from mmbalance.registry import create_dataset

    (tmp_path / "mosi").mkdir()
    (tmp_path / "mosi" / "unaligned_50.pkl").write_bytes(b"")  # never read: the message comes first
    with pytest.raises(DatasetNotFoundError) as info:
        create_dataset("mosi", str(tmp_path))
    msg = str(info.value)
    assert str(tmp_path / "mosi" / "unaligned_50.pkl") in msg and "--set dataset.variant=unaligned" in msg


# ------------------------------------------------------------------------------------------ 6 UMT
def test_umt_teacher_cache_next_to_run_dir_and_cached_runs_record_the_same(tmp_path, monkeypatch):
    """With --run-dir alone the teacher cache goes next to the run folder (not ./runs of the cwd); a run that
    loads the teachers from the cache (as a resumed run does) writes the same method metrics as the one that
    trained them."""
    monkeypatch.chdir(tmp_path)
    sets = {**FAST, "dataset.views": "[fac,fou]", "train.max_steps_per_epoch": 2}
    results = []
    for name in ("first", "cached"):
        rd = tmp_path / "exp" / name
        assert main(cli_args("umt", "mfeat", epochs=1, run_dir=rd, sets=sets)) == 0
        results.append(json.loads((rd / "result.json").read_text()))
    assert (tmp_path / "exp" / "_teachers").is_dir() and not (tmp_path / "runs").exists()
    assert results[0]["method_metrics"] == results[1]["method_metrics"]
    assert "teachers_trained_now" not in results[0]["method_metrics"]


# ------------------------------------------------------------------------------------------ bug classes
def test_tuning_choice_follows_the_metric_direction():
    """A lower-is-better metric (regression MAE) is chosen by its lowest validation value, a higher-is-better
    one by its highest: hand-made trial results, so a direction bug anywhere in scoring or choice shows."""
    from types import SimpleNamespace

    from mmbalance.leaderboard.tune import choose, score_trial

    def trial(k, value, metric, higher):
        res = {"primary_metric": metric, "higher_is_better": higher, "val": {metric: value, "loss": 1.0}}
        states = [SimpleNamespace(state="ok", result=res, spec=SimpleNamespace(seed=s), error="") for s in (0, 1)]
        return {"k": k, **score_trial(states)}

    assert choose([trial(0, 0.50, "mae", False), trial(1, 0.30, "mae", False), trial(2, 0.40, "mae", False)])["k"] == 1
    assert choose([trial(0, 0.50, "accuracy", True), trial(1, 0.30, "accuracy", True)])["k"] == 0
