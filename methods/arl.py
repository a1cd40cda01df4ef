"""ARL — Asymmetric Representation Learning (docs/methods/arl.md; Wei, Luo, Luo, "Improving Multimodal
Learning via Imbalanced Learning", ICCV 2025, arXiv 2507.10203).

Official code shicaiwei123/ICCV2025-ARL @ 358af4f (``main_arl_variance.py``). Unimodal predictions reuse
the fusion classifier (u_m = W_m·z̄_m + b, the zero-padded concat head with its full bias); the loss is
L_f + L_1 + L_2 during the warm-up (epoch ≤ s) and L_f + γ·Σ_m L_m after it. After the warm-up every
gradient of encoder m is multiplied by 1 + w_m, with w = softmax_m(T·(1 − c̃_m)·q_m) from this step's
global-batch statistics of the unimodal predictions: the normalised logit magnitude c̃_m and the inverse
normalised (floored) entropy q_m (``:114-157``). The released script computes w but never applies it
(ω stays 0.5, a uniform 1.5×); preset ``arl_released`` keeps that behaviour.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from mmbalance.methods._unimodal import UNI_HEAD_KINDS, UnimodalOutputs, unimodal_logs, unimodal_losses

from mmbalance.interface import ALL_TASKS, BalancingMethod, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import LogUniform

__all__ = ["ARL", "ARLHParams", "arl_weights", "magnitude_entropy_sums"]

REGRESSION_REASON = ("arl: the modality coefficients use the entropy of each unimodal class distribution, and a "
                     "regression output has none; arl_released (fixed 1.5x scaling) runs on regression")


@dataclass
class ARLHParams:
    """Hyperparameters (official ``main_arl_variance.py`` arguments ``:27-72`` and scripts).

    - ``gamma`` (γ) 4.0: weight of the unimodal losses after the warm-up, ``cramed_arl.sh`` (3.0
      ``ks_arl.sh``, 5.0 ``ave_arl.sh``; CLI default 1.0).
    - ``T`` 8.0: softmax temperature of the weights, ``cramed_arl.sh`` and CLI default (4.0 for KS, AVE).
    - ``start`` (s) 5: warm-up epochs 0..s (0-based, inclusive), CLI ``--start``.
    - ``entropy_floor``: lower bound of the normalised entropy; None = 0.6/M (0.3 at M = 2, ``:128-129``).
    - ``weights`` ``computed`` (the paper's asymmetric re-weighting, applied) or ``fixed_half`` (the
      released behaviour: ω = 0.5 for every modality, preset ``arl_released``).
    - ``uni_head`` ``auto``: the zero-padded shared head (``fusion_modules.py:46-52``) where the head is
      linear over concatenated features (classification), light linear heads otherwise, ``pixel`` heads
      for segmentation.
    """

    gamma: float = field(default=4.0, metadata={"search": LogUniform(1.0, 8.0)})
    T: float = field(default=8.0, metadata={"search": LogUniform(1.0, 16.0)})
    start: int = 5
    entropy_floor: float | None = None
    weights: Literal["computed", "fixed_half"] = "computed"
    uni_head: str = "auto"

    def validate(self) -> None:
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.T < 0:
            raise ValueError(f"T must be >= 0, got {self.T}")
        if self.entropy_floor is not None and not 0.0 <= self.entropy_floor < 1.0:
            raise ValueError(f"entropy_floor must be in [0, 1), got {self.entropy_floor}")
        if self.uni_head not in UNI_HEAD_KINDS or self.uni_head == "shared_slice":
            valid = [k for k in UNI_HEAD_KINDS if k != "shared_slice"]
            raise ValueError(f"uni_head must be one of {', '.join(valid)}, got {self.uni_head!r}")


def magnitude_entropy_sums(u: dict[str, torch.Tensor]) -> torch.Tensor:
    """The 2M sums behind ARL's statistics (``main_arl_variance.py:116-141``), float32, no gradient:
    [Σ_i Σ_c |u_m,i,c| for every m] + [Σ_i H(softmax(u_m,i)) for every m], H = −Σ_c p·log(p + 1e-16).
    Segmentation maps ([B, C, H, W]): per image the mean over pixels, summed over images. Only ratios of
    these sums are used, so the official per-batch means (÷N) cancel and SUM-reducing over ranks gives
    the global-batch statistic."""
    x = torch.stack([um.detach().float() for um in u.values()])  # [M, B, C(, H, W)]
    mag = x.abs().sum(2)
    p = x.softmax(2)
    ent = -(p * (p + 1e-16).log()).sum(2)
    if x.dim() > 3:  # per image: the mean over pixels
        mag, ent = mag.flatten(2).mean(2), ent.flatten(2).mean(2)
    return torch.cat([mag.sum(1), ent.sum(1)])


def arl_weights(sums: torch.Tensor, T: float, floor: float) -> dict[str, torch.Tensor]:
    """w from the 2M global sums (official ``:116-153``; M-modality form, docs/methods/arl.md):
    c̃_m = c_m/Σ_k c_k; H̃_m = max(H_m/Σ_k H_k, floor) (not renormalised); q_m = (1/H̃_m)/Σ_k (1/H̃_k);
    w = softmax_m(T·(1 − c̃_m)·q_m). At M = 2, 1 − c̃_1 = c̃_2: the code's softmax(T·c̃_2·q_1, T·c̃_1·q_2)."""
    s = sums.double()
    M = s.numel() // 2
    mag, ent = s[:M], s[M:]
    c = mag / mag.sum().clamp_min(1e-30)
    h = (ent / ent.sum().clamp_min(1e-30)).clamp_min(floor)
    inv = 1.0 / h
    q = inv / inv.sum()
    w = torch.softmax(T * (1.0 - c) * q, dim=0)
    return {"w": w, "c": c, "h": h, "q": q}


