"""No result is ever lost: run-folder identity and refusal, --overwrite, one writer per folder, preemption
(SIGTERM/SIGINT), corrupt checkpoints, non-finite evaluation, write faults (ENOSPC/EACCES), umask."""
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
from mmbalance.locks import FolderBusyError, FolderLock
from mmbalance.run import main
from mmbalance.testing import build_trainer, cli_args

FAST = {**SMALL_MFEAT, "train.modality_eval": "none"}


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path → digest)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run(method="baseline", *, sets=None, epochs=1, run_dir=None, extra=(), output_dir=None) -> int:
    argv = cli_args(method, "mfeat", epochs=epochs, run_dir=run_dir, sets={**FAST, **(sets or {})})
    if output_dir is not None:
        argv += ["--output-dir", str(output_dir)]
    return main(argv + list(extra))


# ------------------------------------------------------------------------------------------ 1 identity
def test_default_folders_differ_by_settings_and_carry_the_config_hash(tmp_path):
    assert run(output_dir=tmp_path, sets={"train.lr": 0.01}) == 0
    assert run(output_dir=tmp_path, sets={"train.lr": 0.02}) == 0
    folders = sorted((tmp_path / "mfeat" / "baseline").iterdir())
    assert len(folders) == 2
    for f in folders:
        res = json.loads((f / "result.json").read_text())
        assert f.name == f"seed0-{res['config_hash'][:8]}" and res["status"] == "ok"


def test_rerun_with_other_settings_is_refused_and_leaves_the_result_byte_identical(tmp_path, capsys):
    rd = tmp_path / "r"
    assert run(run_dir=rd) == 0
    before = snapshot(rd)
    capsys.readouterr()
    assert run(run_dir=rd, epochs=2, sets={"model.dropout": 0.3}) == 2
    err = capsys.readouterr().err
    assert "train.epochs: 1 → 2" in err and "model.dropout" in err and "--overwrite" in err
    assert snapshot(rd) == before
    # the same settings again: still refused (a finished result is never replaced implicitly)
    assert run(run_dir=rd) == 2 and "same configuration" in capsys.readouterr().err
    assert snapshot(rd) == before


def test_overwrite_keeps_the_old_result_until_the_new_one_finishes(tmp_path):
    rd = tmp_path / "r"
    assert run(run_dir=rd) == 0
    before = snapshot(rd)
    # the replacing run crashes (diverges): the old result is still there, byte for byte, in previous/
    assert run(run_dir=rd, sets={"train.lr": 1e12}, extra=["--overwrite"]) == 3
    assert snapshot(rd / "previous") == before
    assert json.loads((rd / "result.json").read_text())["status"] == "failed"
    # a failed run is not a finished result: a plain re-run may replace it, and once it finishes the
    # set-aside result is dropped
    assert run(run_dir=rd, epochs=2) == 0
    assert not (rd / "previous").exists()
    assert json.loads((rd / "result.json").read_text())["timings"]["epochs"] == 2


