"""UPMC Food-101 (image + text, 101 classes) on frozen-backbone features (docs/datasets/food101.md).

X. Wang, D. Kumar, N. Thome, M. Cord, F. Precioso, "Recipe Recognition with Large Multimodal Food
Dataset", ICME Workshops 2015. Not ETH Food-101 (image only; never a substitute). mmbalance does not
redistribute the data. Modalities, in this order: ``image``, ``text``.

Registry names: ``food101`` (canonical CGGM ``FoodModel`` on token sequences, §4), ``food101_pooled``
(CLS vectors + MLP, quick runs; not comparable to CGGM) and ``food101-synth`` (SYNTHETIC shape-alike with
a planted text-strong imbalance; no data needed).

Layouts (§1): ``<root>/images/{train,test}/<class>/<file>.jpg`` plus one text layout — ``cggm_json``
(``{train,dev,test}.json``), ``jsonl`` (``{train,dev,test}.jsonl``), ``csv`` (``texts/{train,test}_titles.csv``,
with or without header) or ``texts_txt`` (``texts_txt/<class>/<file>.txt``). Features are extracted once
by :mod:`mmbalance.features` and cached to Arrow.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import string
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from mmbalance.data import ModelSpec, MultimodalData, TensorSplit, stratified_split
from mmbalance.errors import ConfigError, DatasetFormatError, DatasetNotFoundError
from mmbalance.features import ExtractionConfig, Record, check_images, extract_or_load
from mmbalance.registry import register_dataset

log = logging.getLogger("mmbalance.datasets")
MODALITIES = ["image", "text"]
CLASSES = sorted("""
apple_pie baby_back_ribs baklava beef_carpaccio beef_tartare beet_salad beignets bibimbap bread_pudding
breakfast_burrito bruschetta caesar_salad cannoli caprese_salad carrot_cake ceviche cheese_plate cheesecake
chicken_curry chicken_quesadilla chicken_wings chocolate_cake chocolate_mousse churros clam_chowder
club_sandwich crab_cakes creme_brulee croque_madame cup_cakes deviled_eggs donuts dumplings edamame
eggs_benedict escargots falafel filet_mignon fish_and_chips foie_gras french_fries french_onion_soup
french_toast fried_calamari fried_rice frozen_yogurt garlic_bread gnocchi greek_salad
grilled_cheese_sandwich grilled_salmon guacamole gyoza hamburger hot_and_sour_soup hot_dog huevos_rancheros
hummus ice_cream lasagna lobster_bisque lobster_roll_sandwich macaroni_and_cheese macarons miso_soup mussels
nachos omelette onion_rings oysters pad_thai paella pancakes panna_cotta peking_duck pho pizza pork_chop
poutine prime_rib pulled_pork_sandwich ramen ravioli red_velvet_cake risotto samosa sashimi scallops
seaweed_salad shrimp_and_grits spaghetti_bolognese spaghetti_carbonara spring_rolls steak
strawberry_shortcake sushi tacos takoyaki tiramisu tuna_tartare waffles""".split())
CLASS_INDEX = {c: i for i, c in enumerate(CLASSES)}
assert len(CLASSES) == 101 and CLASS_INDEX["ramen"] == 81  # §1: label id = index in the canonical list

FORMATS = ("cggm_json", "jsonl", "csv", "texts_txt")  # the order ``format=auto`` tries (§1)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
HOWTO = (
    "Expected layout: <root>/images/{train,test}/<class>/<class>_<n>.jpg plus one text layout: "
    "{train,dev,test}.json (CGGM JSON lists with id/label/text_tokens/img_path, made by MengShen0709/bmmal "
    "dataset/food101/preprocess.py), {train,dev,test}.jsonl (MMBT/QMF: id/label/text/img), "
    "texts/{train,test}_titles.csv (Kaggle release 'upmcfood101': filename,title,class) or "
    "texts_txt/<class>/<class>_<n>.txt (original UPMC release). Obtain UPMC Food-101 (Wang et al., ICME "
    "Workshops 2015; ETH Food-101 has no text and is not a substitute) from the original UPMC release or the "
    "Kaggle 'upmcfood101' release, place it at <data-dir>/food101 (--data-dir or $MMBALANCE_DATA) or pass "
    "--set dataset.root=DIR. See docs/datasets/food101.")

# Dataset-level training settings (§6; CGGM paper Table 7, Food-101 column). Where the official
# zrguo/CGGM code differs the code value is noted; ``hparam_source=code`` applies CODE_TRAIN_DEFAULTS.
TRAIN_DEFAULTS: dict[str, Any] = {
    "batch_size": 128,       # Table 7 (code: 128)
    "optimizer": "adamw",    # Table 7 (code: AdamW)
    "lr": 1e-3,              # Table 7 "base lr" (code: 1e-3)
    "weight_decay": 3e-3,    # Table 7 (code: 6e-3, hard-coded)
    "grad_clip": 0.8,        # Table 7 (code: 0.8)
    "scheduler": "plateau",  # Table 7 says StepLR without step size/decay; code: ReduceLROnPlateau(min, 10, 0.1)
    "plateau_patience": 10,
    "plateau_factor": 0.1,
    "epochs": 80,            # Table 7 (code: 60)
    "eval_batch_size": 256,
}
CODE_TRAIN_DEFAULTS = {"weight_decay": 6e-3, "epochs": 60}
#: DataLoader workers of the memory-mapped Arrow storage (train.num_workers; the in-memory path needs none)
ARROW_NUM_WORKERS = 4
# CGGM on Food-101 (paper Table 7): ρ 1.3, λ 0.15 (code: 0.05), classifier lr 5e-4 and weight decay 3e-3
# (Table 7 / code; methods/cggm.md §4).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"cggm": {"rho": 1.3, "lam": 0.15, "cls_lr": 5e-4, "cls_weight_decay": 3e-3}}
CODE_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"cggm": {"lam": 0.05}}

# Canonical model (§4): width 40, 5 heads, 4 encoder layers, 2 fusion layers, CGGM dropouts.
# The shared CGGM/MulT model (mmbalance/models/msa.py) with biased, separate image/text projections.
MODEL_KWARGS: dict[str, Any] = {"d_model": 40, "num_heads": 5, "nlevels": 4, "fusion_layers": 2,
                                "attn_dropout": 0.2, "relu_dropout": 0.15, "embed_dropout": 0.2,
                                "res_dropout": 0.15, "out_dropout": 0.1, "proj_bias": True}


# ============================================================================ readers (§1)
def _label(name: str, where: str) -> int:
    if name not in CLASS_INDEX:
        raise DatasetFormatError(f"food101: {where}: label {name!r} is not one of the 101 UPMC Food-101 classes")
    return CLASS_INDEX[name]


def _field(rec: Any, key: str, where: str) -> Any:
    if not isinstance(rec, dict) or key not in rec:
        raise DatasetFormatError(f"food101: {where}: missing field {key!r} (expected fields depend on the layout; "
                                 f"{HOWTO})")
    return rec[key]


def _reroot(root: Path, img: str) -> str:
    """cggm_json: absolute paths as given; if missing, re-root from 'images/' on under root (§1)."""
    p = Path(img)
    if not p.is_absolute():
        return str(root / p)
    if p.exists():
        return str(p)
    parts = p.parts
    if "images" in parts:
        k = len(parts) - 1 - parts[::-1].index("images")
        return str(root.joinpath(*parts[k:]))
    return str(p)


def read_cggm_json(root: Path) -> dict[str, list[Record]]:
    out = {}
    for split in ("train", "dev", "test"):
        f = root / f"{split}.json"
        if not f.is_file():
            continue
        try:
            items = json.loads(f.read_text())
        except ValueError as exc:
            raise DatasetFormatError(f"food101: {f}: not valid JSON ({exc})") from None
        if not isinstance(items, list):
            raise DatasetFormatError(f"food101: {f}: expected one JSON list of records, found {type(items).__name__}")
        recs = []
        for k, rec in enumerate(items):
            where = f"{f}: record {k}"
            tokens = _field(rec, "text_tokens", where)
            if not isinstance(tokens, list):
                raise DatasetFormatError(f"food101: {where}: field 'text_tokens' must be a list of words")
            recs.append(Record(str(_field(rec, "id", where)), _reroot(root, str(_field(rec, "img_path", where))),
                               " ".join(map(str, tokens)), _label(str(_field(rec, "label", where)), where)))
        out[split] = recs
    return out


def read_jsonl(root: Path) -> dict[str, list[Record]]:
    out = {}
    for split in ("train", "dev", "test"):
        f = root / f"{split}.jsonl"
        if not f.is_file():
            continue
        recs = []
        with open(f, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{f}:{line_no}"
                try:
                    rec = json.loads(line)
                except ValueError as exc:
                    raise DatasetFormatError(f"food101: {where}: bad JSON line ({exc})") from None
                recs.append(Record(str(_field(rec, "id", where)), str(root / str(_field(rec, "img", where))),
                                   str(_field(rec, "text", where)), _label(str(_field(rec, "label", where)), where)))
        out[split] = recs
    return out


def _is_header(row: list[str]) -> bool:
    return len(row) >= 3 and (row[2] not in CLASS_INDEX or not row[0].lower().endswith(IMAGE_SUFFIXES))


def read_csv(root: Path) -> dict[str, list[Record]]:
    out = {}
    for split in ("train", "test"):
        f = root / "texts" / f"{split}_titles.csv"
        recs = []
        with open(f, encoding="utf-8", newline="") as fh:
            for line_no, row in enumerate(csv.reader(fh), 1):
                if not row:
                    continue
                if line_no == 1 and _is_header(row):
                    continue
                where = f"{f}:{line_no}"
                if len(row) != 3:
                    raise DatasetFormatError(f"food101: {where}: expected 3 columns (image filename, title, class "
                                             f"name), found {len(row)}")
                fname, title, cls = row
                recs.append(Record(Path(fname).stem, str(root / "images" / split / cls / fname), title,
                                   _label(cls, where)))
        out[split] = recs
    return out


def _bmmal_text(raw: str) -> str | None:
    """bmmal preprocessing: strip punctuation, lower-case, NLTK word_tokenize, keep the tokens after the
    last token containing 'ingredients', at most 100; None when there is no such token (§1)."""
    try:
        from nltk.tokenize import word_tokenize
    except ImportError:
        raise ConfigError("food101: text_processing='bmmal' needs the optional nltk extra (pip install nltk, "
                          "plus its 'punkt' data)") from None
    tokens = word_tokenize(raw.translate(str.maketrans("", "", string.punctuation)).lower())
    hits = [i for i, t in enumerate(tokens) if "ingredients" in t]
    return None if not hits else " ".join(tokens[hits[-1] + 1:][:100])


def read_texts_txt(root: Path, text_processing: str) -> dict[str, list[Record]]:
    images = root / "images"
    out = {}
    for split in ("train", "test"):
        d = images / split
        if not d.is_dir():
            raise DatasetNotFoundError(f"food101: missing directory {d}. {HOWTO}")
        recs = []
        for cdir in sorted(p for p in d.iterdir() if p.is_dir()):
            label = _label(cdir.name, str(cdir))
            for img in sorted(p for p in cdir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                txt = root / "texts_txt" / cdir.name / f"{img.stem}.txt"
                if not txt.is_file():
                    continue  # image without text: not a multimodal sample
                raw = txt.read_text(encoding="utf-8", errors="replace")
                text = " ".join(raw.split()) if text_processing == "raw" else _bmmal_text(raw)
                if text is None:
                    continue
                recs.append(Record(img.stem, str(img), text, label))
        out[split] = recs
    return out


def detect_format(root: Path, fmt: str) -> str:
    present = {
        "cggm_json": (root / "train.json").is_file() and (root / "test.json").is_file(),
        "jsonl": (root / "train.jsonl").is_file() and (root / "test.jsonl").is_file(),
        "csv": (root / "texts" / "train_titles.csv").is_file() and (root / "texts" / "test_titles.csv").is_file(),
        "texts_txt": (root / "texts_txt").is_dir(),
    }
    if fmt != "auto":
        if not present[fmt]:
            raise DatasetNotFoundError(f"food101: format={fmt!r} but its files are not under {root}. {HOWTO}")
        return fmt
    for f in FORMATS:
        if present[f]:
            return f
    raise DatasetNotFoundError(f"food101: no text layout found under {root}; looked for train.json/test.json, "
                               f"train.jsonl/test.jsonl, texts/train_titles.csv, texts_txt/. {HOWTO}")


def read_records(root: Path, fmt: str = "auto", text_processing: str = "raw") -> tuple[str, dict[str, list[Record]]]:
    """Parse the layout under ``root`` → (format used, records per source split 'train'/'dev'?/'test')."""
    used = detect_format(root, fmt)
    if used in ("csv", "texts_txt") and not (root / "images").is_dir():
        raise DatasetNotFoundError(f"food101: missing directory {root / 'images'} (layout {used}). {HOWTO}")
    if used == "cggm_json":
        recs = read_cggm_json(root)
    elif used == "jsonl":
        recs = read_jsonl(root)
    elif used == "csv":
        recs = read_csv(root)
    else:
        recs = read_texts_txt(root, text_processing)
    for split, r in recs.items():
        if not r:
            raise DatasetFormatError(f"food101: the {split} split of layout {used} under {root} is empty")
    return used, recs


def carve_validation(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified validation carve from train (§2): per-class counts by largest-remainder rounding of
    val_size·n_c/N; one RandomState(seed) permutes each class in canonical order. → (train, val) idx."""
    n = len(labels)
    if not 0 < val_size < n:
        raise ConfigError(f"food101: val_size must be in [1, {n - 1}] (training samples: {n}), got {val_size}")
    classes, counts = np.unique(labels, return_counts=True)
    quota = val_size * counts / n
    take = np.floor(quota).astype(int)
    rest = val_size - int(take.sum())
    order = sorted(range(len(classes)), key=lambda i: (-(quota[i] - take[i]), classes[i]))
    for i in order[:rest]:
        take[i] += 1
    rs = np.random.RandomState(seed)
    val = []
    for c, k in zip(classes, take):
        idx = np.flatnonzero(labels == c)
        val.extend(idx[rs.permutation(len(idx))][:k].tolist())
    val_idx = np.sort(np.asarray(val, dtype=np.int64))
    return np.setdiff1d(np.arange(n), val_idx), val_idx


