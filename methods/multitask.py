"""Multitask reference row: joint loss plus weighted unimodal losses (docs/methods/multitask.md).

Not a published method: the "uniform baseline" MMPareto is compared with (GeWu-Lab/MMPareto_ICML2024
@ a339db3, ``code/uniform_baseline.py:79``: L = L_mm + L_a + L_v), and the loss inside DGL, InfoReg
and Data Remixing. L = ℓ(o, y) + Σ_m γ_m·ℓ(u_m, y); no adaptive coefficient, no gradient edit.
Preset ``multitask_strong``: γ = 4 (DGL's CLI default α, ICCV2025-GDL ``main_dgl.py:50``), the row that
isolates DGL's stop-gradients from its auxiliary-loss weight.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from mmbalance.methods._unimodal import UNI_HEAD_KINDS, UnimodalOutputs, unimodal_logs, unimodal_losses

from mmbalance.errors import ConfigError
from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import LogUniform


@dataclass
class MultitaskHParams:
    """Hyperparameters.

    - ``gamma`` (γ) 1.0: MMPareto's uniform baseline (``uniform_baseline.py:79``) and InfoReg
      (``main.py:456-458``); 4.0 = preset ``multitask_strong`` (DGL ``main_dgl.py:50``); 0.5 = Remix warm-up.
    - ``uni_head`` ``auto``: head slices (u_m = z̄_m·W_mᵀ + b/M) for classification with a concat-linear
      head, one linear head per modality otherwise, 1×1-conv pixel heads for segmentation (mmbalance).
    - ``gamma_per_modality``: one weight per modality in dataset order (overrides ``gamma``).
    - ``reduction`` ``sum`` (all sources) or ``mean`` (γ/M per modality).
    """

    gamma: float = field(default=1.0, metadata={"search": LogUniform(0.25, 8.0)})
    uni_head: str = "auto"
    gamma_per_modality: list[float] | None = None
    reduction: Literal["sum", "mean"] = "sum"

    def validate(self) -> None:
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.uni_head not in UNI_HEAD_KINDS:
            raise ValueError(f"uni_head must be one of {', '.join(UNI_HEAD_KINDS)}, got {self.uni_head!r}")
        if self.gamma_per_modality is not None and any(g < 0 for g in self.gamma_per_modality):
            raise ValueError(f"gamma_per_modality values must be >= 0, got {self.gamma_per_modality}")


@register_method("multitask", "Multitask reference: fused loss + gamma * sum of unimodal losses (gamma 1)")
@register_method("multitask_strong", "Multitask reference with gamma 4 (DGL's auxiliary weight)", gamma=4.0)
class Multitask(BalancingMethod):
    name = "multitask"
    hparams_cls = MultitaskHParams
    min_modalities = 2

    def setup(self, ctx: StepContext) -> None:
        self.uni = UnimodalOutputs(self.hp.uni_head, "multitask", "multitask_heads")
        self.uni.setup(ctx)
        mods = ctx.modalities
        if self.hp.gamma_per_modality is not None:
            if len(self.hp.gamma_per_modality) != len(mods):
                raise ConfigError(f"multitask: gamma_per_modality has {len(self.hp.gamma_per_modality)} values for "
                                  f"{len(mods)} modalities ({', '.join(mods)})")
            gammas = [float(g) for g in self.hp.gamma_per_modality]
        else:
            gammas = [float(self.hp.gamma)] * len(mods)
        if self.hp.reduction == "mean":
            gammas = [g / len(mods) for g in gammas]
        self.gammas = dict(zip(mods, gammas))

    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        y = batch["label"]
        out = ctx.forward(batch)
        loss_fused = ctx.task.loss(out.logits, y)
        u = self.uni(ctx, out, y)
        losses = unimodal_losses(ctx, u, y)
        loss = loss_fused
        for m, lm in losses.items():
            loss = loss + self.gammas[m] * lm
        logs = unimodal_logs(ctx, "multitask", losses, u, y)
        logs["multitask/loss_fused"] = loss_fused.detach()
        return StepOutput(loss, out, logs)
