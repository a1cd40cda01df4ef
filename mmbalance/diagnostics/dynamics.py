"""Training dynamics logged per epoch for every method (§(d) of docs/diagnostics.md).

o_m, the *unimodal output* of modality m: the split-head logits W_m z_m + b/M when the model's head is
one linear layer over concatenated features (``split_head()``), else the model's output with every
other modality ``absent``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.base import ModelOutput
from ..tasks import Task
from .isolation import isolated


def unimodal_outputs(model: nn.Module, inputs: dict[str, torch.Tensor], out: ModelOutput,
                     mods: list[str]) -> dict[str, torch.Tensor]:
    """o_m for every m (see module docstring); M = 1: the fused output itself."""
    if len(mods) == 1:
        return {mods[0]: out.logits}
    # float32: under autocast the pooled features are bf16/fp16 while the head weight is float32
    uni = model.unimodal_logits({m: p.float() for m, p in out.pooled.items()}) \
        if hasattr(model, "unimodal_logits") else None
    if uni is not None:
        return uni
    return {m: model(inputs, absent=tuple(o for o in mods if o != m)).logits for m in mods}


def _cos(a: list[torch.Tensor | None], b: list[torch.Tensor | None], ref: torch.Tensor) -> torch.Tensor:
    """cos(∇a, ∇b) over a parameter list (None = zero); NaN when either gradient is zero/missing."""
    dot = ref.new_zeros((), dtype=torch.float32)
    na = ref.new_zeros((), dtype=torch.float32)
    nb = ref.new_zeros((), dtype=torch.float32)
    for x, y in zip(a, b):
        if x is not None:
            na = na + x.float().pow(2).sum()
        if y is not None:
            nb = nb + y.float().pow(2).sum()
        if x is not None and y is not None:
            dot = dot + (x.float() * y.float()).sum()
    den = (na * nb).sqrt()
    return torch.where(den > 0, dot / den.clamp_min(1e-30), torch.full_like(den, math.nan))


class Outputs:
    """The fused output and the unimodal outputs o_m of the run's predictor, on unwrapped modules.

    Default (the method keeps the base ``predict``): the model's logits, and o_m as in the module
    docstring. A method with its own ``predict`` (QMF's per-modality heads, ReconBoost, Greedy, UME)
    is its own predictor: the fused output is its ``predict`` and o_m its ``predict`` with every other
    modality absent, evaluated (with gradients when asked) on a shallow copy of the step context whose
    model and modules are unwrapped (no DDP hooks, no collective)."""

    def __init__(self, trainer) -> None:
        import copy
        import inspect

        from ..interface import BalancingMethod

        self.trainer = trainer
        self.method = trainer.method
        self.custom = type(self.method).predict is not BalancingMethod.predict
        self._fn = inspect.unwrap(type(self.method).predict) if self.custom else None
        self._copy = copy.copy
        self.refresh()

    def refresh(self) -> None:
        """Re-read the context (phase, modules): called at every epoch start."""
        ctx, acc = self.trainer.ctx, self.trainer.accelerator
        self.model = ctx.raw_model
        self.modules = [self.model]
        if self.custom:
            self._ctx = self._copy(ctx)
            self._ctx.model = self.model
            self._ctx.modules = {k: acc.unwrap_model(v) for k, v in ctx.modules.items()}
            self.modules += list(self._ctx.modules.values())

    def __call__(self, batch: dict[str, torch.Tensor], mods: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self.custom:
            inputs = {m: batch[m] for m in mods}
            out = self.model(inputs)
            return out.logits, unimodal_outputs(self.model, inputs, out, mods)
        fused = self._fn(self.method, self._ctx, batch, ())
        if len(mods) == 1:
            return fused, {mods[0]: fused}
        return fused, {m: self._fn(self.method, self._ctx, batch, tuple(o for o in mods if o != m)) for m in mods}


def gradient_alignment(outputs: Outputs, task: Task, batch: dict[str, torch.Tensor],
                       mods: list[str]) -> torch.Tensor:
    """[M] cos(∂L_f/∂θ_m, ∂L_m/∂θ_m) on one batch: L_f = task loss of the fused output, L_m = task loss
    of o_m, θ_m = encoder m's parameters (MMPareto's gradient-conflict measure). Train mode, with
    ``torch.autograd.grad`` (``.grad`` untouched), RNG and buffers isolated; NaN where undefined."""
    y = batch["label"]
    model = outputs.model
    params = {m: [p for p in model.encoder_parameters(m) if p.requires_grad] for m in mods}
    with isolated(*outputs.modules, train_mode=True), torch.enable_grad():
        fused, uni = outputs(batch, mods)
        ref = fused
        if not ref.requires_grad or not any(params.values()):
            return torch.full((len(mods),), math.nan, device=ref.device)
        loss_f = task.loss(fused.float(), y)
        flat = [p for m in mods for p in params[m]]
        g_f = torch.autograd.grad(loss_f, flat, allow_unused=True, retain_graph=True)
        cos, start = [], 0
        for m in mods:
            g_fm = list(g_f[start:start + len(params[m])])
            start += len(params[m])
            if not params[m]:
                cos.append(torch.full((), math.nan, device=ref.device))
                continue
            if len(mods) == 1:
                g_um = g_fm
            else:
                loss_m = task.loss(uni[m].float(), y)
                g_um = list(torch.autograd.grad(loss_m, params[m], allow_unused=True, retain_graph=True)) \
                    if loss_m.requires_grad else [None] * len(params[m])
            cos.append(_cos(g_fm, g_um, ref))
    return torch.stack(cos).detach()


@torch.no_grad()
def true_class_confidence(task: Task, logits: torch.Tensor, y: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of the per-sample confidence in the truth: classification softmax(o)[y]
    (OGM-GE's discrepancy score s_m, eq. 7 of Peng et al. 2022); segmentation the mean per-pixel
    true-class probability; regression exp(−|ŷ − y|/τ)."""
    if task.name == "classification":
        p = F.softmax(logits.float(), dim=-1).gather(1, y.long().view(-1, 1)).squeeze(1)
        return p.sum().double(), torch.tensor(float(len(y)), dtype=torch.float64)
    if task.name == "segmentation":
        p = F.softmax(logits.float(), dim=1).gather(1, y.long().unsqueeze(1)).squeeze(1)
        return p.flatten(1).mean(1).sum().double(), torch.tensor(float(len(y)), dtype=torch.float64)
    b = y.shape[0]
    err = (logits.reshape(b).float() - y.reshape(b).float()).abs()
    return torch.exp(-err / max(tau, 1e-12)).sum().double(), torch.tensor(float(b), dtype=torch.float64)


