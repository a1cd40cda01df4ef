"""CMU-MOSI loader, canonical model and mosi-synth (docs/datasets/mosi.md §1, §2, §6, §7).

Fixtures are written in tmp_path in the exact MulT / MMSA pickle layouts with the installed NumPy
(tiny N, real key names and feature dimensions). Metric values are covered by tests/test_tasks.py.
"""
from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mmbalance.errors import DatasetFormatError, DatasetNotFoundError
from mmbalance.registry import METHODS, create_dataset

SIZES = {"train": 8, "valid": 4, "test": 4}


def mult_splits(lengths=(50, 50, 50), seed=0) -> dict:
    """MulT layout: text (N, L_t, 300), audio (N, L_a, 5) with -inf, vision (N, L_v, 20), labels (N, 1, 1), id bytes."""
    rs = np.random.RandomState(seed)
    out = {}
    for split, n in SIZES.items():
        audio = rs.normal(size=(n, lengths[1], 5)).astype(np.float32)
        audio[0, 0, :3] = -np.inf  # three -inf values per split
        labels = rs.uniform(-3, 3, size=(n, 1, 1)).astype(np.float32)
        labels[1, 0, 0] = 0.0
        out[split] = {"text": rs.normal(size=(n, lengths[0], 300)).astype(np.float32), "audio": audio,
                      "vision": rs.normal(size=(n, lengths[2], 20)).astype(np.float32), "labels": labels,
                      "id": np.array([[b"vid", str(i).encode(), b"0"] for i in range(n)])}
    return out


def mmsa_splits(seed=1) -> dict:
    """MMSA unaligned layout: BERT text (N, 50, 768), audio (N, 15, 5), vision (N, 20, 20) + lengths."""
    rs = np.random.RandomState(seed)
    out = {}
    for split, n in SIZES.items():
        y = rs.uniform(-3, 3, size=n).astype(np.float32)
        out[split] = {
            "text": rs.normal(size=(n, 50, 768)).astype(np.float32),
            "text_bert": np.ones((n, 3, 50), dtype=np.float32),
            "audio": rs.normal(size=(n, 15, 5)).astype(np.float32),
            "vision": rs.normal(size=(n, 20, 20)).astype(np.float32),
            "audio_lengths": [int(v) for v in rs.randint(5, 16, size=n)],
            "vision_lengths": [int(v) for v in rs.randint(5, 21, size=n)],
            "regression_labels": y, "classification_labels": (y > 0).astype(np.float32),
            "raw_text": ["text"] * n, "id": [f"vid$_${i}" for i in range(n)], "annotations": ["Positive"] * n,
        }
    return out


