"""Shared pieces of the sequence-feature datasets (CMU-MOSI, IEMOCAP): the CGGM ``MSAModel``
(registered as model ``msa_transformer``), pickle/array checks, fixed-length padding and the
generator of the synthetic shape-alikes.

Model (``specs/datasets/mosi.md`` §2, shared by ``iemocap.md`` §2): MulT/fairseq-style transformer
blocks — batch-first here ([B, L, D]; the official code is sequence-first, which changes no value) —
input scaled by √D, sinusoidal positions starting at 1 with a zero vector at padding steps (a step
whose first channel is exactly 0), embedding dropout, pre-LayerNorm layers, final LayerNorm, no
attention masks (unless ``key_padding`` names modalities whose all-zero steps are masked).
"""
from __future__ import annotations

import hashlib
import logging
import math
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmbalance.errors import DatasetFormatError
from mmbalance.models.base import MultimodalModel
from mmbalance.registry import register_model

log = logging.getLogger("mmbalance.datasets")


# =============================================================================== model
def fairseq_sinusoids(num: int, dim: int) -> torch.Tensor:
    """Table of ``num`` sinusoidal embeddings (fairseq/MulT layout: [sin | cos] halves, frequencies
    10000^(-i/(half-1))); row 0 is the padding position and is all zeros."""
    half = dim // 2
    step = math.log(10000.0) / max(1, half - 1)
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -step)
    ang = torch.arange(num, dtype=torch.float32).unsqueeze(1) * freq.unsqueeze(0)
    table = torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(num, 1)], dim=1)
    table[0] = 0.0
    return table


def _xavier_linear(d_in: int, d_out: int) -> nn.Linear:
    layer = nn.Linear(d_in, d_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.constant_(layer.bias, 0.0)
    return layer


class MSALayer(nn.Module):
    """Pre-LN layer: x + drop_res(MHA(LN(x))); x + drop_res(fc2(drop_relu(relu(fc1(LN(x))))))."""

    def __init__(self, d: int, heads: int, attn_dropout: float, relu_dropout: float, res_dropout: float) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=attn_dropout, batch_first=True)  # fused in_proj, Xavier
        self.ln_ffn = nn.LayerNorm(d)
        self.fc1 = _xavier_linear(d, 4 * d)
        self.fc2 = _xavier_linear(4 * d, d)
        self.relu_dropout = nn.Dropout(relu_dropout)
        self.res_dropout = nn.Dropout(res_dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_attn(x)
        h = self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)[0]
        x = x + self.res_dropout(h)
        h = self.fc2(self.relu_dropout(torch.relu(self.fc1(self.ln_ffn(x)))))
        return x + self.res_dropout(h)


