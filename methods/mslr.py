"""MSLR: Modality-Specific Learning Rates (docs/methods/mslr.md).

Yao & Mihalcea, "Modality-specific Learning Rates for Effective Multimodal Additive Late-fusion",
Findings of ACL 2022; reference implementation in lihong2303/AGM_ICCV2023 (commit 5a65542,
run/CREMAD_main.py). Each modality's encoder gets its own optimizer parameter group with
lr_m = scheduled lr × c⁰_m × r_m; at the end of every epoch r_m = a_m / mean(last K metrics) (AGM-code
"Dynamic" semantics, recomputed each epoch), with a_m the modality's probe metric on the held-out part
of the TRAIN split (never validation or test: bug 7.1). Preset ``mslr_grad_scale`` multiplies the
gradients instead (AGM-code form; ≡ lr scaling only for plain SGD).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

# Shared pieces (README "Auxiliary probes"); kept with OGM-GE, which also uses them.
from mmbalance.methods.ogm_ge import (
    ModalityProbes,
    modality_param_groups,
    probe_kinds,
    probe_outputs,
    train_probes,
)
from torch import nn

from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import IntUniform

__all__ = ["MSLR", "MSLRHParams", "MemoryRatio", "metric_parts"]


def metric_parts(task_name: str, task: Any, u: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(numerator, count) of a_m's ingredient (mslr.md §2 step 3): classification #correct;
    regression Σ|u − y| (a_m = 1/(1 + MAE)); segmentation Σ per-slice mean region Dice."""
    if task_name == "regression":
        err = (u.reshape(u.shape[0]).float() - y.reshape(y.shape[0]).float()).abs().sum()
        return float(err), float(y.shape[0])
    num, den = task.batch_score_parts(u, y)
    return float(num), float(den)


