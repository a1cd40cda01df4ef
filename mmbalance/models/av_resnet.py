"""The audio-visual field's model ``av_resnet18`` (OGM-GE ``AVClassifier``, trained from scratch) and its
MMTM variant ``av_resnet18_mmtm`` (Greedy).

Audio: ResNet-18 (BasicBlock × [2, 2, 2, 2], widths w·[1, 2, 4, 8], 7×7/2 stem with ONE input channel,
max-pool, no fc) on a spectrogram [B, 1, F, T] → [B, 8w, F/32, T/32]. Visual: ResNet-18 (3 input
channels) on the T frames as one batch [B·T, 3, S, S] → [B, 8w, T, S/32, S/32]. Both are feature
``map`` s: pooling is the mean over every non-channel axis (adaptive average pooling; for the visual
stream this is the temporal pooling too). Fusion: concatenation [a; v] → Linear(16w, C), so
``split_head`` gives audio columns [0:8w] and visual [8w:16w] (OGM-GE's unimodal logits).

The ResNets are timm's ``ResNet`` built from its ``BasicBlock`` (``timm.models.resnet``), never loaded
with weights. Initialisation as OGM-GE's ``weight_init``: Conv2d Kaiming normal (fan_out, ReLU),
BatchNorm weight 1 / bias 0, Linear Xavier normal with bias 0. ``width`` (64 = ResNet-18) shrinks both
encoders for CPU tests.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..registry import register_model
from .base import MultimodalModel
from .fusion import ConcatFusion
from .heads import LinearHead
from .mmtm import MMTMModel, _PooledHead


def resnet18_stages(in_chans: int, width: int = 64, blocks: tuple[int, ...] = (2, 2, 2, 2)) -> list[nn.Module]:
    """[stem + layer1, layer2, layer3, layer4] of a timm ResNet-18 (no classifier, no pooling)."""
    from timm.models.resnet import BasicBlock, ResNet

    net = ResNet(BasicBlock, tuple(blocks), num_classes=0, in_chans=in_chans, global_pool="", stem_width=width,
                 channels=tuple(width * 2 ** i for i in range(4)), zero_init_last=False)
    stem = nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool, net.layer1)
    return [stem, net.layer2, net.layer3, net.layer4]


def ogm_weight_init(module: nn.Module) -> None:
    """OGM-GE ``weight_init``: Conv2d Kaiming normal (fan_out, ReLU), BatchNorm 1/0, Linear Xavier normal, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class PerFrame(nn.Module):
    """Apply a 2-D module to every frame: [B, C, T, H, W] → [B, C', T, H', W'] (frames as one batch)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.module(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class SpectrogramResNet(nn.Sequential):
    """Audio encoder: ResNet-18 on [B, 1, F, T] → feature map [B, 8w, F', T']."""

    def __init__(self, width: int = 64, in_chans: int = 1) -> None:
        super().__init__(*resnet18_stages(in_chans, width))
        self.out_dim = 8 * width


class FrameResNet(nn.Module):
    """Visual encoder: ResNet-18 on each of T frames [B, 3, T, S, S] → feature map [B, 8w, T, S', S']."""

    def __init__(self, width: int = 64, in_chans: int = 3) -> None:
        super().__init__()
        self.trunk = PerFrame(nn.Sequential(*resnet18_stages(in_chans, width)))
        self.out_dim = 8 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


def _encoder(m: str, shape: tuple[int, ...], width: int) -> nn.Module:
    if len(shape) == 3:
        return SpectrogramResNet(width, shape[0])
    if len(shape) == 4:
        return FrameResNet(width, shape[0])
    raise ValueError(f"av_resnet18: modality {m!r} has input shape {shape}; expected [C, F, T] (spectrogram) or "
                     "[C, T, H, W] (frames)")


@register_model("av_resnet18", "audio-visual: ResNet-18 spectrogram + ResNet-18 frames (temporal pooling), concat, linear")
def av_resnet18(*, modalities: list[str], input_shapes: dict[str, tuple[int, ...]], out_dim: int, width: int = 64,
                **_ignored: Any) -> MultimodalModel:
    """OGM-GE ``AVClassifier``: pooled [a; v] (2 × 512) → Linear(1024, C); ``<m>``-only: encoder → Linear(512, C)."""
    encoders = {m: _encoder(m, tuple(input_shapes[m]), width) for m in modalities}
    dims = {m: int(e.out_dim) for m, e in encoders.items()}
    fusion = ConcatFusion(dims)
    model = MultimodalModel(encoders, fusion, LinearHead(fusion.out_dim, out_dim),
                            feature_kinds={m: "map" for m in modalities}, feature_dims=dims, out_dim=out_dim)
    ogm_weight_init(model)
    return model


@register_model("av_resnet18_mmtm", "mmtm variant of av_resnet18: MMTM after layer2, layer3, layer4, a head per branch")
def av_resnet18_mmtm(*, modalities: list[str], input_shapes: dict[str, tuple[int, ...]], out_dim: int,
                     width: int = 64, ratio: int = 4, **_ignored: Any) -> MMTMModel:
    """Greedy's architecture on the ResNet-18 pair: each branch is [stem + layer1, layer2, layer3, layer4];
    MMTM blocks after layer2, layer3 and layer4 (the visual squeeze averages over T and space); branch
    heads Linear(8w, C) on the pooled map; prediction = mean of the branch outputs."""
    branches, heads, dims = {}, {}, {}
    for m in modalities:
        shape = tuple(input_shapes[m])
        stages = resnet18_stages(shape[0], width)
        if len(shape) == 4:
            stages = [PerFrame(s) for s in stages]
        elif len(shape) != 3:
            raise ValueError(f"av_resnet18_mmtm: modality {m!r} has input shape {shape}")
        branches[m] = nn.ModuleList(stages)
        heads[m] = _PooledHead(nn.Sequential(nn.Flatten(2), _MeanLast(), LinearHead(8 * width, out_dim)))
        dims[m] = [width * 2 ** i for i in range(4)]
    model = MMTMModel(branches, heads, [1, 2, 3], dims, feature_kinds={m: "map" for m in modalities},
                      feature_dims={m: 8 * width for m in modalities}, out_dim=out_dim, ratio=ratio)
    ogm_weight_init(model)
    return model


class _MeanLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(-1)