class MSATransformerEncoder(nn.Module):
    """MulT ``TransformerEncoder``: √D·x + positions(x) → embed dropout → layers → LayerNorm."""

    def __init__(self, d: int = 40, heads: int = 5, layers: int = 5, attn_dropout: float = 0.15,
                 relu_dropout: float = 0.15, res_dropout: float = 0.1, embed_dropout: float = 0.2) -> None:
        super().__init__()
        self.d = d
        self.scale = math.sqrt(d)
        self.embed_dropout = nn.Dropout(embed_dropout)
        self.layers = nn.ModuleList(MSALayer(d, heads, attn_dropout, relu_dropout, res_dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def positions(self, x: torch.Tensor) -> torch.Tensor:
        """Position t+1 for step t, 0 (zero vector) where the first channel is exactly 0 (MulT padding rule)."""
        length = x.shape[1]
        pos = torch.arange(1, length + 1, device=x.device).expand(x.shape[0], length)
        pos = pos.masked_fill(x[..., 0] == 0, 0)
        return fairseq_sinusoids(length + 1, self.d).to(x.device, x.dtype)[pos]

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed_dropout(self.scale * x + self.positions(x))
        for layer in self.layers:
            h = layer(h, key_padding_mask)
        return self.norm(h)


class MSAModalityEncoder(nn.Module):
    """Conv1d(d_in → d, kernel 1, no bias) projection, then the modality's TransformerEncoder (``body``).
    ``key_padding``: mask time steps whose input features are all exactly zero (length masks)."""

    def __init__(self, in_dim: int, d: int, body: MSATransformerEncoder, key_padding: bool = False) -> None:
        super().__init__()
        self.proj = nn.Conv1d(in_dim, d, kernel_size=1, bias=False)
        self.body = body
        self.key_padding = key_padding
        self.out_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.key_padding:
            mask = (x == 0).all(dim=-1)
            mask = mask & ~mask.all(dim=1, keepdim=True)  # a fully padded (absent) sequence stays unmasked
        return self.body(self.proj(x.transpose(1, 2)).transpose(1, 2), mask)


class MSAFusion(nn.Module):
    """Concatenate h_m along time in modality order → TransformerEncoder → position 0 (first step of
    the first modality, i.e. text)."""

    def __init__(self, modalities: Sequence[str], body: MSATransformerEncoder) -> None:
        super().__init__()
        self.order = list(modalities)
        self.body = body
        self.out_dim = body.d

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.body(torch.cat([features[m] for m in self.order], dim=1))[:, 0]


class MSAHead(nn.Module):
    """h + proj2(dropout(relu(proj1(h)))) → ``out_layer`` (MulT/CGGM residual head)."""

    def __init__(self, d: int, out_dim: int, out_dropout: float) -> None:
        super().__init__()
        self.proj1 = nn.Linear(d, d)
        self.proj2 = nn.Linear(d, d)
        self.dropout = nn.Dropout(out_dropout)
        self.out_layer = nn.Linear(d, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out_layer(h + self.proj2(self.dropout(torch.relu(self.proj1(h)))))

    def final_layer(self) -> nn.Module:
        return self.out_layer


class MSASequenceClassifier(nn.Module):
    """CGGM auxiliary classifier for sequence features (``methods/cggm.md`` §3.1): TransformerEncoder
    (2 layers, the main model's dropouts) → position 0 → Linear(d, d) → ReLU → Linear(d, C). The
    official code applies the hidden projection twice (a bug); it is applied once here."""

    def __init__(self, d: int, out_dim: int, body: MSATransformerEncoder) -> None:
        super().__init__()
        self.body = body
        self.hidden = nn.Linear(d, d)
        self.out = nn.Linear(d, out_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(self.body(z)[:, 0])))

    def final_layer(self) -> nn.Module:
        return self.out


class MSAModel(MultimodalModel):
    """CGGM ``MSAModel`` on the :class:`MultimodalModel` contract. ``encoder_parameters(m, scope)``:
    ``encoder_body`` = the TransformerEncoder only (CGGM scope), ``modality_all`` = with the projection."""

    def __init__(self, *args: Any, block: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.block = dict(block)  # d, heads, dropouts (reused by the CGGM classifier)

    def _scoped(self, m: str, scope: str) -> nn.Module:
        if scope == "modality_all":
            return self.encoders[m]
        if scope == "encoder_body":
            return self.encoders[m].body
        raise ValueError(f"unknown encoder scope {scope!r}; valid: encoder_body, modality_all")

    def encoder_parameters(self, m: str, scope: str = "modality_all") -> Iterator[nn.Parameter]:
        return self._scoped(m, scope).parameters()

    def encoder_named_parameters(self, m: str, scope: str = "modality_all") -> Iterator[tuple[str, nn.Parameter]]:
        prefix = f"encoders.{m}" + ("" if scope == "modality_all" else ".body")
        return ((f"{prefix}.{n}", p) for n, p in self._scoped(m, scope).named_parameters())

    def make_unimodal_head(self, m: str, kind: str = "linear") -> nn.Module:
        if kind == "cggm":
            body = MSATransformerEncoder(layers=2, **self.block)
            return MSASequenceClassifier(self.block["d"], self.out_dim, body)
        return super().make_unimodal_head(m, kind)


@register_model("msa_transformer", "CGGM MSAModel: 1x1 projections, pre-LN sequence transformers, "
                "time-concat transformer fusion, residual head (MOSI/IEMOCAP)")
def msa_transformer(*, modalities: list[str], input_shapes: dict[str, tuple[int, ...]], out_dim: int,
                    d_model: int = 40, num_heads: int = 5, nlevels: int = 5, fusion_layers: int | None = None,
                    attn_dropout: float = 0.15, relu_dropout: float = 0.15, res_dropout: float = 0.1,
                    embed_dropout: float = 0.2, out_dropout: float = 0.1,
                    key_padding: Sequence[str] = ()) -> MSAModel:
    """``nlevels`` layers per modality encoder; fusion ``nlevels − 2`` layers unless ``fusion_layers``
    is given (mosi.md §2: 5/3; iemocap.md §2: 4/2)."""
    block = {"d": d_model, "heads": num_heads, "attn_dropout": attn_dropout, "relu_dropout": relu_dropout,
             "res_dropout": res_dropout, "embed_dropout": embed_dropout}
    n_fusion = max(1, nlevels - 2) if fusion_layers is None else fusion_layers
    encoders = {m: MSAModalityEncoder(input_shapes[m][-1], d_model, MSATransformerEncoder(layers=nlevels, **block),
                                      m in set(key_padding)) for m in modalities}
    fusion = MSAFusion(modalities, MSATransformerEncoder(layers=n_fusion, **block))
    return MSAModel(encoders, fusion, MSAHead(d_model, out_dim, out_dropout), block=block,
                    feature_kinds={m: "sequence" for m in modalities}, feature_dims={m: d_model for m in modalities},
                    out_dim=out_dim, fusion_input="features")


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
