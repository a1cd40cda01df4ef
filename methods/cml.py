"""CML — Calibrating Multimodal Learning (docs/methods/cml.md; Ma et al., ICML 2023, arXiv 2306.01265).

Official code QingyangZhang/CML @ 9d2496e (MIWAE ``miwae/train.py`` and CPM-Nets ``cpm/CPM_Nets.py``
instantiations); BalanceBenchmark's late-fusion trainer (``CML_trainer.py`` @ 4c1482f) does not run as
released. Per step, per sample a random removal order π_i of the M modalities gives a chain of nested
inputs x^(0) (full) ⊃ x^(1) ⊃ … ⊃ x^(M−1) (one modality left); the model is trained on every level,
L_cls = (1/M)·Σ_k ℓ(o^(k), y), and penalised whenever removing a modality RAISES its confidence:
L_CML = Σ_k Σ_i ReLU((conf_i^(k+1) − conf_i^(k))·g_i^(k) − ε), conf = max_c softmax(o)_c, with the
CPM-Nets gate g = 1 − [pred^(k+1) = y ∧ pred^(k) ≠ y] (``cpm/CPM_Nets.py:98-124``). L = L_cls + λ·L_CML.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from mmbalance.errors import MethodNotApplicable
from mmbalance.interface import BalancingMethod, ModelOutput, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import Choice, LogUniform

__all__ = ["CML", "CMLHParams", "cml_regulariser", "removal_ranks"]

REGRESSION_REASON = ("cml: the regulariser compares the predicted-class confidence max_c p(c|x) across modality "
                     "subsets; a regression head has no predictive confidence")


@dataclass
class CMLHParams:
    """Hyperparameters.

    - ``lam`` (λ) 0.1: the README's ``--beta 10`` read as β/100 (``miwae/train.py:304``), and
      BalanceBenchmark's ``lam`` (``trainer_config.yaml:32``).
    - ``gate`` ``cpm``: ¬(reduced correct ∧ fuller wrong) (``cpm/CPM_Nets.py:122``); ``miwae``: penalise
      only if the fuller input is correct, plus a both-wrong term with the fuller confidence detached
      (``miwae/train.py:294-302``); ``none``: no gate.
    - ``margin`` (ε) 0: ``miwae/train.py:137``, ``cpm/CPM_Nets.py:123``.
    - ``removal`` ``input``: removed modalities get the model's neutral input (the official mean
      imputation, ``:229-233``; zeros for standardised features); ``feature``: one encoder pass, the
      removed modalities' fusion inputs zeroed (BalanceBenchmark's logit subtraction on a concat head).
    - ``reduction`` ``sum`` over samples (``.sum()`` at ``:297``, CPM ``:123``) or ``mean``.
    """

    lam: float = field(default=0.1, metadata={"search": LogUniform(0.01, 1.0)})
    gate: Literal["cpm", "miwae", "none"] = "cpm"
    margin: float = field(default=0.0, metadata={"search": Choice((0.0, 0.05))})
    removal: Literal["input", "feature"] = "input"
    reduction: Literal["sum", "mean"] = "sum"

    def validate(self) -> None:
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")


def removal_ranks(n: int, n_modalities: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """[n, M] position of each modality in its sample's uniformly random removal order π_i
    (``miwae/train.py:67-86``, per-sample shuffle): modality m is absent at level k iff rank < k."""
    order = torch.rand(n, n_modalities, generator=generator, device=device).argsort(dim=1)  # π_i
    return order.argsort(dim=1)


def cml_regulariser(conf: torch.Tensor, correct: torch.Tensor, gate: str = "cpm", margin: float = 0.0) -> torch.Tensor:
    """Σ_k Σ_i ReLU((conf_i^(k+1) − conf_i^(k))·g_i^(k) − ε) over consecutive levels (``cpm/CPM_Nets.py:98-124``).

    ``conf`` [K, B, …] float32 confidences of the K nested levels (level 0 = full input), ``correct`` the
    matching bool correctness. Extra trailing dims (pixels) are averaged per sample, then samples summed.
    ``miwae`` adds Σ ReLU((conf^(k+1) − sg(conf^(k)))·[both wrong] − ε) (``miwae/train.py:294-302``)."""
    fuller, reduced = conf[:-1], conf[1:]
    c_full, c_red = correct[:-1], correct[1:]
    if gate == "cpm":
        g = (~(c_red & ~c_full)).to(conf.dtype)
    elif gate == "miwae":
        g = c_full.to(conf.dtype)
    else:
        g = torch.ones_like(fuller)
    hinge = torch.relu((reduced - fuller) * g - margin)
    if gate == "miwae":
        both_wrong = (~c_red & ~c_full).to(conf.dtype)
        hinge = hinge + torch.relu((reduced - fuller.detach()) * both_wrong - margin)
    if hinge.dim() > 2:
        hinge = hinge.flatten(2).mean(2)
    return hinge.sum()


@register_method("cml", "CML: train on nested modality-removed inputs and penalise confidence that rises when a "
                        "modality is removed (lambda 0.1, CPM gate)")
class CML(BalancingMethod):
    name = "cml"
    hparams_cls = CMLHParams
    supported_tasks = frozenset({"classification", "segmentation"})
    unsupported_reason = {"regression": REGRESSION_REASON}
    min_modalities = 2

    def __init__(self, hparams: CMLHParams | None = None) -> None:
        super().__init__(hparams)
        self._epoch_sums: torch.Tensor | None = None  # [2]: Σ L_CML, Σ violations (this rank, this epoch)
        self._pairs = 0  # compared (sample, level pair)s of this rank and epoch
        self._epoch_stats: dict[str, float] = {}
        self.last_levels: list[torch.Tensor] = []  # the last step's level logits (for inspection)
        self.last_ranks: torch.Tensor | None = None

    def setup(self, ctx: StepContext) -> None:
        self.mods = list(ctx.modalities)
        if self.hp.removal == "feature" and getattr(ctx.raw_model, "variant", "canonical") == "mmtm":
            raise MethodNotApplicable("cml: MMTM mixes modalities inside the encoders, so zeroing a modality's fusion "
                                      "inputs does not remove it; use removal=input")

    def draw_ranks(self, ctx: StepContext, batch_size: int) -> torch.Tensor:
        """This rank's [B, M] removal ranks: drawn for the global batch from ``ctx.device_generator``
        (identical on every rank, checkpointed), each rank taking its own rows, so orders are independent
        across ranks and equal those of one process on the concatenated batch."""
        world, rank = ctx.world_size, ctx.accelerator.process_index
        full = removal_ranks(batch_size * world, len(self.mods), ctx.device_generator, ctx.device)
        return full[rank * batch_size:(rank + 1) * batch_size]

    def level_logits(self, ctx: StepContext, batch: dict[str, torch.Tensor],
                     ranks: torch.Tensor) -> tuple[ModelOutput, list[torch.Tensor]]:
        """(full-input output, [o^(0) … o^(M−1)]): level k removes the modalities with rank < k of each sample."""
        model = ctx.raw_model
        out = ctx.forward(batch)
        levels = [out.logits]
        if self.hp.removal == "input":
            for k in range(1, len(self.mods)):
                masked = dict(batch)
                for j, m in enumerate(self.mods):
                    x = batch[m]
                    gone = (ranks[:, j] < k).view(-1, *([1] * (x.dim() - 1)))
                    masked[m] = torch.where(gone, model.neutral_input(m, x), x)
                levels.append(ctx.forward(masked).logits)
            return out, levels
        for k in range(1, len(self.mods)):
            keep = {m: (ranks[:, j] >= k) for j, m in enumerate(self.mods)}
            feats = {m: z * keep[m].view(-1, *([1] * (z.dim() - 1))).to(z.dtype) for m, z in out.features.items()}
            pooled = {m: p * keep[m].view(-1, 1).to(p.dtype) for m, p in out.pooled.items()}
            levels.append(model.fuse_and_head(feats, pooled)[1])
        return out, levels

    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        y = batch["label"]
        ranks = self.draw_ranks(ctx, int(y.shape[0]))
        out, levels = self.level_logits(ctx, batch, ranks)
        M = len(levels)
        loss_cls = sum(ctx.task.loss(o, y) for o in levels) / M
        probs = [o.float().softmax(1) for o in levels]
        confs = [p.max(1) for p in probs]
        conf = torch.stack([c.values for c in confs])
        correct = torch.stack([c.indices == y for c in confs])
        reg = cml_regulariser(conf, correct, self.hp.gate, self.hp.margin)
        if self.hp.reduction == "mean":
            reg_term = reg / y.shape[0]
        else:  # DDP averages gradients over ranks: × W makes it the gradient of the global-batch sum
            reg_term = reg * ctx.world_size
        loss = loss_cls + self.hp.lam * reg_term
        with torch.no_grad():
            d = conf.detach()
            rises = (d[1:] > d[:-1]).float()
            if rises.dim() > 2:
                rises = rises.flatten(2).mean(2)
            per_level = torch.cat([d.flatten(1).mean(1), correct.float().flatten(1).mean(1), rises.mean(1)])
            keys = ([f"cml/conf_{k}" for k in range(M)] + [f"cml/acc_{k}" for k in range(M)]
                    + [f"cml/violation_{k}" for k in range(M - 1)])
            ctx.log_many(keys, per_level)
            sums = torch.stack([reg.detach(), rises.sum()])
            self._epoch_sums = sums if self._epoch_sums is None else self._epoch_sums + sums
            self._pairs += rises.numel()  # a host count: no copy
        self.last_levels, self.last_ranks = [o.detach() for o in levels], ranks
        return StepOutput(loss, out, {"cml/reg": reg.detach(), "cml/loss_cls": loss_cls.detach()})

    def on_epoch_start(self, ctx: StepContext) -> None:
        self._epoch_sums = None
        self._pairs = 0

    def on_epoch_end(self, ctx: StepContext) -> None:
        """The epoch's global regulariser sum and violation rate (SUM over ranks; one host read per epoch)."""
        if self._epoch_sums is None:
            return
        pairs = torch.tensor([float(self._pairs)], device=self._epoch_sums.device)
        reg, viol, pairs = ctx.reduce_sum(torch.cat([self._epoch_sums, pairs])).tolist()
        self._epoch_stats = {"reg_sum": reg, "violation_rate": viol / max(pairs, 1.0)}

    def metrics(self) -> dict[str, float]:
        return dict(self._epoch_stats)
