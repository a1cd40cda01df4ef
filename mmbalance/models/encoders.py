"""Per-modality encoders."""
from __future__ import annotations

import math

import torch
from torch import nn


class MLPEncoder(nn.Sequential):
    """Linear(d, hidden) → ReLU → Linear(hidden, out) → ReLU (mfeat.md §7)."""

    def __init__(self, in_dim: int, hidden: int = 128, out_dim: int = 64, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(hidden, out_dim), nn.ReLU()]
        super().__init__(*layers)
        self.out_dim = out_dim


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: pe[:, 1::2].shape[1]])
    return pe


class SequenceTransformerEncoder(nn.Module):
    """MulT/CGGM-style sequence encoder: 1×1 Conv1d projection to ``d_model`` → scaled input +
    sinusoidal positions → TransformerEncoder. Input [B, L, d_in]; output [B, L, d_model]."""

    def __init__(self, in_dim: int, d_model: int = 40, num_layers: int = 4, num_heads: int = 8,
                 dropout: float = 0.1, embed_dropout: float = 0.25, max_len: int = 2048) -> None:
        super().__init__()
        self.proj = nn.Conv1d(in_dim, d_model, kernel_size=1, bias=False)
        heads = num_heads if d_model % num_heads == 0 else 1
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout, batch_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.embed_dropout = nn.Dropout(embed_dropout)
        self.scale = math.sqrt(d_model)
        self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)
        self.out_dim = d_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x.transpose(1, 2)).transpose(1, 2)
        length = h.shape[1]
        if length > self.positions.shape[0]:
            raise ValueError(f"sequence length {length} exceeds max_len {self.positions.shape[0]}")
        h = self.embed_dropout(self.scale * h + self.positions[:length].to(h.dtype))
        return self.layers(h)
