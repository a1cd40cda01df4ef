"""``--set`` and YAML config values: YAML 1.1 words such as ``no`` are not booleans for string keys."""
from __future__ import annotations

import json

import pytest
from conftest import SMALL_MFEAT

from mmbalance.config import TrainConfig, build_hparams, load_config_file, parse_set_items


def test_set_no_is_the_string_for_a_string_key(run_cli):
    code, rd, res = run_cli("baseline", sets={**SMALL_MFEAT, "train.mixed_precision": "no"}, epochs=1)
    assert code == 0 and res["status"] == "ok"
    assert json.loads((rd / "config.json").read_text())["train"]["mixed_precision"] == "no"


def test_yaml_config_file_no_is_the_string(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("mixed_precision: no\nepochs: 2\nmethod:\n  guard: no\n  tag: off\n  alpha: 1e-3\n")
    cfg = load_config_file(p)
    assert cfg["train"] == {"mixed_precision": "no", "epochs": 2}
    assert cfg["method"] == {"guard": "no", "tag": "off", "alpha": 0.001}
    assert build_hparams(TrainConfig, cfg["train"], where="t").mixed_precision == "no"


def test_set_values_keep_types_and_booleans_still_parse():
    got = parse_set_items(["train.mixed_precision=no", "guard=no", "train.epochs=3", "lr=1e-3", "x=true",
                           "dataset.views=[fou, zer]", "dataset.variant=007", "y=null", "t=1:30"])
    assert got["train"] == {"mixed_precision": "no", "epochs": 3}
    assert got["method"] == {"guard": "no", "lr": 0.001, "x": True, "y": None, "t": "1:30"}
    assert got["dataset"] == {"views": ["fou", "zer"], "variant": "007"}
    # a boolean-typed key still reads yes/no/on/off strictly
    from dataclasses import dataclass

    @dataclass
    class H:
        flag: bool = True
        name: str = "a"

    assert build_hparams(H, {"flag": "no", "name": 2021}, where="h") == H(False, "2021")
    assert build_hparams(H, {"flag": "on"}, where="h").flag is True
    with pytest.raises(Exception, match="expected a boolean"):
        build_hparams(H, {"flag": "maybe"}, where="h")
