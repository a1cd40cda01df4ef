"""Multimodal DeepLabV3+ for BraTS (``docs/datasets/brats2021.md`` §4; CGGM ``DeepLabMultiInput``).

Pure PyTorch (no torchvision import, README "Implementation constraints"). Per modality m:
ResNet backbone_m (one input channel; strides [1, 2, 2, 1], dilations [1, 1, 1, 2], multi-grid
[1, 2, 4] in layer4; output stride 16) → ASPP_m (dilations [1, 2, 4, 6], image pooling, dropout 0.5).
Fusion: channel concatenation of the four ASPP outputs and of the four layer1 (low-level) maps, then
the DeepLabV3+ decoder (1×1 reduction of the low-level maps to 48 channels, ``last_conv``); head: the
final 1×1 conv to the classes and bilinear upsampling to the input size.

What each encoder contributes to fusion (z_m, ``MultimodalModel`` contract) is ONE tensor:
``cat(up(ASPP_m), layer1_m)`` [B, C_aspp + C_low, H/4, W/4]. Bilinear upsampling is per channel, so
upsampling each ASPP output before the concatenation equals the official "concatenate, then upsample"
(same model, same function); it lets methods detach/pool z_m like any other feature. Encoder body of
m (CGGM's magnitude-modulation scope) = backbone_m + ASPP_m.

``backbone="smp:<encoder>"`` swaps the ResNet for a segmentation-models-pytorch encoder (imported
lazily; weights only from a local file, never downloaded); ASPP, decoder and head are unchanged.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BackboneNotFoundError, ConfigError
from ..registry import register_model
from .base import MultimodalModel
from .mmtm import MMTMModel

RESNET_BLOCKS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
#: ``brats2021.md`` §4.1: strides and dilations of layers 1–4 (output stride 16) and layer4 multi-grid.
STRIDES, DILATIONS, MULTI_GRID = (1, 2, 2, 1), (1, 1, 1, 2), (1, 2, 4)
#: ``brats2021.md`` §4.2: CGGM's ASPP dilations (changed from the usual [1, 6, 12, 18]).
ASPP_DILATIONS = (1, 2, 4, 6)
#: Spatial reduction of the low-level (layer1) features: z_m and the decoder live at H/4 × W/4.
LOW_LEVEL_STRIDE = 4


def _bn_relu(ch: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNetBackbone(nn.Module):
    """DeepLab ResNet (``brats2021.md`` §4.1): returns (layer1 features, layer4 features).

    ``blocks`` overrides the per-layer block counts and ``width`` the stem width (64 in ResNets) —
    small values give tiny CPU test models. Random initialisation (no ImageNet weights).
    """

    def __init__(self, depth: str = "resnet101", in_channels: int = 1, width: int = 64,
                 blocks: Sequence[int] | None = None) -> None:
        super().__init__()
        if depth not in RESNET_BLOCKS:
            raise ConfigError(f"deeplab_multi: unknown backbone {depth!r}; valid: {', '.join(RESNET_BLOCKS)} "
                              "or smp:<encoder name>")
        kind, default_blocks = RESNET_BLOCKS[depth]
        block = Bottleneck if kind == "bottleneck" else BasicBlock
        blocks = tuple(blocks) if blocks else default_blocks
        if len(blocks) != 4 or min(blocks) < 1:
            raise ConfigError(f"deeplab_multi: blocks must be 4 positive counts, got {list(blocks)}")
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.cin = width
        layers = []
        for i, (n, s, d) in enumerate(zip(blocks, STRIDES, DILATIONS)):
            grid = MULTI_GRID if i == 3 else (1,)
            layers.append(self._make_layer(block, width * 2 ** i, n, s, [d * grid[k % len(grid)] for k in range(n)]))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.low_channels = width * block.expansion
        self.out_channels = width * 8 * block.expansion
        self.stage_channels = [width * 2 ** i * block.expansion for i in range(4)]  # layer1..layer4 outputs
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block: type, width: int, n: int, stride: int, dilations: list[int]) -> nn.Sequential:
        down = None
        if stride != 1 or self.cin != width * block.expansion:
            down = nn.Sequential(nn.Conv2d(self.cin, width * block.expansion, 1, stride, bias=False),
                                 nn.BatchNorm2d(width * block.expansion))
        mods = [block(self.cin, width, stride, dilations[0], down)]
        self.cin = width * block.expansion
        mods += [block(self.cin, width, 1, d) for d in dilations[1:]]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        return low, self.layer4(self.layer3(self.layer2(low)))


class SmpBackbone(nn.Module):
    """A segmentation-models-pytorch encoder (output stride 16) returning (stride-4, last) features.

    smp is imported here, lazily (it imports torchvision, which fails on some CPU installations)."""

    def __init__(self, name: str, in_channels: int = 1, depth: int = 5) -> None:
        super().__init__()
        try:
            from segmentation_models_pytorch.encoders import get_encoder
        except Exception as exc:  # ImportError, or torchvision's RuntimeError on broken CPU builds
            raise ConfigError(f"deeplab_multi: backbone 'smp:{name}' needs segmentation-models-pytorch, "
                              f"which failed to import ({exc}); use a pure-PyTorch backbone "
                              f"({', '.join(RESNET_BLOCKS)})") from None
        self.encoder = get_encoder(name, in_channels=in_channels, depth=depth, weights=None, output_stride=16)
        chans = self.encoder.out_channels
        self.low_channels, self.out_channels = chans[2], chans[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.encoder(x)
        return feats[2], feats[-1]


class _PoolBranch(nn.Module):
    """ASPP image-pooling branch: global average pool → 1×1 conv → BN → ReLU → upsample.

    BatchNorm on a [1, C, 1, 1] tensor cannot compute batch statistics; for a one-sample training batch
    (a kept last partial batch) this branch normalises with its running statistics instead of failing."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.adaptive_avg_pool2d(x, 1))
        if self.training and y.shape[0] == 1:
            y = F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, False, 0.0,
                             self.bn.eps)
        else:
            y = self.bn(y)
        return F.interpolate(F.relu(y), size=x.shape[-2:], mode="bilinear", align_corners=True)