def dump(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


def load(data_dir=None, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny fixtures differ from the standard split sizes
        return create_dataset("mosi", data_dir, **options)


def test_mult_aligned_from_data_dir_replaces_nonfinite_and_squeezes_labels(tmp_path):
    raw = mult_splits()
    dump(raw, tmp_path / "mosi_data.pkl")
    with pytest.warns(UserWarning, match="split sizes"):
        data = create_dataset("mosi", tmp_path)
    assert data.modalities == ["text", "audio", "vision"]
    assert data.info["flavour"] == "mult" and len(data.info["sha256"]) == 64
    assert {k: len(getattr(data, k)) for k in ("train", "val", "test")} == {"train": 8, "val": 4, "test": 4}
    assert data.input_shapes == {"text": (50, 300), "audio": (50, 5), "vision": (50, 20)}
    assert data.info["nonfinite_replaced"]["valid"] == {"text": 0, "audio": 3, "vision": 0}
    audio = data.val.inputs["audio"]
    assert audio.dtype == torch.float32 and torch.isfinite(audio).all() and (audio[0, 0, :3] == 0).all()
    assert data.train.labels.shape == (8,) and data.train.labels.dtype == torch.float32
    assert torch.equal(data.train.labels, torch.from_numpy(raw["train"]["labels"].reshape(8)))
    assert data.train.labels[1] == 0.0
    assert data.task == "regression" and data.out_dim == 1 and data.model.name == "msa_transformer"
    batch = data.train.batch(torch.arange(3))
    assert set(batch) == {"text", "audio", "vision", "label", "idx"}


def test_unaligned_lengths_inferred_and_path_option(tmp_path):
    dump(mult_splits(lengths=(50, 15, 20)), tmp_path / "sub" / "mosi_data_noalign.pkl")
    data = load(tmp_path / "sub", variant="unaligned")
    assert data.input_shapes == {"text": (50, 300), "audio": (15, 5), "vision": (20, 20)}
    data2 = load(None, path=str(tmp_path / "sub" / "mosi_data_noalign.pkl"))  # path wins, no data dir needed
    assert data2.info["path"] == data.info["path"]
    assert data2.info["lengths"]["test"] == {"text": 50, "audio": 15, "vision": 20}


def test_mmsa_autodetected_and_length_masks_only_when_requested(tmp_path):
    raw = mmsa_splits()
    dump(raw, tmp_path / "MOSI" / "Processed" / "unaligned_50.pkl")
    data = load(tmp_path, variant="unaligned")
    assert data.info["flavour"] == "mmsa" and data.input_shapes["text"] == (50, 768)
    assert "key_padding" not in data.model.kwargs and data.info["length_masks"] is False
    assert torch.equal(data.test.inputs["audio"], torch.from_numpy(raw["test"]["audio"]))  # untouched
    masked = load(tmp_path, variant="unaligned", use_length_masks=True)
    assert masked.model.kwargs["key_padding"] == ["audio", "vision"]
    lens = raw["train"]["audio_lengths"]
    x = masked.train.inputs["audio"]
    for i, n in enumerate(lens):
        assert (x[i, n:] == 0).all() and (x[i, :n] != 0).any(dim=-1).all()


def test_format_auto_detection_refuses_both_label_keys(tmp_path):
    raw = mult_splits()
    raw["train"]["regression_labels"] = raw["train"]["labels"].reshape(-1)
    dump(raw, tmp_path / "mosi_data.pkl")
    with pytest.raises(DatasetFormatError, match="both 'labels'"):
        load(tmp_path)
    assert load(tmp_path, flavour="mult").info["flavour"] == "mult"


def _break(raw: dict, kind: str) -> dict:
    if kind == "missing_key":
        del raw["valid"]["vision"]
    elif kind == "wrong_shape":
        raw["train"]["audio"] = raw["train"]["audio"][:, :, 0]
    elif kind == "bad_labels":
        raw["test"]["labels"] = np.zeros((4, 2), dtype=np.float32)
    elif kind == "n_mismatch":
        raw["train"]["vision"] = raw["train"]["vision"][:5]
    elif kind == "dim_mismatch":
        raw["test"]["text"] = raw["test"]["text"][:, :, :299]
    elif kind == "empty_split":
        raw["test"] = {k: v[:0] for k, v in raw["test"].items()}
    elif kind == "missing_split":
        del raw["valid"]
    return raw


@pytest.mark.parametrize("kind,needle", [
    ("missing_key", "split 'valid' lacks key 'vision'; found keys"),
    ("wrong_shape", "split 'train' key 'audio' has shape (8, 50)"),
    ("bad_labels", "key 'labels' has shape (4, 2)"),
    ("n_mismatch", "disagree on N"),
    ("dim_mismatch", "feature dimension 299 in split 'test' but 300"),
    ("empty_split", "split 'test' key 'text' has shape (0, 50, 300)"),
    ("missing_split", "missing split 'valid'"),
])
def test_malformed_pickles_raise_clear_errors(tmp_path, kind, needle):
    dump(_break(mult_splits(), kind), tmp_path / "mosi_data.pkl")
    with pytest.raises(DatasetFormatError) as err:
        load(tmp_path)
    assert needle in str(err.value) and "mosi_data.pkl" in str(err.value)


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load(tmp_path)
    msg = str(err.value)
    for p in ("mosi_data.pkl", "MOSI/Processed/aligned_50.pkl", "Processed/aligned_50.pkl", "mosi/mosi_data.pkl"):
        assert p in msg
    assert "MulT" in msg and "MMSA" in msg
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        load(None)
    (tmp_path / "mosi_data.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DatasetFormatError, match="cannot unpickle"):
        load(tmp_path)


def test_cli_errors_write_nothing(tmp_path, run_cli):
    dump(_break(mult_splits(), "missing_key"), tmp_path / "data" / "mosi_data.pkl")
    code, rd, res = run_cli("baseline", "mosi", extra=["--data-dir", str(tmp_path / "data")])
    assert code == 2 and not rd.exists()
    code, rd, res = run_cli("baseline", "mosi", extra=["--data-dir", str(tmp_path / "nowhere")])
    assert code == 2 and not rd.exists()


def test_canonical_model_matches_spec():
    """mosi.md §2: about 372k parameters with 300/5/20 inputs; zero input steps get no position."""
    from mmbalance.registry import create_model

    data_kwargs = {"d_model": 40, "num_heads": 5, "nlevels": 5}
    model = create_model("msa_transformer", modalities=["text", "audio", "vision"],
                         input_shapes={"text": (50, 300), "audio": (50, 5), "vision": (50, 20)}, out_dim=1, **data_kwargs)
    assert sum(p.numel() for p in model.parameters()) == 371_601
    assert len(model.fusion.body.layers) == 3 and len(model.encoders["text"].body.layers) == 5
    body = {id(p) for p in model.encoder_parameters("audio", scope="encoder_body")}
    assert id(model.encoders["audio"].proj.weight) not in body
    enc = model.encoders["text"].body
    x = torch.randn(2, 4, 40)
    x[0, :2] = 0.0
    pos = enc.positions(x)
    assert (pos[0, :2] == 0).all() and torch.allclose(pos[0, 2], pos[1, 2]) and (pos[1, 0] != 0).any()
    head = model.make_unimodal_head("text", "cggm")
    assert head.final_layer().weight.shape == model.final_layer().weight.shape == (1, 40)


def _run_and_check(run_cli, dataset, data_dir, method):
    # a small eval batch: the engine pads every evaluation to at least one full eval batch
    code, rd, res = run_cli(method, dataset, epochs=1, sets={"train.eval_batch_size": 4},
                            extra=["--data-dir", str(data_dir)])
    assert code == 0, res
    assert res["task"] == "regression" and res["primary_metric"] == "mae"
    assert {"mae", "corr", "acc7", "acc2_nz", "f1_nz", "acc2_cggm"} <= set(res["test"])
    assert res["num_train_samples"] == 8 and set(res["test_per_modality"]) == {"text", "audio", "vision"}
    return json.loads((rd / "config.json").read_text())


def test_cli_one_epoch_on_mult_and_mmsa_fixtures(tmp_path, run_cli):
    dump(mult_splits(), tmp_path / "mult" / "mosi_data.pkl")
    cfg = _run_and_check(run_cli, "mosi", tmp_path / "mult", "baseline")
    assert cfg["dataset_info"]["flavour"] == "mult" and cfg["train"]["batch_size"] == 64
    assert cfg["train"]["optimizer"] == "adam" and cfg["train"]["grad_clip"] == 0.8
    assert cfg["train"]["scheduler"] == "plateau" and cfg["train"]["epochs"] == 1
    dump(mmsa_splits(), tmp_path / "mmsa" / "MOSI" / "Processed" / "aligned_50.pkl")
    assert _run_and_check(run_cli, "mosi", tmp_path / "mmsa", "baseline")["dataset_info"]["flavour"] == "mmsa"


def test_cli_cggm_one_epoch(tmp_path, run_cli):
    if "cggm" not in METHODS:
        pytest.skip("method cggm is not registered")
    dump(mult_splits(), tmp_path / "mosi_data.pkl")
    cfg = _run_and_check(run_cli, "mosi", tmp_path, "cggm")
    hp = cfg["method_hparams"]
    assert (hp["rho"], hp["lam"], hp["cls_lr"]) == (1.3, 0.2, 5e-4)  # paper Table 7, MOSI


def test_synthetic_shape_alike_has_real_shapes_and_planted_imbalance():
    data = create_dataset("mosi-synth")
    real_dims = {"text": 300, "audio": 5, "vision": 20}
    assert data.synthetic and data.info["synthetic"] and "SYNTHETIC" in data.info["description"]
    assert data.input_shapes == {m: (50, d) for m, d in real_dims.items()}
    assert data.task == "regression" and data.model.name == "msa_transformer"
    assert data.train_defaults == load_defaults("paper")
    y = torch.cat([data.train.labels, data.val.labels, data.test.labels])
    assert y.min() >= -3 and y.max() <= 3
    # low-capacity linear probe (top-3 principal components of the time-averaged features, fitted on
    # train, scored on test): text explains far more of y than audio or vision (planted imbalance)
    r2 = {m: pca_probe_r2(data, m) for m in real_dims}
    assert r2["text"] > 0.25 and r2["text"] > 2 * max(r2["audio"], r2["vision"]), r2
    short = create_dataset("mosi-synth", n_samples=40, seq_len=7)
    assert short.input_shapes["audio"] == (7, 5) and len(short.train) + len(short.val) + len(short.test) == 40


def pca_probe_r2(data, m: str, k: int = 3) -> float:
    def mean_over_valid_steps(split):
        x = split.inputs[m].double()
        return x.sum(1) / (x != 0).any(-1).sum(1, keepdim=True).clamp(min=1)

    xtr, xte = mean_over_valid_steps(data.train), mean_over_valid_steps(data.test)
    mu = xtr.mean(0)
    top = torch.linalg.svd(xtr - mu, full_matrices=False)[2][:k]

    def design(x):
        p = (x - mu) @ top.T
        return torch.cat([p, torch.ones(len(p), 1, dtype=p.dtype)], 1)

    w = torch.linalg.lstsq(design(xtr), data.train.labels.double().unsqueeze(1)).solution
    y = data.test.labels.double()
    return 1 - float(((y - (design(xte) @ w).squeeze(1)) ** 2).mean() / y.var())


def load_defaults(source: str) -> dict:
    from mmbalance.datasets.mosi import TRAIN_DEFAULTS

    return TRAIN_DEFAULTS[source]


def test_hparam_source_switch(tmp_path):
    dump(mult_splits(), tmp_path / "mosi_data.pkl")
    paper, code = load(tmp_path), load(tmp_path, hparam_source="code")
    assert paper.method_defaults["cggm"]["lam"] == code.method_defaults["cggm"]["lam"] == 0.2
    assert paper.train_defaults["batch_size"] == code.train_defaults["batch_size"] == 64
    assert code.info["hparam_source"] == "code"
