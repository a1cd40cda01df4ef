"""Fault injection (not part of CI): kill runs at random points, resume them, and check that every
resumed run ends bit-identical to an uninterrupted one.

For each method (default: one per family — single-phase ``ogm_ge``, teacher-based ``umt``, multi-phase
``reconboost``, held-out-based ``gblending``) it trains a reference run, then ``--trials`` times starts the
same run in a fresh folder and injects 1–``--max-kills`` faults, each one of:

* ``sigkill``: SIGKILL at a random moment of training;
* ``sigterm``: SIGTERM at a random moment (the run checkpoints at the epoch end and exits 143);
* ``ckpt-write``: SIGKILL while a checkpoint is being written (as soon as its temporary file appears);

and restarts it the way the leaderboard does (``--resume`` when a checkpoint or an "interrupted" status
is there, else from scratch) until it finishes. After every fault, every JSON run file present must
parse. Outcomes: ``identical`` (val, test, per-modality, selection and method metrics equal the
reference exactly), ``failed clearly`` (a restart exited 2 with an ``error:`` line), ``lost`` (anything
else: different numbers, a traceback, a missing or unreadable file). Prints a table and exits 1 if
anything was lost.

    python tools/fault_injection.py --trials 5 --out /tmp/fault-injection
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAMILIES = {"ogm_ge": "single-phase", "umt": "teacher-based", "reconboost": "multi-phase",
            "gblending": "held-out-based"}
COMPARED = ("val", "test", "val_per_modality", "test_per_modality", "selected", "method_metrics")


def command(method: str, run_dir: Path, args: argparse.Namespace, resume: bool) -> list[str]:
    argv = [sys.executable, "-m", "mmbalance.run", "--method", method, "--dataset", args.dataset,
            "--seed", str(args.seed), "--epochs", str(args.epochs), "--run-dir", str(run_dir), "--quiet",
            "--output-dir", str(run_dir.parent / f"{run_dir.name}.out"), *sum((["--set", s] for s in args.set), [])]
    return argv + (["--resume"] if resume else [])


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MMBALANCE_NO_PROGRESS": "1"}


def start(argv: list[str], log: Path) -> subprocess.Popen:
    fh = open(log, "a")
    fh.write(f"=== {' '.join(argv)}\n")
    fh.flush()
    return subprocess.Popen(argv, cwd=REPO, env=env(), stdout=fh, stderr=subprocess.STDOUT)


def wait_training(proc: subprocess.Popen, run_dir: Path, timeout: float = 600) -> bool:
    """Until config.json exists (training started) or the process ended; False if it ended."""
    t0 = time.monotonic()
    while not (run_dir / "config.json").exists():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            return False
        time.sleep(0.005)
    return True


def inject(proc: subprocess.Popen, run_dir: Path, kind: str, horizon: float, rng: random.Random) -> str:
    """Apply one fault; returns what actually happened."""
    if not wait_training(proc, run_dir):
        return "finished-before-fault"
    if kind == "ckpt-write":
        ckpt = run_dir / "checkpoints"
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < horizon * 2:
            if ckpt.is_dir() and any(p.name.endswith(".tmp") for p in ckpt.iterdir()):
                proc.send_signal(signal.SIGKILL)
                return "sigkill-during-checkpoint-write"
            time.sleep(0.0005)
        return "finished-before-fault" if proc.poll() is not None else "missed"
    time.sleep(rng.uniform(0.0, horizon))
    if proc.poll() is not None:
        return "finished-before-fault"
    proc.send_signal(signal.SIGKILL if kind == "sigkill" else signal.SIGTERM)
    return kind


def json_files_parse(run_dir: Path) -> list[str]:
    bad = []
    for p in run_dir.glob("*.json*"):
        if p.name.startswith("."):
            continue
        try:
            text = p.read_text()
            if p.suffix == ".jsonl":
                [json.loads(line) for line in text.splitlines()]
            else:
                json.loads(text)
        except (OSError, ValueError) as exc:
            bad.append(f"{p.name}: {exc}")
    return bad


def resumable(run_dir: Path) -> bool:
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return True
    try:
        return json.loads((run_dir / "result.json").read_text()).get("status") == "interrupted"
    except (OSError, ValueError):
        return False


def comparable(value, key: str):
    """Method metrics without wall-clock entries (teacher training seconds, whether it was trained now)."""
    if key == "method_metrics" and isinstance(value, dict):
        return {k: v for k, v in value.items() if "seconds" not in k and "trained_now" not in k}
    return value


def trial(method: str, run_dir: Path, ref: dict, horizon: float, args: argparse.Namespace,
          rng: random.Random) -> dict:
    log = run_dir.parent / f"{run_dir.name}.log"
    run_dir.mkdir(parents=True)
    n_faults = rng.randint(1, args.max_kills)
    faults, notes = [], []
    for _ in range(n_faults):
        proc = start(command(method, run_dir, args, resume=resumable(run_dir)), log)
        kind = rng.choice(["sigkill", "sigterm", "ckpt-write"])
        faults.append(inject(proc, run_dir, kind, horizon, rng))
        proc.wait()
        notes += json_files_parse(run_dir)
    for _ in range(4):  # restarts until done (a SIGTERM'd run may need one more)
        proc = start(command(method, run_dir, args, resume=resumable(run_dir)), log)
        code = proc.wait()
        if code == 0:
            break
        if code == 2:
            tail = [ln for ln in log.read_text().splitlines() if ln.startswith("error:")]
            return {"faults": faults, "outcome": "failed clearly", "detail": tail[-1] if tail else "exit 2"}
    else:
        return {"faults": faults, "outcome": "lost", "detail": f"did not finish (last exit {code})"}
    try:
        res = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError) as exc:
        return {"faults": faults, "outcome": "lost", "detail": f"result.json unreadable: {exc}"}
    diff = [k for k in COMPARED if comparable(res.get(k), k) != comparable(ref.get(k), k)]
    leftovers = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*.tmp")]
    if diff or notes or res.get("status") != "ok":
        return {"faults": faults, "outcome": "lost", "detail": f"differs in {diff}; {notes}; status {res.get('status')}"}
    return {"faults": faults, "outcome": "identical", "detail": f"tmp left: {leftovers}" if leftovers else ""}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(FAMILIES))
    p.add_argument("--dataset", default="mfeat")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=["train.modality_eval=final", "train.checkpoint_interval=0"],
                   metavar="NAME=VALUE", help="--set values of every run (default: a checkpoint after every epoch, "
                   "so that kills land in checkpoint writes too)")
    p.add_argument("--trials", type=int, default=5, help="killed runs per method")
    p.add_argument("--max-kills", type=int, default=3, help="faults per killed run (1..N, random)")
    p.add_argument("--rng-seed", type=int, default=0)
    p.add_argument("--out", default="fault-injection")
    args = p.parse_args(argv)
    rng = random.Random(args.rng_seed)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    table = []
    for method in args.methods:
        mdir = out / method.replace(":", "-")
        mdir.mkdir(parents=True)
        t0 = time.monotonic()
        ref_dir = mdir / "reference"
        proc = start(command(method, ref_dir, args, resume=False), mdir / "reference.log")
        started = wait_training(proc, ref_dir)
        t_train = time.monotonic()
        if proc.wait() != 0 or not started:
            print(f"{method}: the reference run failed; see {mdir / 'reference.log'}", file=sys.stderr)
            return 2
        horizon = max(0.2, time.monotonic() - t_train)
        ref = json.loads((ref_dir / "result.json").read_text())
        print(f"{method}: reference in {time.monotonic() - t0:.1f}s (training+finish {horizon:.1f}s)", flush=True)
        for i in range(args.trials):
            r = trial(method, mdir / f"trial{i}", ref, horizon, args, rng)
            table.append({"method": method, "family": FAMILIES.get(method, "?"), "trial": i, **r})
            print(f"  trial {i}: {r['outcome']:<14} faults {r['faults']} {r['detail']}", flush=True)
    kills = sum(sum(f not in ("finished-before-fault", "missed") for f in r["faults"]) for r in table)
    by = {k: sum(r["outcome"] == k for r in table) for k in ("identical", "failed clearly", "lost")}
    kinds: dict[str, int] = {}
    for r in table:
        for f in r["faults"]:
            kinds[f] = kinds.get(f, 0) + 1
    summary = {"runs": len(table), "faults_injected": kills, "fault_kinds": kinds, **by}
    (out / "summary.json").write_text(json.dumps({"summary": summary, "trials": table}, indent=1))
    print(json.dumps(summary, indent=1))
    return 1 if by["lost"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