class ASPP(nn.Module):
    """``brats2021.md`` §4.2: 1×1 branch, three 3×3 atrous branches, image pooling; each ``width``
    channels with BN+ReLU; concat (5·width) → 1×1 conv ``width`` → BN → ReLU → dropout 0.5."""

    def __init__(self, cin: int, width: int = 256, dilations: Sequence[int] = ASPP_DILATIONS, dropout: float = 0.5):
        super().__init__()
        branches: list[nn.Module] = []
        for d in dilations:
            k = 1 if d == 1 else 3
            branches.append(nn.Sequential(nn.Conv2d(cin, width, k, padding=0 if k == 1 else d, dilation=d, bias=False),
                                          *_bn_relu(width)))
        branches.append(_PoolBranch(cin, width))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(nn.Conv2d(width * len(branches), width, 1, bias=False), *_bn_relu(width),
                                     nn.Dropout(dropout))
        self.out_channels = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLabEncoder(nn.Module):
    """Encoder body of one modality: backbone + ASPP. Output z_m = cat(up(ASPP), layer1) at H/4."""

    def __init__(self, backbone: nn.Module, aspp_width: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.aspp = ASPP(backbone.out_channels, aspp_width)
        self.aspp_channels = aspp_width
        self.low_channels = backbone.low_channels
        self.out_dim = aspp_width + backbone.low_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.backbone(x)
        high = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=True)
        return torch.cat([high, low], dim=1)


