"""The multimodal model contract: encoders[m] → fusion → head."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

FeatureKind = Literal["vector", "sequence", "map"]


@dataclass
class ModelOutput:
    """``features[m]``: what encoder m contributes to fusion (z_m); ``pooled[m]``: [B, d_m] summary of
    z_m (identity for vectors, position 0 for sequences, spatial mean for maps); ``fused``: the fusion
    output fed to the head; ``logits``: the head output."""

    features: dict[str, torch.Tensor]
    pooled: dict[str, torch.Tensor]
    fused: torch.Tensor
    logits: torch.Tensor


def pool_feature(z: torch.Tensor, kind: FeatureKind) -> torch.Tensor:
    if kind == "vector":
        return z
    if kind == "sequence":  # batch-first [B, L, d]: position 0 (CLS-like, as CGGM/MulT)
        return z[:, 0]
    return z.flatten(2).mean(-1)  # map [B, C, H, W] → spatial mean


class MultimodalModel(nn.Module):
    """``forward(inputs, absent=...)`` → :class:`ModelOutput`.

    ``absent`` replaces those modalities' inputs by their neutral input (zeros, the training mean of
    standardised features) — used by AGM, MRD and per-modality diagnostics. Encoders are addressable
    by name in ``self.encoders[m]``.
    """

    def __init__(self, encoders: dict[str, nn.Module], fusion: nn.Module, head: nn.Module, *,
                 feature_kinds: dict[str, FeatureKind], feature_dims: dict[str, int], out_dim: int,
                 fusion_input: Literal["pooled", "features"] = "pooled") -> None:
        super().__init__()
        self.modalities = list(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.head = head
        self.feature_kinds = dict(feature_kinds)
        self.feature_dims = dict(feature_dims)
        self.out_dim = out_dim
        self.fusion_input = fusion_input
        self.variant = "canonical"

    # ---------------------------------------------------------------- forward pieces
    def neutral_input(self, m: str, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    def encode(self, inputs: dict[str, torch.Tensor], absent: Iterable[str] = (),
               only: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """z_m for every modality, or only for ``only`` (the other encoders do not run)."""
        if only is None and not absent:  # the training hot path: no set building, nothing to check
            encoders = self.encoders._modules  # (ModuleDict.__getitem__ is a Python call per modality)
            return {m: encoders[m](inputs[m]) for m in self.modalities}
        absent = set(absent)
        mods = self.modalities if only is None else [m for m in self.modalities if m in set(only)]
        unknown = (absent | set(only or ())) - set(self.modalities)
        if unknown:
            raise KeyError(f"modalities {sorted(unknown)} are not in the model ({self.modalities})")
        return {m: self.encoders[m](self.neutral_input(m, inputs[m]) if m in absent else inputs[m])
                for m in mods}

    def pool(self, m: str, z: torch.Tensor) -> torch.Tensor:
        return pool_feature(z, self.feature_kinds[m])

    def fuse_and_head(self, features: dict[str, torch.Tensor],
                      pooled: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if pooled is None:
            pooled = {m: self.pool(m, z) for m, z in features.items()}
        fused = self.fusion(pooled if self.fusion_input == "pooled" else features)
        return fused, self.head(fused)

    def forward(self, inputs: dict[str, torch.Tensor], absent: Iterable[str] = (),
                only: Iterable[str] | None = None) -> ModelOutput:
        """``only``: run only those encoders; fusion then receives only their features (a fusion
        that needs every modality fails; methods using ``only`` replace it)."""
        features = self.encode(inputs, absent) if only is None else self.encode(inputs, absent, only)
        if type(self).pool is MultimodalModel.pool:  # the hot path: pool_feature inlined for vectors
            kinds = self.feature_kinds
            pooled = {m: z if kinds[m] == "vector" else pool_feature(z, kinds[m]) for m, z in features.items()}
        else:
            pooled = {m: self.pool(m, z) for m, z in features.items()}
        fused, logits = self.fuse_and_head(features, pooled)
        return ModelOutput(features, pooled, fused, logits)

    # ---------------------------------------------------------------- capabilities for methods
    def final_layer(self) -> nn.Module:
        """The fusion head's final Linear/Conv layer (CGGM's W_F, AGM's clipped weight)."""
        final = getattr(self.head, "final_layer", None)
        return final() if callable(final) else self.head

    def split_head(self) -> dict[str, slice] | None:
        """Column slices of the final layer's weight per modality, when the head is one Linear over
        the concatenation of pooled features (OGM-GE unimodal logits, CGGM block pairing)."""
        slices = getattr(self.fusion, "slices", None)
        if slices is None or not isinstance(self.head, nn.Linear) and not getattr(self.head, "is_linear", False):
            return None
        return dict(slices)

    def unimodal_logits(self, pooled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """OGM-GE style per-modality logits W_m·z_m + b/M from the concat-linear head, or None."""
        slices = self.split_head()
        if slices is None:
            return None
        layer = self.final_layer()
        bias = layer.bias / len(slices) if layer.bias is not None else 0.0
        return {m: pooled[m] @ layer.weight[:, s].t() + bias for m, s in slices.items()}

    def feature_parts(self, m: str, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """The separate tensors that z_m packs (UMT distils each, PMR picks one). Default: z_m itself."""
        return {"z": z}

    def encoder_parameters(self, m: str) -> Iterator[nn.Parameter]:
        return self.encoders[m].parameters()

    def encoder_named_parameters(self, m: str) -> Iterator[tuple[str, nn.Parameter]]:
        return ((f"encoders.{m}.{n}", p) for n, p in self.encoders[m].named_parameters())

    def make_unimodal_head(self, m: str, kind: str = "linear") -> nn.Module:
        """A head mapping encoder m's features z_m to the task output.

        kinds: ``linear`` (Linear on pooled z_m), ``mlp``/``cggm`` (Linear-ReLU-Linear on pooled z_m;
        for sequence features, ``cggm`` first runs a 2-layer TransformerEncoder as CGGM's classifier).
        """
        from .heads import UnimodalHead

        return UnimodalHead(self.feature_kinds[m], self.feature_dims[m], self.out_dim, kind)
