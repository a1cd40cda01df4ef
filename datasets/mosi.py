"""CMU-MOSI multimodal sentiment regression (``docs/datasets/mosi.md``) and its synthetic shape-alike.

Zadeh et al., "MOSI: Multimodal Corpus of Sentiment Intensity and Subjectivity Analysis in Online
Opinion Videos", IEEE Intelligent Systems 2016. Modalities ``text``, ``audio``, ``vision``; target
sentiment in [−3, 3]. Not redistributed: users supply MulT (``mosi_data.pkl`` /
``mosi_data_noalign.pkl``) or MMSA (``MOSI/Processed/{aligned,unaligned}_50.pkl``) feature pickles.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mmbalance.data import ModelSpec, MultimodalData, TensorSplit, stratified_split
from mmbalance.data.splits import quantile_bins
from mmbalance.errors import ConfigError, DatasetFormatError, DatasetNotFoundError
from mmbalance.registry import register_dataset

from ._seqcommon import (
    feature_array,
    load_pickle,
    require_key,
    sha256_of,
    split_dict,
    synthetic_sequences,
)

log = logging.getLogger("mmbalance.datasets.mosi")

MODALITIES = ("text", "audio", "vision")
SPLITS = {"train": "train", "val": "valid", "test": "test"}  # mmbalance name → pickle key
EXPECTED_SIZES = {"train": 1284, "val": 229, "test": 686}  # MMSA configuration (mosi.md §1.1)

HOW_TO_GET = (
    "Accepted formats: MulT mosi_data.pkl / mosi_data_noalign.pkl (the CMU-MOSI pickles distributed with "
    "yaohungt/Multimodal-Transformer, read by zrguo/CGGM), MMSA MOSI/Processed/{aligned,unaligned}_50.pkl "
    "(thuiar/MMSA, SHA-256 values in its README). Place the file under --data-dir / $MMBALANCE_DATA "
    "(or point --set dataset.path=FILE / dataset.root=DIR at it). See docs/datasets/mosi")

# Dataset-level training settings (mosi.md §4). CGGM paper Table 7 (MOSI column): batch 64, Adam,
# base lr 1e-3, weight decay "-", gradient clip 0.8, scheduler "StepLR" (no step size or gamma stated),
# no warm-up, 30 epochs. zrguo/CGGM code: the same values, no weight decay, ReduceLROnPlateau(min,
# patience 10, factor 0.1) on the validation loss, stepped per epoch. As for Food-101 (README
# "Decisions"), the paper's StepLR has no parameters, so the code's plateau scheduler is kept.
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "paper": {"batch_size": 64, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "grad_clip": 0.8,
              "scheduler": "plateau", "plateau_patience": 10, "plateau_factor": 0.1, "warmup_epochs": 0,
              "epochs": 30, "eval_batch_size": 64},
    "code": {"batch_size": 64, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "grad_clip": 0.8,
             "scheduler": "plateau", "plateau_patience": 10, "plateau_factor": 0.1, "warmup_epochs": 0,
             "epochs": 30, "eval_batch_size": 64},
}
# CGGM on MOSI, paper Table 7: ρ 1.3, λ 0.20, classifier lr 5e-4, weight decay "-" (0; the code uses
# the same values: Adam without weight decay).
CGGM_DEFAULTS: dict[str, dict[str, float]] = {
    "paper": {"rho": 1.3, "lam": 0.2, "cls_lr": 5e-4, "cls_weight_decay": 0.0},
    "code": {"rho": 1.3, "lam": 0.2, "cls_lr": 5e-4, "cls_weight_decay": 0.0},
}
# Canonical model (mosi.md §2): width 40, 5 heads, nlevels 5 (fusion 3 layers), dropouts
# attention 0.15, ReLU 0.15, embedding 0.2, residual 0.1, output 0.1.
# ReconBoost sample weights w1/w2 = 1.0/0.25: the official MSA script (huacong/ReconBoost train_MSA.py;
# methods/reconboost.md §4); the method's own default 5/1 is the CREMA-D command.
RECONBOOST_DEFAULTS: dict[str, float] = {"w1": 1.0, "w2": 0.25}

MODEL_KWARGS: dict[str, Any] = {"d_model": 40, "num_heads": 5, "nlevels": 5, "attn_dropout": 0.15,
                                "relu_dropout": 0.15, "embed_dropout": 0.2, "res_dropout": 0.1, "out_dropout": 0.1}


@dataclass
class MosiOptions:
    """``path``: the pickle file (overrides everything else); ``root``: directory searched as in
    mosi.md §1 (default: the data dir, then ``<data dir>/mosi``); ``variant``: aligned | unaligned;
    ``flavour``: auto | mult | mmsa; ``use_length_masks``: mask padded audio/vision steps (MMSA
    unaligned only); ``hparam_source``: paper (Table 7) | code (zrguo/CGGM CLI values)."""

    path: str | None = None
    root: str | None = None
    variant: Literal["aligned", "unaligned"] = "aligned"
    flavour: Literal["auto", "mult", "mmsa"] = "auto"
    use_length_masks: bool = False
    hparam_source: Literal["paper", "code"] = "paper"


def candidate_paths(options: MosiOptions, data_dir: str | Path | None) -> list[Path]:
    """mosi.md §1 resolution order, for each root."""
    if options.path:
        return [Path(options.path).expanduser()]
    if options.root:
        roots = [Path(options.root).expanduser()]
    elif data_dir:
        roots = [Path(data_dir).expanduser(), Path(data_dir).expanduser() / "mosi"]
    else:
        raise DatasetNotFoundError(
            "mosi: no data location given: pass --data-dir DIR, set $MMBALANCE_DATA, or --set dataset.path=FILE. "
            + HOW_TO_GET)
    mult = "mosi_data.pkl" if options.variant == "aligned" else "mosi_data_noalign.pkl"
    mmsa = f"{options.variant}_50.pkl"
    # the MMSA pickle is also found directly in the folder (where users put a downloaded aligned_50.pkl)
    return [p for r in roots for p in (r / mult, r / "MOSI" / "Processed" / mmsa, r / "Processed" / mmsa, r / mmsa)]


def detect_flavour(obj: dict[str, Any], path: Path, wanted: str) -> str:
    if wanted != "auto":
        return wanted
    train = split_dict(obj, "train", path, "mosi")
    has_mult, has_mmsa = "labels" in train, "regression_labels" in train
    if has_mult == has_mmsa:
        raise DatasetFormatError(
            f"mosi: {path}: cannot tell the format: split 'train' has {'both' if has_mult else 'neither'} "
            f"'labels' (MulT) {'and' if has_mult else 'nor'} 'regression_labels' (MMSA); found keys: "
            f"{sorted(map(str, train))}. Set dataset.flavour=mult or mmsa")
    return "mult" if has_mult else "mmsa"


def labels_array(value: Any, n: int, split: str, path: Path, key: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu" or arr.shape not in {(n,), (n, 1), (n, 1, 1)}:
        raise DatasetFormatError(f"mosi: {path}: split {split!r} key {key!r} has shape {arr.shape} (dtype "
                                 f"{arr.dtype}) but ({n},), ({n}, 1) or ({n}, 1, 1) floats are required")
    y = arr.reshape(n).astype(np.float32)
    if not np.isfinite(y).all():
        raise DatasetFormatError(f"mosi: {path}: split {split!r} key {key!r} holds non-finite labels")
    if y.size and (y.min() < -3 or y.max() > 3):  # sentiment is annotated on [-3, 3]
        raise DatasetFormatError(f"mosi: {path}: split {split!r} key {key!r} has labels outside [-3, 3] (min "
                                 f"{y.min():.4g}, max {y.max():.4g}); MOSI sentiment is on [-3, 3] (scaled labels?)")
    return y


def read_splits(obj: Any, path: Path, flavour: str, use_length_masks: bool) -> tuple[dict[str, TensorSplit], dict]:
    """Check and convert the three splits; returns the splits and loading statistics."""
    label_key = "labels" if flavour == "mult" else "regression_labels"
    splits: dict[str, TensorSplit] = {}
    replaced: dict[str, dict[str, int]] = {}
    dims: dict[str, int] = {}
    lengths: dict[str, dict[str, int]] = {}
    masked = False
    for name, key in SPLITS.items():
        d = split_dict(obj, key, path, "mosi")
        feats: dict[str, np.ndarray] = {}
        for m in MODALITIES:
            feats[m], replaced.setdefault(key, {})[m] = feature_array(require_key(d, m, key, path, "mosi"), m, key, path, "mosi")
            if m in dims and feats[m].shape[2] != dims[m]:
                raise DatasetFormatError(f"mosi: {path}: key {m!r} has feature dimension {feats[m].shape[2]} in "
                                         f"split {key!r} but {dims[m]} in split 'train'")
            dims.setdefault(m, feats[m].shape[2])
        n = feats["text"].shape[0]
        for m in MODALITIES:
            if feats[m].shape[0] != n:
                raise DatasetFormatError(f"mosi: {path}: split {key!r}: modality arrays disagree on N "
                                         f"({', '.join(f'{k} {v.shape[0]}' for k, v in feats.items())})")
        y = labels_array(require_key(d, label_key, key, path, "mosi"), n, key, path, label_key)
        if use_length_masks and flavour == "mmsa" and "audio_lengths" in d and "vision_lengths" in d:
            for m in ("audio", "vision"):
                lens = np.asarray(d[f"{m}_lengths"]).reshape(-1)
                if lens.dtype.kind not in "iuf" or (lens.size and not np.isfinite(lens.astype(np.float64)).all()):
                    raise DatasetFormatError(f"mosi: {path}: split {key!r} key '{m}_lengths' must hold numbers, got "
                                             f"dtype {lens.dtype} (first values {lens[:3].tolist()})")
                if lens.shape != (n,):
                    raise DatasetFormatError(f"mosi: {path}: split {key!r} key '{m}_lengths' has {lens.shape[0]} "
                                             f"entries for {n} samples")
                feats[m][np.arange(feats[m].shape[1])[None, :] >= lens[:, None]] = 0.0  # padded steps exactly 0
            masked = True
        for m in MODALITIES:
            if replaced[key][m]:
                log.warning("mosi: %s: split %r key %r: replaced %d non-finite values by 0", path, key, m, replaced[key][m])
        lengths[key] = {m: int(feats[m].shape[1]) for m in MODALITIES}
        splits[name] = TensorSplit({m: torch.from_numpy(feats[m]) for m in MODALITIES}, torch.from_numpy(y))
    return splits, {"nonfinite_replaced": replaced, "feature_dims": dims, "lengths": lengths, "length_masks": masked}


def build(options: MosiOptions, data_dir: str | Path | None = None) -> MultimodalData:
    tried = candidate_paths(options, data_dir)
    path = next((p for p in tried if p.is_file()), None)
    if path is None:
        other = "unaligned" if options.variant == "aligned" else "aligned"
        found = next((p for p in candidate_paths(dataclasses.replace(options, variant=other), data_dir) if p.is_file()),
                     None)
        if found is not None:  # the folder holds the other variant only: name it and how to select it
            raise DatasetNotFoundError(f"mosi: no {options.variant} feature pickle found (tried: "
                                       + ", ".join(map(str, tried)) + f"), but {found} holds the {other} variant; "
                                       f"select it with --set dataset.variant={other}")
        raise DatasetNotFoundError("mosi: no feature pickle found; tried: " + ", ".join(map(str, tried)) + ". " + HOW_TO_GET)
    obj = load_pickle(path, "mosi")
    flavour = detect_flavour(obj, path, options.flavour)
    splits, stats = read_splits(obj, path, flavour, options.use_length_masks)
    sizes = {k: len(v) for k, v in splits.items()}
    if sizes != EXPECTED_SIZES:
        warnings.warn(f"mosi: {path}: split sizes {sizes} differ from the standard {EXPECTED_SIZES} "
                      "(custom pickle?)", stacklevel=2)
    kwargs = dict(MODEL_KWARGS)
    if stats["length_masks"]:
        kwargs["key_padding"] = ["audio", "vision"]
    return MultimodalData(
        modalities=list(MODALITIES), task="regression", task_kwargs={},
        train=splits["train"], val=splits["val"], test=splits["test"],
        input_shapes={m: tuple(splits["train"].inputs[m].shape[1:]) for m in MODALITIES}, out_dim=1,
        model=ModelSpec("msa_transformer", kwargs),
        train_defaults=dict(TRAIN_DEFAULTS[options.hparam_source]),
        method_defaults={"cggm": dict(CGGM_DEFAULTS[options.hparam_source]), "reconboost": dict(RECONBOOST_DEFAULTS)},
        info={"source": "CMU-MOSI (Zadeh et al. 2016)", "path": str(path), "sha256": sha256_of(path),
              "flavour": flavour, "variant": options.variant, "split_sizes": sizes,
              "hparam_source": options.hparam_source, **stats},
    )


build.options_cls = MosiOptions  # type: ignore[attr-defined]
register_dataset("mosi", "CMU-MOSI sentiment regression, text/audio/vision feature pickles (MulT or MMSA)")(build)


# ------------------------------------------------------------------------------------ synthetic
@dataclass
class MosiSynthOptions:
    """SYNTHETIC MOSI shape-alike. ``n_samples`` (split 70/10/20 by target quantiles); ``seq_len``:
    every modality's length (default: 50 as the aligned MulT pickles); ``imbalance``: text amplitude
    (audio/vision have 0.8); ``seed``: generation seed; ``split_seed``."""

    n_samples: int = 600
    seq_len: int = 50
    imbalance: float = 3.0
    seed: int = 0
    split_seed: int = 0
    hparam_source: Literal["paper", "code"] = "paper"

    def validate(self) -> None:
        if self.n_samples < 20:
            raise ConfigError(f"mosi-synth: n_samples must be >= 20, got {self.n_samples}")
        if self.seq_len < 1:
            raise ConfigError(f"mosi-synth: seq_len must be >= 1, got {self.seq_len}")


SYNTH_DIMS = {"text": 300, "audio": 5, "vision": 20}  # MulT feature dimensions (mosi.md §1.1)


def build_synth(options: MosiSynthOptions, data_dir: str | Path | None = None) -> MultimodalData:
    """y = clip(1.2·z0 + 0.9·z1 + 0.9·z2, −3, 3); text sees z0 with amplitude ``imbalance`` (strong,
    about half the target variance), audio sees z1 and vision z2 with amplitude 0.8 (weak,
    complementary): the model leans on text and under-trains the others."""
    o = options
    rs = np.random.RandomState(o.seed)
    z = rs.normal(size=(o.n_samples, 3))
    y = np.clip(1.2 * z[:, 0] + 0.9 * z[:, 1] + 0.9 * z[:, 2], -3, 3).astype(np.float32)
    views = {"text": ([0], o.imbalance), "audio": ([1], 0.8), "vision": ([2], 0.8)}
    xs = synthetic_sequences(rs, z, views, {m: (o.seq_len, d) for m, d in SYNTH_DIMS.items()})
    parts = stratified_split(quantile_bins(y, max(1, min(10, o.n_samples // 20))), [0.7, 0.1, 0.2], o.split_seed)

    def split(idx: np.ndarray) -> TensorSplit:
        return TensorSplit({m: torch.from_numpy(xs[m][idx]) for m in MODALITIES}, torch.from_numpy(y[idx]))

    tr, va, te = (split(p) for p in parts)
    return MultimodalData(
        modalities=list(MODALITIES), task="regression", task_kwargs={}, train=tr, val=va, test=te,
        input_shapes={m: (o.seq_len, d) for m, d in SYNTH_DIMS.items()}, out_dim=1,
        model=ModelSpec("msa_transformer", dict(MODEL_KWARGS)),
        train_defaults=dict(TRAIN_DEFAULTS[o.hparam_source]),
        method_defaults={"cggm": dict(CGGM_DEFAULTS[o.hparam_source]), "reconboost": dict(RECONBOOST_DEFAULTS)},
        info={"synthetic": True, "description": "SYNTHETIC CMU-MOSI shape-alike (text strong, audio/vision weak)",
              "split_seed": o.split_seed, "split_sizes": {"train": len(tr), "val": len(va), "test": len(te)},
              "hparam_source": o.hparam_source},
        synthetic=True,
    )


build_synth.options_cls = MosiSynthOptions  # type: ignore[attr-defined]
register_dataset("mosi-synth", "SYNTHETIC CMU-MOSI shape-alike (regression, text strong)")(build_synth)

__all__ = ["MosiOptions", "MosiSynthOptions", "build", "build_synth", "TRAIN_DEFAULTS", "CGGM_DEFAULTS",
           "RECONBOOST_DEFAULTS"]