def per_sample_metric(task_name: str, task: Any, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample ingredient of a_m [B] (float64), the terms whose sum :func:`metric_parts` returns:
    correct (0/1), |u − y|, or the slice's mean region Dice."""
    if task_name == "regression":
        return (u.reshape(u.shape[0]).float() - y.reshape(y.shape[0]).float()).abs().double()
    if task_name == "segmentation":
        return task.region_dice(task.prediction(u), y.long()).mean(1).double()
    return (u.argmax(-1) == y.long()).double()


def metric_value(task_name: str, num: float, den: float) -> float:
    v = num / max(den, 1.0)
    return 1.0 / (1.0 + v) if task_name == "regression" else v


class MemoryRatio:
    """Sliding window of K metrics (mslr.md §2 step 4). ``update(a)``: with fewer than K stored values
    append a and return 1; otherwise return a / mean(memory), then drop the oldest and append a.
    ``accumulate`` (AMST, unverified details): every K epochs once K earlier values exist,
    r ← r · a / mean(previous K values); r is kept in between."""

    def __init__(self, K: int, accumulate: bool = False) -> None:
        self.K = K
        self.accumulate = accumulate
        self.memory: deque[float] = deque()
        self.n = 0
        self.r = 1.0

    def update(self, a: float) -> float:
        self.n += 1
        if len(self.memory) < self.K:
            self.memory.append(a)
            return self.r if self.accumulate else 1.0
        mean = sum(self.memory) / len(self.memory)
        ratio = a / mean if mean > 0 else 1.0
        self.memory.popleft()
        self.memory.append(a)
        if not self.accumulate:
            return ratio
        if (self.n - 1) % self.K == 0:
            self.r *= ratio
        return self.r

    def state(self) -> dict[str, Any]:
        return {"memory": list(self.memory), "n": self.n, "r": self.r}

    def load(self, st: dict[str, Any]) -> None:
        self.memory, self.n, self.r = deque(st["memory"]), int(st["n"]), float(st["r"])


@dataclass
class MSLRHParams:
    """MSLR hyperparameters (mslr.md §4).

    ``c0``: 1.0 for every modality (mmbalance: no prior unimodal tuning); a number, a list in modality
    order, or a mapping modality → value. ``window`` K: 5 epochs (AGM code). ``start_epoch``/``end_epoch``:
    0 / last epoch (None), mmbalance; outside the window the multipliers are frozen. ``form``:
    ``param_groups`` (mmbalance decision) or ``grad_scale`` (AGM code; preset ``mslr_grad_scale``).
    ``metric_split``: ``heldout`` (fidelity policy 4; ``train_running`` = the probes' running training
    metric of the epoch, no data held out). ``heldout_fraction``: 0.08 (README). ``accumulate``: false
    (AGM code; true = AMST multiplicative). ``ratio_clip``: None (AGM code) or [lo, hi].
    """

    c0: float | list[float] | dict[str, float] = 1.0
    window: int = field(default=5, metadata={"search": IntUniform(2, 10)})
    start_epoch: int = 0
    end_epoch: int | None = None
    form: Literal["param_groups", "grad_scale"] = "param_groups"
    metric_split: Literal["heldout", "train_running"] = "heldout"
    heldout_fraction: float = 0.08
    accumulate: bool = False
    ratio_clip: tuple[float, float] | None = None

    def validate(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.ratio_clip is not None and not 0 < self.ratio_clip[0] <= self.ratio_clip[1]:
            raise ValueError(f"ratio_clip must be [lo, hi] with 0 < lo <= hi, got {self.ratio_clip}")


@register_method("mslr", "MSLR: per-modality learning rates (parameter groups) adapted from held-out unimodal metrics")
@register_method("mslr_grad_scale", "MSLR, AGM-code form: per-modality gradient scaling", form="grad_scale")
class MSLR(BalancingMethod):
    """MSLR (mslr.md). Probes on detached pooled features (own optimizer) give the unimodal metric;
    its sums are SUM-reduced across processes, so the multipliers are identical on every rank."""

    name = "mslr"
    hparams_cls = MSLRHParams
    min_modalities = 2
    needs_heldout = True

    def __init__(self, hparams: Any = None) -> None:
        super().__init__(hparams)
        self.needs_heldout = self.hp.metric_split == "heldout"
        self.heldout_fraction = self.hp.heldout_fraction
        self.c0: dict[str, float] = {}
        self.r: dict[str, float] = {}
        self.a: dict[str, float] = {}
        self.mem: dict[str, MemoryRatio] = {}
        self.running: dict[str, list[float]] = {}

    # ------------------------------------------------------------------ set-up
    def _resolve_c0(self, modalities: list[str]) -> dict[str, float]:
        c0 = self.hp.c0
        if isinstance(c0, dict):
            unknown = set(c0) - set(modalities)
            if unknown:
                raise ValueError(f"mslr: c0 names unknown modalities {sorted(unknown)}; modalities: {modalities}")
            return {m: float(c0.get(m, 1.0)) for m in modalities}
        if isinstance(c0, (list, tuple)):
            if len(c0) == 1:
                return {m: float(c0[0]) for m in modalities}
            if len(c0) != len(modalities):
                raise ValueError(f"mslr: c0 has {len(c0)} values but the model has {len(modalities)} modalities "
                                 f"({', '.join(modalities)})")
            return {m: float(v) for m, v in zip(modalities, c0)}
        return {m: float(c0) for m in modalities}

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]] | None:
        """One group per modality (``modality/<m>``, lr_mult = c⁰_m·r_m) plus ``shared`` (mslr.md §2 step 1)."""
        self.modalities = list(model.modalities)
        self.c0 = self._resolve_c0(self.modalities)
        self.r = {m: 1.0 for m in self.modalities}
        if self.hp.form != "param_groups":
            return None
        return modality_param_groups(model, self.mult())

    def setup(self, ctx: StepContext) -> None:
        model = ctx.raw_model
        self.modalities = list(model.modalities)
        self.kinds = probe_kinds(model)
        self.c0 = self._resolve_c0(self.modalities)
        self.r = {m: 1.0 for m in self.modalities}
        self.mem = {m: MemoryRatio(self.hp.window, self.hp.accumulate) for m in self.modalities}
        ctx.add_module("mslr_probes", ModalityProbes(model))

    def mult(self) -> dict[str, float]:
        return {m: self.c0[m] * self.r[m] for m in self.modalities}

    def in_window(self, epoch: int) -> bool:
        end = self.hp.end_epoch if self.hp.end_epoch is not None else math.inf
        return self.hp.start_epoch <= epoch <= end

    # ------------------------------------------------------------------ training
    def on_epoch_start(self, ctx: StepContext) -> None:
        self.running = {m: [0.0, 0.0] for m in self.modalities}

    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        out = ctx.forward(batch)
        y = batch["label"]
        loss = ctx.task.loss(out.logits, y)
        u = probe_outputs(ctx, ctx.modules["mslr_probes"], out, y, self.kinds)
        if self.hp.metric_split == "train_running":
            with torch.no_grad():
                for m in self.modalities:
                    num, den = metric_parts(ctx.task.name, ctx.task, u[m].detach(), y)
                    self.running[m][0] += num
                    self.running[m][1] += den
        probe_loss = train_probes(ctx, u, y)
        logs = {"mslr/probe_loss": probe_loss}
        logs.update({f"mslr/lr_mult_{m}": v for m, v in self.mult().items()})
        return StepOutput(loss, out, logs)

    def after_backward(self, ctx: StepContext) -> None:
        """``grad_scale`` form only: g_m ← c⁰_m·r_m·g_m on unscaled gradients (mslr.md §2, preset)."""
        if self.hp.form != "grad_scale":
            return
        model = ctx.raw_model
        for m, c in self.mult().items():
            if c == 1.0:
                continue
            for p in model.encoder_parameters(m):
                if p.grad is not None:
                    p.grad.mul_(c)

    @torch.no_grad()
    def heldout_metrics(self, ctx: StepContext) -> dict[str, float]:
        """a_m of every modality's probe on the train-carved held-out split (eval mode), each sample
        counted exactly once: per-position SUM buffers (value and count) are SUM-reduced across
        processes, so the duplicates that pad the split to a multiple of the world size count once."""
        model, probes = ctx.model, ctx.modules["mslr_probes"]
        model.eval()
        probes.eval()
        n, mods = len(ctx.data.train), self.modalities
        total = torch.zeros(len(mods), n, dtype=torch.float64, device=ctx.device)
        count = torch.zeros(n, dtype=torch.float64, device=ctx.device)
        try:
            for batch in ctx.train_batches(split="heldout", shuffle=False):
                out = ctx.forward(batch)
                u = probe_outputs(ctx, probes, out, batch["label"], self.kinds)
                idx = batch["idx"].to(ctx.device).long()
                for j, m in enumerate(mods):
                    total[j].index_put_((idx,), per_sample_metric(ctx.task.name, ctx.task, u[m], batch["label"]),
                                        accumulate=True)
                count.index_put_((idx,), torch.ones(len(idx), dtype=torch.float64, device=ctx.device),
                                 accumulate=True)
        finally:
            model.train()
            probes.train()
        total, count = ctx.reduce_sum(total), ctx.reduce_sum(count)
        seen = count > 0
        mean = (total[:, seen] / count[seen]).sum(1).cpu()  # Σ over distinct samples of their value
        k = float(seen.sum())
        return {m: metric_value(ctx.task.name, float(mean[j]), k) for j, m in enumerate(mods)}

    def _reduce(self, ctx: StepContext, sums: dict[str, list[float]]) -> dict[str, float]:
        t = ctx.reduce_sum(torch.tensor([v for m in self.modalities for v in sums[m]], dtype=torch.float64)).cpu()
        return {m: metric_value(ctx.task.name, float(t[2 * i]), float(t[2 * i + 1]))
                for i, m in enumerate(self.modalities)}

    def on_epoch_end(self, ctx: StepContext) -> None:
        if not self.in_window(ctx.epoch):
            return
        self.a = self.heldout_metrics(ctx) if self.hp.metric_split == "heldout" else self._reduce(ctx, self.running)
        self.update_ratios(self.a)
        self.apply(ctx)

    def update_ratios(self, a: dict[str, float]) -> None:
        """mslr.md §2 steps 4–6."""
        for m in self.modalities:
            r = self.mem[m].update(a[m])
            if self.hp.ratio_clip is not None:
                r = min(max(r, self.hp.ratio_clip[0]), self.hp.ratio_clip[1])
            self.r[m] = r

    def apply(self, ctx: StepContext) -> None:
        """Write lr_mult = c⁰_m·r_m into the modality groups; the loop applies it on top of the scheduled
        lr before every step (bug 7.3: never overwritten by the scheduler)."""
        if self.hp.form != "param_groups":
            return
        mult = self.mult()
        for g in ctx.optimizer.param_groups:
            if "modality" in g:
                g["lr_mult"] = mult[g["modality"]]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"r": dict(self.r), "a": dict(self.a), "mem": {m: s.state() for m, s in self.mem.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.r, self.a = dict(state["r"]), dict(state["a"])
        for m, st in state["mem"].items():
            self.mem[m].load(st)

    def metrics(self) -> dict[str, float]:
        out = {f"lr_mult_{m}": v for m, v in self.mult().items()}
        out.update({f"a_{m}": v for m, v in self.a.items()})
        return out
