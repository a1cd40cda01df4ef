"""InfoReg — information-acquisition regulation (docs/methods/inforeg.md).

Huang, Wei, Yang, Hu, "Adaptive Unimodal Regulation for Balanced Multimodal Information Acquisition",
CVPR 2025, arXiv 2503.18595; official code GeWu-Lab/InfoReg_CVPR2025 @ 939b2ed (``main.py``), made
modality-agnostic. Loss: the multitask loss ℓ(o, y) + Σ_m ℓ(u_m, y) (``main.py:456-458``).

- Epoch start: snapshot θ_m^(e) of every encoder; window statistic from the Fisher-trace history
  T_0 … T_{e−1} zero-padded by W = 10 in front (``main.py:237-243, 694``):
  k_e = (T_{e−1} − T_{e−1−W}) / Σ_{j=e−W}^{e−1} T_j (k_0 = 1); regulation is on iff k_e > 0.05.
- Each step: scores s_m = Σ_i softmax(u_{m,i})[y_i] (SUM-reduced over ranks); the strict leader m* gets
  β = c_{m*}·exp(tanh(s_{m*} − max_{k≠m*} s_k)) (``main.py:465-485``); its encoder gradient gets the
  proximal term β·(θ − θ^(e)) (``main.py:489-495``).
- Fisher trace per encoder: F_m += Σ_W mean(∇W²) over its weights with ≥ 2 dimensions, from the edited
  gradients (``main.py:501-523, 569-572``); T_e^m = F_m at the epoch end.

Constants: ``rank`` (mmbalance default) gives c_high to the information-sufficient modality (argmax of
the cumulative scores) and c_low to the others, which equals the official audio 0.95 / visual 0.1 on the
official data; preset ``inforeg_official`` = fixed 0.95 for the first modality in dataset order and
0.1 for the others (the released audio/visual constants).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from mmbalance.methods._unimodal import UNI_HEAD_KINDS, UnimodalOutputs, unimodal_logs, unimodal_losses
from mmbalance.methods.ogm_ge import score_sums, train_target_tau

from mmbalance.errors import ConfigError
from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import LogUniform

__all__ = ["InfoReg", "InfoRegHParams", "window_statistic", "regulation_strength", "fisher_increment"]


@dataclass
class InfoRegHParams:
    """Hyperparameters (official values: GeWu-Lab/InfoReg_CVPR2025 @ 939b2ed, ``main.py``).

    - ``threshold`` 0.05 (``:465, 473``; the first release 4df625a used 0.04).
    - ``window_len`` W = 10 (``:240-241, 694``).
    - ``c_high``, ``c_low`` 0.95, 0.1 (``:468, 476``).
    - ``constants``: ``rank`` (mmbalance: c_high for the argmax of the cumulative scores), ``fixed``
      (``c_fixed`` per modality in dataset order; preset ``inforeg_official``), ``symmetric`` (c_high
      for every modality).
    - ``c_fixed``: the per-modality constants for ``constants=fixed``; None = c_high for the first
      modality in dataset order and c_low for the others (the released audio 0.95 / visual 0.1).
    - ``window_source``: ``sufficient`` (the trace of the information-sufficient modality; official: the
      audio encoder), ``all`` (Σ_m T^m), ``per_modality`` (modality m regulated only while its own k^m is
      above the threshold).
    - ``gap``: ``sum`` (official: batch sums of the scores) or ``mean`` (per-sample means; non-official,
      independent of the batch size and of the number of processes).
    - ``uni_head`` ``auto``: head slices with bias b/M for a concat-linear classification head (official
      slices with b/2 at M = 2), light heads otherwise.
    """

    threshold: float = field(default=0.05, metadata={"search": LogUniform(0.01, 0.3)})
    window_len: int = 10
    c_high: float = field(default=0.95, metadata={"search": LogUniform(0.1, 4.0)})
    c_low: float = 0.1
    constants: Literal["rank", "fixed", "symmetric"] = "rank"
    c_fixed: list[float] | None = None
    window_source: Literal["sufficient", "all", "per_modality"] = "sufficient"
    gap: Literal["sum", "mean"] = "sum"
    uni_head: str = "auto"

    def validate(self) -> None:
        if self.window_len < 1:
            raise ValueError(f"window_len must be >= 1, got {self.window_len}")
        if self.c_high < 0 or self.c_low < 0:
            raise ValueError(f"c_high and c_low must be >= 0, got {self.c_high}, {self.c_low}")
        if self.uni_head not in UNI_HEAD_KINDS:
            raise ValueError(f"uni_head must be one of {', '.join(UNI_HEAD_KINDS)}, got {self.uni_head!r}")


# ------------------------------------------------------------------------------------------ the maths
def window_statistic(history: list[float], window_len: int = 10) -> float:
    """k_e for the next epoch e = len(history): 1 at e = 0, else with T_j = 0 for j < 0
    (T_{e−1} − T_{e−1−W}) / Σ_{j=e−W}^{e−1} T_j; 0 when that sum is 0 (``main.py:237-243``)."""
    e = len(history)
    if e == 0:
        return 1.0
    padded = [0.0] * window_len + [float(t) for t in history]
    tr1 = sum(padded[-window_len:])
    if tr1 == 0:
        return 0.0
    return (padded[-1] - padded[-1 - window_len]) / tr1


def regulation_strength(s: torch.Tensor, c: torch.Tensor, active: torch.Tensor | bool = True) -> torch.Tensor:
    """β per modality: c_{m*}·exp(tanh(s_{m*} − max_{k≠m*} s_k)) for the strict leader m* (ties: nobody),
    0 for every other modality and when ``active`` is false (``main.py:465-485``). Tensor ops only."""
    s = s.double()
    M = s.numel()
    eye = torch.eye(M, dtype=torch.bool, device=s.device)
    others = torch.where(eye, torch.full((M, M), -math.inf, dtype=s.dtype, device=s.device), s[None, :].expand(M, M))
    gap = s - others.max(dim=1).values
    beta = torch.where(gap > 0, c.to(s) * torch.exp(torch.tanh(gap)), torch.zeros_like(s))
    active = torch.as_tensor(active, device=s.device)
    return torch.where(active, beta, torch.zeros_like(beta))


def fisher_increment(grads: list[torch.Tensor | None]) -> torch.Tensor:
    """Σ_W ‖∇W‖²/numel(W) over the gradients given (weights with ≥ 2 dims; None = unused, skipped)."""
    gs = [g.float() for g in grads if g is not None]
    if not gs:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([sq.mean() for sq in torch._foreach_pow(gs, 2)]).double().sum()


# ------------------------------------------------------------------------------------------ the method
@register_method("inforeg", "InfoReg: proximal pull of the leading encoder inside the Fisher-trace prime learning window")
@register_method("inforeg_official", "InfoReg with the released constants: 0.95 for the first modality, 0.1 for the others",
                 constants="fixed")
class InfoReg(BalancingMethod):
    name = "inforeg"
    hparams_cls = InfoRegHParams
    min_modalities = 2

    def __init__(self, hparams: InfoRegHParams | None = None) -> None:
        super().__init__(hparams)
        self.traces: list[list[float]] = []  # per epoch: [T^m for m in modalities]
        self.cum_scores: torch.Tensor | None = None
        self.tau = 1.0
        self.active = torch.zeros(0, dtype=torch.bool)
        self.k: list[float] = []
        self.last: dict[str, float] = {}

    # ------------------------------------------------------------------ set-up
    def setup(self, ctx: StepContext) -> None:
        self.uni = UnimodalOutputs(self.hp.uni_head, "inforeg", "inforeg_heads")
        self.uni.setup(ctx)
        model = ctx.raw_model
        self.mods = list(model.modalities)
        M = len(self.mods)
        if self.hp.constants == "fixed" and self.hp.c_fixed is not None and len(self.hp.c_fixed) != M:
            raise ConfigError(f"inforeg: c_fixed has {len(self.hp.c_fixed)} values for {M} modalities "
                              f"({', '.join(self.mods)}); give one constant per modality in this order")
        self.params = {m: [p for p in model.encoder_parameters(m) if p.requires_grad] for m in self.mods}
        self.weights = {m: [p for p in self.params[m] if p.dim() >= 2] for m in self.mods}
        self.cum_scores = torch.zeros(M, dtype=torch.float64, device=ctx.device)
        self._fixed_c = None
        self.constants()  # the fixed constants' device copy, made once here
        if ctx.task.name == "regression":
            self.tau = train_target_tau(ctx)

    # ------------------------------------------------------------------ epoch boundaries
    def sufficient_index(self) -> int:
        """m_s = argmax_m of the cumulative scores (the first modality before any step)."""
        return int(torch.argmax(self.cum_scores).item()) if self.cum_scores is not None else 0

    def on_epoch_start(self, ctx: StepContext) -> None:
        dev = ctx.device
        self.snapshot = {m: [p.detach().clone() for p in self.params[m]] for m in self.mods}
        self.fisher = torch.zeros(len(self.mods), dtype=torch.float64, device=dev)
        self.regulated_steps = torch.zeros(len(self.mods), dtype=torch.float64, device=dev)
        self.beta_sum = torch.zeros(len(self.mods), dtype=torch.float64, device=dev)
        self.n_steps = 0
        M, W, thr = len(self.mods), self.hp.window_len, self.hp.threshold
        per_mod = [window_statistic([t[i] for t in self.traces], W) for i in range(M)]
        src = self.hp.window_source
        if src == "per_modality":
            self.k = per_mod
            active = [k > thr for k in per_mod]
        else:
            if src == "all":
                k = window_statistic([sum(t) for t in self.traces], W)
            else:
                k = per_mod[self.sufficient_index()]
            self.k = [k] * M
            active = [k > thr] * M
        self.active = torch.tensor(active, dtype=torch.bool, device=dev)
        self.any_active = any(active)

    def on_epoch_end(self, ctx: StepContext) -> None:
        t = [float(x) for x in self.fisher.cpu()]
        self.traces.append(t)
        n = max(1, self.n_steps)
        reg = (self.regulated_steps / n).cpu().tolist()
        beta = (self.beta_sum / n).cpu().tolist()
        self.last = {"sufficient": float(self.sufficient_index())}
        for i, m in enumerate(self.mods):
            self.last.update({f"k/{m}": self.k[i], f"trace/{m}": t[i], f"regulated/{m}": reg[i], f"beta/{m}": beta[i]})

    # ------------------------------------------------------------------ steps
    def constants(self) -> torch.Tensor:
        M, dev = len(self.mods), self.cum_scores.device
        if self.hp.constants == "fixed":  # copied to the device once (setup), not per step
            if getattr(self, "_fixed_c", None) is None or self._fixed_c.device != dev:
                c = self.hp.c_fixed if self.hp.c_fixed is not None else [self.hp.c_high] + [self.hp.c_low] * (M - 1)
                self._fixed_c = torch.tensor(c, dtype=torch.float64, device=dev)
            return self._fixed_c
        if self.hp.constants == "symmetric":
            return torch.full((M,), self.hp.c_high, dtype=torch.float64, device=dev)
        lead = torch.arange(M, device=dev) == torch.argmax(self.cum_scores)
        return torch.where(lead, torch.full((M,), self.hp.c_high, dtype=torch.float64, device=dev),
                           torch.full((M,), self.hp.c_low, dtype=torch.float64, device=dev))

    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        y = batch["label"]
        out = ctx.forward(batch)
        loss_fused = ctx.task.loss(out.logits, y)
        u = self.uni(ctx, out, y)
        losses = unimodal_losses(ctx, u, y)
        loss = loss_fused + sum(losses.values())
        with torch.no_grad():
            s_local = score_sums(ctx.task.name, {m: v.detach() for m, v in u.items()}, y, self.tau).double()
            n_local = s_local.new_full((1,), float(y.shape[0]))  # made on the device: no copy per step
            red = torch.cat([s_local, n_local])
            if ctx.world_size > 1:  # SUM over ranks: every rank compares the same global scores
                red = ctx.accelerator.reduce(red, reduction="sum")
            s, n = red[:-1], red[-1]
            self.cum_scores = self.cum_scores + s  # the sufficient modality: cumulative scores so far
            gap_s = s / n if self.hp.gap == "mean" else s
            self.beta = regulation_strength(gap_s, self.constants(), self.active)
        logs = unimodal_logs(ctx, "inforeg", losses, u, y)
        logs["inforeg/loss_fused"] = loss_fused.detach()
        for i, m in enumerate(self.mods):
            logs[f"inforeg/score_{m}"] = s[i] / n
            logs[f"inforeg/beta_{m}"] = self.beta[i]
        return StepOutput(loss, out, logs)

    def after_backward(self, ctx: StepContext) -> None:
        fp16 = ctx.accelerator.scaler is not None
        inc = []
        for i, m in enumerate(self.mods):
            if self.any_active:  # p.grad += β_m·(p − p^(e)); β_m = 0 except for the regulated leader
                b = self.beta[i].float()
                pairs = [(p, p0) for p, p0 in zip(self.params[m], self.snapshot[m]) if p.grad is not None]
                if pairs and all(p.grad.dtype == torch.float32 for p, _ in pairs):
                    # batched: the same element-wise operations as one tensor at a time (bit-identical)
                    with torch.no_grad():
                        pull = torch._foreach_sub([p.detach() for p, _ in pairs], [p0 for _, p0 in pairs])
                        torch._foreach_mul_(pull, b)
                        torch._foreach_add_([p.grad for p, _ in pairs], pull)
                else:
                    for p, p0 in pairs:
                        p.grad.add_(b.to(p.grad.dtype) * (p.detach() - p0))
            inc.append(fisher_increment([p.grad for p in self.weights[m]]).to(self.fisher.device))
        inc_t = torch.stack(inc)
        if fp16:  # the scaler will skip a step with non-finite gradients: do not count it
            inc_t = torch.where(inc_t.isfinite(), inc_t, torch.zeros_like(inc_t))
        self.fisher = self.fisher + inc_t
        self.regulated_steps = self.regulated_steps + (self.beta > 0).double()
        self.beta_sum = self.beta_sum + self.beta
        self.n_steps += 1

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"traces": [list(t) for t in self.traces],
                "cum_scores": self.cum_scores.detach().cpu().clone() if self.cum_scores is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.traces = [list(t) for t in state.get("traces", [])]
        cs = state.get("cum_scores")
        if cs is not None:
            dev = self.cum_scores.device if self.cum_scores is not None else "cpu"
            self.cum_scores = cs.to(dev, torch.float64).clone()

    def metrics(self) -> dict[str, float]:
        return dict(self.last)
