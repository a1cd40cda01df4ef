"""BraTS 2021 loader, converter, DeepLabV3+ model and the SYNTHETIC shape-alike (docs/datasets/brats2021.md §8)."""
from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

h5py = pytest.importorskip("h5py")
nib = pytest.importorskip("nibabel")

from mmbalance.datasets import brats2021 as B  # noqa: E402

from mmbalance.data import make_loader  # noqa: E402
from mmbalance.errors import DatasetFormatError, DatasetNotFoundError  # noqa: E402
from mmbalance.registry import METHODS, create_dataset  # noqa: E402

SHAPE = (32, 32, 24)
# tumour slices per fixture case: case 1 only two slices, case 2 none below z = 12 (§8)
TUMOUR_Z = {0: range(8, 16), 1: range(10, 12), 2: range(14, 20), 3: range(4, 10)}
CONTRAST = {"flair": 300, "t1ce": 200, "t1": 120, "t2": 500}
TINY = {"dataset.model_size": "tiny", "dataset.crop": 32, "dataset.slice_range": [0, 24], "train.num_workers": 0,
        "train.batch_size": 2, "train.eval_batch_size": 8, "train.modality_eval": "none"}


def phantom(case: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """int16 modality volumes (zero background, ellipsoid brain, per-modality contrast) and a uint8 seg
    with nested regions: ED shell (2) ⊃ core of NCR/NET (1) with an ET rim (4)."""
    x, y, z = np.mgrid[0:SHAPE[0], 0:SHAPE[1], 0:SHAPE[2]].astype(float)
    brain = ((x - 16) / 13) ** 2 + ((y - 16) / 11) ** 2 + ((z - 12) / 14) ** 2 < 1
    rs = np.random.RandomState(case)
    d = np.sqrt((x - 15) ** 2 + (y - 17) ** 2)
    seg = np.zeros(SHAPE, np.uint8)
    for zz in TUMOUR_Z[case]:
        sl = seg[:, :, zz]
        sl[d[:, :, zz] < 6] = 2
        sl[d[:, :, zz] < 4] = 4
        sl[d[:, :, zz] < 2] = 1
    mods = {}
    for m, c in CONTRAST.items():
        v = brain * (c + rs.randint(0, 40, SHAPE)) + (seg > 0) * c // 3
        mods[m] = v.astype(np.int16)
    return mods, seg


def write_raw(root: Path, cases=(0, 1, 2, 3), *, skip=None, bad_label_case=None) -> Path:
    for k in cases:
        name = f"BraTS2021_{k:05d}"
        d = root / name
        d.mkdir(parents=True)
        mods, seg = phantom(k)
        if k == bad_label_case:
            seg[seg == 4] = 3
        for m, arr in {**mods, "seg": seg}.items():
            if (k, m) == skip:
                continue
            nib.save(nib.Nifti1Image(arr, affine=np.eye(4)), str(d / f"{name}_{m}.nii.gz"))
    return root


def write_cggm(root: Path, *, layout=None, mutate=None) -> Path:
    """CGGM-style h5 tree: train (cases 0, 2, 3), valid (case 1), test (case 0 again as another file)."""
    layout = layout or {"train": [0, 2, 3], "valid": [1], "test": [0]}
    for split, cases in layout.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for k in cases:
            mods, seg = phantom(k)
            image = np.stack([mods[m] for m in B.MODALITIES]).astype(np.float32) / 100.0
            data = {"image": image, "label": seg}
            if mutate:
                mutate(split, k, data)
            with h5py.File(root / split / f"case{k}_mri_norm2.h5", "w") as f:
                for key, arr in data.items():
                    f.create_dataset(key, data=arr)
    return root


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("brats")
    raw = write_raw(base / "raw")
    B.convert_raw(raw, base / "prepared", split_seed=0, fractions=(0.5, 0.25, 0.25))
    return base / "prepared"


# --------------------------------------------------------------------------- converter


def test_converter_layout_normalisation_labels_split_index(prepared):
    splits = json.loads((prepared / "splits.json").read_text())
    meta = json.loads((prepared / "meta.json").read_text())
    index = json.loads((prepared / "slice_index.json").read_text())
    ids = [f"BraTS2021_{k:05d}" for k in range(4)]
    assert sorted(splits["train"] + splits["valid"] + splits["test"]) == ids  # by case, disjoint
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [2, 1, 1]
    assert meta["orientation"] == "nibabel_xyz"
    for k, case in enumerate(ids):
        path = prepared / "cases" / f"{case}.h5"
        assert meta["sha256"][case] == hashlib.sha256(path.read_bytes()).hexdigest()
        mods, seg = phantom(k)
        with h5py.File(path, "r") as f:
            image, label = f["image"][()], f["label"][()]
        assert image.dtype == np.float32 and image.shape == (4, *SHAPE)
        np.testing.assert_array_equal(label, seg)  # stored unmodified (4 stays 4)
        mask = sum(mods[m].astype(float) for m in B.MODALITIES) > 0
        for c, m in enumerate(B.MODALITIES):  # channel order flair, t1ce, t1, t2
            v = mods[m][mask].astype(float)
            np.testing.assert_allclose(image[c][mask], (v - v.mean()) / v.std(), atol=1e-4)
            assert image[c][~mask].max() == 0 and image[c][~mask].min() == 0
            assert abs(image[c][mask].mean()) < 1e-4 and abs(image[c][mask].std() - 1) < 1e-3
        assert index[case]["tumour"] == list(TUMOUR_Z[k])
        assert index[case]["brain"] == np.flatnonzero(mask.any(axis=(0, 1))).tolist()


def test_converter_reports_all_problems_and_writes_nothing(tmp_path):
    raw = write_raw(tmp_path / "raw", cases=(0, 1), skip=(1, "t1ce"))
    with pytest.raises(DatasetFormatError, match=r"BraTS2021_00001.*missing file BraTS2021_00001_t1ce\.nii\.gz"):
        B.convert_raw(raw, tmp_path / "out")
    raw2 = write_raw(tmp_path / "raw2", cases=(0, 1), bad_label_case=1)
    with pytest.raises(DatasetFormatError, match=r"BraTS2021_00001: seg has label values \[3\]"):
        B.convert_raw(raw2, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "raw2"]  # no temporary folder left


# --------------------------------------------------------------------------- loader


def load(root: Path, **opts):
    base = {"path": str(root), "crop": 16, "slice_range": (0, 24), "model_size": "tiny"}
    return create_dataset("brats2021", **{**base, **opts})


def test_label_remap_and_training_draws_only_tumour_slices(tmp_path):
    root = write_cggm(tmp_path / "h5")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load(root, slice_range=(0, 12))  # case 2 (train) has no tumour below z = 12
    assert any("1 training case(s) have no tumour slice" in str(w.message) for w in caught)
    train = data.train
    assert len(train) == 2 and data.info["train_cases_excluded"] == ["train/case2_mri_norm2.h5"]
    seen = set()
    for epoch in range(6):
        train.set_epoch(epoch)
        for i in range(len(train)):
            s = train[i]
            assert s["z"] in train.tumour[i] and 0 <= s["z"] < 12
            assert s["flair"].shape == (1, 16, 16) and s["label"].dtype == torch.int64
            values = set(s["label"].unique().tolist())
            assert values <= {0, 1, 2, 3} and 3 in values  # 4 → 3 (the ET rim is inside the crop)
            seen.add((i, s["z"]))
    assert len(seen) > 3  # the draw changes with the epoch


def test_evaluation_slices_are_fixed_and_identical_across_runs_and_workers(prepared):
    a, b = load(prepared), load(prepared)
    assert a.info["selected_slices"] == b.info["selected_slices"]
    splits = json.loads((prepared / "splits.json").read_text())
    index = json.loads((prepared / "slice_index.json").read_text())
    want = [[c, z] for c in splits["valid"] for z in index[c]["tumour"]]
    assert a.info["selected_slices"]["valid"] == want  # all_tumour, ordered by (case, z)
    one = load(prepared, eval_slices="one_per_case")
    assert len(one.val) == 1 and one.info["selected_slices"] == load(prepared, eval_slices="one_per_case").info["selected_slices"]

    def batches(ds, workers):
        return list(make_loader(ds, 4, shuffle=False, seed=0, num_workers=workers))

    for x, y in zip(batches(a.val, 0), batches(b.val, 2)):
        assert torch.equal(x["flair"], y["flair"]) and torch.equal(x["label"], y["label"]) and torch.equal(x["z"], y["z"])
    a.train.set_epoch(3)
    b.train.set_epoch(3)
    for x, y in zip(batches(a.train, 0), batches(b.train, 2)):
        assert torch.equal(x["t2"], y["t2"]) and torch.equal(x["z"], y["z"])


def test_augmentation_applies_the_same_geometry_to_image_and_label():
    label = np.arange(16 * 16).reshape(16, 16) % 7
    image = np.stack([label.astype(np.float32)] * 4)
    ks = set()
    for seed in range(40):
        rng = np.random.default_rng(seed)
        img, lab = B.augment(image, label, rng)
        assert img.shape == (4, 16, 16)
        ks.add(lab.tobytes())
        assert np.abs(img - lab[None].astype(np.float32)).max() < 0.5  # noise σ ≤ 0.1 at most
    assert len(ks) >= 4  # several distinct rotation/flip combinations


# --------------------------------------------------------------------------- end to end (CLI)


def test_cli_baseline_one_epoch_prepared_and_cggm_h5(run_cli, prepared, tmp_path):
    code, rd, res = run_cli("baseline", "brats2021", sets={**TINY, "dataset.path": str(prepared)})
    assert code == 0 and res is not None
    assert set(res["test"]) >= {"dice_wt", "dice_tc", "dice_et", "dice_mean"}
    info = json.loads((rd / "config.json").read_text())["dataset_info"]
    assert info["layout"] == "prepared" and info["orientation"] == "nibabel_xyz"
    assert info["selected_slices"]["test"]
    root = write_cggm(tmp_path / "h5")
    code, rd, res = run_cli("baseline", "brats2021", sets={**TINY, "dataset.path": str(root)}, run_dir=tmp_path / "r2")
    assert code == 0 and json.loads((rd / "config.json").read_text())["dataset_info"]["layout"] == "cggm_h5"
    assert (root / "slice_index.json").is_file()  # cached next to the data
    if "cggm" in METHODS:
        code, _, res = run_cli("cggm", "brats2021", sets={**TINY, "dataset.path": str(root)}, run_dir=tmp_path / "r3")
        assert code == 0 and math.isfinite(res["test"]["dice_mean"])


def _no_label(split, k, data):
    if split == "valid":
        del data["label"]


def _three_channels(split, k, data):
    if split == "test":
        data["image"] = data["image"][:3]


@pytest.mark.parametrize("variant, pattern", [
    ("missing_key", r"valid/case1_mri_norm2\.h5 has no key 'label'"),
    ("wrong_shape", r"test/case0_mri_norm2\.h5 key 'image' has shape \(3, 32, 32, 24\), expected \(4, H, W, D\)"),
    ("short_depth", r"depth D = 24 < 40.*slice_range"),
    ("empty_split", r"split 'valid' .* has no case"),
    ("raw", r"raw BraTS 2021 NIfTI case folders \(BraTS2021_00000.*mmbalance\.datasets\.brats2021 --raw"),
    ("gli", r"BraTS 2023\+ GLI"),
    ("nothing", r"contains neither a prepared layout"),
])
def test_malformed_data_gives_a_clear_error_and_writes_nothing(run_cli, prepared, tmp_path, capsys, variant, pattern):
    root = tmp_path / "data"
    sets = dict(TINY)
    if variant == "missing_key":
        write_cggm(root, mutate=_no_label)
    elif variant == "wrong_shape":
        write_cggm(root, mutate=_three_channels)
    elif variant == "short_depth":
        write_cggm(root)
        sets["dataset.slice_range"] = [0, 40]
    elif variant == "empty_split":
        root.mkdir()
        for name in ("cases", "slice_index.json", "meta.json"):
            (root / name).symlink_to(prepared / name)
        splits = json.loads((prepared / "splits.json").read_text())
        (root / "splits.json").write_text(json.dumps({**splits, "valid": []}))
    elif variant == "raw":
        write_raw(root, cases=(0,))
    elif variant == "gli":
        (root / "BraTS-GLI-00000-000").mkdir(parents=True)
    else:
        (root / "train").mkdir(parents=True)
    before = listing(root)
    rd = tmp_path / "run"
    code, _, res = run_cli("baseline", "brats2021", sets={**sets, "dataset.path": str(root)}, run_dir=rd)
    err = capsys.readouterr().err
    assert code == 2 and res is None and not rd.exists()
    assert re.search(pattern, err), err
    assert listing(root) == before
    if variant in {"raw", "nothing"}:
        assert "Synapse" in err and "--data-dir" in err  # how to obtain and place the data


def test_no_location_names_the_options(monkeypatch):
    with pytest.raises(DatasetNotFoundError, match=r"--data-dir.*MMBALANCE_DATA.*dataset\.path"):
        create_dataset("brats2021")


# --------------------------------------------------------------------------- model, defaults, synthetic


def test_model_shapes_scopes_and_canonical_size():
    from mmbalance.registry import create_model

    mods = list(B.MODALITIES)
    shapes = {m: (1, 32, 32) for m in mods}
    model = create_model("deeplab_multi", modalities=mods, input_shapes=shapes, out_dim=4, **B.MODEL_KWARGS["tiny"])
    x = {m: torch.randn(2, 1, 32, 32) for m in mods}
    out = model(x)
    assert out.logits.shape == (2, 4, 32, 32) and model.feature_kinds["flair"] == "map"
    w = model.final_layer().weight
    assert w.shape == (4, 16, 1, 1)
    for m in mods:
        names = [n for n, _ in model.encoder_named_parameters(m)]
        assert any(".backbone." in n for n in names) and any(".aspp." in n for n in names)
        head = model.make_unimodal_head(m, "cggm")
        assert head(out.features[m].detach()).shape == (2, 4, 32, 32)
        assert head.final_layer().weight.shape == w.shape
        assert model.make_unimodal_head(m, "probe")(out.features[m]).shape == (2, 4, 32, 32)
    with torch.device("meta"):  # brats2021.md §4.5: about 235.2M parameters
        canon = create_model("deeplab_multi", modalities=mods, input_shapes={m: (1, 160, 160) for m in mods}, out_dim=4)
    assert abs(sum(p.numel() for p in canon.parameters()) / 1e6 - 235.2) < 0.1
    lite = create_model("deeplab_multi", modalities=mods, input_shapes=shapes, out_dim=4, **B.MODEL_KWARGS["lite"])
    assert lite(x).logits.shape == (2, 4, 32, 32)


def test_table7_defaults_and_hparam_source(prepared):
    data = load(prepared)
    td = data.train_defaults
    assert (td["batch_size"], td["optimizer"], td["lr"], td["weight_decay"], td["epochs"]) == (64, "sgd", 1e-2, 3e-4, 150)
    assert (td["scheduler"], td["warmup_epochs"], td["warmup_start_lr"], td["min_lr"], td["grad_clip"]) == (
        "cosine", 10, 4e-4, 1e-3, None)
    assert data.method_defaults["cggm"] == {"rho": 1.2, "lam": 0.1, "cls_lr": 6e-3}
    assert data.task_kwargs["ce_weight"] == [0.2, 0.3, 0.25, 0.25]
    code = load(prepared, hparam_source="code")
    assert code.train_defaults["epochs"] == 75 and code.method_defaults["cggm"]["rho"] == 1.0


def test_warmup_cosine_schedule_matches_the_spec_formula():
    from mmbalance.config import TrainConfig
    from mmbalance.engine import LRSchedule

    cfg = TrainConfig(**{k: v for k, v in B.TRAIN_DEFAULTS.items() if k != "num_workers"}, num_workers=0)
    sched, spe = LRSchedule(cfg, epochs=150, steps_per_epoch=20), 20
    total, warm = 150 * spe, 10 * spe
    for i in (0, 1, 57, warm, warm + 333, total - 1):
        want = 4e-4 + (1e-2 - 4e-4) * i / warm if i < warm else \
            1e-3 + 0.5 * (1e-2 - 1e-3) * (1 + math.cos(math.pi * (i - warm) / (total - warm)))
        assert cfg.lr * sched.factor(i // spe, i % spe) == pytest.approx(want, rel=1e-9)


def test_synthetic_shape_alike_and_one_epoch(run_cli):
    data = create_dataset("brats-synth", n_samples=40)
    assert data.synthetic and data.modalities == ["flair", "t1ce", "t1", "t2"] and data.task == "segmentation"
    x, y = data.train.inputs, data.train.labels
    assert x["t1ce"].shape[1:] == (1, 32, 32) and set(y.unique().tolist()) == {0, 1, 2, 3}
    wt, et = (y > 0), (y == 3)
    # sub-regions are visible in different modalities: flair separates WT, t1ce separates the ET rim
    assert x["flair"][:, 0][wt].mean() > x["flair"][:, 0][~wt].mean() + 1.0
    assert x["t1ce"][:, 0][et].mean() > x["t1ce"][:, 0][wt & ~et].mean() + 0.8
    code, _, res = run_cli("baseline", "brats-synth", sets={"dataset.n_samples": 40, "train.modality_eval": "none"})
    assert code == 0 and res["synthetic"] is True and 0 <= res["test"]["dice_mean"] <= 1
