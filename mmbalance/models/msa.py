"""CGGM/MulT sequence model shared by the sequence-feature datasets (MOSI, IEMOCAP, Food-101).

``msa_transformer``: per-modality 1×1 projection to ``d_model``, pre-LN MulT transformer encoders,
transformer fusion over the time-concatenated sequences (position 0 out), residual head
(``docs/datasets/mosi.md`` §2, ``iemocap.md`` §2, ``food101.md`` §4).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..registry import register_model
from .base import MultimodalModel
from .mmtm import MMTMModel


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


_SINUSOIDS: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}


def _sinusoids_on(num: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """:func:`fairseq_sinusoids` on ``device`` in ``dtype``, built and copied there once per shape (not
    once per forward: on a GPU each copy is a blocking host→device copy)."""
    key = (num, dim, device, dtype)
    table = _SINUSOIDS.get(key)
    if table is None:
        if len(_SINUSOIDS) > 64:  # many sequence lengths: keep the cache bounded
            _SINUSOIDS.clear()
        table = _SINUSOIDS[key] = fairseq_sinusoids(num, dim).to(device, dtype)
    return table


def padded_positions(x: torch.Tensor, d: int) -> torch.Tensor:
    """Sinusoidal embeddings for a [B, L, d] input: position t+1 for step t, 0 (zero vector) where the
    first channel is exactly 0 (MulT padding rule)."""
    length = x.shape[1]
    pos = torch.arange(1, length + 1, device=x.device).expand(x.shape[0], length)
    pos = pos.masked_fill(x[..., 0] == 0, 0)
    return _sinusoids_on(length + 1, d, x.device, x.dtype)[pos]


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
        return padded_positions(x, self.d)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed_dropout(self.scale * x + self.positions(x))
        for layer in self.layers:
            h = layer(h, key_padding_mask)
        return self.norm(h)


class MSAModalityEncoder(nn.Module):
    """Conv1d(d_in → d, kernel 1) projection (bias-free in MulT/MSAModel, with bias in CGGM's FoodModel),
    then the modality's TransformerEncoder (``body``). Inputs of any float dtype (fp16 cached features)
    are cast to the projection's dtype. ``key_padding``: mask time steps whose input features are all
    exactly zero (length masks)."""

    def __init__(self, in_dim: int, d: int, body: MSATransformerEncoder, key_padding: bool = False,
                 proj_bias: bool = False) -> None:
        super().__init__()
        self.proj = nn.Conv1d(in_dim, d, kernel_size=1, bias=proj_bias)
        self.body = body
        self.key_padding = key_padding
        self.out_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.proj.weight.dtype)
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
                    key_padding: Sequence[str] = (), proj_bias: bool = False) -> MSAModel:
    """``nlevels`` layers per modality encoder; fusion ``nlevels − 2`` layers unless ``fusion_layers``
    is given (mosi.md §2: 5/3; iemocap.md §2: 4/2; food101.md §4: 4/2 with ``proj_bias=True`` and separate
    image/text projections — the official shared projection is a bug)."""
    block = {"d": d_model, "heads": num_heads, "attn_dropout": attn_dropout, "relu_dropout": relu_dropout,
             "res_dropout": res_dropout, "embed_dropout": embed_dropout}
    n_fusion = max(1, nlevels - 2) if fusion_layers is None else fusion_layers
    encoders = {m: MSAModalityEncoder(input_shapes[m][-1], d_model, MSATransformerEncoder(layers=nlevels, **block),
                                      m in set(key_padding), proj_bias) for m in modalities}
    fusion = MSAFusion(modalities, MSATransformerEncoder(layers=n_fusion, **block))
    return MSAModel(encoders, fusion, MSAHead(d_model, out_dim, out_dropout), block=block,
                    feature_kinds={m: "sequence" for m in modalities}, feature_dims={m: d_model for m in modalities},
                    out_dim=out_dim, fusion_input="features")


# ------------------------------------------------------------------------------------ MMTM variant (Greedy)
class MSAInputStage(nn.Module):
    """First stage of an MMTM branch: the modality's Conv1d projection, then √D·x + positions(x) and
    the embedding dropout of its :class:`MSATransformerEncoder` (the same computation as the canonical
    encoder up to its first layer)."""

    def __init__(self, proj: nn.Conv1d, body: MSATransformerEncoder) -> None:
        super().__init__()
        self.proj = proj
        self.d, self.scale = body.d, body.scale
        self.embed_dropout = body.embed_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x.to(self.proj.weight.dtype).transpose(1, 2)).transpose(1, 2)
        return self.embed_dropout(self.scale * h + padded_positions(h, self.d))


class MSALastStage(nn.Module):
    """Last stage of an MMTM branch: the encoder's last layer followed by its final LayerNorm, so the
    MMTM block after the last layer gates the encoder output h_m."""

    def __init__(self, layer: MSALayer, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.layer = layer
        self.norm = norm

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm(self.layer(x, key_padding_mask))


class MSABranchHead(nn.Module):
    """Branch head of the MMTM variant: position 0 of h_m → the residual head (greedy.md §3.1)."""

    def __init__(self, head: MSAHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z[:, 0])

    def final_layer(self) -> nn.Module:
        return self.head.out_layer


class MSAMMTMModel(MMTMModel):
    """:class:`MMTMModel` whose branch stages are [input stage, layer 1, …, layer L−1, layer L + norm].
    Layer stages receive the branch's key-padding mask (computed from the raw input as in
    :class:`MSAModalityEncoder`), so ``key_padding`` behaves as in the canonical model."""

    def __init__(self, *args: Any, key_padding: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key_padding = [m for m in self.modalities if m in set(key_padding)]

    def encode(self, inputs: dict[str, torch.Tensor], absent: Any = ()) -> dict[str, torch.Tensor]:
        absent = set(absent)
        unknown = absent - set(self.modalities)
        if unknown:
            raise KeyError(f"absent modalities {sorted(unknown)} are not in the model ({self.modalities})")
        x = {m: self.neutral_input(m, inputs[m]) if m in absent else inputs[m] for m in self.modalities}
        masks: dict[str, torch.Tensor | None] = {}
        for m in self.modalities:
            mask = None
            if m in self.key_padding:
                mask = (x[m] == 0).all(dim=-1)
                mask = mask & ~mask.all(dim=1, keepdim=True)  # a fully padded (absent) sequence stays unmasked
            masks[m] = mask
        h = x
        blocks = iter(self.mmtm_blocks)
        for s in range(len(self.encoders[self.modalities[0]])):
            h = {m: self.encoders[m][s](h[m]) if s == 0 else self.encoders[m][s](h[m], masks[m])
                 for m in self.modalities}
            if s in self.positions:
                h = dict(zip(self.modalities, next(blocks)([h[m] for m in self.modalities])))
        return h


@register_model("msa_mmtm", "mmtm variant of msa_transformer: per-modality MulT encoders as branches, MMTM "
                "(mean over time) after the last 3 encoder layers, residual head per branch (Greedy)")
def msa_mmtm(*, modalities: list[str], input_shapes: dict[str, tuple[int, ...]], out_dim: int,
             d_model: int = 40, num_heads: int = 5, nlevels: int = 5, fusion_layers: int | None = None,
             attn_dropout: float = 0.15, relu_dropout: float = 0.15, res_dropout: float = 0.1,
             embed_dropout: float = 0.2, out_dropout: float = 0.1, key_padding: Sequence[str] = (),
             proj_bias: bool = False, ratio: int = 4) -> MSAMMTMModel:
    """greedy.md §3.1 MOSI / IEMOCAP / Food-101 rows. Branch m = the canonical modality encoder of
    :func:`msa_transformer` (same projection, ``nlevels`` pre-LN layers and final LayerNorm); MMTM blocks
    (ratio 4, squeeze = mean over time) after the last three layers — layers 3, 4, 5 for MOSI
    (``nlevels`` 5), 2, 3, 4 for IEMOCAP and Food-101 (4), every layer when there are fewer; the block
    after the last layer gates h_m after the final LayerNorm. Branch head: position 0 → the canonical
    residual head (Linear(d, out_dim) last). No fusion encoder (``fusion_layers`` is accepted and unused,
    so that the dataset's model options apply unchanged)."""
    block = {"d": d_model, "heads": num_heads, "attn_dropout": attn_dropout, "relu_dropout": relu_dropout,
             "res_dropout": res_dropout, "embed_dropout": embed_dropout}
    branches, heads, dims = {}, {}, {}
    for m in modalities:
        body = MSATransformerEncoder(layers=nlevels, **block)
        proj = nn.Conv1d(input_shapes[m][-1], d_model, kernel_size=1, bias=proj_bias)
        layers = list(body.layers)
        stages: list[nn.Module] = [MSAInputStage(proj, body), *layers[:-1], MSALastStage(layers[-1], body.norm)]
        branches[m] = nn.ModuleList(stages)
        heads[m] = MSABranchHead(MSAHead(d_model, out_dim, out_dropout))
        dims[m] = [d_model] * len(stages)
    positions = list(range(max(1, nlevels - 2), nlevels + 1))
    return MSAMMTMModel(branches, heads, positions, dims, feature_kinds={m: "sequence" for m in modalities},
                        feature_dims={m: d_model for m in modalities}, out_dim=out_dim, ratio=ratio,
                        key_padding=key_padding)
