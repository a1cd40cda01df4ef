"""Heads: linear, MLP, the MulT/CGGM residual head, and unimodal heads for methods."""
from __future__ import annotations

import torch
from torch import nn

from .base import pool_feature


class LinearHead(nn.Linear):
    """A plain Linear head (decomposable over concatenated modality features)."""

    is_linear = True

    def final_layer(self) -> nn.Module:
        return self


class MLPHead(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(x))

    def final_layer(self) -> nn.Module:
        return self.out


class ResidualHead(nn.Module):
    """MulT/CGGM head: h = proj2(dropout(relu(proj1(x)))) + x; y = out_layer(h)."""

    def __init__(self, dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj1 = nn.Linear(dim, dim)
        self.proj2 = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.out_layer = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj2(self.dropout(torch.relu(self.proj1(x)))) + x
        return self.out_layer(h)

    def final_layer(self) -> nn.Module:
        return self.out_layer


class UnimodalHead(nn.Module):
    """Head on one modality's features z_m (vector or batch-first sequence)."""

    def __init__(self, kind_of_feature: str, dim: int, out_dim: int, kind: str = "linear",
                 hidden: int | None = None, num_heads: int = 5, num_layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        if kind not in {"linear", "mlp", "cggm"}:
            raise ValueError(f"unknown unimodal head kind {kind!r}; valid: linear, mlp, cggm")
        self.feature_kind = kind_of_feature
        self.encoder: nn.Module | None = None
        if kind == "cggm" and kind_of_feature == "sequence":
            heads = num_heads if dim % num_heads == 0 else 1
            layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        hidden = hidden or dim
        self.body: nn.Module = nn.Identity() if kind == "linear" else nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.out = nn.Linear(dim if kind == "linear" else hidden, out_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.encoder is not None:
            z = self.encoder(z)
        return self.out(self.body(pool_feature(z, self.feature_kind)))

    def final_layer(self) -> nn.Module:
        return self.out


def dense_unimodal_head(model: nn.Module, m: str) -> nn.Module | None:
    """The model's own per-modality segmentation decoder, ``make_unimodal_head(m, "dense")``, when its
    class defines that factory (BraTS ``deeplab_multi``: the one-input DeepLabV3+ decoder on (ASPP_m,
    layer1_m) + final 1×1 conv, logits upsampled to the input size); None for models without one (the
    caller then builds a light head for full-resolution feature maps)."""
    from .base import MultimodalModel

    if type(model).make_unimodal_head is MultimodalModel.make_unimodal_head:
        return None
    return model.make_unimodal_head(m, "dense")
