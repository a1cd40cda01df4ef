"""Fusion modules."""
from __future__ import annotations

import torch
from torch import nn

from .encoders import sinusoidal_positions


class ConcatFusion(nn.Module):
    """Concatenate pooled features in modality order; ``slices[m]`` = m's columns in the result."""

    def __init__(self, dims: dict[str, int]) -> None:
        super().__init__()
        self.order = list(dims)
        self.slices: dict[str, slice] = {}
        start = 0
        for m, d in dims.items():
            self.slices[m] = slice(start, start + d)
            start += d
        self.out_dim = start

    def forward(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([pooled[m] for m in self.order], dim=-1)


class TransformerFusion(nn.Module):
    """Concatenate the modality sequences in time (with learned modality embeddings and a leading
    fusion token), run a TransformerEncoder, return the fusion token's output [B, d]."""

    def __init__(self, modalities: list[str], d_model: int = 40, num_layers: int = 2, num_heads: int = 8,
                 dropout: float = 0.1, max_len: int = 4096) -> None:
        super().__init__()
        self.order = list(modalities)
        heads = num_heads if d_model % num_heads == 0 else 1
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout, batch_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.modality_embedding = nn.Parameter(torch.zeros(len(modalities), d_model))
        nn.init.normal_(self.modality_embedding, std=0.02)
        self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)
        self.out_dim = d_model

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        seqs = []
        for k, m in enumerate(self.order):
            z = features[m]
            if z.dim() == 2:
                z = z.unsqueeze(1)
            seqs.append(z + self.modality_embedding[k])
        h = torch.cat([self.token.expand(seqs[0].shape[0], -1, -1).to(seqs[0].dtype)] + seqs, dim=1)
        h = h + self.positions[: h.shape[1]].to(h.dtype)
        return self.layers(h)[:, 0]