@register_method("arl", "ARL: unimodal losses through the shared head (gamma) and encoder gradients x (1 + w_m), "
                        "w from unimodal logit magnitude and entropy")
class ARL(BalancingMethod):
    """Statistics are collected in ``training_step`` (one float32 vector, no host read), SUM-reduced
    across processes and turned into w in ``after_backward``, which then scales every gradient of
    ``encoder_parameters(m)`` by 1 + w_m (equal to the official ``GradScale`` at the encoder output)."""

    name = "arl"
    hparams_cls = ARLHParams
    supported_tasks = frozenset({"classification", "segmentation"})
    unsupported_reason = {"regression": REGRESSION_REASON}
    min_modalities = 2

    def __init__(self, hparams: ARLHParams | None = None) -> None:
        super().__init__(hparams)
        if self.hp.weights == "fixed_half":  # task-agnostic: no class distribution is needed
            self.supported_tasks = ALL_TASKS
        self._sums: torch.Tensor | None = None
        self._last: torch.Tensor | None = None  # [M] multipliers of the last scaled step

    def setup(self, ctx: StepContext) -> None:
        self.mods = list(ctx.modalities)
        self.floor = self.hp.entropy_floor if self.hp.entropy_floor is not None else 0.6 / len(self.mods)
        self.uni = UnimodalOutputs(self.hp.uni_head, "arl", "arl_heads", auto_shared="shared_zero_pad",
                                   detach_shared=False)
        self.uni.setup(ctx)
        self._params: dict[str, list[torch.nn.Parameter]] | None = None

    def after_warmup(self, ctx: StepContext) -> bool:
        """Scaling and γ apply for epochs strictly after ``start`` (official ``epoch > args.start``)."""
        return ctx.epoch > self.hp.start

    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        y = batch["label"]
        out = ctx.forward(batch)
        loss_fused = ctx.task.loss(out.logits, y)
        u = self.uni(ctx, out, y)
        losses = unimodal_losses(ctx, u, y)
        active = self.after_warmup(ctx)
        gamma = self.hp.gamma if active else 1.0
        loss = loss_fused + gamma * sum(losses.values())
        logs = unimodal_logs(ctx, "arl", losses, u, y)
        logs["arl/loss_fused"] = loss_fused.detach()
        logs["arl/gamma"] = gamma
        self._sums = magnitude_entropy_sums(u) if active and self.hp.weights == "computed" else None
        return StepOutput(loss, out, logs)

    def multipliers(self, ctx: StepContext) -> torch.Tensor:
        """1 + w_m per modality (global-batch w), or 1.5 everywhere for ``weights=fixed_half``."""
        if self.hp.weights == "fixed_half":
            return torch.full((len(self.mods),), 1.5, dtype=torch.float32, device=ctx.device)
        stats = arl_weights(ctx.reduce_sum(self._sums), self.hp.T, self.floor)  # SUM over ranks first (§9)
        keys = [f"arl/{k}_{m}" for k in ("w", "c", "h") for m in self.mods]
        ctx.log_many(keys, torch.cat([stats["w"], stats["c"], stats["h"]]).float())
        return (1.0 + stats["w"]).float()

    def after_backward(self, ctx: StepContext) -> None:
        if not self.after_warmup(ctx):
            return
        mult = self.multipliers(ctx)
        if self._params is None:  # the prepared model's parameters (same objects once placed)
            model = ctx.raw_model
            self._params = {m: [p for p in model.encoder_parameters(m) if p.requires_grad] for m in self.mods}
        grads, factors = [], []
        parts = mult.unbind()
        for k, m in enumerate(self.mods):
            for p in self._params[m]:
                if p.grad is not None:
                    grads.append(p.grad)
                    factors.append(parts[k])
        if grads:  # one fused multiply; a non-finite gradient stays non-finite (the fp16 scaler then skips)
            torch._foreach_mul_(grads, factors)
        self._last = mult

    def metrics(self) -> dict[str, float]:
        """The last scaled step's multipliers 1 + w_m (identical on every rank); one host read."""
        if self._last is None:
            return {}
        return {f"mult_{m}": v for m, v in zip(self.mods, self._last.tolist())}

    def state_dict(self) -> dict[str, Any]:
        """Nothing to keep: the warm-up follows ``ctx.epoch`` and w comes from the current batch."""
        return {}


@register_method("arl_released", "ARL as released: coefficients computed but never applied (every encoder "
                                 "gradient x 1.5)", weights="fixed_half")
class ARLReleased(ARL):
    """``arl`` with ``weights=fixed_half``; task-agnostic, so it also runs on regression."""

    supported_tasks = ALL_TASKS
    unsupported_reason: dict[str, str] = {}
