"""AMCo: adaptive mask co-optimization (docs/methods/amco.md).

Zhou, Liang, Zheng, Xuan, Kumada, "Adaptive Mask Co-Optimization for Modal Dependence in Multimodal
Learning", ICASSP 2023. No official code was found and only the abstract was available: the algorithm
follows BalanceBenchmark's trainer (GeWu-Lab/BalanceBenchmark @ 4c1482f, ``balancemm/trainer/AMCo_trainer.py``,
``balancemm/models/avclassify_model.py:326-384``; first version 596b434), cited by line.

Per step k of epoch e (``AMCo_trainer.py:61-83, 122-159``):

1. masking ratio p = sin(π/2·min(ε, ℓ)/ε), then ℓ ← ℓ + e/10 (ℓ = 0 and no dependent modality at
   every epoch start);
2. for each dependent modality (flag D_m from the previous step): ``feature`` (596b434, default) zeroes
   ⌊p·d_m⌋ random channels of its fusion input and multiplies the rest by min(10, 1/(1 − p)); ``logit``
   (HEAD, preset ``amco_bb``) zeroes ⌊p·C⌋ random classes of its unimodal logits;
3. L = CE(o, y) + Σ_m CE(u_m, y) (co-optimization), o the fused output (``logit``: Linear*(Σ_m u_m));
4. D_m ← share_m > σ, share_m = the batch mean of modality m's block of the softmax over the
   concatenated unimodal logits [u_1; …; u_M] (``:146-155``), SUM-reduced over ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from mmbalance.methods._unimodal import UNI_HEAD_KINDS, UnimodalOutputs, unimodal_losses
from torch import nn

from mmbalance.errors import ConfigError, MethodNotApplicable
from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import Choice

__all__ = ["AMCo", "AMCoHParams", "mask_ratio", "rescale", "block_shares", "feature_mask", "class_mask"]


@dataclass
class AMCoHParams:
    """Hyperparameters (docs/methods/amco.md "Hyperparameters").

    - ``sigma`` σ 0.5 (``trainer_config.yaml:25``): a modality is dependent when its share > σ.
    - ``eps`` ε 0.3 (``trainer_config.yaml:27``): the ramp length of the masking ratio.
    - ``schedule`` ``bb``: ℓ += e/10 per step, reset every epoch (``AMCo_trainer.py:64, 73, 83``);
      ``progress``: ℓ = the fraction of training done (non-official).
    - ``p_max`` 1.0: p ← p_max·p (non-official values < 1 cap the ratio).
    - ``mask_target`` ``feature`` (596b434: pooled-feature units, rescaled; MIDAS's description);
      ``logit`` (HEAD: unimodal logit classes, no rescale; preset ``amco_bb``).
    - ``star_layer`` ``auto``: the HEAD's extra C×C layer Linear* on Σ_m u_m with ``logit``, none with ``feature``.
    - ``uni_weight`` 1 per modality (``:144-145``); ``start``/``end``: the epoch window (0, always).
    - ``uni_head`` ``auto``: slices of a concat-linear head, else a linear (pixel) head per modality.
    """

    sigma: float = field(default=0.5, metadata={"search": Choice((0.5, 0.6, 0.7))})
    eps: float = field(default=0.3, metadata={"search": Choice((0.3, 1.0, 3.0))})
    schedule: Literal["bb", "progress"] = "bb"
    p_max: float = 1.0
    mask_target: Literal["feature", "logit"] = "feature"
    star_layer: Literal["auto", "on", "off"] = "auto"
    uni_weight: float = 1.0
    start: int = 0
    end: int | None = None
    uni_head: str = "auto"

    def validate(self) -> None:
        if not 0 < self.sigma < 1:
            raise ValueError(f"sigma must be in (0, 1), got {self.sigma}")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not 0 <= self.p_max <= 1:
            raise ValueError(f"p_max must be in [0, 1], got {self.p_max}")
        if self.uni_weight < 0:
            raise ValueError(f"uni_weight must be >= 0, got {self.uni_weight}")
        if self.end is not None and self.end < self.start:
            raise ValueError(f"end ({self.end}) must be >= start ({self.start})")
        if self.uni_head not in UNI_HEAD_KINDS:
            raise ValueError(f"uni_head must be one of {', '.join(UNI_HEAD_KINDS)}, got {self.uni_head!r}")


# ---------------------------------------------------------------------------------------- formulas
def mask_ratio(ell: float, eps: float) -> float:
    """p = sin(π/2·min(ε, ℓ)/ε) (``AMCo_trainer.py:73``)."""
    return math.sin(math.pi / 2 * min(eps, ell) / eps)


def rescale(p: float) -> float:
    """The kept channels' multiplier r = min(10, 1/(1 − p)) (596b434: 1/(1 − p) unless |p − 1| ≤ 0.1, then 10)."""
    return 10.0 if 1 - p <= 0.1 else 1.0 / (1.0 - p)


def block_shares(u: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_i share_m,i per modality, number of rows): the softmax over the concatenated class logits
    [u_1; …; u_M] (class axis 1; per pixel for maps), summed within each modality's block (``:146-155``)."""
    C = u[0].shape[1]
    p = torch.cat([x.double() for x in u], 1).softmax(1)  # float64: equal logits give shares of 1/M, not 1/M + 6e-8
    mass = p.unflatten(1, (len(u), C)).sum(2)  # [B, M, ...]
    mass = mass.flatten(2).mean(2) if mass.dim() > 2 else mass  # maps: mean over pixels
    return mass.sum(0), mass.new_full((), float(mass.shape[0]))


def feature_mask(d: int, p: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """[d] multipliers: ⌊p·d⌋ random channels 0, the others r(p) (596b434)."""
    n = int(p * d)
    perm = torch.randperm(d, generator=generator, device=device)
    mask = torch.full((d,), rescale(p) if n < d else 0.0, device=device)
    return mask.index_fill(0, perm[:n], 0.0)


def class_mask(C: int, p: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """[C] multipliers: ⌊p·C⌋ random classes 0, no rescale (HEAD ``avclassify_model.py:376-377``)."""
    perm = torch.randperm(C, generator=generator, device=device)
    return torch.ones(C, device=device).index_fill(0, perm[:int(p * C)], 0.0)


# ---------------------------------------------------------------------------------------- the method
@register_method("amco", "AMCo: mask the dependent modality's fusion features with a ramped ratio, plus unimodal co-optimization losses")
@register_method("amco_bb", "AMCo as BalanceBenchmark HEAD: class masks on unimodal logits, Linear*(Σ u_m) fused output",
                 mask_target="logit")
class AMCo(BalancingMethod):
    name = "amco"
    hparams_cls = AMCoHParams
    min_modalities = 2
    supported_tasks = frozenset({"classification", "segmentation"})
    unsupported_reason = {"regression": "AMCo decides dependency from the share of softmax probability mass over the "
                                        "concatenated class logits of all modalities and (logit variant) masks classes; "
                                        "a regression output has neither"}

    def __init__(self, hparams: AMCoHParams | None = None) -> None:
        super().__init__(hparams)
        self.ell = 0.0
        self.flags: torch.Tensor | None = None  # [M] bool, dependency of each modality (for the next step)
        self._masks: dict[str, torch.Tensor] | None = None  # feature masks of the current step
        self.last_shares: torch.Tensor | None = None

    def setup(self, ctx: StepContext) -> None:
        model = ctx.raw_model
        if getattr(model, "variant", "canonical") == "mmtm":
            raise MethodNotApplicable("amco: MMTM blocks have already mixed the masked modality into the others' "
                                      "features, so masking its fusion input would not make it harder to use")
        self.mods = list(model.modalities)
        self.logit = self.hp.mask_target == "logit"
        if self.logit and (model.split_head() is None or ctx.task.name != "classification"):
            raise MethodNotApplicable(
                f"amco: mask_target=logit needs a concat-linear head (it masks classes of the head's per-modality "
                f"slices and fuses them by Linear*; on another head the mask would touch only the auxiliary loss); "
                f"the {ctx.task.name} model of dataset {ctx.data.name!r} has none — use mask_target=feature (amco)")
        self.uni = UnimodalOutputs("shared_slice" if self.logit else self.hp.uni_head, "amco", "amco_heads",
                                   auto_shared="shared_slice")
        self.uni.setup(ctx)
        self.star = self.hp.star_layer == "on" or (self.hp.star_layer == "auto" and self.logit)
        if self.star:
            if not self.logit:
                raise ConfigError("amco: star_layer=on needs mask_target=logit (Linear* acts on Σ_m u_m)")
            C = ctx.data.out_dim
            ctx.add_module("amco_star", nn.Linear(C, C), own_optimizer=False)
        self.flags = torch.zeros(len(self.mods), dtype=torch.bool, device=ctx.device)
        self.dims = dict(model.feature_dims)
        self.kinds = dict(model.feature_kinds)
        if not self.logit:
            for m in self.mods:
                model.encoders[m].register_forward_hook(self._make_hook(m))

    def _make_hook(self, m: str):
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor | None:
            if self._masks is None or not module.training:
                return None
            mask = self._masks[m].to(out.dtype)
            if self.kinds[m] == "map":  # channels on axis 1
                return out * mask.view(1, -1, *([1] * (out.dim() - 2)))
            return out * mask  # vectors and sequences: channels last
        return hook

    # ------------------------------------------------------------------ schedule
    def in_window(self, epoch: int) -> bool:
        return epoch >= self.hp.start and (self.hp.end is None or epoch <= self.hp.end)

    def on_epoch_start(self, ctx: StepContext) -> None:
        self.ell = 0.0
        self.flags = torch.zeros(len(self.mods), dtype=torch.bool, device=ctx.device)

    def next_ratio(self, ctx: StepContext) -> float:
        """This step's p, then the ramp advances (``:73, 83``)."""
        if self.hp.schedule == "progress":
            steps = max(1, ctx.steps_per_epoch)
            self.ell = (ctx.epoch * steps + ctx.step) / max(1, ctx.epochs_in_phase * steps)
            p = mask_ratio(self.ell, self.hp.eps)
        else:
            p = mask_ratio(self.ell, self.hp.eps)
            self.ell += ctx.epoch / 10
        return self.hp.p_max * p

    # ------------------------------------------------------------------ training
    def _masks_for(self, ctx: StepContext, p: float, size: dict[str, int]) -> dict[str, torch.Tensor]:
        """One mask per modality (drawn for every modality every step, so the generator stream does not depend
        on the flags), 1 everywhere for modalities that are not dependent."""
        make = class_mask if self.logit else feature_mask
        g = ctx.device_generator
        return {m: torch.where(self.flags[k], make(size[m], p, g, ctx.device), 1.0) for k, m in enumerate(self.mods)}

    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        y = batch["label"]
        if not self.in_window(ctx.epoch):
            out = ctx.forward(batch)
            return StepOutput(ctx.task.loss(out.logits, y), out)
        p = self.next_ratio(ctx)
        size = {m: ctx.data.out_dim for m in self.mods} if self.logit else self.dims
        masks = self._masks_for(ctx, p, size)
        if self.logit:
            out = ctx.forward(batch)
            u = self.uni(ctx, out, y)
            u = {m: u[m] * masks[m] for m in self.mods}
            o = sum(u.values())
            if self.star:
                o = ctx.modules["amco_star"](o)
        else:
            self._masks = masks
            try:
                out = ctx.forward(batch)  # the encoder hooks mask the dependent modality's fusion input
            finally:
                self._masks = None
            u = self.uni(ctx, out, y)  # on the masked features
            o = out.logits
        fused = ctx.task.loss(o, y)
        uni = unimodal_losses(ctx, u, y)
        loss = fused + self.hp.uni_weight * sum(uni.values())
        with torch.no_grad():  # dependency for the next step, from this step's (masked) u_m
            num, rows = block_shares([u[m].detach() for m in self.mods])
            tot = ctx.reduce_sum(torch.cat([num.double(), rows.double().reshape(1)]))
            shares = tot[:-1] / tot[-1]
            flags_used = self.flags.to(torch.float64)
            self.flags = shares > self.hp.sigma + 1e-9  # strict (equal logits at M = 2 flag nothing), float64 rounding aside
            self.last_shares = shares
        vals = torch.cat([flags_used, shares, shares.new_full((1,), p)])
        ctx.log_many(self._log_keys(), vals)
        logs = {"amco/loss_fused": fused.detach()}
        return StepOutput(loss, out, logs)

    def _log_keys(self) -> tuple[str, ...]:
        if not hasattr(self, "_keys"):
            self._keys = (*(f"amco/dependent_{m}" for m in self.mods), *(f"amco/share_{m}" for m in self.mods), "amco/p")
        return self._keys

    @torch.no_grad()
    def predict(self, ctx: StepContext, batch: dict[str, torch.Tensor], absent: tuple[str, ...] = ()) -> torch.Tensor:
        """The fused output without any mask; under ``amco_bb`` Linear*(Σ_m u_m) = Linear*(head output)."""
        logits = ctx.forward(batch, absent).logits
        return ctx.modules["amco_star"](logits) if self.star else logits

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"ell": self.ell, "flags": None if self.flags is None else self.flags.cpu().clone(),
                "shares": None if self.last_shares is None else self.last_shares.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ell = float(state.get("ell", 0.0))
        if state.get("flags") is not None and self.flags is not None:
            self.flags = state["flags"].to(self.flags.device).clone()
        if state.get("shares") is not None:
            self.last_shares = state["shares"].clone()
