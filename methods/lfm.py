"""LFM: dynamically learning the modality gap (docs/methods/lfm.md).

Yang, Wan, Jiang, Xu, "Facilitating Multimodal Classification via Dynamically Learning Modality Gap",
NeurIPS 2024; official code njustkmg/NeurIPS24-LFM @ ad44fa0 (README run ``Crema_epoch.py``, learning-based
variant ``Crema_epoch_learnable.py``, model ``model/AudioVideo.py``). The paper body was not available:
formulas are cited by their place in the code.

Per step (``Crema_epoch.py:56-85``): unimodal logits u_m, fused ō = (1/M)·Σ_m u_m (``AudioVideo.py:70``);
L = 2·(α_cls·CE(ō, y) + α_align·mean_{pairs} D(softmax u_j, softmax u_l)) (``:71``). The weights follow a
fitted quintic in the epoch (``:47-53``; default) or a hypergradient step on held-out training samples at
every epoch start (``Crema_epoch_learnable.py:55-97``; preset ``lfm_learnable``).

D is the Jensen–Shannon divergence by default: the released ``Alignment`` (``:38-45``) computes
½[KL(r‖p) + KL(r‖q)] (``F.kl_div(p.log(), r)`` is KL(r‖p)) while its names say JS; ``divergence=code``
keeps the released value, computed from log-softmax (the released ``log(softmax)`` overflows to inf).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Literal

import torch
import torch.nn.functional as F
from mmbalance.methods._unimodal import UNI_HEAD_KINDS, UnimodalOutputs
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmbalance.data.batching import collate_dicts
from mmbalance.data.containers import TensorSplit
from mmbalance.errors import ConfigError, MethodNotApplicable
from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.registry import register_method

__all__ = ["LFM", "LFMHParams", "FITTED_COEFFS", "fitted_alpha_cls", "alphas_fitted", "divergence",
           "alignment_loss", "info_nce", "hypergradient"]

#: α_cls(t) = Σ_n a_n·tⁿ, the curve fitted to a learning-based run of 200 epochs (``Crema_epoch.py:47-53``)
FITTED_COEFFS = (2.04623704e-1, 3.35472727e-3, 1.22989557e-4, -2.92947416e-6, 2.23835486e-8, -5.39717505e-11)
OFFICIAL_EPOCHS = 200


@dataclass
class LFMHParams:
    """Hyperparameters (docs/methods/lfm.md "Hyperparameters").

    - ``schedule`` ``fitted`` (README run ``Crema_epoch.py:195``); ``learned`` (preset ``lfm_learnable``,
      ``Crema_epoch_learnable.py``); ``constant`` (α_cls = ``alpha_cls``).
    - ``clock`` ``relative``: t = 200·e/E (the curve belongs to the official 200-epoch run); ``absolute``: t = e.
    - ``divergence`` ``js`` (fix: the divergence the code's names announce); ``code`` (the released value).
    - ``align`` ``code`` (a divergence between the unimodal predictions, released); ``paper`` (symmetric
      cross-modal InfoNCE on pooled features, τ = ``tau``; the paper's §3.2 as issue #6 describes it, unverified).
    - ``lr_alpha`` 1e-4, ``alpha_align_init`` 0.95, ``halve_every`` 20, clip [0.05, 0.95], ``heldout_batch`` 8
      (``Crema_epoch_learnable.py:59-62, 90-94, 246, 250``); ``hvp_scope`` ``first`` (the mean over the first
      parameter tensor's Hessian-vector product, ``:87``) or ``all``.
    - ``uni_head`` ``auto``: slices of a concat-linear head (ō = o/M) for classification, else a linear
      (``pixel`` for maps) head per modality with the model's fusion and head removed (late fusion).
    """

    schedule: Literal["fitted", "learned", "constant"] = "fitted"
    clock: Literal["relative", "absolute"] = "relative"
    divergence: Literal["js", "code"] = "js"
    align: Literal["code", "paper"] = "code"
    alpha_cls: float = 0.5
    lr_alpha: float = 1e-4
    alpha_align_init: float = 0.95
    halve_every: int = 20
    clip_lo: float = 0.05
    clip_hi: float = 0.95
    heldout_batch: int = 8
    hvp_scope: Literal["first", "all"] = "first"
    tau: float = 0.1
    uni_head: str = "auto"

    def validate(self) -> None:
        if not 0 <= self.alpha_cls <= 1:
            raise ValueError(f"alpha_cls must be in [0, 1], got {self.alpha_cls}")
        if not 0 <= self.clip_lo <= self.clip_hi <= 1:
            raise ValueError(f"need 0 <= clip_lo <= clip_hi <= 1, got {self.clip_lo}, {self.clip_hi}")
        if self.heldout_batch < 1 or self.halve_every < 1:
            raise ValueError(f"heldout_batch and halve_every must be >= 1, got {self.heldout_batch}, {self.halve_every}")
        if self.tau <= 0 or self.lr_alpha < 0:
            raise ValueError(f"tau must be > 0 and lr_alpha >= 0, got {self.tau}, {self.lr_alpha}")
        if self.uni_head not in UNI_HEAD_KINDS:
            raise ValueError(f"uni_head must be one of {', '.join(UNI_HEAD_KINDS)}, got {self.uni_head!r}")


# ---------------------------------------------------------------------------------------- formulas
def fitted_alpha_cls(t: float) -> float:
    """α_cls(t) = Σ_{n=0..5} a_n·tⁿ (``Crema_epoch.py:47-53``)."""
    return sum(a * t ** n for n, a in enumerate(FITTED_COEFFS))


def alphas_fitted(epoch: int, epochs: int, clock: str = "relative") -> tuple[float, float]:
    """(α_cls, α_align) at ``epoch`` (0-based) of ``epochs``: t = 200·e/E (``relative``) or e; α_align =
    1 − α_cls clamped to [0, 1] (the raw curve is negative for t = 177…188, fix)."""
    t = OFFICIAL_EPOCHS * epoch / epochs if clock == "relative" else float(epoch)
    a_cls = fitted_alpha_cls(t)
    return a_cls, min(1.0, max(0.0, 1.0 - a_cls))


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str = "js", dim: int = 1) -> torch.Tensor:
    """Per-sample (per-pixel) divergence from log-probabilities along ``dim``: ``js`` = ½[KL(p‖r) + KL(q‖r)],
    ``code`` = ½[KL(r‖p) + KL(r‖q)] (what ``F.kl_div(p.log(), r)`` computes, ``Crema_epoch.py:42-44``),
    r = ½(p + q). From log-softmax, so an underflowing probability gives a finite value."""
    log_r = torch.logsumexp(torch.stack([log_p, log_q]), 0) - math.log(2.0)
    if kind == "js":
        return 0.5 * ((log_p.exp() * (log_p - log_r)).sum(dim) + (log_q.exp() * (log_q - log_r)).sum(dim))
    r = log_r.exp()
    return 0.5 * ((r * (log_r - log_p)).sum(dim) + (r * (log_r - log_q)).sum(dim))


def alignment_loss(u: dict[str, torch.Tensor], kind: str = "js") -> torch.Tensor:
    """L_align = mean over modality pairs (j < l) of the batch (and pixel) mean of D(p_j, p_l); every pair
    in one stacked evaluation."""
    logp = torch.stack([F.log_softmax(x.float(), dim=1) for x in u.values()])  # [M, B, C, ...]
    first, second = zip(*combinations(range(len(u)), 2))
    d = divergence(logp[list(first)], logp[list(second)], kind, dim=2)  # [pairs, B, ...]
    return d.flatten(1).mean(1).mean()


def info_nce(z: dict[str, torch.Tensor], tau: float) -> torch.Tensor:
    """Symmetric cross-modal InfoNCE on pooled features, S_ik = cos(z_j,i, z_l,k)/τ,
    ℓ = ½[CE(S, I) + CE(Sᵀ, I)], averaged over pairs (``align=paper``)."""
    zn = {m: F.normalize(x.float().flatten(1), dim=1) for m, x in z.items()}
    pairs = list(combinations(list(z), 2))
    total = 0
    for a, b in pairs:
        s = zn[a] @ zn[b].t() / tau
        target = torch.arange(s.shape[0], device=s.device)
        total = total + 0.5 * (F.cross_entropy(s, target) + F.cross_entropy(s.t(), target))
    return total / len(pairs)


def hypergradient(params: list[torch.Tensor], loss_cls: torch.Tensor, loss_align: torch.Tensor, alpha_cls: float,
                  alpha_align: float, scope: str = "first") -> torch.Tensor:
    """a = mean of H_tot·c (``Crema_epoch_learnable.py:73-87``): g = ∇(α_cls·L_cls + α_align·L_align),
    c = ∇L_cls (both with ``create_graph``), h = ∇(g·sg(c)); the mean over the first tensor (``first``,
    official ``hessian_vector_prod[0].mean()``) or over every entry (``all``)."""
    total = alpha_cls * loss_cls + alpha_align * loss_align
    g = torch.autograd.grad(total, params, create_graph=True, allow_unused=True)
    c = torch.autograd.grad(loss_cls, params, create_graph=True, allow_unused=True)
    dot = sum((gi * ci.detach()).sum() for gi, ci in zip(g, c) if gi is not None and ci is not None)
    h = torch.autograd.grad(dot, params, allow_unused=True)
    h = [torch.zeros_like(p) if hi is None else hi for p, hi in zip(params, h)]
    if scope == "first":
        return h[0].double().mean()
    return torch.cat([x.double().flatten() for x in h]).mean()


# ---------------------------------------------------------------------------------------- the method
@register_method("lfm", "LFM: late fusion with a prediction-alignment loss whose weight follows the official fitted curve")
@register_method("lfm_learnable", "LFM, learning-based weights: a hypergradient step on held-out training samples each epoch",
                 schedule="learned")
class LFM(BalancingMethod):
    name = "lfm"
    hparams_cls = LFMHParams
    min_modalities = 2

    def __init__(self, hparams: LFMHParams | None = None) -> None:
        super().__init__(hparams)
        self.needs_heldout = self.hp.schedule == "learned"  # instance override (the engine reads method.needs_heldout)
        self.alpha_cls = 0.5 if self.hp.schedule == "constant" else 1 - self.hp.alpha_align_init
        self.alpha_align = 1 - self.alpha_cls
        if self.hp.schedule == "constant":
            self.alpha_cls, self.alpha_align = self.hp.alpha_cls, 1 - self.hp.alpha_cls
        self.lr_alpha = self.hp.lr_alpha
        self.heldout_idx: torch.Tensor | None = None
        self._learned_epochs: set[int] = set()

    def setup(self, ctx: StepContext) -> None:
        model, task = ctx.raw_model, ctx.task.name
        if task == "regression" and self.hp.align == "code":
            raise MethodNotApplicable(f"lfm: the released alignment compares the modalities' class distributions; a "
                                      f"regression output has none — use align=paper (dataset {ctx.data.name} is regression)")
        if getattr(model, "variant", "canonical") == "mmtm":
            raise MethodNotApplicable("lfm: LFM is late fusion of per-modality predictions; MMTM branches have already "
                                      "mixed the modalities, so their heads are not unimodal")
        if self.hp.align == "paper" and len(set(model.feature_dims.values())) > 1:
            raise ConfigError(f"lfm: align=paper compares pooled features across modalities by cosine similarity and "
                              f"needs equal widths, got {dict(model.feature_dims)}")
        self.mods = list(model.modalities)
        self.uni = UnimodalOutputs(self.hp.uni_head, "lfm", "lfm_heads", auto_shared="shared_slice")
        self.uni.setup(ctx)
        if not self.uni.shared:  # late fusion: the model's fusion and head are replaced by the unimodal heads
            model.fusion = nn.Identity()
            model.head = nn.Identity()
            model.variant = "late"
        if self.hp.schedule == "learned":
            held = ctx.heldout
            g = torch.Generator().manual_seed(ctx.seed * 7919 + 613)
            k = min(self.hp.heldout_batch, len(held))
            self.heldout_idx = torch.randperm(len(held), generator=g)[:k]

    # ------------------------------------------------------------------ outputs and losses
    def unimodal(self, ctx: StepContext, out, label: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.uni(ctx, out, label)

    def losses(self, ctx: StepContext, out, u: dict[str, torch.Tensor], y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_cls on ō = mean of u_m, L_align) in float32."""
        fused = sum(x.float() for x in u.values()) / len(u)
        loss_cls = ctx.task.loss(fused, y)
        if self.hp.align == "paper":
            loss_align = info_nce({m: out.pooled[m] for m in u}, self.hp.tau)
        else:
            loss_align = alignment_loss(u, self.hp.divergence)
        return loss_cls, loss_align

    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        y = batch["label"]
        out = ctx.forward(batch)
        u = self.unimodal(ctx, out, y)
        loss_cls, loss_align = self.losses(ctx, out, u, y)
        loss = 2 * (self.alpha_cls * loss_cls + self.alpha_align * loss_align)  # factor 2: Crema_epoch.py:71
        with torch.no_grad():  # per-epoch means of the two losses and of each modality's batch metric
            parts = [ctx.task.batch_score_parts(x.detach().float(), y) for x in u.values()]
            vals = torch.stack([loss_cls.detach(), loss_align.detach(), *(num / den for num, den in parts)])
        ctx.log_many(self._log_keys(), vals)
        return StepOutput(loss, out)

    def _log_keys(self) -> tuple[str, ...]:
        if not hasattr(self, "_keys"):
            self._keys = ("lfm/loss_cls", "lfm/loss_align", *(f"lfm/metric_{m}" for m in self.mods))
        return self._keys

    @torch.no_grad()
    def predict(self, ctx: StepContext, batch: dict[str, torch.Tensor], absent: tuple[str, ...] = ()) -> torch.Tensor:
        """ō = mean of u_m over the present modalities (absent ones get their neutral input and are left out)."""
        out = ctx.forward(batch, absent)
        u = self.unimodal(ctx, out, batch["label"])
        kept = [x.float() for m, x in u.items() if m not in absent] or [x.float() for x in u.values()]
        return sum(kept) / len(kept)

    # ------------------------------------------------------------------ weights
    def on_epoch_start(self, ctx: StepContext) -> None:
        if self.hp.schedule == "fitted":
            self.alpha_cls, self.alpha_align = alphas_fitted(ctx.epoch, ctx.epochs_in_phase, self.hp.clock)
        elif self.hp.schedule == "learned":
            self.learned_step(ctx)

    def _heldout_batch(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        held = ctx.heldout
        if isinstance(held, TensorSplit):
            batch = held.batch(self.heldout_idx)
        else:  # a map-style dataset (or a Subset of one)
            batch = collate_dicts([held[int(i)] for i in self.heldout_idx])
        return {k: v.to(ctx.device) for k, v in batch.items()}

    def learned_step(self, ctx: StepContext) -> None:
        """One hypergradient step on the fixed held-out batch (``Crema_epoch_learnable.py:55-97``): on the
        unwrapped model in eval mode (no dropout, no running-statistics update), float32, autocast off."""
        e = ctx.epoch
        if e > 0 and e % self.hp.halve_every == 0:
            self.lr_alpha /= 2  # :90-91
        model = ctx.raw_model
        heads = [ctx.raw_module(name) for name in ctx.modules]
        modules = [model, *heads]
        states = [m.training for m in modules]
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        batch = self._heldout_batch(ctx)
        for m in modules:
            m.eval()
        try:
            # math attention: the fused CPU/GPU attention kernels have no double backward
            with torch.autocast(device_type=ctx.device.type, enabled=False), sdpa_kernel(SDPBackend.MATH):
                out = model(ctx.inputs(batch))
                u = self._unimodal_raw(ctx, out, batch["label"])
                loss_cls, loss_align = self.losses(ctx, out, u, batch["label"])
                a = hypergradient(params, loss_cls, loss_align, self.alpha_cls, self.alpha_align, self.hp.hvp_scope)
        finally:
            for m, st in zip(modules, states):
                m.train(st)
        a = ctx.reduce_mean(a.detach())  # every rank has the same value; the mean keeps them bit-identical
        self.alpha_align = float(min(self.hp.clip_hi, max(self.hp.clip_lo, self.alpha_align - self.lr_alpha * float(a))))
        self.alpha_cls = 1 - self.alpha_align  # :92-94
        self.last_hypergradient = float(a)

    def _unimodal_raw(self, ctx: StepContext, out, label: torch.Tensor) -> dict[str, torch.Tensor]:
        """u_m through unwrapped modules (the double backward must not go through DDP's reducer)."""
        if self.uni.shared:
            return self.uni(ctx, out, label)
        heads = ctx.raw_module("lfm_heads")
        size = tuple(label.shape[-2:]) if ctx.task.name == "segmentation" else None
        return heads(out.features, size)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"alpha_cls": self.alpha_cls, "alpha_align": self.alpha_align, "lr_alpha": self.lr_alpha,
                "heldout_idx": None if self.heldout_idx is None else self.heldout_idx.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha_cls = float(state.get("alpha_cls", self.alpha_cls))
        self.alpha_align = float(state.get("alpha_align", self.alpha_align))
        self.lr_alpha = float(state.get("lr_alpha", self.lr_alpha))
        if state.get("heldout_idx") is not None:
            self.heldout_idx = state["heldout_idx"].clone()

    def metrics(self) -> dict[str, float]:
        return {"alpha_cls": self.alpha_cls, "alpha_align": self.alpha_align, "lr_alpha": self.lr_alpha}
