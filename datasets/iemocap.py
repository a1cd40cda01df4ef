"""IEMOCAP 4-class emotion recognition (``docs/datasets/iemocap.md``) and its synthetic shape-alike.

Busso et al., "IEMOCAP: Interactive Emotional Dyadic Motion Capture Database", LRE 42(4), 2008.
Modalities ``text``, ``audio``, ``vision``; single-label 4-class classification. Not redistributed:
users supply the MMIN feature tree (AIM3-RUC/MMIN, read by zrguo/CGGM; ``format=mmin``, default) or
the MulT pickles ``iemocap_data.pkl`` / ``iemocap_data_noalign.pkl`` (``format=mult``).

Reported metrics: ``accuracy`` (WA, selection and primary metric), ``f1_weighted`` (the F1 of the
CGGM paper, zrguo/CGGM ``eval_iemocap``), ``f1_macro`` and ``ua`` (unweighted accuracy).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mmbalance.data import ModelSpec, MultimodalData, TensorSplit, stratified_split
from mmbalance.errors import ConfigError, DatasetFormatError, DatasetNotFoundError
from mmbalance.registry import register_dataset

from ._seqcommon import (
    feature_array,
    fit_length,
    load_pickle,
    require_key,
    sha256_of,
    split_dict,
    synthetic_sequences,
)

log = logging.getLogger("mmbalance.datasets.iemocap")

MODALITIES = ("text", "audio", "vision")
MMIN_FILES = {"audio": "A/comparE.h5", "vision": "V/denseface.h5", "text": "L/bert_large.h5"}
MMIN_STATS = "A/comparE_mean_std.h5"
MMIN_SPLITS = {"train": "trn", "val": "val", "test": "tst"}
MMIN_MAX_LEN = {"text": 22, "audio": 350, "vision": 50}  # the official loader's fixed maxima (iemocap.md §1.1)
MULT_CLASSES = ["neutral", "happy", "sad", "angry"]  # MulT label order (iemocap.md §1.2)
F1_REPORTED = "f1_weighted (support-weighted F1, as zrguo/CGGM eval_iemocap and the paper's Table 4)"

MMIN_LAYOUT = ("A/comparE.h5, A/comparE_mean_std.h5, V/denseface.h5, L/bert_large.h5, "
               "target/<cv>/{trn,val,tst}_{label,int2name}.npy")
HOW_TO_GET = (
    "Obtain IEMOCAP from USC SAIL (https://sail.usc.edu/iemocap/, licence required) and the MMIN features "
    "(AIM3-RUC/MMIN README: ComParE/DenseFace/BERT-large features with 10-fold targets), or the MulT pickles "
    "iemocap_data.pkl / iemocap_data_noalign.pkl (yaohungt/Multimodal-Transformer) with --set "
    "dataset.format=mult. Place them under --data-dir / $MMBALANCE_DATA (or <data dir>/iemocap), or point "
    "--set dataset.root=DIR / dataset.path=FILE at them. See docs/datasets/iemocap")

# Dataset-level training settings (iemocap.md §4). CGGM paper Table 7 (IEMOCAP column): batch 32,
# AdamW, base lr 1e-3, weight decay "-" (not stated: PyTorch's AdamW default 0.01, unverified),
# gradient clip 0.8, scheduler "StepLR" without parameters (the code's ReduceLROnPlateau on the
# validation loss is kept, as for Food-101), no warm-up, 30 epochs. zrguo/CGGM code: batch 64, Adam
# without weight decay, lr 1e-3, clip 0.8, ReduceLROnPlateau(min, patience 10, factor 0.1), 30 epochs.
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "paper": {"batch_size": 32, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01, "grad_clip": 0.8,
              "scheduler": "plateau", "plateau_patience": 10, "plateau_factor": 0.1, "warmup_epochs": 0,
              "epochs": 30, "eval_batch_size": 32},
    "code": {"batch_size": 64, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "grad_clip": 0.8,
             "scheduler": "plateau", "plateau_patience": 10, "plateau_factor": 0.1, "warmup_epochs": 0,
             "epochs": 30, "eval_batch_size": 32},
}
# CGGM on IEMOCAP, paper Table 7: ρ 1.3, λ 0.15, classifier lr 5e-4 (classifier AdamW with the
# dataset's weight decay 0.01, unverified); the code's CLI uses λ 0.2 and Adam without weight decay.
CGGM_DEFAULTS: dict[str, dict[str, float]] = {
    "paper": {"rho": 1.3, "lam": 0.15, "cls_lr": 5e-4, "cls_weight_decay": 0.01},
    "code": {"rho": 1.3, "lam": 0.2, "cls_lr": 5e-4, "cls_weight_decay": 0.0},
}
# Canonical model (iemocap.md §2): width 40, 5 heads, nlevels 4 (fusion 2 layers), dropouts
# attention 0.15, ReLU 0.15, embedding 0.2, residual 0.15, output 0.2.
# ReconBoost sample weights w1/w2 = 1.0/0.25: the official MSA script (huacong/ReconBoost train_MSA.py;
# methods/reconboost.md §4); the method's own default 5/1 is the CREMA-D command.
RECONBOOST_DEFAULTS: dict[str, float] = {"w1": 1.0, "w2": 0.25}

MODEL_KWARGS: dict[str, Any] = {"d_model": 40, "num_heads": 5, "nlevels": 4, "attn_dropout": 0.15,
                                "relu_dropout": 0.15, "embed_dropout": 0.2, "res_dropout": 0.15, "out_dropout": 0.2}


@dataclass
class IemocapOptions:
    """``format``: mmin (MMIN feature tree, default) | mult (MulT pickle); ``root``: the directory
    (default: the data dir, then ``<data dir>/iemocap``, ``<data dir>/IEMOCAP``); ``path``: the MMIN
    root or the MulT pickle itself; ``cv``: MMIN fold 1..10; ``class_names``: 4 names (MMIN class order
    is undocumented, so the default names are class_0..class_3; MulT: neutral/happy/sad/angry);
    ``norm``: trn (audio standardised with the fold's shipped statistics) | none; ``max_len_*``:
    truncate/zero-pad lengths (None: MMIN 22/350/50, MulT the file's lengths); ``variant``: MulT
    aligned | unaligned; ``drop_ambiguous``: drop MulT rows without exactly one positive emotion;
    ``hparam_source``: paper (Table 7) | code."""

    format: Literal["mmin", "mult"] = "mmin"
    root: str | None = None
    path: str | None = None
    cv: int = 1
    class_names: list[str] | None = None
    norm: Literal["trn", "none"] = "trn"
    max_len_text: int | None = None
    max_len_audio: int | None = None
    max_len_vision: int | None = None
    variant: Literal["aligned", "unaligned"] = "aligned"
    drop_ambiguous: bool = False
    hparam_source: Literal["paper", "code"] = "paper"

    def validate(self) -> None:
        if self.class_names is not None and len(self.class_names) != 4:
            raise ValueError(f"class_names must list 4 names, got {self.class_names}")
        for m in MODALITIES:
            v = getattr(self, f"max_len_{m}")
            if v is not None and v < 1:
                raise ValueError(f"max_len_{m} must be >= 1, got {v}")

    def max_len(self, m: str) -> int | None:
        return getattr(self, f"max_len_{m}")


def candidate_roots(options: IemocapOptions, data_dir: str | Path | None) -> list[Path]:
    if options.path:
        return [Path(options.path).expanduser()]
    if options.root:
        return [Path(options.root).expanduser()]
    if data_dir:
        d = Path(data_dir).expanduser()
        return [d, d / "iemocap", d / "IEMOCAP"]
    raise DatasetNotFoundError(f"iemocap (format={options.format}): no data location given: pass --data-dir DIR, "
                               "set $MMBALANCE_DATA, or --set dataset.root=DIR. " + HOW_TO_GET)


# ------------------------------------------------------------------------------------ MMIN tree
def _mmin_root(options: IemocapOptions, data_dir: str | Path | None) -> Path:
    roots = candidate_roots(options, data_dir)
    for r in roots:
        if (r / "target").is_dir() or (r / "A").is_dir():
            return r
    raise DatasetNotFoundError(
        f"iemocap (format=mmin): no MMIN feature tree found; tried: {', '.join(map(str, roots))}. Expected the "
        f"MMIN feature tree: {MMIN_LAYOUT}. " + HOW_TO_GET)


def _load_npy(path: Path, allow_pickle: bool) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=allow_pickle)
    except Exception as exc:  # truncated (ValueError/EOFError), not an .npy file, pickled objects
        raise DatasetFormatError(f"iemocap: {path} is not a readable .npy file ({type(exc).__name__}: {exc})") from None


def _one_hot_labels(path: Path) -> np.ndarray:
    arr = _load_npy(path, allow_pickle=False)
    if arr.dtype.kind not in "biuf":
        raise DatasetFormatError(f"iemocap: {path}: labels have dtype {arr.dtype}, expected numbers (one-hot)")
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise DatasetFormatError(f"iemocap: {path}: labels have shape {arr.shape}, expected one-hot (n, 4)")
    ok = (np.isin(arr, (0, 1))).all(axis=1) & (arr.sum(axis=1) == 1)
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise DatasetFormatError(f"iemocap: {path}: row {row} is {arr[row].tolist()}, expected one-hot "
                                 f"(exactly one 1, zeros elsewhere); {int((~ok).sum())} such row(s)")
    if len(arr) == 0:
        raise DatasetFormatError(f"iemocap: {path}: the split is empty (0 labels)")
    return arr.argmax(axis=1).astype(np.int64)


def _names(path: Path) -> list[str]:
    arr = _load_npy(path, allow_pickle=True)
    if arr.ndim == 0:
        raise DatasetFormatError(f"iemocap: {path}: expected an array of utterance names, got a scalar")
    flat = arr.reshape(len(arr), -1)[:, 0] if arr.ndim > 1 else arr
    return [v.decode() if isinstance(v, bytes) else str(v) for v in flat]


def _read_h5(path: Path, names: list[str], replaced: list[int] | None = None) -> list[np.ndarray]:
    """The utterances ``names`` of an MMIN HDF5 file; non-finite values become 0 and are counted into
    ``replaced[0]``; a modality without a single finite value is an error."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DatasetFormatError(f"iemocap: {path}: cannot open as HDF5 ({exc})") from None
    with f:
        missing = [n for n in names if n not in f]
        if missing:
            raise DatasetFormatError(f"iemocap: {path}: {len(missing)} utterance id(s) of the split are absent; "
                                     f"first five: {missing[:5]}")
        out, dim = [], None
        total_bad = total = 0
        for n in names:
            try:
                x = np.asarray(f[n][()], dtype=np.float32)
            except (OSError, ValueError, TypeError) as exc:  # truncated file, non-numeric dataset
                raise DatasetFormatError(f"iemocap: {path}: utterance {n!r} is unreadable ({exc})") from None
            if x.ndim == 1:
                x = x[None, :]
            if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
                raise DatasetFormatError(f"iemocap: {path}: utterance {n!r} has shape {x.shape}, expected "
                                         f"(T, {dim if dim is not None else 'D'}) like the other utterances")
            dim = x.shape[1]
            bad = int((~np.isfinite(x)).sum())
            if bad and replaced is not None:
                replaced[0] += bad
            total_bad += bad
            total += x.size
            out.append(np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0))
    if out and total_bad == total:
        raise DatasetFormatError(f"iemocap: {path}: all {total} values of the split are non-finite (NaN/inf)")
    return out


def _audio_stats(path: Path, cv: int) -> tuple[np.ndarray, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        g = str(cv)
        if g not in f or "mean" not in f[g] or "std" not in f[g]:
            raise DatasetFormatError(f"iemocap: {path}: missing group {g!r} with datasets 'mean' and 'std' "
                                     f"(fold {cv}); found groups {sorted(f.keys())}")
        mean, std = np.asarray(f[g]["mean"][()], np.float32), np.asarray(f[g]["std"][()], np.float32)
    std = np.where(std == 0, 1.0, std).astype(np.float32)  # zero-std guard (iemocap.md §1.1)
    return mean.reshape(-1), std.reshape(-1)


def load_mmin(options: IemocapOptions, data_dir: str | Path | None) -> tuple[dict[str, TensorSplit], dict[str, Any]]:
    root = _mmin_root(options, data_dir)
    target = root / "target"
    fold = target / str(options.cv)
    if target.is_dir() and not fold.is_dir():
        folds = sorted((p.name for p in target.iterdir() if p.is_dir()), key=lambda s: (len(s), s))
        raise ConfigError(f"iemocap: cv={options.cv}: no fold directory {fold}; folds present under {target}: {folds}")
    needed = [root / f for f in (*MMIN_FILES.values(), MMIN_STATS)]
    needed += [fold / f"{s}_{k}.npy" for s in MMIN_SPLITS.values() for k in ("label", "int2name")]
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(f"iemocap (format=mmin): missing {', '.join(map(str, missing))}. Expected the MMIN "
                                   f"feature tree: {MMIN_LAYOUT}. " + HOW_TO_GET)
    stats = _audio_stats(root / MMIN_STATS, options.cv) if options.norm == "trn" else None
    splits: dict[str, TensorSplit] = {}
    truncated: dict[str, dict[str, int]] = {}
    replaced: dict[str, dict[str, int]] = {}
    dims: dict[str, int] = {}
    for name, s in MMIN_SPLITS.items():
        y = _one_hot_labels(fold / f"{s}_label.npy")
        names = _names(fold / f"{s}_int2name.npy")
        if len(names) != len(y):
            raise DatasetFormatError(f"iemocap: {fold / f'{s}_int2name.npy'} has {len(names)} names but "
                                     f"{fold / f'{s}_label.npy'} has {len(y)} labels")
        inputs = {}
        for m in MODALITIES:
            count = [0]
            seqs = _read_h5(root / MMIN_FILES[m], names, count)
            replaced.setdefault(name, {})[m] = count[0]
            if count[0]:
                log.warning("iemocap: %s split %s: replaced %d non-finite %s value(s) by 0", root / MMIN_FILES[m], s,
                            count[0], m)
            d = seqs[0].shape[1]
            if dims.setdefault(m, d) != d:
                raise DatasetFormatError(f"iemocap: {root / MMIN_FILES[m]}: feature width {d} in split {s!r} but "
                                         f"{dims[m]} in split 'trn'")
            if m == "audio" and stats is not None:
                if stats[0].shape != (d,):
                    raise DatasetFormatError(f"iemocap: {root / MMIN_STATS}: group {str(options.cv)!r} 'mean' has "
                                             f"shape {stats[0].shape}, expected ({d},)")
                seqs = [(x - stats[0]) / stats[1] for x in seqs]
            arr, n_trunc = fit_length(seqs, options.max_len(m) or MMIN_MAX_LEN[m])
            truncated.setdefault(name, {})[m] = n_trunc
            if n_trunc:
                log.warning("iemocap: split %s: truncated %d %s sequence(s) to %d steps", s, n_trunc, m, arr.shape[1])
            inputs[m] = torch.from_numpy(arr)
        splits[name] = TensorSplit(inputs, torch.from_numpy(y))
    info = {"format": "mmin", "root": str(root), "cv": options.cv, "norm": options.norm, "truncated": truncated,
            "nonfinite_replaced": replaced,
            "feature_dims": dims, "max_len": {m: options.max_len(m) or MMIN_MAX_LEN[m] for m in MODALITIES}}
    return splits, info


# ------------------------------------------------------------------------------------ MulT pickle
def mult_labels(value: Any, n: int, split: str, path: Path, drop_ambiguous: bool) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4, 2) per-emotion (absent, present) one-hots → y = argmax(labels[:, :, 1]); returns labels
    and the kept-row mask. Rows without exactly one present emotion raise unless ``drop_ambiguous``."""
    arr = np.asarray(value)
    if arr.shape != (n, 4, 2):
        raise DatasetFormatError(f"iemocap: {path}: split {split!r} key 'labels' has shape {arr.shape} but "
                                 f"({n}, 4, 2) is required (per emotion neutral/happy/sad/angry: absent, present)")
    if arr.dtype.kind not in "biuf":
        raise DatasetFormatError(f"iemocap: {path}: split {split!r} key 'labels' has dtype {arr.dtype}; "
                                 "numbers (0/1 one-hots) are required")
    positive = arr[:, :, 1]
    ok = positive.sum(axis=1) == 1
    if not ok.all() and not drop_ambiguous:
        row = int(np.flatnonzero(~ok)[0])
        raise DatasetFormatError(f"iemocap: {path}: split {split!r} row {row} has {int(positive[row].sum())} positive "
                                 f"emotions ({positive[row].tolist()}), expected exactly one; {int((~ok).sum())} such "
                                 "row(s) (set dataset.drop_ambiguous=true to drop them)")
    return positive.argmax(axis=1).astype(np.int64), ok


def load_mult(options: IemocapOptions, data_dir: str | Path | None) -> tuple[dict[str, TensorSplit], dict[str, Any]]:
    fname = "iemocap_data.pkl" if options.variant == "aligned" else "iemocap_data_noalign.pkl"
    roots = candidate_roots(options, data_dir)
    tried = [r if r.suffix == ".pkl" else r / fname for r in roots]
    path = next((p for p in tried if p.is_file()), None)
    if path is None:
        raise DatasetNotFoundError(f"iemocap (format=mult): no {fname} found; tried: {', '.join(map(str, tried))}. "
                                   + HOW_TO_GET)
    obj = load_pickle(path, "iemocap")
    splits: dict[str, TensorSplit] = {}
    dropped: dict[str, int] = {}
    replaced: dict[str, dict[str, int]] = {}
    truncated: dict[str, dict[str, int]] = {}
    dims: dict[str, int] = {}
    for name, key in {"train": "train", "val": "valid", "test": "test"}.items():
        d = split_dict(obj, key, path, "iemocap")
        feats = {}
        for m in MODALITIES:
            feats[m], replaced.setdefault(key, {})[m] = feature_array(require_key(d, m, key, path, "iemocap"),
                                                                      m, key, path, "iemocap")
            if dims.setdefault(m, feats[m].shape[2]) != feats[m].shape[2]:
                raise DatasetFormatError(f"iemocap: {path}: key {m!r} has feature dimension {feats[m].shape[2]} in "
                                         f"split {key!r} but {dims[m]} in split 'train'")
        n = feats["text"].shape[0]
        if any(x.shape[0] != n for x in feats.values()):
            raise DatasetFormatError(f"iemocap: {path}: split {key!r}: modality arrays disagree on N "
                                     f"({', '.join(f'{k} {v.shape[0]}' for k, v in feats.items())})")
        y, keep = mult_labels(require_key(d, "labels", key, path, "iemocap"), n, key, path, options.drop_ambiguous)
        dropped[key] = int((~keep).sum())
        if dropped[key]:
            log.warning("iemocap: %s: split %r: dropped %d row(s) without exactly one positive emotion",
                        path, key, dropped[key])
        if not keep.any():
            raise DatasetFormatError(f"iemocap: {path}: split {key!r} is empty after dropping ambiguous rows")
        inputs = {}
        for m in MODALITIES:
            x = feats[m][keep]
            limit = options.max_len(m)
            truncated.setdefault(name, {})[m] = 0
            if limit is not None:
                truncated[name][m] = int(len(x)) if x.shape[1] > limit else 0
                x, _ = fit_length(list(x), limit)
            inputs[m] = torch.from_numpy(np.ascontiguousarray(x))
        splits[name] = TensorSplit(inputs, torch.from_numpy(y[keep]))
    info = {"format": "mult", "path": str(path), "sha256": sha256_of(path), "variant": options.variant,
            "dropped_ambiguous": dropped, "nonfinite_replaced": replaced, "truncated": truncated, "feature_dims": dims}
    return splits, info


def _data(splits: dict[str, TensorSplit], class_names: list[str], hparam_source: str, info: dict[str, Any],
          synthetic: bool = False) -> MultimodalData:
    return MultimodalData(
        modalities=list(MODALITIES), task="classification", task_kwargs={"num_classes": 4},
        train=splits["train"], val=splits["val"], test=splits["test"],
        input_shapes={m: tuple(splits["train"].inputs[m].shape[1:]) for m in MODALITIES}, out_dim=4,
        model=ModelSpec("msa_transformer", dict(MODEL_KWARGS)),
        train_defaults=dict(TRAIN_DEFAULTS[hparam_source]),
        method_defaults={"cggm": dict(CGGM_DEFAULTS[hparam_source]), "reconboost": dict(RECONBOOST_DEFAULTS)},
        info={**info, "class_names": list(class_names), "f1_reported": F1_REPORTED, "hparam_source": hparam_source,
              "split_sizes": {k: len(v) for k, v in splits.items()},
              "class_counts": {k: torch.bincount(v.labels, minlength=4).tolist() for k, v in splits.items()}},
        synthetic=synthetic,
    )


def _mult_pickle_without_tree(options: IemocapOptions, data_dir: str | Path | None) -> bool:
    """format=mmin (default) but only the MulT pickle is there: read it (no dataset.format=mult needed)."""
    if options.path:
        return Path(options.path).suffix == ".pkl"
    try:
        roots = candidate_roots(options, data_dir)
    except DatasetNotFoundError:
        return False
    fname = "iemocap_data.pkl" if options.variant == "aligned" else "iemocap_data_noalign.pkl"
    has_tree = any((r / "target").is_dir() or (r / "A").is_dir() for r in roots)
    return not has_tree and any((r / fname).is_file() for r in roots)


def build(options: IemocapOptions, data_dir: str | Path | None = None) -> MultimodalData:
    if options.format == "mmin" and _mult_pickle_without_tree(options, data_dir):
        options = dataclasses.replace(options, format="mult")
    if options.format == "mmin":
        splits, info = load_mmin(options, data_dir)
        default_names = [f"class_{i}" for i in range(4)]
    else:
        splits, info = load_mult(options, data_dir)
        default_names = MULT_CLASSES
    info["source"] = "IEMOCAP (Busso et al. 2008)"
    return _data(splits, options.class_names or default_names, options.hparam_source, info)


build.options_cls = IemocapOptions  # type: ignore[attr-defined]
register_dataset("iemocap", "IEMOCAP 4-class emotion, text/audio/vision features (MMIN tree or MulT pickle)")(build)


# ------------------------------------------------------------------------------------ synthetic
SYNTH_SHAPES = {"text": (22, 1024), "audio": (350, 130), "vision": (50, 342)}  # MMIN shapes (iemocap.md §1.1)


@dataclass
class IemocapSynthOptions:
    """SYNTHETIC IEMOCAP shape-alike. ``n_samples`` (stratified 70/10/20); ``seq_len``: None = the
    MMIN lengths 22/350/50, an integer = that length for every modality (faster); ``imbalance``:
    text amplitude (audio/vision 0.8); ``seed``; ``split_seed``. The full-length model is heavy on a
    CPU (audio 350 steps, fusion 422 steps): the default 200 samples keep an epoch short there."""

    n_samples: int = 200
    seq_len: int | None = None
    imbalance: float = 3.0
    seed: int = 0
    split_seed: int = 0
    hparam_source: Literal["paper", "code"] = "paper"

    def validate(self) -> None:
        if self.n_samples < 40:
            raise ValueError(f"n_samples must be >= 40, got {self.n_samples}")
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")


def build_synth(options: IemocapSynthOptions, data_dir: str | Path | None = None) -> MultimodalData:
    """class = 1[z0 > 0] + 2·1[z1 + z2 > 0]: text sees z0 with amplitude ``imbalance`` (one of the two
    bits, learnt fast), audio sees z1 and vision z2 with amplitude 0.8 (the other bit needs both weak
    modalities): text alone reaches about 50 % accuracy, all three modalities much more."""
    o = options
    rs = np.random.RandomState(o.seed)
    z = rs.normal(size=(o.n_samples, 3))
    y = ((z[:, 0] > 0).astype(np.int64) + 2 * (z[:, 1] + z[:, 2] > 0)).astype(np.int64)
    shapes = {m: ((o.seq_len or L), d) for m, (L, d) in SYNTH_SHAPES.items()}
    xs = synthetic_sequences(rs, z, {"text": ([0], o.imbalance), "audio": ([1], 0.8), "vision": ([2], 0.8)}, shapes)
    parts = stratified_split(y, [0.7, 0.1, 0.2], o.split_seed)
    splits = {k: TensorSplit({m: torch.from_numpy(xs[m][p]) for m in MODALITIES}, torch.from_numpy(y[p]))
              for k, p in zip(("train", "val", "test"), parts)}
    info = {"synthetic": True, "description": "SYNTHETIC IEMOCAP shape-alike (text strong, audio/vision weak)",
            "split_seed": o.split_seed}
    return _data(splits, [f"class_{i}" for i in range(4)], o.hparam_source, info, synthetic=True)


build_synth.options_cls = IemocapSynthOptions  # type: ignore[attr-defined]
register_dataset("iemocap-synth", "SYNTHETIC IEMOCAP shape-alike (4 classes, text strong)")(build_synth)
