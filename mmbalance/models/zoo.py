"""Registered generic model builders."""
from __future__ import annotations

import torch
from torch import nn

from ..registry import register_model
from .base import MultimodalModel
from .encoders import MLPEncoder, SequenceTransformerEncoder
from .fusion import ConcatFusion, TransformerFusion
from .heads import LinearHead, MLPHead, ResidualHead


@register_model("mlp_concat", "per-modality MLP encoders, concat fusion, linear (or MLP) head")
def mlp_concat(*, modalities: list[str], input_shapes: dict[str, tuple[int, ...]], out_dim: int,
               enc_hidden: int = 128, enc_out: int = 64, head: str = "linear", head_hidden: int = 128,
               dropout: float = 0.0) -> MultimodalModel:
    """mfeat canonical model (mfeat.md §7): MLP(d→128→64) per view → concat → Linear(64·M, C)."""
    encoders = {m: MLPEncoder(input_shapes[m][-1], enc_hidden, enc_out, dropout) for m in modalities}
    dims = {m: enc_out for m in modalities}
    fusion = ConcatFusion(dims)
    if head == "linear":
        head_mod = LinearHead(fusion.out_dim, out_dim)
    elif head == "mlp":
        head_mod = MLPHead(fusion.out_dim, head_hidden, out_dim, dropout)
    else:
        raise ValueError(f"mlp_concat: head must be 'linear' or 'mlp', got {head!r}")
    return MultimodalModel(encoders, fusion, head_mod, feature_kinds={m: "vector" for m in modalities},
                           feature_dims=dims, out_dim=out_dim)


@register_model("seq_transformer", "sequence transformer encoders, transformer fusion, residual head")
def seq_transformer(*, modalities: list[str], input_shapes: dict[str, tuple[int, ...]], out_dim: int,
                    d_model: int = 40, encoder_layers: int = 4, fusion_layers: int = 2, num_heads: int = 8,
                    dropout: float = 0.1, embed_dropout: float = 0.25, out_dropout: float = 0.0,
                    fusion: str = "transformer", max_len: int = 2048) -> MultimodalModel:
    """CGGM-style model: per-modality 1×1 projection to ``d_model`` + TransformerEncoder, transformer
    fusion over the concatenated sequences, residual head (CGGM paper §4 / appendix)."""
    encoders = {m: SequenceTransformerEncoder(input_shapes[m][-1], d_model, encoder_layers, num_heads, dropout,
                                              embed_dropout, max_len) for m in modalities}
    dims = {m: d_model for m in modalities}
    kinds = {m: "sequence" for m in modalities}
    if fusion == "transformer":
        fusion_mod = TransformerFusion(modalities, d_model, fusion_layers, num_heads, dropout,
                                       max_len=max_len * len(modalities) + 1)
        return MultimodalModel(encoders, fusion_mod, ResidualHead(d_model, out_dim, out_dropout),
                               feature_kinds=kinds, feature_dims=dims, out_dim=out_dim, fusion_input="features")
    if fusion == "concat":
        cat = ConcatFusion(dims)
        return MultimodalModel(encoders, cat, LinearHead(cat.out_dim, out_dim), feature_kinds=kinds,
                               feature_dims=dims, out_dim=out_dim)
    raise ValueError(f"seq_transformer: fusion must be 'transformer' or 'concat', got {fusion!r}")


@register_model("mlp_transformer_fusion", "MLP encoders with transformer fusion over modality tokens")
def mlp_transformer_fusion(*, modalities: list[str], input_shapes: dict[str, tuple[int, ...]], out_dim: int,
                           enc_hidden: int = 128, enc_out: int = 64, fusion_layers: int = 1, num_heads: int = 4,
                           dropout: float = 0.0) -> MultimodalModel:
    """Non-decomposable fusion for vector data: each modality's z_m is one token (AGM's use case)."""
    encoders = {m: MLPEncoder(input_shapes[m][-1], enc_hidden, enc_out) for m in modalities}
    fusion = TransformerFusion(modalities, enc_out, fusion_layers, num_heads, dropout, max_len=len(modalities) + 1)
    return MultimodalModel(encoders, fusion, ResidualHead(enc_out, out_dim, dropout),
                           feature_kinds={m: "vector" for m in modalities}, feature_dims={m: enc_out for m in modalities},
                           out_dim=out_dim, fusion_input="features")


class ConvEncoder(nn.Sequential):
    """Small per-modality 2-D encoder for segmentation: two 3×3 conv blocks keeping the resolution."""

    def __init__(self, in_ch: int, width: int = 16) -> None:
        super().__init__(nn.Conv2d(in_ch, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.out_dim = width


class ChannelConcatFusion(nn.Module):
    """Concatenate feature maps along channels; ``slices[m]`` = m's channels."""

    def __init__(self, dims: dict[str, int]) -> None:
        super().__init__()
        self.order = list(dims)
        self.slices, start = {}, 0
        for m, d in dims.items():
            self.slices[m] = slice(start, start + d)
            start += d
        self.out_dim = start

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([features[m] for m in self.order], dim=1)


class ConvSegHead(nn.Module):
    """3×3 conv block then the final 1×1 conv to class logits."""

    def __init__(self, in_ch: int, out_dim: int, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(width, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))

    def final_layer(self) -> nn.Module:
        return self.out


@register_model("conv_seg", "small per-modality conv encoders, channel-concat fusion, conv head (segmentation)")
def conv_seg(*, modalities: list[str], input_shapes: dict[str, tuple[int, ...]], out_dim: int,
             width: int = 16, head_width: int = 32) -> MultimodalModel:
    """Light segmentation model for synthetic/tests: inputs [B, C_m, H, W] → logits [B, out_dim, H, W]."""
    encoders = {m: ConvEncoder(input_shapes[m][0], width) for m in modalities}
    dims = {m: width for m in modalities}
    fusion = ChannelConcatFusion(dims)
    return MultimodalModel(encoders, fusion, ConvSegHead(fusion.out_dim, out_dim, head_width),
                           feature_kinds={m: "map" for m in modalities}, feature_dims=dims, out_dim=out_dim,
                           fusion_input="features")