# ============================================================================ options and build
@dataclass
class Food101Options:
    """§3.1 options (ExtractionConfig fields) plus: ``root`` (default <data-dir>/food101 or <data-dir>);
    ``format``; ``text_processing``; ``val_size``/``split_seed`` (§2); ``hparam_source`` (§6);
    ``storage`` (``memory``: tensors in RAM; ``arrow``: memory-mapped Arrow through a DataLoader;
    ``auto``: memory up to ``in_memory_max_gb``);
    ``limit_per_class`` (first k samples per class and source split: quick runs)."""

    root: str | None = None
    format: Literal["auto", "cggm_json", "jsonl", "csv", "texts_txt"] = "auto"
    text_processing: Literal["raw", "bmmal"] = "raw"
    text_backbone: str = "bert-base-uncased"
    image_backbone: str = "google/vit-base-patch16-224"
    image_backend: Literal["transformers", "timm"] = "transformers"
    timm_model: str | None = None
    feature_mode: Literal["sequence", "cls", "mean"] = "sequence"
    feature_dtype: Literal["float16", "float32"] = "float16"
    max_length: int = 50
    image_normalize: Literal["processor", "none"] = "processor"
    extraction: Literal["cached", "online"] = "cached"
    allow_download: bool = False
    cache_root: str | None = None
    extract_batch_size: int = 64
    extract_device: str | None = None
    strict_hash: bool = False
    val_size: int = 5000
    split_seed: int = 0
    hparam_source: Literal["paper", "code"] = "paper"
    storage: Literal["auto", "memory", "arrow"] = "auto"
    in_memory_max_gb: float = 8.0
    limit_per_class: int | None = None
    pooled_model: bool = False  # food101_pooled preset

    def validate(self) -> None:
        if self.extraction == "online":
            raise ConfigError("food101: extraction='online' (§3.5) is not implemented in this release; "
                              "use the default extraction='cached'")
        if self.val_size < 1:
            raise ConfigError(f"food101: val_size must be >= 1, got {self.val_size}")
        if self.pooled_model and self.feature_mode == "sequence":
            raise ConfigError("food101_pooled needs feature_mode=cls or mean")
        self.extraction_config().validate()

    def extraction_config(self) -> ExtractionConfig:
        names = {f.name for f in fields(ExtractionConfig)}
        return ExtractionConfig(**{k: v for k, v in vars(self).items() if k in names})


