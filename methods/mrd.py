"""Modality Random Dropout (docs/methods/mrd.md): per-sample modality dropping during training.

The standard ModDrop form (Neverova et al., TPAMI 2016) as used as a baseline by CGGM (its exact
configuration is unverified, mrd.md §1): with probability ``p_drop`` a sample loses one uniformly
chosen modality; the dropped modality's fusion inputs (``level=feature``, default) or raw inputs
(``level=input``) are replaced by zeros or a learned token. Evaluation never drops.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from mmbalance.methods._outputs import map_tensors
from torch import nn

from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import Uniform


@dataclass
class MRDHParams:
    """Hyperparameters (mrd.md §4).

    - ``p_drop`` 0.5: standard practice (CGGM's value unverified; search {0.1, 0.3, 0.5}).
    - ``mode`` ``one_uniform`` (mmbalance): drop one uniformly chosen modality with probability p;
      ``bernoulli``: drop each modality independently with p_m (``p_per_modality`` or ``p_drop``).
    - ``fill`` ``zeros`` (mmbalance) or ``learned_token`` (a trained per-modality tensor, init 0).
    - ``rescale`` false (mmbalance): true multiplies kept features by M/(M − #dropped).
    - ``level`` ``feature`` (mmbalance; after the encoders, before fusion) or ``input``.
    """

    p_drop: float = field(default=0.5, metadata={"search": Uniform(0.1, 0.7)})
    mode: Literal["one_uniform", "bernoulli"] = "one_uniform"
    fill: Literal["zeros", "learned_token"] = "zeros"
    rescale: bool = False
    level: Literal["feature", "input"] = "feature"
    p_per_modality: list[float] | None = None

    def validate(self) -> None:
        if not 0.0 <= self.p_drop <= 1.0:
            raise ValueError(f"p_drop must be in [0, 1], got {self.p_drop}")
        if self.p_per_modality is not None and any(not 0.0 <= p <= 1.0 for p in self.p_per_modality):
            raise ValueError(f"p_per_modality values must be in [0, 1], got {self.p_per_modality}")
        if self.level == "input" and self.fill == "learned_token":
            raise ValueError("fill=learned_token needs level=feature (a token replaces encoder features)")


def draw_drop_mask(batch_size: int, n_modalities: int, hp: MRDHParams, generator: torch.Generator) -> torch.Tensor:
    """Boolean [B, M] mask, True = dropped (mrd.md §2 steps 1 and 4). Never drops every modality."""
    if hp.mode == "one_uniform":
        drop = torch.rand(batch_size, generator=generator) < hp.p_drop
        which = torch.randint(n_modalities, (batch_size,), generator=generator)
        mask = torch.zeros(batch_size, n_modalities, dtype=torch.bool)
        mask[drop, which[drop]] = True
        return mask
    p = torch.tensor(hp.p_per_modality if hp.p_per_modality is not None else [hp.p_drop] * n_modalities)
    if len(p) != n_modalities:
        raise ValueError(f"mrd: p_per_modality has {len(p)} values for {n_modalities} modalities")
    mask = torch.rand(batch_size, n_modalities, generator=generator) < p
    for _ in range(1000):  # re-draw samples whose mask would drop everything (step 4)
        full = mask.all(dim=1)
        if not bool(full.any()):
            return mask
        mask[full] = torch.rand(int(full.sum()), n_modalities, generator=generator) < p
    mask[mask.all(dim=1), 0] = False  # p_m = 1 everywhere: keep the first modality
    return mask


class LearnedTokens(nn.Module):
    """``fill=learned_token``: one trained tensor per modality with the shape of z_m (init zeros)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        self.tokens = nn.ParameterDict({m: nn.Parameter(torch.zeros(s)) for m, s in shapes.items()})

    def forward(self) -> dict[str, torch.Tensor]:
        return dict(self.tokens.items())


@register_method("mrd", "Modality Random Dropout: per-sample, one modality's fusion inputs zeroed with p=0.5")
class MRD(BalancingMethod):
    """Masks are applied by forward hooks on the encoders so that the forward still goes through the
    (DDP-wrapped) model; the hooks act only while a training step has set a mask (never at eval)."""

    name = "mrd"
    hparams_cls = MRDHParams

    def __init__(self, hparams: MRDHParams | None = None) -> None:
        super().__init__(hparams)
        self._scale: dict[str, torch.Tensor] | None = None  # per-modality [B] multipliers (1 keep, 0 drop)
        self._keep: dict[str, torch.Tensor] | None = None
        self._tokens: dict[str, torch.Tensor] | None = None
        self.drop_counts: torch.Tensor | None = None
        self.samples_seen = 0

    def setup(self, ctx: StepContext) -> None:
        model = ctx.raw_model
        mods = ctx.modalities
        self.drop_counts = torch.zeros(len(mods), dtype=torch.float64)
        self._mods = list(mods)
        if self.hp.fill == "learned_token":
            shapes = {}
            with torch.no_grad():
                for m in mods:
                    z = model.encoders[m].eval()(torch.zeros(1, *ctx.data.input_shapes[m]))
                    model.encoders[m].train()
                    if not isinstance(z, torch.Tensor):
                        raise ValueError("mrd: fill=learned_token needs encoders that return one tensor")
                    shapes[m] = tuple(z.shape[1:])
            ctx.add_module("mrd_tokens", LearnedTokens(shapes), own_optimizer=False)
        if self.hp.level == "feature":
            for m in mods:
                model.encoders[m].register_forward_hook(self._make_hook(ctx, m))

    def _make_hook(self, ctx: StepContext, m: str):
        def hook(module: nn.Module, args: Any, out: Any) -> Any:
            if self._scale is None or not module.training:
                return None
            scale = self._scale[m]
            token = self._tokens[m] if self._tokens is not None else None

            def apply(z: torch.Tensor) -> torch.Tensor:
                s = scale.to(z.device, z.dtype).view(-1, *([1] * (z.dim() - 1)))
                out_z = z * s
                if token is not None:
                    keep = self._keep[m].to(z.device, z.dtype).view(-1, *([1] * (z.dim() - 1)))
                    out_z = out_z + (1 - keep) * token.to(z.dtype)
                return out_z

            return map_tensors(out, apply)

        return hook

    def draw(self, ctx: StepContext, batch_size: int) -> torch.Tensor:
        """This rank's [B, M] drop mask: one mask for the global batch is drawn from ``ctx.generator``
        (identical on every rank) and each rank takes its own rows, so ranks get independent masks."""
        world, rank = ctx.world_size, ctx.accelerator.process_index
        full = draw_drop_mask(batch_size * world, len(ctx.modalities), self.hp, ctx.generator)
        return full[rank * batch_size:(rank + 1) * batch_size]

    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        mods = ctx.modalities
        bsz = int(batch["label"].shape[0])
        mask = self.draw(ctx, bsz)
        keep = (~mask).to(torch.float32)
        scale = keep.clone()
        if self.hp.rescale:
            n_kept = keep.sum(dim=1, keepdim=True)
            scale = keep * (len(mods) / n_kept)
        self.drop_counts += mask.sum(dim=0).double()
        self.samples_seen += bsz
        # the mask is drawn on the CPU generator (the same draws on every device); scale and keep go
        # to the device in ONE copy per step (not one per modality and use)
        scale, keep = torch.stack([scale, keep]).to(ctx.device, non_blocking=True).unbind(0)
        if self.hp.level == "input":
            model = ctx.raw_model
            batch = dict(batch)
            for k, m in enumerate(mods):
                x = batch[m]
                s = scale[:, k].to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
                neutral = model.neutral_input(m, x)
                batch[m] = torch.where(s > 0, x * s, neutral)
            out = ctx.forward(batch)
        else:
            self._scale = {m: scale[:, k] for k, m in enumerate(mods)}
            self._keep = {m: keep[:, k] for k, m in enumerate(mods)}
            # tokens go through their (DDP-wrapped) module's forward once per step
            self._tokens = ctx.modules["mrd_tokens"]() if self.hp.fill == "learned_token" else None
            try:
                out = ctx.forward(batch)
            finally:
                self._scale = self._keep = self._tokens = None
        loss = ctx.task.loss(out.logits, batch["label"])
        return StepOutput(loss, out, {"mrd/drop_fraction": mask.any(dim=1).float().mean()})  # host tensor

    def on_epoch_start(self, ctx: StepContext) -> None:
        self.drop_counts = torch.zeros(len(ctx.modalities), dtype=torch.float64)
        self.samples_seen = 0

    def metrics(self) -> dict[str, float]:
        """This epoch's fraction of (sample, modality) drops per sample, in all and per modality, on
        this rank (ranks draw different rows of the global mask, so these differ between ranks)."""
        if self.drop_counts is None or self.samples_seen == 0:
            return {}
        out = {"drop_rate_total": float(self.drop_counts.sum()) / self.samples_seen}
        out.update({f"drop_rate_{m}": float(c) / self.samples_seen for m, c in zip(self._mods, self.drop_counts)})
        return out
