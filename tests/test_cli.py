"""CLI behaviour: the three run files, bad input (clear message, exit ≠ 0, nothing written)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, SMALL_MFEAT

from mmbalance.run import main


def test_baseline_writes_three_run_files(run_cli):
    code, rd, res = run_cli("baseline", sets=SMALL_MFEAT, epochs=2)
    assert code == 0
    assert {p.name for p in rd.iterdir()} >= {"config.json", "metrics.jsonl", "result.json"}
    assert res["status"] == "ok" and set(res["test_per_modality"]) == {"fac", "fou", "mor"}
    assert 0 <= res["test"]["accuracy"] <= 1 and "accuracy" in res["val"]
    assert res["timings"]["epochs"] == 2
    lines = (rd / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "val_per_modality" in json.loads(lines[0])
    cfg = json.loads((rd / "config.json").read_text())
    assert cfg["config_hash"] == res["config_hash"] and cfg["train"]["epochs"] == 2


def test_unimodal_run_has_only_its_modality(run_cli):
    code, rd, res = run_cli("unimodal:fou", sets=SMALL_MFEAT)
    assert code == 0 and res["modalities"] == ["fou"]
    cfg = json.loads((rd / "config.json").read_text())
    assert cfg["model_resolved"]["modalities"] == ["fou"]


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope"], "unknown method 'nope'; known methods: "),
    (["--dataset", "nope"], "unknown dataset 'nope'; known datasets: "),
    (["--set", "bogus=1"], "unknown option(s) 'bogus'"),
    (["--set", "dataset.views=[xyz]"], "unknown view 'xyz'"),
    (["--set", "train.optimizer=rmsprop"], "'rmsprop' is not one of"),
    (["--method", "unimodal:zzz"], "modality 'zzz' is not in dataset"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys, argv, message):
    rd = tmp_path / "run"
    code = main(["--run-dir", str(rd), "--epochs", "1", "--quiet"] + argv)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not rd.exists()


def test_malformed_config_file(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("train: {epochs: [1\n")
    assert main(["--config", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
    assert "c.yaml" in capsys.readouterr().err and not (tmp_path / "r").exists()
    bad2 = tmp_path / "c.toml"
    bad2.write_text("unknown_key = 3\n")
    assert main(["--config", str(bad2), "--run-dir", str(tmp_path / "r")]) == 2
    assert "unknown key 'unknown_key'" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2


def test_config_file_and_cli_precedence(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("epochs = 3\nbatch_size = 32\n[dataset]\nlimit_per_class = 20\n")
    rd = tmp_path / "r"
    assert main(["--config", str(cfg), "--epochs", "1", "--run-dir", str(rd), "--quiet"]) == 0
    saved = json.loads((rd / "config.json").read_text())
    assert saved["train"]["epochs"] == 1 and saved["train"]["batch_size"] == 32


def test_missing_data_dir_names_the_layout(tmp_path, capsys):
    from mmbalance.registry import list_datasets

    if "mosi" not in list_datasets():
        pytest.skip("mosi loader not present")
    code = main(["--dataset", "mosi", "--data-dir", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert "nowhere" in err
    assert not (tmp_path / "r").exists()


def test_list_and_help_subprocess():
    out = subprocess.run([sys.executable, "-m", "mmbalance.run", "--list"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert "methods:" in out and "baseline" in out and "mfeat-hard" in out
