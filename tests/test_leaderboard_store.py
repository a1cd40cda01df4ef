"""The compact results store: a report built from the store alone is byte-identical to one built from the run
folders; stored runs are done for ``run`` (skipped, not redone); a stored line of another plan is stale; lines are
deduplicated per run folder and the file is deterministic."""
from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
from pathlib import Path

from test_leaderboard import make_fixture

from mmbalance.config import config_hash
from mmbalance.leaderboard import store
from mmbalance.leaderboard.execute import RUNNER_ENV, execute_run
from mmbalance.leaderboard.plan import plan_hash_payload, read_state
from mmbalance.leaderboard.report import build_report, write_report


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_report_from_the_store_alone_is_byte_identical(tmp_path):
    suite, specs = make_fixture(tmp_path)
    results = tmp_path / "results"
    (Path(specs[0].run_dir) / "metrics.jsonl").write_text(
        json.dumps({"epoch": 0, "phase": "joint", "train_loss": 1.5, "lr": 0.1, "val": {"accuracy": 0.5},
                    "diag": {"conf": {"fac": 0.3}}}) + "\n")
    write_report(build_report(suite, specs), tmp_path / "from_folders")
    assert store.sync(specs) == len(specs)  # every fixture run is finished (ok, failed or n/a)
    first = {p.name: p.read_bytes() for p in (results / store.STORE_DIR).glob("*.gz")}
    assert store.sync(specs) == 0  # deduplicated: nothing new
    lines = [json.loads(x) for x in gzip.open(results / store.STORE_DIR / "mfeat.jsonl.gz", "rt")]
    assert len(lines) == len({x["run"] for x in lines}) == sum(s.dataset == "mfeat" for s in specs)
    rec = next(x for x in lines if x["run"] == "mfeat/baseline/seed0")
    assert rec["curve"] == [{"epoch": 0, "phase": "joint", "train_loss": 1.5, "lr": 0.1, "val": {"accuracy": 0.5}}]
    for ds in ("mfeat", "mfeat-hard"):
        shutil.rmtree(results / ds)  # the run folders leave; the store stays
    assert [read_state(s).state for s in specs] == [store.lookup(results, s.dataset, s.run_dir)["state"]
                                                    for s in specs]
    assert {read_state(s).state for s in specs} == {"ok", "failed", "n/a"}
    write_report(build_report(suite, specs), tmp_path / "from_store")
    assert _files(tmp_path / "from_folders") == _files(tmp_path / "from_store")
    store.add(results, [], {})  # a no-op leaves the bytes alone; re-encoding the same lines gives the same bytes
    again = store._encode(store.load(results, "mfeat"))
    assert again == first["mfeat.jsonl.gz"]


def test_stored_runs_are_done_for_run_and_other_plans_are_stale(tmp_path, monkeypatch):
    suite, specs = make_fixture(tmp_path)
    store.sync(specs)
    results = tmp_path / "results"
    shutil.rmtree(results / "mfeat")
    spec = next(s for s in specs if s.dataset == "mfeat" and s.row == "baseline" and s.seed == 0)
    # the runner would fail loudly if it were called: a stored ok run is skipped
    monkeypatch.setenv(RUNNER_ENV, "false")
    assert execute_run(spec).state == "ok"
    assert not Path(spec.run_dir).exists()
    # another plan (changed --set values) for the same folder: the stored line is not its result
    other = dataclasses.replace(spec, sets=spec.sets + (("train.lr", "0.5"),))
    other = dataclasses.replace(other, plan_hash=config_hash(plan_hash_payload(other)))
    assert read_state(other).state == "missing"
    # a folder that exists wins over the store (here: a failed re-run of the same plan)
    Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(spec.run_dir) / "status.json").write_text(json.dumps({"plan_hash": spec.plan_hash, "state": "failed",
                                                                "error": "boom"}))
    assert read_state(spec).state == "failed"


def test_the_writer_adds_runs_as_they_finish_and_flushes_the_rest(tmp_path):
    suite, specs = make_fixture(tmp_path)
    results = tmp_path / "results"
    w = store.Writer(interval=3600.0)
    w.add(specs[0])  # the first finished run is written at once
    assert store.lookup(results, specs[0].dataset, specs[0].run_dir)["plan_hash"] == specs[0].plan_hash
    w.add(specs[1])  # within the interval: pending until flush
    assert store.lookup(results, specs[1].dataset, specs[1].run_dir) is None
    assert w.flush() == 1 and store.lookup(results, specs[1].dataset, specs[1].run_dir) is not None
