"""Unimodal outputs u_m for methods that add per-modality losses to the fused loss (multitask,
MMPareto, DGL, InfoReg; docs/methods/multitask.md "Unimodal outputs").

Kinds (``uni_head``):

- ``shared_slice``: u_m = z̄_m·W_mᵀ + b/M from the fused concat-linear head (W_m = the column block
  ``split_head()[m]`` of ``final_layer().weight``); Σ_m u_m equals the fused logits.
- ``shared_zero_pad``: u_m = z̄_m·W_mᵀ + b, the shared head applied to [0, …, z̄_m, …, 0] (DGL's form).
- ``linear`` / ``mlp``: a method-owned head per modality (``make_unimodal_head``) on the pooled z̄_m.
- ``pixel``: 1×1 conv on the feature map z_m, upsampled to the label size (segmentation).
- ``dense``: the model's one-input decoder head (``make_unimodal_head(m, "dense")``, segmentation).

``auto``: the shared kind the method names for classification with a decomposable head; ``linear`` for
every other vector/sequence case (a slice of a regression head is a partial sum, not a prediction);
``pixel`` for segmentation. Light heads are registered with ``own_optimizer=False`` (they join the main
optimizer) and are always called through the prepared module (DDP wrapper).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.errors import ConfigError
from mmbalance.interface import ModelOutput, StepContext

__all__ = ["UNI_HEAD_KINDS", "LightHeads", "UnimodalOutputs", "resolve_uni_head", "unimodal_losses"]

UNI_HEAD_KINDS = ("auto", "shared_slice", "shared_zero_pad", "linear", "mlp", "pixel", "dense")
SHARED_KINDS = ("shared_slice", "shared_zero_pad")


def resolve_uni_head(kind: str, model: nn.Module, task: str, method: str, auto_shared: str | None = "shared_slice") -> str:
    """The concrete head kind for ``kind`` on ``model``/``task`` (``auto`` rule in the module docstring).
    Raises :class:`ConfigError` naming the method, the value and the valid choices."""
    if kind not in UNI_HEAD_KINDS:
        raise ConfigError(f"{method}: uni_head={kind!r} is not known; valid: {', '.join(UNI_HEAD_KINDS)}")
    decomposable = model.split_head() is not None
    if kind == "auto":
        if task == "segmentation":
            return "pixel"
        if task == "classification" and decomposable and auto_shared is not None:
            return auto_shared
        return "linear"
    if kind in SHARED_KINDS and (not decomposable or task != "classification"):
        why = ("the model's head is not one linear layer over concatenated per-modality features" if not decomposable
               else f"a slice of the {task} head is a partial sum, not a prediction")
        raise ConfigError(f"{method}: uni_head={kind} is not possible here ({why}); use uni_head=auto or linear")
    if kind in {"pixel", "dense"} and task != "segmentation":
        raise ConfigError(f"{method}: uni_head={kind} is for segmentation only (task is {task}); use auto or linear")
    if kind in {"linear", "mlp"} and task == "segmentation":
        raise ConfigError(f"{method}: uni_head={kind} would pool the feature maps to vectors; use pixel or dense "
                          "for segmentation")
    return kind


class PixelHead(nn.Module):
    """1×1 conv on a modality's feature map (the upsampling to the label size is done by :class:`LightHeads`)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.out = nn.Conv2d(dim, out_dim, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(z)


class LightHeads(nn.Module):
    """One head per modality on z_m; ``forward(features, size)`` → {m: u_m}, maps resized to ``size``."""

    def __init__(self, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.heads = nn.ModuleDict(heads)

    def forward(self, features: dict[str, torch.Tensor], size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for m, z in features.items():
            u = self.heads[m](z)
            if u.dim() == 4 and size is not None and tuple(u.shape[-2:]) != tuple(size):
                u = F.interpolate(u, size=size, mode="bilinear", align_corners=False)
            out[m] = u
        return out


def _make_light_heads(model: nn.Module, kind: str, method: str) -> LightHeads:
    heads: dict[str, nn.Module] = {}
    for m in model.modalities:
        if kind == "pixel":
            heads[m] = PixelHead(model.feature_dims[m], model.out_dim)
            continue
        try:
            heads[m] = model.make_unimodal_head(m, kind)
        except ValueError as exc:
            raise ConfigError(f"{method}: uni_head={kind} is not available for this model ({exc})") from None
    return LightHeads(heads)


class UnimodalOutputs:
    """Builds (``setup``) and evaluates (``__call__``) the unimodal outputs of one method.

    ``detach_shared``: the shared kinds use detached head weights (DGL: L_m must not train the head).
    """

    def __init__(self, kind: str, method: str, module_name: str, *, auto_shared: str | None = "shared_slice",
                 detach_shared: bool = False) -> None:
        self.requested = kind
        self.method = method
        self.module_name = module_name
        self.auto_shared = auto_shared
        self.detach_shared = detach_shared
        self.kind = kind

    def setup(self, ctx: StepContext) -> str:
        model = ctx.raw_model
        self.kind = resolve_uni_head(self.requested, model, ctx.task.name, self.method, self.auto_shared)
        if self.kind not in SHARED_KINDS:
            ctx.add_module(self.module_name, _make_light_heads(model, self.kind, self.method), own_optimizer=False)
        return self.kind

    @property
    def shared(self) -> bool:
        return self.kind in SHARED_KINDS

    def __call__(self, ctx: StepContext, out: ModelOutput, label: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.shared:
            model = ctx.raw_model
            layer = model.final_layer()
            w, b = layer.weight, layer.bias
            if self.detach_shared:
                w, b = w.detach(), (b.detach() if b is not None else None)
            slices = model.split_head()
            if b is not None and self.kind == "shared_slice":
                b = b / len(slices)
            return {m: F.linear(out.pooled[m].to(w.dtype), w[:, s], b) for m, s in slices.items()}
        size = tuple(label.shape[-2:]) if ctx.task.name == "segmentation" else None
        return ctx.modules[self.module_name](out.features, size)


def unimodal_losses(ctx: StepContext, u: dict[str, torch.Tensor], label: torch.Tensor) -> dict[str, torch.Tensor]:
    """ℓ(u_m, y) per modality: the dataset's task loss (same reduction as the fused loss), in float32."""
    return {m: ctx.task.loss(um.float(), label) for m, um in u.items()}


def unimodal_logs(ctx: StepContext, prefix: str, losses: dict[str, torch.Tensor], u: dict[str, torch.Tensor],
                  label: torch.Tensor) -> dict[str, Any]:
    """Tensors to log (no host sync): ``<prefix>/loss_<m>`` and the batch metric ``<prefix>/metric_<m>``
    (accuracy, sign accuracy or Dice: the task's ``batch_score_parts``)."""
    logs: dict[str, Any] = {}
    with torch.no_grad():
        for m, um in u.items():
            logs[f"{prefix}/loss_{m}"] = losses[m].detach()
            num, den = ctx.task.batch_score_parts(um.detach().float(), label)
            logs[f"{prefix}/metric_{m}"] = num / den
    return logs