class DeepLabDecoder(nn.Module):
    """DeepLabV3+ decoder over one or more (ASPP, low-level) pairs (``brats2021.md`` §4.4): 1×1 conv of the
    concatenated low-level maps → 48 (BN, ReLU); concat with the ASPP maps; ``last_conv`` = 3×3 conv →
    width, BN, ReLU, dropout 0.5, 3×3 conv width → width, BN, ReLU, dropout 0.1. Returns the last_conv
    output (the final 1×1 conv lives in :class:`SegOutput`)."""

    def __init__(self, aspp_channels: int, low_channels: int, width: int = 256, low_reduced: int = 48) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(low_channels, low_reduced, 1, bias=False), *_bn_relu(low_reduced))
        self.last_conv = nn.Sequential(
            nn.Conv2d(aspp_channels + low_reduced, width, 3, padding=1, bias=False), *_bn_relu(width), nn.Dropout(0.5),
            nn.Conv2d(width, width, 3, padding=1, bias=False), *_bn_relu(width), nn.Dropout(0.1))
        self.out_dim = width

    def forward(self, aspp: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return self.last_conv(torch.cat([aspp, self.reduce(low)], dim=1))


class DeepLabFusion(nn.Module):
    """Fusion by channel concatenation (``brats2021.md`` §4.3) followed by the multi-input decoder.

    Each z_m is split into its ASPP part and its low-level part; ASPP parts and low-level parts are
    concatenated in modality order (4 × 256 = 1024 channels each in the canonical model)."""

    def __init__(self, modalities: list[str], aspp_channels: dict[str, int], low_channels: dict[str, int],
                 width: int = 256, low_reduced: int = 48) -> None:
        super().__init__()
        self.order = list(modalities)
        self.aspp_channels = dict(aspp_channels)
        self.decoder = DeepLabDecoder(sum(aspp_channels.values()), sum(low_channels.values()), width, low_reduced)
        self.out_dim = width

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        aspp = [features[m][:, : self.aspp_channels[m]] for m in self.order]
        low = [features[m][:, self.aspp_channels[m]:] for m in self.order]
        return self.decoder(torch.cat(aspp, dim=1), torch.cat(low, dim=1))


class SegOutput(nn.Module):
    """Final 1×1 conv to the classes, then bilinear upsampling by ``scale`` to the input size.
    ``final_layer()`` is the 1×1 conv (CGGM's W_F, ``decoder.last_conv.7`` in zrguo/CGGM)."""

    def __init__(self, cin: int, out_dim: int, scale: int = LOW_LEVEL_STRIDE) -> None:
        super().__init__()
        self.out = nn.Conv2d(cin, out_dim, 1)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out(x)
        return F.interpolate(y, scale_factor=self.scale, mode="bilinear", align_corners=True) if self.scale != 1 else y

    def final_layer(self) -> nn.Module:
        return self.out


class DeepLabUnimodalHead(nn.Module):
    """Head on one modality's z_m (``brats2021.md`` §4 "method-facing pieces").

    ``cggm``/``dense``/``mlp``: DeepLabV3+ decoder with one input head on (ASPP_m, layer1_m) + final
    1×1 conv (CGGM's classifier; its final layer has the fusion head's shape, so CGGM pairs them
    directly). ``linear``/``probe``: 1×1 conv on the ASPP part. Both upsampled to the input size."""

    def __init__(self, aspp_channels: int, low_channels: int, out_dim: int, kind: str = "cggm",
                 width: int = 256, low_reduced: int = 48) -> None:
        super().__init__()
        if kind not in {"cggm", "dense", "mlp", "linear", "probe"}:
            raise ValueError(f"unknown unimodal head kind {kind!r}; valid: cggm, dense, mlp, linear, probe")
        self.aspp_channels = aspp_channels
        self.decoder = DeepLabDecoder(aspp_channels, low_channels, width, low_reduced) if kind in {"cggm", "dense", "mlp"} else None
        self.head = SegOutput(width if self.decoder is not None else aspp_channels, out_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        aspp = z[:, : self.aspp_channels]
        x = aspp if self.decoder is None else self.decoder(aspp, z[:, self.aspp_channels:])
        return self.head(x)

    def final_layer(self) -> nn.Module:
        return self.head.out


class DeepLabMultiModel(MultimodalModel):
    """:class:`MultimodalModel` with DeepLab encoders, the multi-input decoder as fusion and the final
    1×1 conv as head; ``make_unimodal_head`` builds the one-input decoder heads."""

    def __init__(self, encoders: dict[str, DeepLabEncoder], fusion: DeepLabFusion, head: SegOutput, *, out_dim: int,
                 decoder_width: int, low_reduced: int) -> None:
        super().__init__(encoders, fusion, head, feature_kinds={m: "map" for m in encoders},
                         feature_dims={m: e.out_dim for m, e in encoders.items()}, out_dim=out_dim,
                         fusion_input="features")
        self.decoder_width = decoder_width
        self.low_reduced = low_reduced

    def encoder_parameters(self, m: str, scope: str = "encoder_body") -> Iterator[nn.Parameter]:
        """``encoder_body`` (CGGM's magnitude scope, ``brats2021.md`` §4) = backbone_m + ASPP_m; the encoders
        have no input projection, so ``modality_all`` is the same set."""
        if scope not in {"encoder_body", "modality_all"}:
            raise ValueError(f"unknown encoder scope {scope!r}; valid: encoder_body, modality_all")
        return self.encoders[m].parameters()

    def feature_parts(self, m: str, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """z_m = cat(up(ASPP_m), layer1_m) on channels: ``aspp`` [B, C_aspp, H/4, W/4] and ``low``."""
        a = self.encoders[m].aspp_channels
        return {"aspp": z[:, :a], "low": z[:, a:]}

    def make_unimodal_head(self, m: str, kind: str = "cggm") -> nn.Module:
        enc: DeepLabEncoder = self.encoders[m]  # type: ignore[assignment]
        return DeepLabUnimodalHead(enc.aspp_channels, enc.low_channels, self.out_dim, kind, self.decoder_width,
                                   self.low_reduced)


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a local state dict into a backbone (never downloads). 3-channel first convs are summed over
    the input channels (one-channel MRI input); keys the backbone lacks (classifier) are ignored."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise BackboneNotFoundError(f"deeplab_multi: encoder_weights file {str(p)!r} does not exist (weights are "
                                    "never downloaded; pass a local state-dict file or leave encoder_weights empty)")
    state = torch.load(p, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    target = backbone.encoder if isinstance(backbone, SmpBackbone) else backbone
    own = target.state_dict()
    usable = {}
    for k, v in state.items():
        if k in own and v.ndim == 4 and v.shape[1] == 3 and own[k].shape[1] == 1:
            v = v.sum(dim=1, keepdim=True)
        if k in own and own[k].shape == v.shape:
            usable[k] = v
    if not usable:
        raise BackboneNotFoundError(f"deeplab_multi: {str(p)!r} holds no parameter matching the backbone")
    target.load_state_dict(usable, strict=False)


@register_model("deeplab_multi", "per-modality DeepLabV3+ encoders (ResNet+ASPP), concat fusion, DeepLabV3+ decoder")
def deeplab_multi(*, modalities: list[str], input_shapes: dict[str, tuple[int, ...]], out_dim: int,
                  backbone: str = "resnet101", width: int = 64, blocks: list[int] | None = None,
                  aspp_width: int = 256, decoder_width: int = 256, low_reduced: int = 48,
                  encoder_weights: str | None = None) -> DeepLabMultiModel:
    """Canonical BraTS model (``brats2021.md`` §4): ``backbone`` resnet101 (canonical), resnet18 with
    aspp/decoder width 128 (``brats2021_lite``), or ``smp:<encoder>``; ``width``/``blocks`` shrink the
    ResNet for CPU tests. Inputs [B, 1, H, W] with H, W divisible by 16 → logits [B, out_dim, H, W]."""
    encoders = {}
    for m in modalities:
        cin = int(input_shapes[m][0])
        bb: nn.Module = (SmpBackbone(backbone.split(":", 1)[1], cin) if backbone.startswith("smp:")
                         else ResNetBackbone(backbone, cin, width, blocks))
        if encoder_weights:
            load_backbone_weights(bb, encoder_weights)
        encoders[m] = DeepLabEncoder(bb, aspp_width)
    fusion = DeepLabFusion(list(modalities), {m: e.aspp_channels for m, e in encoders.items()},
                           {m: e.low_channels for m, e in encoders.items()}, decoder_width, low_reduced)
    return DeepLabMultiModel(encoders, fusion, SegOutput(decoder_width, out_dim), out_dim=out_dim,
                             decoder_width=decoder_width, low_reduced=low_reduced)


# --------------------------------------------------------------------------- MMTM variant (Greedy)
_RESNET_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def resnet_stages(backbone: nn.Module) -> tuple[list[nn.Module], list[int]]:
    """A DeepLab ResNet backbone cut into its four stages [stem + layer1, layer2, layer3, layer4] and their
    output channels. Works for :class:`ResNetBackbone` and for segmentation-models-pytorch ResNet encoders
    (same attribute names, same forward order); other smp encoders have no ResNet stages."""
    net = backbone.encoder if isinstance(backbone, SmpBackbone) else backbone
    if not all(hasattr(net, a) for a in _RESNET_PARTS):
        raise ConfigError(f"deeplab_mmtm: backbone {type(net).__name__} has no ResNet stages (conv1 … layer4); "
                          "MMTM blocks sit after ResNet layer2, layer3 and layer4 — use a resnet* backbone")
    if isinstance(backbone, SmpBackbone):
        channels = [int(c) for c in net.out_channels[2:6]]
    else:
        channels = list(backbone.stage_channels)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
    return [stem, net.layer2, net.layer3, net.layer4], channels


class DeepLabMMTMModel(MMTMModel):
    """:class:`MMTMModel` for BraTS: branch m = [stem + layer1, layer2, layer3, layer4, ASPP] of its own
    ResNet and ASPP; MMTM blocks (spatial squeeze) after layer2, layer3 and layer4; z_m =
    cat(up(ASPP_m), layer1_m) as in the canonical model (the low-level layer1 features are not gated);
    head m = the one-input DeepLabV3+ decoder + final 1×1 conv, upsampled to the input size."""

    def encode(self, inputs: dict[str, torch.Tensor], absent: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        absent = set(absent)
        unknown = absent - set(self.modalities)
        if unknown:
            raise KeyError(f"absent modalities {sorted(unknown)} are not in the model ({self.modalities})")
        x = {m: self.neutral_input(m, inputs[m]) if m in absent else inputs[m] for m in self.modalities}
        low = {m: self.encoders[m][0](x[m]) for m in self.modalities}
        h = dict(low)
        blocks = iter(self.mmtm_blocks)
        for s in (1, 2, 3):
            h = {m: self.encoders[m][s](h[m]) for m in self.modalities}
            if s in self.positions:
                h = dict(zip(self.modalities, next(blocks)([h[m] for m in self.modalities])))
        out = {}
        for m in self.modalities:
            aspp = F.interpolate(self.encoders[m][4](h[m]), size=low[m].shape[-2:], mode="bilinear", align_corners=True)
            out[m] = torch.cat([aspp, low[m]], dim=1)
        return out


@register_model("deeplab_mmtm", "mmtm variant of deeplab_multi: per-modality ResNet+ASPP branches, MMTM after "
                "layer2-4 (spatial squeeze), one-input DeepLabV3+ decoder per branch (Greedy)")
def deeplab_mmtm(*, modalities: list[str], input_shapes: dict[str, tuple[int, ...]], out_dim: int,
                 backbone: str = "resnet101", width: int = 64, blocks: list[int] | None = None,
                 aspp_width: int = 256, decoder_width: int = 256, low_reduced: int = 48,
                 encoder_weights: str | None = None, ratio: int = 4) -> DeepLabMMTMModel:
    """greedy.md §3.1 BraTS row: each branch is the canonical modality encoder of :func:`deeplab_multi`
    (same backbone options and weights), MMTM blocks (ratio 4) after ResNet layer2, layer3 and layer4 (the
    official Greedy code places them after ResNet-18 stages 2–4), and its own one-input DeepLabV3+ decoder
    (the prediction averages the branch logit maps)."""
    branches, heads, dims = {}, {}, {}
    for m in modalities:
        cin = int(input_shapes[m][0])
        bb: nn.Module = (SmpBackbone(backbone.split(":", 1)[1], cin) if backbone.startswith("smp:")
                         else ResNetBackbone(backbone, cin, width, blocks))
        if encoder_weights:
            load_backbone_weights(bb, encoder_weights)
        stages, chans = resnet_stages(bb)
        aspp = ASPP(chans[-1], aspp_width)
        branches[m] = nn.ModuleList([*stages, aspp])
        dims[m] = [*chans, aspp_width]
        heads[m] = DeepLabUnimodalHead(aspp_width, chans[0], out_dim, "dense", decoder_width, low_reduced)
    return DeepLabMMTMModel(branches, heads, [1, 2, 3], dims, feature_kinds={m: "map" for m in modalities},
                            feature_dims={m: aspp_width + dims[m][0] for m in modalities}, out_dim=out_dim,
                            ratio=ratio)