def test_skip_finished_keeps_only_a_result_of_the_same_settings_and_process_count(tmp_path, capsys, monkeypatch):
    """``--overwrite --skip-finished`` (sweeps) keeps a finished result only when it is this very run: the same
    config hash AND the same number of processes (``world_size`` in result.json; the config hash leaves it out).
    A 1-process result is recomputed for a 2-process request (and the other way round), the old result kept in
    previous/ until the new one finishes; a result that records no process count counts as 1 process."""
    from mmbalance import runfolder
    from mmbalance.run import build_parser, resolve

    rd = tmp_path / "r"
    sweep = ["--overwrite", "--skip-finished"]
    assert run(run_dir=rd) == 0
    one = snapshot(rd)
    assert json.loads((rd / "result.json").read_text())["world_size"] == 1
    assert run(run_dir=rd, extra=sweep) == 0 and snapshot(rd) == one  # same settings, same count: kept
    assert "nothing to do" in capsys.readouterr().err
    # the decision of a 2-process request (every rank of `accelerate launch --num_processes 2` decides it so)
    config = resolve(build_parser().parse_args(cli_args("baseline", "mfeat", epochs=1, run_dir=rd, sets=FAST)))[0]
    state = runfolder.inspect(rd, runfolder.identity_hash(config))
    assert state.same_config and runfolder.keeps_finished(state, 1) and not runfolder.keeps_finished(state, 2)
    seen = []  # the CLI passes the launcher's process count (WORLD_SIZE) to the decision
    monkeypatch.setattr(runfolder, "prepare", lambda *a, **k: seen.append(k.get("world_size")) or "finished")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run(run_dir=rd, extra=sweep) == 0 and seen == [2]
    monkeypatch.undo()
    # a non-main rank of that launch decides by itself (it never takes the lock): it must train too, not leave
    trains = []

    class WouldTrain:  # stands in for the engine: records that this rank went on to train
        def __init__(self, *a, **k):
            trains.append(True)
            raise SystemExit(0)

    monkeypatch.setattr("mmbalance.engine.Trainer", WouldTrain)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        run(run_dir=rd, extra=sweep)
    assert trains == [True] and snapshot(rd) == one  # rank 1 decides to train and touches nothing
    monkeypatch.undo()
    assert runfolder.prepare(rd, config, resume=False, overwrite=True, skip_finished=True, world_size=2) == "fresh"
    assert snapshot(rd / "previous") == one and not (rd / "result.json").exists()  # set aside, not deleted
    assert "1 process(es), this run uses 2" in capsys.readouterr().err
    # a finished 2-process result is not kept for a 1-process run either (recorded world_size 2 by hand)
    rd2 = tmp_path / "r2"
    assert run(run_dir=rd2) == 0
    res = json.loads((rd2 / "result.json").read_text())
    (rd2 / "result.json").write_text(json.dumps({**res, "world_size": 2}))
    two = snapshot(rd2)
    assert run(run_dir=rd2, extra=sweep) == 0
    assert snapshot(rd2) != two and json.loads((rd2 / "result.json").read_text())["world_size"] == 1  # recomputed
    assert "2 process(es), this run uses 1" in capsys.readouterr().err
    # an older result without the key ran on one process: kept for a 1-process request
    res = json.loads((rd2 / "result.json").read_text())
    (rd2 / "result.json").write_text(json.dumps({k: v for k, v in res.items() if k != "world_size"}))
    kept = snapshot(rd2)
    assert run(run_dir=rd2, extra=sweep) == 0 and snapshot(rd2) == kept


