"""IEMOCAP loader (MMIN feature tree and MulT pickle) and iemocap-synth (docs/datasets/iemocap.md §1, §6, §7).

Fixtures are generated in tmp_path with h5py / NumPy in the exact MMIN and MulT layouts (tiny N,
real file names, key names and feature widths 1024 / 130 / 342 and 300 / 74 / 35).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mmbalance.errors import ConfigError, DatasetFormatError, DatasetNotFoundError
from mmbalance.registry import METHODS, create_dataset

N_SPLIT = {"trn": 6, "val": 3, "tst": 3}
AUDIO_T = [360, 120, 80, 200, 350, 60, 90, 100, 110, 130, 140, 150]  # utterance 0 is longer than 350 frames


def write_mmin(root: Path, seed: int = 0) -> dict:
    """MMIN tree with 12 utterances; fold 1: trn = 0..5, val = 6..8, tst = 9..11; fold 2: reversed order."""
    rs = np.random.RandomState(seed)
    ids = [f"Ses01F_impro01_F{i:03d}" for i in range(12)]
    labels = np.arange(12) % 4
    feats = {"A/comparE.h5": {}, "V/denseface.h5": {}, "L/bert_large.h5": {}}
    for i, uid in enumerate(ids):
        feats["A/comparE.h5"][uid] = rs.normal(2.0, 3.0, size=(AUDIO_T[i], 130)).astype(np.float32)
        feats["V/denseface.h5"][uid] = rs.normal(size=(40 if i % 2 else 50, 342)).astype(np.float32)
        feats["L/bert_large.h5"][uid] = rs.normal(size=(18 if i % 2 else 22, 1024)).astype(np.float32)
    for rel, content in feats.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(root / rel, "w") as f:
            for uid, x in content.items():
                f[uid] = x
    mean, std = np.full(130, 2.0, np.float32), np.full(130, 3.0, np.float32)
    std[5] = 0.0
    with h5py.File(root / "A/comparE_mean_std.h5", "w") as f:
        for cv in range(1, 11):
            f[f"{cv}/mean"] = mean
            f[f"{cv}/std"] = std
    for cv, order in ((1, list(range(12))), (2, list(range(11, -1, -1)))):
        d = root / "target" / str(cv)
        d.mkdir(parents=True)
        start = 0
        for s, n in N_SPLIT.items():
            idx = order[start:start + n]
            start += n
            np.save(d / f"{s}_label.npy", np.eye(4, dtype=np.float32)[labels[idx]])
            np.save(d / f"{s}_int2name.npy", np.array([[ids[i].encode()] for i in idx], dtype="S"))
    return {"ids": ids, "labels": labels, "feats": feats}


@pytest.fixture(scope="module")
def mmin_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("iemocap") / "iemocap"
    return root, write_mmin(root)


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_mmin_shapes_truncation_normalisation_and_labels(mmin_tree):
    root, raw = mmin_tree
    data = create_dataset("iemocap", root.parent)  # found as <data dir>/iemocap
    assert data.modalities == ["text", "audio", "vision"] and data.task == "classification" and data.out_dim == 4
    assert data.input_shapes == {"text": (22, 1024), "audio": (350, 130), "vision": (50, 342)}
    assert [len(data.train), len(data.val), len(data.test)] == [6, 3, 3]
    assert data.train.labels.tolist() == raw["labels"][:6].tolist() and data.train.labels.dtype == torch.int64
    assert data.info["truncated"]["train"] == {"text": 0, "audio": 1, "vision": 0}
    assert data.info["class_names"] == ["class_0", "class_1", "class_2", "class_3"]
    assert data.info["f1_reported"].startswith("f1_weighted")
    a0 = raw["feats"]["A/comparE.h5"][raw["ids"][0]]
    expect = (a0[:350] - 2.0) / 3.0
    expect[:, 5] = a0[:350, 5] - 2.0  # std 0 → 1
    assert torch.allclose(data.train.inputs["audio"][0], torch.from_numpy(expect))
    a1 = data.train.inputs["audio"][1]  # 120 frames, zero-padded to 350
    assert (a1[120:] == 0).all() and (a1[:120] != 0).any(dim=1).all()
    assert (data.train.inputs["text"][1, 18:] == 0).all() and (data.train.inputs["vision"][1, 40:] == 0).all()
    raw_norm = create_dataset("iemocap", root=str(root), norm="none", max_len_audio=400)
    assert raw_norm.input_shapes["audio"] == (400, 130) and raw_norm.info["truncated"]["train"]["audio"] == 0
    assert torch.equal(raw_norm.train.inputs["audio"][0, :360], torch.from_numpy(a0))


def test_fold_selection_and_invalid_fold(mmin_tree):
    root, raw = mmin_tree
    f2 = create_dataset("iemocap", root=str(root), cv=2, class_names=["a", "b", "c", "d"])
    assert f2.train.labels.tolist() == raw["labels"][[11, 10, 9, 8, 7, 6]].tolist()
    assert f2.info["cv"] == 2 and f2.info["class_names"] == ["a", "b", "c", "d"]
    f1 = create_dataset("iemocap", root=str(root), cv=1)
    assert not torch.equal(f1.train.inputs["text"], f2.train.inputs["text"])
    with pytest.raises(ConfigError, match=r"folds present under .*target: \['1', '2'\]"):
        create_dataset("iemocap", root=str(root), cv=3)


def test_mmin_missing_files_are_all_listed(tmp_path, mmin_tree):
    root = copy_tree(mmin_tree[0], tmp_path / "tree")
    (root / "L/bert_large.h5").unlink()
    (root / "target/1/val_label.npy").unlink()
    with pytest.raises(DatasetNotFoundError) as err:
        create_dataset("iemocap", root=str(root))
    msg = str(err.value)
    assert "L/bert_large.h5" in msg and "target/1/val_label.npy" in msg and "MMIN feature tree" in msg
    with pytest.raises(DatasetNotFoundError, match="no MMIN feature tree found"):
        create_dataset("iemocap", tmp_path / "empty")


@pytest.mark.parametrize("kind,needle", [
    ("not_one_hot", "row 2 is [0.0, 1.0, 1.0, 0.0], expected one-hot"),
    ("length_mismatch", "has 5 names but"),
    ("absent_ids", "2 utterance id(s) of the split are absent"),
    ("width", "has shape (22, 1000)"),
    ("fold_group", "missing group '1'"),
    ("empty_split", "the split is empty"),
])
def test_mmin_malformed(tmp_path, mmin_tree, kind, needle):
    root = copy_tree(mmin_tree[0], tmp_path / "tree")
    ids = mmin_tree[1]["ids"]
    if kind == "not_one_hot":
        y = np.load(root / "target/1/trn_label.npy")
        y[2, 1] = 1.0
        np.save(root / "target/1/trn_label.npy", y)
    elif kind == "length_mismatch":
        np.save(root / "target/1/trn_int2name.npy", np.load(root / "target/1/trn_int2name.npy")[:5])
    elif kind in {"absent_ids", "width"}:
        with h5py.File(root / "L/bert_large.h5", "a") as f:
            if kind == "absent_ids":
                del f[ids[1]], f[ids[3]]
            else:
                del f[ids[2]]
                f[ids[2]] = np.zeros((22, 1000), np.float32)
    elif kind == "fold_group":
        with h5py.File(root / "A/comparE_mean_std.h5", "a") as f:
            del f["1"]
    elif kind == "empty_split":
        np.save(root / "target/1/tst_label.npy", np.zeros((0, 4), np.float32))
        np.save(root / "target/1/tst_int2name.npy", np.zeros((0, 1), dtype="S20"))
    with pytest.raises(DatasetFormatError) as err:
        create_dataset("iemocap", root=str(root))
    assert needle in str(err.value)


def write_mult(path: Path, ambiguous: bool = False, seed: int = 0) -> dict:
    """MulT pickle: text (N, 20, 300), audio (N, 20, 74) with -inf, vision (N, 20, 35), labels (N, 4, 2)."""
    rs = np.random.RandomState(seed)
    out = {}
    for split, n in {"train": 8, "valid": 4, "test": 4}.items():
        positive = np.arange(n) % 4
        onehot = np.zeros((n, 4), dtype=np.int64)
        onehot[np.arange(n), positive] = 1
        if ambiguous and split == "train":
            onehot[3, 0] = 1  # row 3 (angry) is also neutral
        audio = rs.normal(size=(n, 20, 74)).astype(np.float32)
        audio[0, 0, 0] = -np.inf
        out[split] = {"text": rs.normal(size=(n, 20, 300)).astype(np.float32), "audio": audio,
                      "vision": rs.normal(size=(n, 20, 35)).astype(np.float32),
                      "labels": np.eye(2, dtype=np.float32)[onehot]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(out, f)
    return out


def test_mult_pickle_four_class_conversion(tmp_path):
    raw = write_mult(tmp_path / "iemocap_data.pkl")
    assert raw["train"]["labels"].shape == (8, 4, 2)
    data = create_dataset("iemocap", tmp_path, format="mult")
    assert data.train.labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert data.info["class_names"] == ["neutral", "happy", "sad", "angry"]
    assert data.input_shapes == {"text": (20, 300), "audio": (20, 74), "vision": (20, 35)}
    assert data.info["nonfinite_replaced"]["train"]["audio"] == 1 and torch.isfinite(data.train.inputs["audio"]).all()
    short = create_dataset("iemocap", format="mult", path=str(tmp_path / "iemocap_data.pkl"), max_len_audio=8)
    assert short.input_shapes["audio"] == (8, 74) and short.info["truncated"]["train"]["audio"] == 8


def test_mult_ambiguous_rows_raise_or_are_dropped(tmp_path):
    write_mult(tmp_path / "iemocap_data.pkl", ambiguous=True)
    with pytest.raises(DatasetFormatError, match="split 'train' row 3 has 2 positive emotions"):
        create_dataset("iemocap", tmp_path, format="mult")
    data = create_dataset("iemocap", tmp_path, format="mult", drop_ambiguous=True)
    assert len(data.train) == 7 and data.info["dropped_ambiguous"] == {"train": 1, "valid": 0, "test": 0}
    assert data.train.labels.tolist() == [0, 1, 2, 0, 1, 2, 3]


def test_mult_malformed(tmp_path):
    raw = write_mult(tmp_path / "iemocap_data.pkl")
    raw["test"]["labels"] = raw["test"]["labels"][:, :, 1]
    del raw["valid"]["audio"]
    with open(tmp_path / "iemocap_data.pkl", "wb") as f:
        pickle.dump(raw, f)
    with pytest.raises(DatasetFormatError, match="split 'valid' lacks key 'audio'"):
        create_dataset("iemocap", tmp_path, format="mult")
    with pytest.raises(DatasetNotFoundError, match="iemocap_data_noalign.pkl"):
        create_dataset("iemocap", tmp_path, format="mult", variant="unaligned")


def _cli(run_cli, method, data_dir, sets=None):
    # short audio and a small eval batch keep this fast (the engine pads evaluation to a full eval batch)
    sets = {"dataset.max_len_audio": 40, "train.eval_batch_size": 3, **(sets or {})}
    code, rd, res = run_cli(method, "iemocap", epochs=1, sets=sets, extra=["--data-dir", str(data_dir)])
    assert code == 0
    assert res["task"] == "classification" and res["primary_metric"] == "accuracy"
    assert {"accuracy", "f1_weighted", "f1_macro", "ua"} <= set(res["test"])
    cfg = json.loads((rd / "config.json").read_text())
    assert cfg["dataset_info"]["f1_reported"].startswith("f1_weighted") and cfg["dataset_info"]["cv"] == 1
    return res, cfg


def test_cli_one_epoch_baseline_and_errors_write_nothing(tmp_path, mmin_tree, run_cli):
    res, cfg = _cli(run_cli, "baseline", mmin_tree[0])
    assert res["num_train_samples"] == 6
    assert (cfg["train"]["batch_size"], cfg["train"]["optimizer"], cfg["train"]["weight_decay"]) == (32, "adamw", 0.01)
    code, rd, _ = run_cli("baseline", "iemocap", sets={"dataset.cv": 7}, extra=["--data-dir", str(mmin_tree[0])],
                          run_dir=tmp_path / "bad-fold")
    assert code == 2 and not rd.exists()
    code, rd, _ = run_cli("baseline", "iemocap", extra=["--data-dir", str(tmp_path / "nothing")],
                          run_dir=tmp_path / "no-data")
    assert code == 2 and not rd.exists()


def test_cli_cggm_one_epoch(mmin_tree, run_cli):
    if "cggm" not in METHODS:
        pytest.skip("method cggm is not registered")
    res, cfg = _cli(run_cli, "cggm", mmin_tree[0], sets={"dataset.hparam_source": "code"})
    hp = cfg["method_hparams"]
    assert (hp["rho"], hp["lam"], hp["cls_lr"]) == (1.3, 0.2, 5e-4)  # code column (paper Table 7: λ 0.15)
    assert (cfg["train"]["batch_size"], cfg["train"]["optimizer"]) == (64, "adam")


def test_paper_defaults_and_canonical_model(mmin_tree):
    from mmbalance.registry import create_model

    data = create_dataset("iemocap", root=str(mmin_tree[0]))
    assert data.method_defaults["cggm"]["lam"] == 0.15 and data.train_defaults["epochs"] == 30
    model = create_model(data.model.name, modalities=data.modalities, input_shapes=data.input_shapes,
                         out_dim=4, **data.model.kwargs)
    assert sum(p.numel() for p in model.parameters()) == 339_684  # iemocap.md §2: about 340k
    assert len(model.fusion.body.layers) == 2 and len(model.encoders["audio"].body.layers) == 4


def test_synthetic_shape_alike(tmp_path):
    data = create_dataset("iemocap-synth", n_samples=120)
    assert data.synthetic and "SYNTHETIC" in data.info["description"]
    assert data.input_shapes == {"text": (22, 1024), "audio": (350, 130), "vision": (50, 342)}
    assert data.task == "classification" and data.out_dim == 4 and data.model.name == "msa_transformer"
    assert sorted(torch.bincount(data.train.labels, minlength=4).tolist())[0] >= 15
    small = create_dataset("iemocap-synth", n_samples=400, seq_len=6)
    assert small.input_shapes["audio"] == (6, 130)
    # planted structure: text carries the low bit of the class strongly, audio/vision the high bit weakly
    low = {m: centroid_probe_accuracy(small, m, lambda y: y % 2) for m in small.modalities}
    high = {m: centroid_probe_accuracy(small, m, lambda y: y // 2) for m in small.modalities}
    assert low["text"] > 0.75 and max(low["audio"], low["vision"]) < 0.65, low
    assert max(high["audio"], high["vision"]) > 0.55 and high["text"] < 0.65, high


def centroid_probe_accuracy(data, m: str, target, k: int = 3) -> float:
    """Nearest centroid of ``target(labels)`` on the top-k principal components of time-averaged
    features (train → test)."""
    def feats(split):
        x = split.inputs[m].double()
        return x.sum(1) / (x != 0).any(-1).sum(1, keepdim=True).clamp(min=1)

    xtr, xte = feats(data.train), feats(data.test)
    mu = xtr.mean(0)
    top = torch.linalg.svd(xtr - mu, full_matrices=False)[2][:k]
    ptr, pte = (xtr - mu) @ top.T, (xte - mu) @ top.T
    ytr, yte = target(data.train.labels), target(data.test.labels)
    cent = torch.stack([ptr[ytr == c].mean(0) for c in range(int(ytr.max()) + 1)])
    return float((torch.cdist(pte, cent).argmin(1) == yte).double().mean())
