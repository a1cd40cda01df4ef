"""avdigits canonical model ``av_gru_mlp`` and its MMTM variant ``av_gru_mlp_mmtm``.

The audio input is ``[B, T, 13 + 1]``: 13 MFCCs and a validity channel (> 0 on real frames, 0 on
padding; padding sits at the end of each clip). The audio encoders read only the valid frames, so a
padded and an unpadded copy of a clip give the same feature. An all-zero input (``absent``) is an
empty clip: its length is clamped to one all-zero frame, which gives one constant, finite feature.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..registry import register_model
from .base import MultimodalModel
from .encoders import MLPEncoder
from .fusion import ConcatFusion
from .heads import LinearHead
from .mmtm import MMTMModel, _PooledHead


def split_audio(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(MFCC frames [B, T, C], validity [B, T] bool, lengths [B] ≥ 1) of a masked audio tensor.

    Validity is ``channel > 0`` (not its value): input-level rescaling (MRD) multiplies the whole
    tensor, mask channel included."""
    feats, valid = x[..., :-1], x[..., -1] > 0
    lengths = valid.sum(dim=1).clamp_min(1)
    return feats, valid, lengths


class GRUAudioEncoder(nn.Module):
    """Unidirectional GRU(13 → 64); z = the output at the clip's last valid step ℓ − 1.

    The input is cut to the batch's longest clip first: a unidirectional GRU's output at step ℓ − 1 does
    not depend on later steps, so the cut only saves time (padding lies after ℓ)."""

    def __init__(self, in_dim: int = 13, hidden: int = 64) -> None:
        super().__init__()
        self.gru = nn.GRU(in_dim, hidden, num_layers=1, batch_first=True)
        self.out_dim = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats, valid, lengths = split_audio(x)
        # one host sync per forward: the cut length must be a Python int to slice
        t_max = int(lengths.max())
        feats = feats[:, :t_max] * valid[:, :t_max].unsqueeze(-1).to(feats.dtype)
        out, _ = self.gru(feats)
        last = (lengths - 1).view(-1, 1, 1).expand(-1, 1, out.shape[-1])
        return out.gather(1, last).squeeze(1)


class ConvAudioEncoder(nn.Module):
    """Conv1d(13, 64, 5, pad 2) → ReLU → Conv1d(64, 64, 5, pad 2) → ReLU → masked mean over valid frames.

    The hidden sequence is zeroed on padding after the first block, so the second convolution sees the
    same zeros at the clip's end as with an unpadded clip (no leak of padded positions)."""

    def __init__(self, in_dim: int = 13, hidden: int = 64, kernel: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(in_dim, hidden, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2)
        self.out_dim = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats, valid, lengths = split_audio(x)
        t_max = int(lengths.max())
        feats, valid = feats[:, :t_max], valid[:, :t_max]
        first = torch.zeros_like(valid)
        first[:, 0] = True
        valid = valid | (first & ~valid.any(dim=1, keepdim=True))  # empty clip (absent): one all-zero frame
        m = valid.unsqueeze(1).to(feats.dtype)  # [B, 1, T]
        h = torch.relu(self.conv1((feats.transpose(1, 2)) * m)) * m
        h = torch.relu(self.conv2(h)) * m
        return h.sum(-1) / m.sum(-1)


AUDIO_ENCODERS = {"gru": GRUAudioEncoder, "conv": ConvAudioEncoder}


def _encoders(modalities: list[str], input_shapes: dict[str, tuple[int, ...]], audio_encoder: str,
              audio_hidden: int, enc_hidden: int, enc_out: int) -> dict[str, nn.Module]:
    if audio_encoder not in AUDIO_ENCODERS:
        raise ValueError(f"audio_encoder must be one of {', '.join(AUDIO_ENCODERS)}, got {audio_encoder!r}")
    out: dict[str, nn.Module] = {}
    for m in modalities:
        if m == "audio":
            out[m] = AUDIO_ENCODERS[audio_encoder](input_shapes[m][-1] - 1, audio_hidden)
        else:
            out[m] = MLPEncoder(input_shapes[m][-1], enc_hidden, enc_out)
    return out


def _dims(encoders: dict[str, nn.Module]) -> dict[str, int]:
    return {m: int(e.out_dim) for m, e in encoders.items()}


@register_model("av_gru_mlp", "avdigits: GRU audio encoder (masked sequences), MLP image encoder, concat, linear head")
def av_gru_mlp(*, modalities: list[str], input_shapes: dict[str, tuple[int, ...]], out_dim: int,
               audio_encoder: str = "gru", audio_hidden: int = 64, enc_hidden: int = 128,
               enc_out: int = 64) -> MultimodalModel:
    """[z_audio; z_image] → Linear(128, 10). Audio: GRU(13, 64) at the last valid step (or the conv
    encoder); image: MLP 64 → 128 → 64 (as mfeat). ``<m>``-only: encoder_m → Linear(64, 10)."""
    encoders = _encoders(modalities, input_shapes, audio_encoder, audio_hidden, enc_hidden, enc_out)
    dims = _dims(encoders)
    fusion = ConcatFusion(dims)
    return MultimodalModel(encoders, fusion, LinearHead(fusion.out_dim, out_dim),
                           feature_kinds={m: "vector" for m in modalities}, feature_dims=dims, out_dim=out_dim)


@register_model("av_gru_mlp_mmtm", "mmtm variant of av_gru_mlp: one MMTM block on (z_audio, z_image), a head per branch")
def av_gru_mlp_mmtm(*, modalities: list[str], input_shapes: dict[str, tuple[int, ...]], out_dim: int,
                    audio_encoder: str = "gru", audio_hidden: int = 64, enc_hidden: int = 128, enc_out: int = 64,
                    ratio: int = 4, **_ignored: Any) -> MMTMModel:
    """Greedy's model on avdigits: each encoder is one stage, one MMTM block gates the two 64-d
    features, branch heads Linear(64, 10); prediction = mean of the branch outputs."""
    encoders = _encoders(modalities, input_shapes, audio_encoder, audio_hidden, enc_hidden, enc_out)
    dims = _dims(encoders)
    branches = {m: nn.ModuleList([e]) for m, e in encoders.items()}
    heads = {m: _PooledHead(LinearHead(dims[m], out_dim)) for m in modalities}
    return MMTMModel(branches, heads, [0], {m: [dims[m]] for m in modalities},
                     feature_kinds={m: "vector" for m in modalities}, feature_dims=dims, out_dim=out_dim,
                     ratio=ratio)