def test_resume_with_nothing_to_resume_and_refused_resume_name_the_reason(tmp_path, capsys, monkeypatch):
    assert run(run_dir=tmp_path / "empty", extra=["--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err and not (tmp_path / "empty").exists()
    rd = tmp_path / "k"
    monkeypatch.setenv("MMBALANCE_STOP_AFTER_EPOCHS", "1")
    with pytest.raises(KeyboardInterrupt):
        run(run_dir=rd, epochs=3)
    monkeypatch.delenv("MMBALANCE_STOP_AFTER_EPOCHS")
    before = snapshot(rd)
    assert run(run_dir=rd, epochs=3, sets={"train.lr": 0.05}, extra=["--resume"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.01 → 0.05" in err and "hash" not in err.split("\n")[0]
    assert run(run_dir=rd, epochs=3) == 2  # an unfinished run is not restarted silently either
    assert "--resume" in capsys.readouterr().err
    assert snapshot(rd) == before
    assert run(run_dir=rd, epochs=3, extra=["--resume"]) == 0


# ------------------------------------------------------------------------------------------ 2 one writer
def test_a_second_writer_on_a_folder_is_refused(tmp_path, capsys):
    rd = tmp_path / "r"
    with FolderLock(rd):
        assert run(run_dir=rd) == 2
        err = capsys.readouterr().err
        assert "in use by another process" in err and f"pid {os.getpid()}" in err
        assert not (rd / "config.json").exists()
        with pytest.raises(FolderBusyError):
            FolderLock(rd).acquire()
    assert run(run_dir=rd) == 0


def test_a_lock_left_by_a_killed_process_is_recovered(tmp_path):
    rd = tmp_path / "r"
    code = ("import sys, time; from mmbalance.locks import FolderLock; FolderLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(rd)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(FolderBusyError):
        FolderLock(rd).acquire()
    proc.kill()
    proc.wait()
    assert (rd / ".lock").exists()  # the file stays behind; the kernel released the lock with its holder
    assert run(run_dir=rd) == 0
    assert not (rd / ".lock").exists()


# ------------------------------------------------------------------------------------------ 6 preemption
SIGNAL_SETS = {"model.dropout": 0.2, "train.scheduler": "cosine"}


def _start(rd: Path, epochs: int) -> subprocess.Popen:
    argv = cli_args("baseline", "mfeat", epochs=epochs, run_dir=rd, sets={**FAST, **SIGNAL_SETS})
    return subprocess.Popen([sys.executable, "-m", "mmbalance.run", *argv], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def _signal_when_training(proc: subprocess.Popen, rd: Path, sig: int) -> None:
    deadline = time.monotonic() + 120
    while not (rd / "config.json").exists():  # written when training starts (handlers installed)
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(sig)


def test_sigterm_and_sigint_checkpoint_and_resume_reaches_the_uninterrupted_numbers(tmp_path):
    """Subprocess-level: the signal arrives while training; the run stops at the end of that epoch
    with the signal's exit code and an 'interrupted' status; --resume equals an uninterrupted run."""
    epochs = 8
    assert run(run_dir=tmp_path / "full", epochs=epochs, sets=SIGNAL_SETS) == 0
    full = json.loads((tmp_path / "full" / "result.json").read_text())
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        rd = tmp_path / signal.Signals(sig).name
        proc = _start(rd, epochs)
        _signal_when_training(proc, rd, sig)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == code, err
        status = json.loads((rd / "result.json").read_text())
        assert status["status"] == "interrupted" and status["resumable"] is True
        assert status["signal"] == signal.Signals(sig).name and 1 <= status["epochs_done"] < epochs
        assert len((rd / "metrics.jsonl").read_text().splitlines()) == status["epochs_done"]
        assert "--resume" in err and "Traceback" not in err
        assert run(run_dir=rd, epochs=epochs, sets=SIGNAL_SETS, extra=["--resume"]) == 0
        resumed = json.loads((rd / "result.json").read_text())
        assert resumed["status"] == "ok"
        assert resumed["val"] == full["val"] and resumed["test"] == full["test"], sig
        assert len((rd / "metrics.jsonl").read_text().splitlines()) == epochs


def test_method_metrics_survive_a_resume_in_the_finish_stage(tmp_path, monkeypatch):
    sets = {"train.max_steps_per_epoch": 2}
    assert run("ogm_ge", run_dir=tmp_path / "full", epochs=2, sets=sets) == 0
    full = json.loads((tmp_path / "full" / "result.json").read_text())
    assert full["method_metrics"]  # ogm_ge reports its k_m coefficients
    monkeypatch.setenv("MMBALANCE_STOP_AFTER_EPOCHS", "2")  # killed after the last epoch, before the test pass
    with pytest.raises(KeyboardInterrupt):
        run("ogm_ge", run_dir=tmp_path / "k", epochs=2, sets=sets)
    monkeypatch.delenv("MMBALANCE_STOP_AFTER_EPOCHS")
    assert run("ogm_ge", run_dir=tmp_path / "k", epochs=2, sets=sets, extra=["--resume"]) == 0
    resumed = json.loads((tmp_path / "k" / "result.json").read_text())
    assert resumed["method_metrics"] == full["method_metrics"] and resumed["test"] == full["test"]


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip"])
def test_corrupt_last_checkpoint_is_a_clear_error(tmp_path, capsys, monkeypatch, content):
    rd = tmp_path / "r"
    monkeypatch.setenv("MMBALANCE_STOP_AFTER_EPOCHS", "1")
    with pytest.raises(KeyboardInterrupt):
        run(run_dir=rd, epochs=3)
    monkeypatch.delenv("MMBALANCE_STOP_AFTER_EPOCHS")
    (rd / "checkpoints" / "last.pt").write_bytes(content)
    assert run(run_dir=rd, epochs=3, extra=["--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: checkpoint") and "last.pt" in err and "unreadable" in err
    assert "Traceback" not in err


def test_temp_files_of_killed_writes_are_removed_on_the_next_start(tmp_path, monkeypatch):
    rd = tmp_path / "r"
    monkeypatch.setenv("MMBALANCE_STOP_AFTER_EPOCHS", "1")
    with pytest.raises(KeyboardInterrupt):
        run(run_dir=rd, epochs=2)
    monkeypatch.delenv("MMBALANCE_STOP_AFTER_EPOCHS")
    junk = [rd / "checkpoints" / ".last.pt.12345.tmp", rd / ".result.json.abcd.tmp"]
    for j in junk:
        j.write_bytes(b"half-written")
    assert run(run_dir=rd, epochs=2, extra=["--resume"]) == 0
    assert not any(j.exists() for j in junk)
    assert not [p for p in rd.rglob("*.tmp")]


# ------------------------------------------------------------------------------------------ 3 non-finite
@pytest.mark.parametrize("split", ["val", "test"])
def test_non_finite_evaluation_fails_the_run(tmp_path, split):
    from mmbalance.errors import NonFiniteLossError

    tr = build_trainer("baseline", run_dir=tmp_path / "r", epochs=1, sets=FAST)
    getattr(tr.data, split).inputs["fac"][0, 0] = float("nan")  # one poisoned sample, never trained on
    with pytest.raises(NonFiniteLossError, match=f"non-finite {'validation' if split == 'val' else 'test'}"):
        tr.fit()
    res = json.loads((tmp_path / "r" / "result.json").read_text())
    assert res["status"] == "failed" and "loss=nan" in res["error"]


def test_non_finite_training_data_is_blamed_not_the_lr(tmp_path):
    from mmbalance.errors import NonFiniteLossError

    tr = build_trainer("baseline", run_dir=tmp_path / "r", epochs=1, sets=FAST)
    tr.data.train.inputs["fou"][:] = float("inf")
    with pytest.raises(NonFiniteLossError, match="non-finite in fou: fix the data"):
        tr.fit()


@pytest.mark.parametrize("lr", ["nan", "inf", "-1"])
def test_non_finite_lr_is_refused(tmp_path, capsys, lr):
    assert main(cli_args("baseline", "mfeat", epochs=1, run_dir=tmp_path / "r", sets=FAST) + ["--lr", lr]) == 2
    assert "lr must be a finite number > 0" in capsys.readouterr().err and not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------ 7 faults
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
def test_write_fault_is_a_clear_error_and_keeps_the_previous_files(tmp_path, capsys, monkeypatch, err):
    rd = tmp_path / "r"
    assert run(run_dir=rd) == 0
    before = snapshot(rd)
    real_fsync = os.fsync

    def failing_fsync(fd):  # every write reaches fsync before its rename: fail the result.json one
        if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(".result.json."):
            raise OSError(err, os.strerror(err))
        return real_fsync(fd)

    monkeypatch.setattr(runfiles.os, "fsync", failing_fsync)
    assert run(run_dir=rd, epochs=2, extra=["--overwrite"]) == 4
    msg = capsys.readouterr().err
    assert os.strerror(err) in msg and "result.json" in msg and "Traceback" not in msg
    assert snapshot(rd / "previous") == before  # the finished result it was to replace is intact
    assert not [p for p in rd.rglob("*.tmp")]


def test_atomic_write_keeps_the_old_file_when_the_disk_is_full(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    runfiles.atomic_write_json(target, {"a": 1})
    real_fsync = os.fsync
    monkeypatch.setattr(runfiles.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(runfiles.RunFileWriteError, match="No space left"):
        runfiles.atomic_write_json(target, {"a": 2})
    monkeypatch.setattr(runfiles.os, "fsync", real_fsync)
    assert json.loads(target.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["result.json"]


# ------------------------------------------------------------------------------------------ 9 umask
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_run_files_follow_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        assert run(run_dir=tmp_path / "r") == 0
    finally:
        os.umask(old)
    for name in ("config.json", "metrics.jsonl", "result.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (tmp_path / "r" / name).stat().st_mode & 0o777 == mode, name
