"""MBSD — sample-weighted distillation between unimodal predictions (BalanceBenchmark's trainer,
GeWu-Lab/BalanceBenchmark @ 4c1482f ``balancemm/trainer/MBSD_trainer.py:95-231``; the source paper
could not be identified; docs/methods/mbsd.md).

Multitask loss L_f + Σ_m L_m plus, for every modality pair (j, l) in dataset order, on the samples
that at least one of the two heads classifies correctly (c_i), a pull weighted by the gap of the
true-class probabilities w_i = c_i·(q_s,i − q_w,i) (strong s = the larger q, weak w = the smaller;
ties → modality j, as Python's max/min):

    L^{jl} = (1/B)·Σ_i w_i·(RS_i + KL_i),   RS_i = (1/C)·Σ_c (a_j,i,c − a_l,i,c)²,
    KL_i = F.kl_div(q_s, q_w) = q_w·(log q_w − q_s)    (the trainer's call, :153; see ``kl``),

a = logits for M = 2, probabilities for M ≥ 3 (``rs_on=auto``, :132 vs :197-199); L_MBSD is the mean
over the M(M−1)/2 pairs and L = L_f + Σ_m L_m + weight·L_MBSD inside [start_epoch, end_epoch],
L = L_f outside (:226-228).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Literal

import torch
import torch.nn.functional as F
from mmbalance.methods._unimodal import UNI_HEAD_KINDS, UnimodalOutputs, unimodal_logs, unimodal_losses

from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import LogUniform

__all__ = ["MBSD", "MBSDHParams", "mbsd_pair", "pair_terms", "strong_weak"]

#: probability clamp of ``kl=bernoulli``
EPS = 1e-7


@dataclass
class MBSDHParams:
    """Hyperparameters (docs/methods/mbsd.md).

    - ``weight`` 1.0: BalanceBenchmark adds L_MBSD without a coefficient (``MBSD_trainer.py:159``).
    - ``start_epoch`` 0 / ``end_epoch`` None: BalanceBenchmark ``modulation_starts`` 0 and ``modulation_ends``
      80 (> its 30 epochs: always on); its predecessor used 10–60.
    - ``kl`` ``code``: ``F.kl_div(q_s, q_w)`` as the trainer calls it (a probability where kl_div expects a
      log-probability; not a divergence, kept as the default until the paper is found); ``bernoulli``:
      KL(Ber(q_s) ‖ Ber(q_w)) (proposed fix, unverified); ``off``.
    - ``rs_on`` ``auto``: logits for M = 2, probabilities for M ≥ 3 (the trainer's two branches);
      ``logits``, ``probs``.
    - ``detach_weight`` false: w carries gradient, as in the trainer.
    - ``uni_head`` ``auto``: slices of the concat-linear head (u_m = z̄_m·W_mᵀ + b/M, BalanceBenchmark's
      ``unimodality_calculate``), light linear heads otherwise, pixel heads for segmentation.
    """

    weight: float = field(default=1.0, metadata={"search": LogUniform(0.1, 10.0)})
    start_epoch: int = 0
    end_epoch: int | None = None
    kl: Literal["code", "bernoulli", "off"] = "code"
    rs_on: Literal["auto", "logits", "probs"] = "auto"
    detach_weight: bool = False
    uni_head: str = "auto"

    def validate(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.kl not in ("code", "bernoulli", "off"):
            raise ValueError(f"kl must be 'code', 'bernoulli' or 'off', got {self.kl!r}")
        if self.rs_on not in ("auto", "logits", "probs"):
            raise ValueError(f"rs_on must be 'auto', 'logits' or 'probs', got {self.rs_on!r}")
        if self.uni_head not in UNI_HEAD_KINDS:
            raise ValueError(f"uni_head must be one of {', '.join(UNI_HEAD_KINDS)}, got {self.uni_head!r}")
        if self.end_epoch is not None and self.end_epoch < self.start_epoch:
            raise ValueError(f"end_epoch ({self.end_epoch}) must be >= start_epoch ({self.start_epoch})")


# ------------------------------------------------------------------------------------------ the loss
def _f32(t: torch.Tensor) -> torch.Tensor:
    """Half precision → float32; float32/float64 kept (the tests check gradients in float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def strong_weak(q_j: torch.Tensor, q_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_s, q_w) = Python's (max(q_j, q_l), min(q_j, q_l)) elementwise (``MBSD_trainer.py:149-151``):
    both return their FIRST argument on a tie, so a tie gives j's value (and gradient) to both."""
    return torch.where(q_l > q_j, q_l, q_j), torch.where(q_l < q_j, q_l, q_j)


def pair_terms(u_j: torch.Tensor, u_l: torch.Tensor, y: torch.Tensor, *, kl: str = "code", rs_probs: bool = False,
               detach_weight: bool = False) -> dict[str, torch.Tensor]:
    """Per-sample (per-pixel) terms of modalities j (first in dataset order) and l, logits [N, C(, H, W)]:
    ``loss`` = w·(RS + KL), ``w``, ``gated`` (c), ``rs``, ``kl``, ``l_strong`` (q_l > q_j).

    Float32 (float64 inputs stay float64); log q_w = log_softmax(u).gather (an underflowing probability
    stays finite). Strong/weak by :func:`strong_weak` (a tie takes both values and all their gradient
    from j, as the trainer's Python ``max``/``min``).
    """
    yl = y.long().unsqueeze(1)
    u_j, u_l = _f32(u_j), _f32(u_l)
    lp_j, lp_l = F.log_softmax(u_j, 1), F.log_softmax(u_l, 1)
    p_j, p_l = lp_j.exp(), lp_l.exp()
    q_j, q_l = p_j.gather(1, yl).squeeze(1), p_l.gather(1, yl).squeeze(1)
    lq_j, lq_l = lp_j.gather(1, yl).squeeze(1), lp_l.gather(1, yl).squeeze(1)
    correct = (u_j.argmax(1) == y) | (u_l.argmax(1) == y)  # c_i (:145-146)
    q_s, q_w = strong_weak(q_j, q_l)
    lq_w = torch.where(q_l < q_j, lq_l, lq_j)
    w = correct.to(q_s.dtype) * (q_s - q_w)  # :148-151
    if detach_weight:
        w = w.detach()
    a_j, a_l = (p_j, p_l) if rs_probs else (u_j, u_l)
    rs = (a_j - a_l).pow(2).mean(1)  # (1/C)·Σ_c, :132 / :197-199
    if kl == "code":  # F.kl_div(q_s, q_w, reduction="none") = q_w·(log q_w − q_s), :153
        div = q_w * (lq_w - q_s)
    elif kl == "bernoulli":
        s, t = q_s.clamp(EPS, 1 - EPS), q_w.clamp(EPS, 1 - EPS)
        div = s * (s.log() - t.log()) + (1 - s) * ((1 - s).log() - (1 - t).log())
    else:
        div = torch.zeros_like(rs)
    return {"loss": w * (rs + div), "w": w, "gated": correct, "rs": rs, "kl": div, "l_strong": q_l > q_j}


def mbsd_pair(u_j: torch.Tensor, u_l: torch.Tensor, y: torch.Tensor, **kw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L^{jl} = mean over samples (and pixels; every pixel is labelled) of w·(RS + KL), and the means of
    the terms (keyword switches of :func:`pair_terms`)."""
    t = pair_terms(u_j, u_l, y, **kw)
    return t["loss"].mean(), {k: v.detach().float().mean() for k, v in t.items() if k != "loss"}


# ------------------------------------------------------------------------------------------ the method
@register_method("mbsd", "MBSD: multitask loss + confidence-gap-weighted logit matching and distillation between unimodal heads")
class MBSD(BalancingMethod):
    name = "mbsd"
    hparams_cls = MBSDHParams
    supported_tasks = frozenset({"classification", "segmentation"})
    unsupported_reason = {"regression": "mbsd: the sample weight and the strong/weak choice use true-class "
                                        "probabilities and argmax correctness; a regression output has neither"}
    min_modalities = 2

    def setup(self, ctx: StepContext) -> None:
        self.uni = UnimodalOutputs(self.hp.uni_head, "mbsd", "mbsd_heads", auto_shared="shared_slice")
        self.uni.setup(ctx)
        mods = ctx.modalities
        self.pairs = list(combinations(mods, 2))
        self.rs_probs = self.hp.rs_on == "probs" or (self.hp.rs_on == "auto" and len(mods) >= 3)
        self._stat_keys = ("w", "gated", "rs", "kl")
        idx = {m: k for k, m in enumerate(mods)}
        self._pair_index = torch.tensor([[idx[a] for a, _ in self.pairs], [idx[b] for _, b in self.pairs]])
        on_l = torch.zeros(len(mods), len(self.pairs))
        on_j = torch.zeros(len(mods), len(self.pairs))
        for p, (a, b) in enumerate(self.pairs):
            on_j[idx[a], p] = on_l[idx[b], p] = 1.0 / (len(mods) - 1)
        self._strong_l, self._strong_j = on_l.to(ctx.device), on_j.to(ctx.device)
        self._pair_index = self._pair_index.to(ctx.device)
        self._keys = tuple(f"mbsd/{k}" for k in self._stat_keys) + tuple(f"mbsd/strong_{m}" for m in mods)

    def active(self, epoch: int) -> bool:
        end = self.hp.end_epoch
        return self.hp.start_epoch <= epoch and (end is None or epoch <= end)

    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        y = batch["label"]
        out = ctx.forward(batch)
        loss_fused = ctx.task.loss(out.logits, y)
        if not self.active(ctx.epoch):  # outside the window: the fused loss alone (:226-228)
            return StepOutput(loss_fused, out, {"mbsd/loss_fused": loss_fused.detach()})
        u = self.uni(ctx, out, y)
        losses = unimodal_losses(ctx, u, y)
        # every pair at once: [P·B, C, …] stacks of the j and l sides (one pass instead of P)
        stack = torch.stack([_f32(um) for um in u.values()])
        P = len(self.pairs)
        jj, ll = self._pair_index.unbind(0)
        t = pair_terms(stack[jj].flatten(0, 1), stack[ll].flatten(0, 1), y.repeat(P, *([1] * (y.dim() - 1))),
                       kl=self.hp.kl, rs_probs=self.rs_probs, detach_weight=self.hp.detach_weight)
        l_mbsd = t["loss"].reshape(P, -1).mean(1).mean()  # mean over samples per pair, then over pairs
        loss = loss_fused + sum(losses.values()) + self.hp.weight * l_mbsd
        with torch.no_grad():
            stats = torch.stack([t[k].detach().float().mean() for k in self._stat_keys])
            ls = t["l_strong"].reshape(P, -1).float().mean(1)  # [P]
            strong = self._strong_l @ ls + self._strong_j @ (1 - ls)  # [M]: share of samples m is strong
            ctx.log_many(self._keys, torch.cat([stats, strong]))
        logs = unimodal_logs(ctx, "mbsd", losses, u, y)
        logs["mbsd/loss_fused"] = loss_fused.detach()
        logs["mbsd/loss_mbsd"] = l_mbsd.detach()
        return StepOutput(loss, out, logs)
