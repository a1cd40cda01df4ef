"""Data Remixing (Ma, Chen, Deng, ICML 2025, arXiv 2506.11550; official code MatthewMaxy/Remix_ICML2025
@ 80898aa, ``train.py``, ``models/models.py``).

After a multitask warm-up (L = ℓ(o, y) + 0.5·Σ_m ℓ(u_m, y), ``train.py:120``), every epoch starts with
an assignment pass over the training split (eval mode, no gradient): each sample goes to the modality
that is least confident on it, m(i) = argmin_m KL(p_m(i) ‖ U) with KL_m(i) = Σ_c p̃_c·log2(p̃_c·C)
(``train.py:52-81``). The epoch then trains the groups D_m one after another (the engine's epoch plan),
each in single-modality batches: the other modalities' encoder outputs are multiplied by 0 before
fusion (``models.py:55-59``) and L = ℓ(o, y) + γ·ℓ(u_m, y) (``train.py:147, 166``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from mmbalance.methods._outputs import map_tensors
from mmbalance.methods._unimodal import UNI_HEAD_KINDS, UnimodalOutputs, unimodal_losses
from torch import nn

from mmbalance.errors import ConfigError
from mmbalance.interface import BalancingMethod, BatchGroup, StepContext, StepOutput
from mmbalance.registry import register_method

__all__ = ["Remix", "RemixHParams", "kl_to_uniform", "assign", "auto_warmup_epochs"]


@dataclass
class RemixHParams:
    """Hyperparameters (docs/methods/remix.md).

    - ``warmup_epochs`` ``auto`` = max(1, round(E·10/60)): the official 10 of 60 epochs
      (``train.py:33``, ``scripts/run_train.sh``); an integer overrides (10 = official).
    - ``warmup_weight`` 0.5 per modality (``train.py:43-44``); ``gamma`` (γ) 1 (``train.py:45-46``).
    - ``criterion`` ``auto``: ``kl_uniform`` (official) for classification and segmentation, ``loss``
      (the sample goes to the modality with the largest unimodal loss) for regression.
    - ``group_order`` ``reverse``: the last modality's group first (official M = 2: visual, then audio,
      ``train.py:135-169``); ``dataset``; ``interleaved`` (single-modality batches in a seeded random order).
    - ``mask_level`` ``feature``: encoder outputs × 0 (official); ``input``: neutral inputs (non-official).
    - ``uni_head`` ``auto``: one linear head per modality (official Linear(512, C)), pixel heads for maps.
    """

    warmup_epochs: int | Literal["auto"] = "auto"
    warmup_weight: float = 0.5
    gamma: float = 1.0
    criterion: Literal["auto", "kl_uniform", "loss"] = "auto"
    group_order: Literal["reverse", "dataset", "interleaved"] = "reverse"
    mask_level: Literal["feature", "input"] = "feature"
    uni_head: str = "auto"

    def validate(self) -> None:
        if self.warmup_epochs != "auto" and self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0 or 'auto', got {self.warmup_epochs}")
        if self.gamma < 0 or self.warmup_weight < 0:
            raise ValueError(f"gamma and warmup_weight must be >= 0, got {self.gamma}, {self.warmup_weight}")
        if self.uni_head not in UNI_HEAD_KINDS:
            raise ValueError(f"uni_head must be one of {', '.join(UNI_HEAD_KINDS)}, got {self.uni_head!r}")


# ---------------------------------------------------------------------------------------- formulas
def kl_to_uniform(logits: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """KL(p ‖ U) in bits per sample, p̃ = clip(softmax(logits), 1e-9, 1): Σ_c p̃_c·log2(p̃_c·C)
    (``train.py:52-57``, with C from the data instead of the hard-coded 6). Class axis 1; for maps the
    per-pixel values are averaged per image."""
    C = logits.shape[1] if num_classes is None else num_classes
    p = torch.softmax(logits.float(), dim=1).clamp(1e-9, 1.0)
    kl = (p * torch.log2(p * C)).sum(1)
    return kl.flatten(1).mean(1) if kl.dim() > 1 else kl


def assign(scores: torch.Tensor, lower_is_harder: bool = True) -> torch.Tensor:
    """m(i) per sample from [N, M] scores: argmin (KL) or argmax (loss) over modalities, ties to the
    later modality (official M = 2: modality 1 only if KL_1 < KL_2, ``train.py:78-81``)."""
    s = scores if lower_is_harder else -scores
    flipped = s.flip(1)  # argmin returns the first minimum: search from the last modality
    return s.shape[1] - 1 - flipped.argmin(1)


def auto_warmup_epochs(epochs: int) -> int:
    return max(1, round(epochs * 10 / 60))


# ---------------------------------------------------------------------------------------- the method
@register_method("remix", "Data Remixing: per-epoch sample-to-modality assignment (least confident), single-modality batches")
class Remix(BalancingMethod):
    name = "remix"
    hparams_cls = RemixHParams
    min_modalities = 2
    find_unused_parameters = True  # the masked modalities' unimodal heads get no gradient in a group

    def __init__(self, hparams: RemixHParams | None = None) -> None:
        super().__init__(hparams)
        self.assignment: torch.Tensor | None = None  # [N] modality index per training sample
        self._masked: frozenset[str] = frozenset()

    def setup(self, ctx: StepContext) -> None:
        self._mods = list(ctx.modalities)
        self.uni = UnimodalOutputs(self.hp.uni_head, "remix", "remix_heads", auto_shared=None)
        self.uni.setup(ctx)
        self.criterion = self.hp.criterion if self.hp.criterion != "auto" else (
            "loss" if ctx.task.name == "regression" else "kl_uniform")
        if self.criterion == "kl_uniform" and ctx.task.name == "regression":
            raise ConfigError("remix: criterion=kl_uniform needs a predictive distribution; regression uses "
                              "criterion=loss (or leave criterion=auto)")
        if self.hp.mask_level == "feature":
            for m in ctx.modalities:
                ctx.raw_model.encoders[m].register_forward_hook(self._make_hook(m))

    def _make_hook(self, m: str):
        def hook(module: nn.Module, args: Any, out: Any) -> Any:
            if m not in self._masked:
                return None
            return map_tensors(out, lambda z: z * 0)  # exact zeros, zero (not None) encoder gradients
        return hook

    # ------------------------------------------------------------------ schedule
    def warmup(self, ctx: StepContext) -> int:
        return auto_warmup_epochs(ctx.epochs_in_phase) if self.hp.warmup_epochs == "auto" else int(self.hp.warmup_epochs)

    def remixing(self, ctx: StepContext) -> bool:
        return ctx.epoch >= self.warmup(ctx)

    # ------------------------------------------------------------------ assignment pass
    def _unimodal(self, ctx: StepContext, out, label: torch.Tensor, mods: tuple[str, ...]) -> dict[str, torch.Tensor]:
        if self.uni.shared:
            u = self.uni(ctx, out, label)
            return {m: u[m] for m in mods}
        size = tuple(label.shape[-2:]) if ctx.task.name == "segmentation" else None
        return ctx.modules["remix_heads"]({m: out.features[m] for m in mods}, size)

    @torch.no_grad()
    def scores(self, ctx: StepContext) -> torch.Tensor:
        """[N, M] per-sample scores of every training sample (KL to uniform, or the unimodal loss),
        eval mode, all modalities present; gathered across ranks, padded duplicates removed by idx."""
        mods = tuple(ctx.modalities)
        modules = [ctx.model, *ctx.modules.values()]
        states = [mod.training for mod in modules]
        for mod in modules:
            mod.eval()
        idxs, rows = [], []
        try:
            for batch in ctx.train_batches("train", shuffle=False):
                y = batch["label"]
                out = ctx.forward(batch)
                u = self._unimodal(ctx, out, y, mods)
                if self.criterion == "kl_uniform":
                    s = torch.stack([kl_to_uniform(u[m], ctx.data.out_dim) for m in mods], 1)
                else:
                    B = y.shape[0]
                    s = torch.stack([(u[m].float().reshape(B, -1).mean(1) - y.float().reshape(B, -1).mean(1)).abs()
                                     for m in mods], 1)
                idx = batch["idx"].contiguous()
                if ctx.world_size > 1:
                    idx, s = ctx.accelerator.gather((idx, s.contiguous()))
                idxs.append(idx)
                rows.append(s)
        finally:
            for mod, st in zip(modules, states):
                mod.train(st)
        idx, s = torch.cat(idxs).cpu(), torch.cat(rows).cpu()  # one copy per pass, not per batch
        out = torch.full((int(idx.max()) + 1, len(mods)), float("nan"), dtype=s.dtype)
        out[idx] = s  # duplicates (padding) carry identical values
        return out

    def on_epoch_start(self, ctx: StepContext) -> None:
        if self.remixing(ctx):
            self.assignment = assign(self.scores(ctx), lower_is_harder=self.criterion == "kl_uniform")

    # ------------------------------------------------------------------ the plan
    def epoch_plan(self, ctx: StepContext) -> list[BatchGroup] | None:
        if not self.remixing(ctx) or self.assignment is None:
            return None  # warm-up: the normal shuffled loader
        mods = ctx.modalities
        groups = [BatchGroup(torch.nonzero(self.assignment == k).flatten(), (m,)) for k, m in enumerate(mods)]
        if self.hp.group_order == "reverse":
            return groups[::-1]
        if self.hp.group_order == "dataset":
            return groups
        # interleaved: each group cut into global batches (B per rank), the batches in a seeded random order
        g = torch.Generator().manual_seed(ctx.seed * 1_000_003 + 97 * ctx.epoch + 11)
        bsz = self._batch_size(ctx) * ctx.world_size
        chunks = []
        for grp in groups:
            perm = grp.indices[torch.randperm(len(grp.indices), generator=g)]
            chunks += [BatchGroup(perm[i:i + bsz], grp.present, shuffle=False) for i in range(0, len(perm), bsz)]
        order = torch.randperm(len(chunks), generator=g).tolist()
        return [chunks[i] for i in order]

    @staticmethod
    def _batch_size(ctx: StepContext) -> int:
        """The per-rank training batch size (the first batch of a pass over TRAIN)."""
        for batch in ctx.train_batches("train", shuffle=False):
            return int(batch["label"].shape[0])
        return 1

    # ------------------------------------------------------------------ training
    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        y = batch["label"]
        mods = tuple(ctx.modalities)
        if not self.remixing(ctx) or set(ctx.present) == set(mods):
            out = ctx.forward(batch)
            u = self._unimodal(ctx, out, y, mods)
            losses = unimodal_losses(ctx, u, y)
            fused = ctx.task.loss(out.logits, y)
            loss = fused + sum(self.hp.warmup_weight * lm for lm in losses.values())
            return StepOutput(loss, out, {"remix/loss_fused": fused.detach()})
        present = tuple(ctx.present)
        masked = tuple(m for m in mods if m not in present)
        if self.hp.mask_level == "feature":
            self._masked = frozenset(masked)
            try:
                out = ctx.forward(batch)
            finally:
                self._masked = frozenset()
        else:
            out = ctx.forward(batch, absent=masked)
        u = self._unimodal(ctx, out, y, present)
        fused = ctx.task.loss(out.logits, y)
        loss = fused + sum(self.hp.gamma * lm for lm in unimodal_losses(ctx, u, y).values())
        return StepOutput(loss, out, {"remix/loss_fused": fused.detach()})

    # ------------------------------------------------------------------ state and logs
    def state_dict(self) -> dict[str, Any]:
        return {"assignment": None if self.assignment is None else self.assignment.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        a = state.get("assignment")
        self.assignment = None if a is None else a.clone()

    def metrics(self) -> dict[str, float]:
        if self.assignment is None:
            return {}
        return {f"assigned/{m}": float((self.assignment == k).sum()) for k, m in enumerate(self._mods)}