def resolve_root(options: Food101Options, data_dir: str | Path | None) -> Path:
    if options.root:
        root = Path(options.root).expanduser()
        if not root.is_dir():
            raise DatasetNotFoundError(f"food101: dataset.root {root} is not a directory. {HOWTO}")
        return root
    base = data_dir or os.environ.get("MMBALANCE_DATA")
    if not base:
        raise DatasetNotFoundError(f"food101: no data location given (--data-dir, $MMBALANCE_DATA or "
                                   f"dataset.root). {HOWTO}")
    base = Path(base).expanduser()
    for cand in (base / "food101", base / "upmc_food101", base):
        if cand.is_dir() and any((cand / n).exists() for n in ("images", "train.json", "train.jsonl", "texts",
                                                                  "texts_txt")):
            return cand
    raise DatasetNotFoundError(f"food101: no UPMC Food-101 data under {base / 'food101'} or {base}. {HOWTO}")


class ArrowFeatureSplit(Dataset):
    """Memory-mapped cached features (DataLoader path): sample = {image, text, label, idx}."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.ds[int(i)]
        return {"image": row["image_feat"], "text": row["text_feat"], "label": row["label"],
                "idx": torch.tensor(int(i))}


def _column_tensor(table: Any, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """An Arrow (nested list / Array2D) column as one tensor [N, *shape] in its stored dtype
    (the ``datasets`` numpy/torch formatters would upcast float16 to float32)."""
    col = table.column(name).combine_chunks()
    arr = getattr(col, "storage", col)
    for _ in shape:
        arr = arr.flatten()
    return torch.from_numpy(np.asarray(arr.to_numpy(zero_copy_only=False)).reshape(len(table), *shape).copy())


def _subset_records(recs: list[Record], k: int | None) -> list[Record]:
    if k is None:
        return recs
    seen: dict[int, int] = {}
    out = []
    for r in recs:
        if seen.get(r.label, 0) < k:
            out.append(r)
            seen[r.label] = seen.get(r.label, 0) + 1
    return out


def build(options: Food101Options, data_dir: str | Path | None = None) -> MultimodalData:
    o = options
    root = resolve_root(o, data_dir)
    used, records = read_records(root, o.format, o.text_processing)
    records = {s: _subset_records(r, o.limit_per_class) for s, r in records.items()}
    check_images(records, "food101")
    log.info("food101: text layout %r under %s; samples %s", used, root,
             ", ".join(f"{s} {len(r)}" for s, r in records.items()))
    cache = extract_or_load(records, o.extraction_config(), name="food101", class_names=CLASSES,
                            layout={"format": used, "text_processing": o.text_processing}, root=root, log=log.info)
    meta = cache.meta
    train_ds = cache.splits["train"]
    if "dev" in cache.splits:
        val_ds, val_source = cache.splits["dev"], "dev split"
    else:
        labels = np.asarray(train_ds["label"])
        tr_idx, va_idx = carve_validation(labels, o.val_size, o.split_seed)
        train_ds, val_ds = train_ds.select(tr_idx), train_ds.select(va_idx)
        val_source = f"{len(va_idx)} carved from train (stratified, split_seed {o.split_seed})"
    splits = {"train": train_ds, "val": val_ds, "test": cache.splits["test"]}
    if o.feature_mode == "sequence":
        shapes = {"image": (meta["image_tokens"], meta["image_dim"]), "text": (meta["text_len"], meta["text_dim"])}
    else:
        shapes = {"image": (meta["image_dim"],), "text": (meta["text_dim"],)}
    n_bytes = sum(len(d) for d in splits.values()) * sum(math.prod(s) for s in shapes.values()) * (
        2 if o.feature_dtype == "float16" else 4)
    in_memory = o.storage == "memory" or (o.storage == "auto" and n_bytes <= o.in_memory_max_gb * 2**30)
    pooled = o.feature_mode != "sequence"

    def to_split(ds: Any) -> TensorSplit | ArrowFeatureSplit:
        if not in_memory:
            return ArrowFeatureSplit(ds)
        table = ds.with_format("arrow")[:]
        x = {m: _column_tensor(table, f"{m}_feat", shapes[m]) for m in MODALITIES}
        if pooled:  # small: float32 so the generic MLP builder can read them
            x = {m: v.float() for m, v in x.items()}
        return TensorSplit(x, torch.as_tensor(table.column("label").to_numpy(), dtype=torch.long))

    train_defaults = {**TRAIN_DEFAULTS, **(CODE_TRAIN_DEFAULTS if o.hparam_source == "code" else {})}
    if not in_memory:  # the memory-mapped Arrow path reads and collates in loader workers (same order, same numbers)
        train_defaults["num_workers"] = ARROW_NUM_WORKERS
    method_defaults = {k: {**v, **(CODE_METHOD_DEFAULTS.get(k, {}) if o.hparam_source == "code" else {})}
                       for k, v in METHOD_DEFAULTS.items()}
    if o.pooled_model:
        model = ModelSpec("mlp_concat", {"enc_hidden": 128, "enc_out": 64})
    else:
        if pooled:
            raise ConfigError("food101: the canonical model needs feature_mode=sequence; use food101_pooled for "
                              "cls/mean vectors")
        model = ModelSpec("msa_transformer", dict(MODEL_KWARGS))
    return MultimodalData(
        modalities=list(MODALITIES), task="classification", task_kwargs={"num_classes": 101},
        train=to_split(splits["train"]), val=to_split(splits["val"]), test=to_split(splits["test"]),
        input_shapes=shapes, out_dim=101, model=model, train_defaults=train_defaults,
        method_defaults=method_defaults,
        info={"source": "UPMC Food-101 (Wang et al., ICME-W 2015)", "root": str(root), "format": used,
              "validation": val_source, "split_sizes": [len(d) for d in splits.values()],
              "feature_cache": str(cache.directory), "extracted_now": cache.extracted,
              "feature_mode": o.feature_mode, "feature_dtype": o.feature_dtype, "in_memory": in_memory,
              "hparam_source": o.hparam_source},
    )


build.options_cls = Food101Options  # type: ignore[attr-defined]
register_dataset("food101", "UPMC Food-101 image+text, frozen BERT/ViT token features, CGGM FoodModel")(build)
register_dataset("food101_pooled", "UPMC Food-101, frozen-backbone CLS vectors + MLP (quick; not comparable to CGGM)",
                 feature_mode="cls", pooled_model=True)(build)


# ============================================================================ synthetic shape-alike
@dataclass
class Food101SynthOptions:
    """SYNTHETIC Food-101 shape-alike: ``n_samples`` (70/10/20 stratified split by ``split_seed``);
    ``image_tokens``/``image_dim`` (ViT-B/16: 197×768), ``text_tokens``/``text_dim`` (BERT-base, max_length
    50: 50×768); ``text_snr``/``image_snr``: class-signal amplitude (text strong, as CGGM observes on
    Food-101: text-only 84.77 vs image-only 68.24 %, paper Table 2); ``seed``: generation seed."""

    n_samples: int = 1010
    num_classes: int = 101
    image_tokens: int = 197
    image_dim: int = 768
    text_tokens: int = 50
    text_dim: int = 768
    text_snr: float = 1.5
    image_snr: float = 0.75
    seed: int = 0
    split_seed: int = 0
    hparam_source: Literal["paper", "code"] = "paper"

    def validate(self) -> None:
        if self.num_classes < 2 or self.num_classes > 101:
            raise ConfigError(f"food101-synth: num_classes must be in [2, 101], got {self.num_classes}")
        if self.n_samples < 10 * self.num_classes:  # 70/10/20 split: at least one validation sample per class
            raise ConfigError(f"food101-synth: n_samples must be >= 10 per class ({10 * self.num_classes})")
        if min(self.image_tokens, self.text_tokens, self.image_dim, self.text_dim) < 1:
            raise ConfigError("food101-synth: token counts and dims must be >= 1")


def _synth_modality(g: torch.Generator, y: torch.Tensor, num_classes: int, tokens: int, dim: int, snr: float,
                    latent: torch.Tensor) -> torch.Tensor:
    """x[n, t] = w_t·P·(snr·μ_{y_n} + ε_n) + token noise, stored float16. μ: class codes in a 16-d
    latent (independent per modality, so the modalities are complementary); ε_n: per-sample latent
    noise; P: a random 16→dim projection; w_t: per-token weights."""
    proj = torch.randn(latent.shape[1], dim, generator=g) / math.sqrt(latent.shape[1])
    weights = torch.rand(tokens, generator=g) * 1.5 + 0.25
    out = torch.empty(len(y), tokens, dim, dtype=torch.float16)
    for s in range(0, len(y), 128):
        yb = y[s:s + 128]
        sample = (snr * latent[yb] + torch.randn(len(yb), latent.shape[1], generator=g)) @ proj  # [b, dim]
        x = weights.view(1, -1, 1) * sample.unsqueeze(1) + torch.randn(len(yb), tokens, dim, generator=g)
        out[s:s + 128] = x.half()
    return out


def build_synth(options: Food101SynthOptions, data_dir: str | Path | None = None) -> MultimodalData:
    o = options
    g = torch.Generator().manual_seed(o.seed)
    y = torch.arange(o.n_samples) % o.num_classes
    y = y[torch.randperm(o.n_samples, generator=g)]
    latent_text = torch.randn(o.num_classes, 16, generator=g)
    latent_image = torch.randn(o.num_classes, 16, generator=g)
    x = {"image": _synth_modality(g, y, o.num_classes, o.image_tokens, o.image_dim, o.image_snr, latent_image),
         "text": _synth_modality(g, y, o.num_classes, o.text_tokens, o.text_dim, o.text_snr, latent_text)}
    tr, va, te = stratified_split(y.numpy(), [0.7, 0.1, 0.2], o.split_seed)

    def split(idx: np.ndarray) -> TensorSplit:
        t = torch.as_tensor(idx)
        return TensorSplit({m: v[t] for m, v in x.items()}, y[t])

    train_defaults = {**TRAIN_DEFAULTS, "epochs": 20, **(CODE_TRAIN_DEFAULTS if o.hparam_source == "code" else {})}
    method_defaults = {k: {**v, **(CODE_METHOD_DEFAULTS.get(k, {}) if o.hparam_source == "code" else {})}
                       for k, v in METHOD_DEFAULTS.items()}
    return MultimodalData(
        modalities=list(MODALITIES), task="classification", task_kwargs={"num_classes": o.num_classes},
        train=split(tr), val=split(va), test=split(te),
        input_shapes={"image": (o.image_tokens, o.image_dim), "text": (o.text_tokens, o.text_dim)},
        out_dim=o.num_classes, model=ModelSpec("msa_transformer", dict(MODEL_KWARGS)),
        train_defaults=train_defaults, method_defaults=method_defaults,
        info={"synthetic": True, "description": "SYNTHETIC Food-101 shape-alike (text strong, image weak); "
              "not UPMC Food-101", "split_sizes": [len(tr), len(va), len(te)], "split_seed": o.split_seed},
        synthetic=True,
    )


build_synth.options_cls = Food101SynthOptions  # type: ignore[attr-defined]
register_dataset("food101-synth", "SYNTHETIC Food-101 shape-alike (197x768 image, 50x768 text tokens, 101 classes; "
                 "text strong)")(build_synth)
