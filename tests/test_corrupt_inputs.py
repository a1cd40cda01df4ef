"""Corrupt or out-of-range inputs: a clear DatasetFormatError (exit 2) naming the file and key, never a
traceback or a silently accepted file; published file placements are found."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

from test_iemocap import copy_tree, write_mmin, write_mult  # noqa: E402
from test_mosi import dump, load, mmsa_splits, mult_splits  # noqa: E402

from mmbalance.errors import DatasetFormatError  # noqa: E402
from mmbalance.registry import create_dataset  # noqa: E402


# ------------------------------------------------------------------------------------------ MOSI
def test_mosi_labels_outside_the_sentiment_scale_are_refused(tmp_path):
    raw = mult_splits()
    raw["train"]["labels"] = raw["train"]["labels"] * 100
    dump(raw, tmp_path / "mosi_data.pkl")
    with pytest.raises(DatasetFormatError, match=r"mosi_data.pkl: split 'train' key 'labels' has labels outside \[-3, 3\]"):
        load(tmp_path)


def test_mosi_modality_that_is_entirely_nan_is_refused_not_zeroed(tmp_path):
    raw = mult_splits()
    raw["valid"]["vision"][:] = np.nan
    dump(raw, tmp_path / "mosi_data.pkl")
    with pytest.raises(DatasetFormatError, match=r"split 'valid' key 'vision': all .* non-finite"):
        load(tmp_path)
    # a few -inf (MulT's padding convention) are still replaced and counted
    dump(mult_splits(), tmp_path / "mosi_data.pkl")
    assert load(tmp_path).info["nonfinite_replaced"]["train"]["audio"] == 3


def test_mosi_non_numeric_lengths_and_truncated_pickle(tmp_path):
    raw = mmsa_splits()
    raw["train"]["audio_lengths"] = ["x"] * 8
    path = dump(raw, tmp_path / "MOSI" / "Processed" / "unaligned_50.pkl")
    with pytest.raises(DatasetFormatError, match="key 'audio_lengths' must hold numbers"):
        load(tmp_path, variant="unaligned", use_length_masks=True)
    blob = pickle.dumps(mult_splits())
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "mosi_data.pkl").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetFormatError, match=r"t/mosi_data.pkl: cannot unpickle"):
        load(tmp_path / "t")
    assert path.is_file()


@pytest.mark.parametrize("variant", ["aligned", "unaligned"])
def test_mmsa_pickle_directly_in_the_data_folder_is_found(tmp_path, variant):
    dump(mmsa_splits(), tmp_path / f"{variant}_50.pkl")
    data = load(tmp_path, variant=variant)
    assert data.info["flavour"] == "mmsa" and data.info["path"] == str(tmp_path / f"{variant}_50.pkl")


# ------------------------------------------------------------------------------------------ IEMOCAP
@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("iemocap-corrupt") / "iemocap"
    write_mmin(root)
    return root


def test_iemocap_truncated_h5_and_label_npy(tmp_path, tree):
    root = copy_tree(tree, tmp_path / "a")
    blob = (root / "V/denseface.h5").read_bytes()
    (root / "V/denseface.h5").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(DatasetFormatError, match=r"denseface.h5"):
        create_dataset("iemocap", root=str(root))
    root = copy_tree(tree, tmp_path / "b")
    blob = (root / "target/1/trn_label.npy").read_bytes()
    (root / "target/1/trn_label.npy").write_bytes(blob[:100])
    with pytest.raises(DatasetFormatError, match=r"trn_label.npy is not a readable .npy file"):
        create_dataset("iemocap", root=str(root))


def test_iemocap_non_finite_features_are_counted(tmp_path, tree):
    root = copy_tree(tree, tmp_path / "c")
    with h5py.File(root / "L/bert_large.h5", "a") as f:
        uid = sorted(f.keys())[0]
        x = f[uid][()]
        x[0, :5] = np.nan
        x[1, 0] = np.inf
        del f[uid]
        f[uid] = x
    data = create_dataset("iemocap", root=str(root))
    counts = data.info["nonfinite_replaced"]
    assert sum(c["text"] for c in counts.values()) == 6 and sum(c["audio"] for c in counts.values()) == 0


def test_iemocap_mult_pickle_string_labels_and_autodetection(tmp_path):
    write_mult(tmp_path / "ok" / "iemocap_data.pkl")
    data = create_dataset("iemocap", str(tmp_path / "ok"))  # no dataset.format=mult needed
    assert data.info["format"] == "mult"
    raw = write_mult(tmp_path / "bad" / "iemocap_data.pkl")
    raw["test"]["labels"] = raw["test"]["labels"].astype(str)
    with open(tmp_path / "bad" / "iemocap_data.pkl", "wb") as f:
        pickle.dump(raw, f)
    with pytest.raises(DatasetFormatError, match=r"iemocap_data.pkl: split 'test' key 'labels' has dtype"):
        create_dataset("iemocap", str(tmp_path / "bad"))


# ------------------------------------------------------------------------------------------ BraTS
def test_brats_converter_refuses_non_finite_and_truncated_volumes_and_empty_splits(tmp_path):
    nib = pytest.importorskip("nibabel")
    from mmbalance.datasets import brats2021 as B
    from test_brats import write_raw

    raw = write_raw(tmp_path / "raw")
    vol = nib.load(str(raw / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz"))
    arr = np.asarray(vol.get_fdata(), dtype=np.float32)
    arr[3, 3, 3] = np.inf
    nib.save(nib.Nifti1Image(arr, affine=np.eye(4)), str(raw / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz"))
    blob = (raw / "BraTS2021_00002" / "BraTS2021_00002_seg.nii.gz").read_bytes()
    (raw / "BraTS2021_00002" / "BraTS2021_00002_seg.nii.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetFormatError) as err:
        B.convert_raw(raw, tmp_path / "out", fractions=(0.5, 0.25, 0.25))
    msg = str(err.value)
    assert "BraTS2021_00001_t2.nii.gz: 1" in msg and "case BraTS2021_00002: a .nii.gz file is unreadable" in msg
    assert not (tmp_path / "out").exists()
    raw2 = write_raw(tmp_path / "raw2", cases=(0, 1))
    with pytest.raises(DatasetFormatError, match="leave split.* valid.* empty"):
        B.convert_raw(raw2, tmp_path / "out2")  # 2 cases × 10 % validation = 0 cases
    assert not (tmp_path / "out2").exists()


def test_brats_invalid_label_in_a_training_case_fails_at_load_not_mid_training(tmp_path):
    pytest.importorskip("nibabel")
    from mmbalance.datasets import brats2021 as B
    from test_brats import write_raw

    prepared = tmp_path / "prepared"
    B.convert_raw(write_raw(tmp_path / "raw"), prepared, fractions=(0.5, 0.25, 0.25))
    import json

    case = json.loads((prepared / "splits.json").read_text())["train"][0]
    with h5py.File(prepared / "cases" / f"{case}.h5", "a") as f:
        lab = f["label"][()]
        lab[0, 0, 0] = 7
        del f["label"]
        f.create_dataset("label", data=lab)
    with pytest.raises(DatasetFormatError, match=rf"{case}.h5 key 'label' has values \[7\]"):
        create_dataset("brats2021", path=str(prepared), crop=32, slice_range=[0, 24])


# ------------------------------------------------------------------------------------------ mfeat
def test_mfeat_missing_integrity_file_is_an_error(tmp_path):
    from importlib import resources

    from mmbalance.datasets import mfeat

    src = Path(str(resources.files("mmbalance.data").joinpath("mfeat.npz")))
    shutil.copy(src, tmp_path / "mfeat.npz")
    with pytest.raises(DatasetFormatError, match="integrity file .*mfeat.sha256 is missing"):
        mfeat.load_arrays(tmp_path / "mfeat.npz")
    shutil.copy(src.with_name("mfeat.sha256"), tmp_path / "mfeat.sha256")
    assert mfeat.load_arrays(tmp_path / "mfeat.npz")["labels"].shape == (2000,)