class GradNormMeter:
    """Per-step gradient norms of each modality's encoder parameters (and ``head`` = the final
    layer), accumulated on the device (one host sync per epoch)."""

    def __init__(self, groups: dict[str, list[nn.Parameter]], device: torch.device) -> None:
        self.names = list(groups)
        self.groups = list(groups.values())
        self.device = device
        self.reset()

    def reset(self) -> None:
        k = len(self.names)
        self.raw = torch.zeros(k, dtype=torch.float64, device=self.device)
        self.raw_sq = torch.zeros(k, dtype=torch.float64, device=self.device)
        self.edited = torch.zeros(k, dtype=torch.float64, device=self.device)
        self.n_raw = 0
        self.n_edited = 0

    def _norms(self) -> torch.Tensor:
        out = []
        for ps in self.groups:
            gs = [p.grad.detach() for p in ps if p.grad is not None]
            if gs:
                out.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm([g.float() for g in gs]))))
            else:
                out.append(torch.zeros((), device=self.device))
        return torch.stack(out).to(torch.float64)

    def observe_raw(self) -> None:
        n = self._last_raw = self._norms()
        self.raw += n
        self.raw_sq += n * n
        self.n_raw += 1

    def observe_edited(self, unchanged: bool = False) -> None:
        """``unchanged``: nothing edited the gradients since :meth:`observe_raw` (the method has no
        ``after_backward``), so the edited norms are the raw ones, not computed again."""
        self.edited += self._last_raw if unchanged else self._norms()
        self.n_edited += 1

    def summary(self) -> dict[str, dict[str, float]]:
        raw = (self.raw / max(1, self.n_raw)).cpu().tolist()
        sq = (self.raw_sq / max(1, self.n_raw)).cpu().tolist()
        ed = (self.edited / max(1, self.n_edited)).cpu().tolist()
        names = self.names
        mods = [m for m in names if m != "head"]
        out: dict[str, dict[str, float]] = {"grad_norm_raw": dict(zip(names, raw)), "grad_norm": dict(zip(names, ed)),
                                            "grad_sq": dict(zip(names, sq))}
        out["grad_ratio"] = ratio_to_others({m: out["grad_norm_raw"][m] for m in mods})
        out["edit_ratio"] = {m: (out["grad_norm"][m] / out["grad_norm_raw"][m] if out["grad_norm_raw"][m] > 0
                                 else math.nan) for m in names}
        return out


def ratio_to_others(x: dict[str, float]) -> dict[str, float]:
    """r_m = x_m / mean_{k≠m} x_k (OGM-GE's ratio generalised to M modalities); NaN for M = 1 or a
    zero denominator."""
    out = {}
    for m, v in x.items():
        others = [x[k] for k in x if k != m]
        den = sum(others) / len(others) if others else math.nan
        out[m] = v / den if others and den > 0 and math.isfinite(v) else math.nan
    return out
