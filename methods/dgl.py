"""DGL — Disentangled Gradient Learning (docs/methods/dgl.md; Wei, Luo, Luo, ICCV 2025, arXiv 2507.10213).

Official code shicaiwei123/ICCV2025-GDL @ b72a55f. The encoders are trained only by their unimodal
losses α·Σ_m ℓ(u_m, y); the fusion module and the head only by the fused loss ℓ(o, y) computed on
stop-gradient features. The official code obtains this with two backward passes (``main_dgl.py:108-122``:
backward α·(L_a + L_v), fusion gradients set to None, backward L_f); one backward with stop-gradients
gives the same gradients:

- o = h(sg z̄_1, …, sg z̄_M): a forward pre-hook on ``model.fusion`` detaches the fusion inputs, only
  while ``training_step`` runs (inside the DDP-wrapped forward);
- u_m = F.linear(z̄_m, sg W_m, sg b): the zero-padded shared head with the full bias
  (``fusion_modules.py:57-58``) for decomposable heads, light heads (trained by α·L_m) otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from mmbalance.methods._unimodal import UNI_HEAD_KINDS, UnimodalOutputs, unimodal_logs, unimodal_losses
from torch import nn

from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import LogUniform


@dataclass
class DGLHParams:
    """Hyperparameters.

    - ``alpha`` (α) 4.0: CLI default ``main_dgl.py:50`` and the CREMA-D script ``cramed_dgl.sh``
      (5 in a second CREMA-D run; 2 and 3 for Kinetics-Sounds, ``ks_dgl.sh``).
    - ``uni_head`` ``auto``: ``shared_zero_pad`` (official zero-padded shared head, full bias, detached
      head weights) for classification with a concat-linear head; ``linear`` light heads otherwise;
      ``pixel`` for segmentation (``dense`` = a one-input decoder, recommended on BraTS).
    """

    alpha: float = field(default=4.0, metadata={"search": LogUniform(0.5, 8.0)})
    uni_head: str = "auto"

    def validate(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.uni_head not in UNI_HEAD_KINDS or self.uni_head == "shared_slice":
            valid = [k for k in UNI_HEAD_KINDS if k != "shared_slice"]
            raise ValueError(f"uni_head must be one of {', '.join(valid)}, got {self.uni_head!r}")


def _detach_tree(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, dict):
        return {k: _detach_tree(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_detach_tree(v) for v in x)
    return x


@register_method("dgl", "DGL: encoders trained by unimodal losses only, fusion/head by the fused loss on detached features")
class DGL(BalancingMethod):
    name = "dgl"
    hparams_cls = DGLHParams
    min_modalities = 2

    def __init__(self, hparams: DGLHParams | None = None) -> None:
        super().__init__(hparams)
        self._detaching = False

    def setup(self, ctx: StepContext) -> None:
        self.uni = UnimodalOutputs(self.hp.uni_head, "dgl", "dgl_heads", auto_shared="shared_zero_pad",
                                   detach_shared=True)
        self.uni.setup(ctx)
        ctx.raw_model.fusion.register_forward_pre_hook(self._fusion_pre_hook)

    def _fusion_pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Stop-gradient on the fusion inputs (pooled dict or feature dict) while a training step runs."""
        if not self._detaching:
            return None
        return _detach_tree(args)

    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        y = batch["label"]
        self._detaching = True
        try:
            out = ctx.forward(batch)  # o = h(sg z̄): L_f trains only the fusion module and the head
        finally:
            self._detaching = False
        loss_fused = ctx.task.loss(out.logits, y)
        u = self.uni(ctx, out, y)  # attached z̄_m, detached shared head (or a light head)
        losses = unimodal_losses(ctx, u, y)
        loss = loss_fused + self.hp.alpha * sum(losses.values())
        logs = unimodal_logs(ctx, "dgl", losses, u, y)
        logs["dgl/loss_fused"] = loss_fused.detach()
        return StepOutput(loss, out, logs)
