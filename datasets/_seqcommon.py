"""Shared pieces of the sequence-feature datasets (CMU-MOSI, IEMOCAP): the CGGM ``MSAModel``
(registered as model ``msa_transformer``), pickle/array checks, fixed-length padding and the
generator of the synthetic shape-alikes.

Model (``docs/datasets/mosi.md`` §2, shared by ``iemocap.md`` §2): MulT/fairseq-style transformer
blocks — batch-first here ([B, L, D]; the official code is sequence-first, which changes no value) —
input scaled by √D, sinusoidal positions starting at 1 with a zero vector at padding steps (a step
whose first channel is exactly 0), embedding dropout, pre-LayerNorm layers, final LayerNorm, no
attention masks (unless ``key_padding`` names modalities whose all-zero steps are masked).
"""
from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmbalance.errors import DatasetFormatError

log = logging.getLogger("mmbalance.datasets")


# =============================================================================== file helpers
def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_pickle(path: Path, dataset: str) -> Any:
    """``pickle.load``; on ``UnicodeDecodeError`` retry with ``encoding="latin1"`` (Python-2 pickles)."""
    try:
        with open(path, "rb") as f:
            try:
                return pickle.load(f)
            except UnicodeDecodeError:
                f.seek(0)
                return pickle.load(f, encoding="latin1")
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a format error
        raise DatasetFormatError(f"{dataset}: {path}: cannot unpickle ({type(exc).__name__}: {exc})") from None


def split_dict(obj: Any, split: str, path: Path, dataset: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{dataset}: {path}: expected a dict with keys 'train', 'valid', 'test', "
                                 f"got {type(obj).__name__}")
    if split not in obj:
        raise DatasetFormatError(f"{dataset}: {path}: missing split {split!r}; found keys: {sorted(map(str, obj))}")
    d = obj[split]
    if not isinstance(d, dict):
        raise DatasetFormatError(f"{dataset}: {path}: split {split!r} is a {type(d).__name__}, expected a dict")
    return d


def require_key(d: dict[str, Any], key: str, split: str, path: Path, dataset: str) -> Any:
    if key not in d:
        raise DatasetFormatError(f"{dataset}: {path}: split {split!r} lacks key {key!r}; "
                                 f"found keys: {sorted(map(str, d))}")
    return d[key]


def feature_array(value: Any, key: str, split: str, path: Path, dataset: str) -> tuple[np.ndarray, int]:
    """A 3-D float array (N, L, D) as float32 with every non-finite value replaced by 0 (−inf → 0 as
    MulT/CGGM do; NaN and +inf as well). Returns the array and the number of replaced values."""
    try:
        arr = np.asarray(value)
    except Exception:  # noqa: BLE001 - ragged lists etc.
        arr = np.asarray(value, dtype=object)
    if arr.ndim != 3 or arr.dtype.kind not in "fiu" or arr.shape[0] == 0:
        raise DatasetFormatError(f"{dataset}: {path}: split {split!r} key {key!r} has shape {arr.shape} "
                                 f"(dtype {arr.dtype}) but a non-empty 3-D float array (N, L, D) is required")
    arr = arr.astype(np.float32, copy=True)
    bad = ~np.isfinite(arr)
    n_bad = int(bad.sum())
    if n_bad == arr.size:  # padding is -inf in places; a modality with no finite value at all is corrupt
        raise DatasetFormatError(f"{dataset}: {path}: split {split!r} key {key!r}: all {n_bad} values are "
                                 "non-finite (NaN/inf); the modality holds no data")
    if n_bad:
        arr[bad] = 0.0
    return arr, n_bad


def fit_length(seqs: Sequence[np.ndarray], max_len: int) -> tuple[np.ndarray, int]:
    """Stack variable-length (T_i, D) sequences into (N, max_len, D): truncate to the first ``max_len``
    steps, zero-pad at the end. Returns the array and how many sequences were truncated."""
    dim = seqs[0].shape[1]
    out = np.zeros((len(seqs), max_len, dim), dtype=np.float32)
    truncated = 0
    for i, s in enumerate(seqs):
        if len(s) > max_len:
            truncated += 1
        t = min(len(s), max_len)
        out[i, :t] = s[:t]
    return out, truncated


# =============================================================================== synthetic
def orthonormal_rows(rs: np.random.RandomState, k: int, dim: int) -> np.ndarray:
    """k orthonormal rows in R^dim (k ≤ dim): each latent factor has unit gain whatever dim is, so
    the planted SNR does not grow with the feature dimension."""
    q, _ = np.linalg.qr(rs.normal(size=(dim, k)))
    return q.T.astype(np.float64)


def synthetic_sequences(rs: np.random.RandomState, latent: np.ndarray, views: dict[str, tuple[list[int], float]],
                        shapes: dict[str, tuple[int, int]], step_noise: float = 0.3) -> dict[str, np.ndarray]:
    """Per modality m with (latent columns c_m, amplitude a_m) and shape (L_m, D_m):
    x_i = (a_m·latent_i[c_m] @ P_m + ε_i)[None, :] + step_noise·ε_it, with P_m orthonormal rows and
    per-sample noise ε_i ~ N(0, I) (so averaging over time does not raise the SNR). Each sample has
    a length in [L_m/2, L_m], zero-padded at the end."""
    n = latent.shape[0]
    out = {}
    for m, (cols, amp) in views.items():
        length, dim = shapes[m]
        proj = orthonormal_rows(rs, len(cols), dim)
        base = amp * latent[:, cols] @ proj + rs.normal(size=(n, dim))
        x = (base[:, None, :] + step_noise * rs.normal(size=(n, length, dim))).astype(np.float32)
        lengths = rs.randint(max(1, length // 2), length + 1, size=n)
        x[np.arange(length)[None, :] >= lengths[:, None]] = 0.0
        out[m] = x
    return out
