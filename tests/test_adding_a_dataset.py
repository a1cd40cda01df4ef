"""The README's "Adding a dataset" section and docs/adding_a_dataset.md's map-style example run as written,
and a dataset whose modality shapes disagree with what it declares is refused with exit 2 naming both."""
from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import REPO
from test_usability import _env, _readme_section


def test_readme_adding_a_dataset_runs_as_written(tmp_path):
    sec = _readme_section("Adding a dataset")
    blocks = re.findall(r"```(\w+)\n(.*?)```", sec, re.S)
    py = [b for lang, b in blocks if lang == "python"]
    sh = [b for lang, b in blocks if lang == "bash"]
    assert len(py) == 1 and sh
    (tmp_path / "my_dataset.py").write_text(py[0])
    for line in (ln for b in sh for ln in b.splitlines() if ln.strip() and not ln.startswith("#")):
        res = subprocess.run(line, shell=True, cwd=tmp_path, env=_env(MMBALANCE_NO_PROGRESS="1"),
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"{line}\n{res.stdout}\n{res.stderr}"
    (run_dir,) = (tmp_path / "runs_example" / "two_views" / "ogm_ge").glob("seed0-*")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "ok" and result["modalities"] == ["strong", "weak"]
    assert json.loads((run_dir / "config.json").read_text())["dataset_options"]["noise"] == 3
    # the preset: the same loader with noise 4 (a noisier weak view), in this process
    from mmbalance.registry import DATASETS, create_dataset, load_plugin

    try:
        load_plugin(str(tmp_path / "my_dataset.py"))
        plain, noisy = create_dataset("two_views"), create_dataset("two_views-noisy")
        assert plain.train.inputs["strong"].equal(noisy.train.inputs["strong"])
        assert noisy.train.inputs["weak"].std() > plain.train.inputs["weak"].std() * 1.5
    finally:
        for name in ("two_views", "two_views-noisy"):
            DATASETS._entries.pop(name, None)


def test_docs_map_style_example_runs(tmp_path):
    text = (REPO / "docs" / "adding_a_dataset.md").read_text()
    (code,) = [b for lang, b in re.findall(r"```(\w+)\n(.*?)```", text, re.S) if lang == "python"]
    (tmp_path / "npy_pairs_plugin.py").write_text(code)
    from mmbalance.registry import DATASETS

    namespace: dict = {}
    try:  # make the files with the page's own make_files (the registration is undone)
        exec(compile(code, "adding_a_dataset.md", "exec"), namespace)
        namespace["make_files"](tmp_path / "data" / "npy_pairs")
    finally:
        DATASETS._entries.pop("npy_pairs", None)
    res = subprocess.run([sys.executable, "-m", "mmbalance.run", "--plugin", "npy_pairs_plugin.py", "--method",
                          "baseline", "--dataset", "npy_pairs", "--data-dir", str(tmp_path / "data"), "--output-dir",
                          str(tmp_path / "runs"), "--quiet"], cwd=tmp_path, env=_env(MMBALANCE_NO_PROGRESS="1"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (run_dir,) = (tmp_path / "runs" / "npy_pairs" / "baseline").glob("seed0-*")
    assert json.loads((run_dir / "result.json").read_text())["status"] == "ok"


def test_declared_and_actual_shapes_must_agree(tmp_path):
    """A map-style split whose items disagree with input_shapes: exit 2 before anything is written."""
    from mmbalance.data import ModelSpec, MultimodalData
    from mmbalance.errors import DatasetFormatError
    from mmbalance.registry import DATASETS, create_dataset, register_dataset

    class Items:
        def __init__(self, shape, keys=("a", "b", "label", "idx")):
            self.shape, self.keys = shape, keys

        def __len__(self):
            return 4

        def __getitem__(self, i):
            import torch

            full = {"a": torch.zeros(self.shape), "b": torch.zeros(3), "label": 0, "idx": i}
            return {k: full[k] for k in self.keys}

    from dataclasses import dataclass

    @dataclass
    class Opt:
        shape: int = 5
        drop_label: bool = False

    def build(o, data_dir=None):
        keys = ("a", "b", "idx") if o.drop_label else ("a", "b", "label", "idx")
        return MultimodalData(["a", "b"], "classification", {"num_classes": 2}, Items(5), Items(5),
                              Items(o.shape, keys), {"a": (5,), "b": (3,)}, 2, ModelSpec("mlp_concat"))

    build.options_cls = Opt
    try:
        register_dataset("_shape_check_probe")(build)
        create_dataset("_shape_check_probe")
        try:
            create_dataset("_shape_check_probe", shape=6)
            raise AssertionError("a shape mismatch was accepted")
        except DatasetFormatError as exc:
            assert "modality 'a' of the test split has per-sample shape (6,) but input_shapes['a'] = (5,)" in str(exc)
        try:
            create_dataset("_shape_check_probe", drop_label=True)
            raise AssertionError("an item without 'label' was accepted")
        except DatasetFormatError as exc:
            assert "lack key(s) ['label']" in str(exc)
    finally:
        DATASETS._entries.pop("_shape_check_probe", None)
