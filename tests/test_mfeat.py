"""The vendored mfeat file and its loader (docs/datasets/mfeat.md §3, §5, §12)."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

from mmbalance.errors import ConfigError
from mmbalance.registry import create_dataset

FINGERPRINTS = {"fou": (20068.876447, [0.065882, 0.19731, 0.10383]), "fac": (137492808, [98, 236, 531]),
                "kar": (6794.852860, [-10.297, -11.667, 11.561]), "pix": (1452834, [0, 3, 4]),
                "zer": (8331825.075159, [0.011033, 0.83147, 15.352]), "mor": (12632390.634800, [1, 0, 0])}


def test_vendored_file_fingerprints_and_layout():
    from mmbalance.datasets.mfeat import load_arrays

    a = load_arrays()
    for view, (total, first) in FINGERPRINTS.items():
        assert a[view].dtype == np.float32
        assert a[view].astype(np.float64).sum() == pytest.approx(total, rel=1e-6)
        np.testing.assert_allclose(a[view][0, :3], first, rtol=1e-4)
    assert a["labels"].tolist() == np.repeat(np.arange(10), 200).tolist()
    assert (REPO / "mmbalance" / "data" / "NOTICE.mfeat").is_file()


def _sha(idx: np.ndarray) -> str:
    return hashlib.sha256(np.sort(idx).astype("<i8").tobytes()).hexdigest()[:16]


def test_golden_split_and_standardisation():
    d = create_dataset("mfeat")
    assert [len(d.train), len(d.val), len(d.test)] == [1400, 200, 400]
    assert d.modalities == ["fac", "fou", "mor"]
    # recover indices through the labels/rows: the loader keeps index order ascending
    from mmbalance.data import stratified_split

    tr, va, te = stratified_split(np.repeat(np.arange(10), 200), [0.7, 0.1, 0.2], 0)
    assert tr[:5].tolist() == [0, 2, 3, 4, 5] and va[:5].tolist() == [1, 17, 28, 34, 35]
    assert te[:5].tolist() == [9, 21, 25, 29, 31]
    assert (tr.sum(), va.sum(), te.sum()) == (1398182, 199840, 400978)
    assert (_sha(tr), _sha(va), _sha(te)) == ("76b9897a3710828e", "649a977a54b3e832", "507d8feb8b3b93af")
    # standardisation fitted on train only: train mean 0 / std 1, val not exactly
    x = d.train.inputs["fac"].double()
    assert torch.allclose(x.mean(0), torch.zeros(216, dtype=torch.float64), atol=1e-4)
    assert d.train.labels.bincount().tolist() == [140] * 10


def test_presets_and_bad_views():
    assert create_dataset("mfeat-hard").modalities == ["fou", "zer", "mor"]
    assert len(create_dataset("mfeat-all").modalities) == 6
    with pytest.raises(ConfigError, match="unknown view 'xyz'; valid views: fou, fac, kar, pix, zer, mor"):
        create_dataset("mfeat", views=["xyz"])
    with pytest.raises(ConfigError, match="duplicate"):
        create_dataset("mfeat", views=["fac", "fac"])


def test_build_tool_csv_and_raw_layouts_agree(tmp_path):
    rs = np.random.RandomState(0)
    dims = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
    csv_dir, raw_dir = tmp_path / "csv", tmp_path / "raw"
    csv_dir.mkdir(), raw_dir.mkdir()
    for v, d in dims.items():
        x = rs.randint(0, 9, size=(30, d)).astype(float)
        y = np.repeat(np.arange(10), 3)
        header = ",".join(str(i) for i in range(d + 1))
        np.savetxt(csv_dir / f"mfeat-{v}.csv", np.column_stack([x, y]), delimiter=",", header=header, comments="", fmt="%g")
        np.savetxt(raw_dir / f"mfeat-{v}", x, fmt="%g")
    tool = [sys.executable, str(REPO / "tools" / "build_mfeat_npz.py"), "--no-fingerprint"]
    for src in (csv_dir, raw_dir):
        subprocess.run(tool + [str(src), "--out", str(src / "out")], check=True, capture_output=True)
        assert (src / "out" / "mfeat.sha256").is_file()
    a, b = np.load(csv_dir / "out" / "mfeat.npz"), np.load(raw_dir / "out" / "mfeat.npz")
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])
    # a wrong dimension is rejected with the expected layout named
    np.savetxt(raw_dir / "mfeat-mor", np.zeros((30, 5)))
    (raw_dir / "mfeat-mor.csv").unlink(missing_ok=True)
    r = subprocess.run(tool + [str(raw_dir), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and "expected 6 whitespace-separated columns" in r.stderr
