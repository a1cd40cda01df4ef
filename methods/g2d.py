"""G2D — Gradient-Guided Distillation (docs/methods/g2d.md; Rakib, Bagavathi, ICCV 2025, arXiv 2506.21514).

Official code rAIson-Lab/G2D @ 95969d8. Phase U: one unimodal teacher per modality — the shared, cached
``<m>-only`` models (``mmbalance.teachers``, selected on validation). Phase J, per step (``student.py:73-166``):

    L = ℓ(o, y) + Σ_m [β·τ²·KL(softmax(l_m^T/τ) ‖ softmax(o/τ)) + α·MSE(z̄_m, f_m^T)]

(the logit term targets the FUSED output o for every teacher). Sequential modality prioritisation (SMP,
``utils/utils.py:243-284``) during epochs smp_start..⌊smp_end_frac·E⌋: the teachers' batch confidences
ρ_m = Σ_i softmax(l_m,i^T)[y_i] decide which encoders are suppressed — at M = 2 the more confident
modality's weight gradients are multiplied by 0 — so the weaker modality leads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from mmbalance.methods._outputs import output_tensors
from mmbalance.methods.ogm_ge import score_sums, train_target_tau
from mmbalance.methods.umt import FeatureProjector
from torch import nn

from mmbalance.errors import MethodNotApplicable
from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import LogUniform, Uniform
from mmbalance.teachers import TeacherInfo, jsonable_infos, teacher_costs, train_unimodal

__all__ = ["G2D", "G2DHParams", "distill_logits", "smp_suppressed"]


@dataclass
class G2DHParams:
    """Hyperparameters (official ``config.py``).

    - ``w_logit`` (β) 1.0, ``w_feat`` (α) 1.0, ``tau`` (τ) 1: ``config.py:117-144``.
    - ``smp`` true: ``modulation = 'G2D'`` (``config.py:25``); false = preset ``g2d_no_smp``.
    - ``smp_start`` 0, ``smp_end_frac`` 0.5: the window 0..150 of 300 epochs (``config.py:50-51``),
      i.e. epochs ``smp_start`` ≤ e ≤ ⌊``smp_end_frac``·E⌋.
    - ``smp_params`` ``weights``: every encoder parameter with ≥ 2 dims (mmbalance; on ResNet encoders the
      official set), ``conv4d`` (code literal: 4-D tensors only), ``all``.
    - ``smp_zero`` ``zero``: gradient × 0, momentum and weight decay still move the weights
      (``utils.py:281-284``); ``freeze``: gradient set to None (a true freeze).
    - ``smp_rule`` ``keep_weakest`` (M ≥ 3: only the least confident modality keeps its gradients; at
      M = 2 the code's rule) or ``suppress_strongest``.
    - ``feature_target`` ``auto``: ``pooled`` (``student.py:86, 107, 127``) except segmentation, which uses
      ``fusion_tensors`` (every tensor entering the fusion, as UMT).
    - ``projector`` false: a learned student-side projector when widths differ (generalisation).
    """

    w_logit: float = field(default=1.0, metadata={"search": LogUniform(0.1, 10.0)})
    w_feat: float = field(default=1.0, metadata={"search": LogUniform(0.1, 10.0)})
    tau: float = 1.0
    smp: bool = True
    smp_start: int = 0
    smp_end_frac: float = field(default=0.5, metadata={"search": Uniform(0.1, 0.9)})
    smp_params: Literal["weights", "conv4d", "all"] = "weights"
    smp_zero: Literal["zero", "freeze"] = "zero"
    smp_rule: Literal["keep_weakest", "suppress_strongest"] = "keep_weakest"
    feature_target: Literal["auto", "pooled", "fusion_tensors"] = "auto"
    projector: bool = False

    def validate(self) -> None:
        if self.w_logit < 0 or self.w_feat < 0:
            raise ValueError(f"w_logit and w_feat must be >= 0, got {self.w_logit}, {self.w_feat}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if not 0.0 <= self.smp_end_frac <= 1.0:
            raise ValueError(f"smp_end_frac must be in [0, 1], got {self.smp_end_frac}")


def distill_logits(task: str, student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """The logit term (``student.py:179-192``): τ²·KL(softmax(l^T/τ) ‖ softmax(o/τ)) averaged over samples
    (segmentation: over pixels), float32; regression: MSE(o, l^T)."""
    s, t = student.float(), teacher.detach().float()
    if task == "regression":
        return F.mse_loss(s, t)
    log_q = F.log_softmax(s / tau, dim=1)
    p = F.softmax(t / tau, dim=1)
    kl = (p * (torch.log(p.clamp_min(1e-30)) - log_q)).sum(1)
    return kl.mean() * tau * tau


def smp_suppressed(rho: torch.Tensor, rule: str = "keep_weakest") -> torch.Tensor:
    """Float mask [M] of the suppressed modalities (``utils.py:243-284``). ``keep_weakest``: every modality
    more confident than the least confident one (M = 2: the larger ρ; a tie suppresses nothing, where the
    code raises ValueError); ``suppress_strongest``: the most confident one(s) unless all are equal."""
    low, high = rho.min(), rho.max()
    if rule == "keep_weakest":
        return (rho > low).to(torch.float32)
    return ((rho == high) & (high > low)).to(torch.float32)


@register_method("g2d", "G2D: KL to each unimodal teacher on the fused output + feature MSE, and SMP (the "
                        "teacher-confident modality's encoder gradients zeroed in the first half)")
@register_method("g2d_no_smp", "G2D distillation only (no sequential modality prioritisation)", smp=False)
class G2D(BalancingMethod):
    name = "g2d"
    hparams_cls = G2DHParams
    min_modalities = 2

    def __init__(self, hparams: G2DHParams | None = None) -> None:
        super().__init__(hparams)
        self.teachers: list[TeacherInfo] = []
        self._rho: torch.Tensor | None = None
        self._last: torch.Tensor | None = None  # [2M]: last SMP step's ρ/B and suppression mask

    # ------------------------------------------------------------------ set-up
    def setup(self, ctx: StepContext) -> None:
        student = ctx.raw_model
        task = ctx.task.name
        self.mods = list(student.modalities)
        self.target = self.hp.feature_target
        if self.target == "auto":
            self.target = "fusion_tensors" if task == "segmentation" else "pooled"
        self.tau_y = train_target_tau(ctx) if task == "regression" else 1.0
        self.teachers = []
        for m in self.mods:
            teacher, info = train_unimodal(ctx, m)  # cached <m>-only model, selected on validation
            self.teachers.append(info)
            if teacher.out_dim != student.out_dim:
                raise MethodNotApplicable(f"g2d: teacher {m!r} has {teacher.out_dim} outputs, the student "
                                          f"{student.out_dim}")
            s_kind, t_kind = student.feature_kinds[m], teacher.feature_kinds[m]
            s_dim, t_dim = student.feature_dims[m], teacher.feature_dims[m]
            if s_dim != t_dim or (self.target == "fusion_tensors" and s_kind != t_kind):
                if not self.hp.projector or (self.target == "fusion_tensors" and s_kind != t_kind):
                    raise MethodNotApplicable(
                        f"g2d: modality {m!r}: student feature width {s_dim} ({s_kind}) and teacher width {t_dim} "
                        f"({t_kind}) differ; set projector=true to add a learned projector")
                kind = s_kind if self.target == "fusion_tensors" else "vector"
                ctx.add_module(f"g2d_projector_{m}", FeatureProjector(kind, s_dim, t_dim), own_optimizer=False)
            ctx.add_module(f"g2d_teacher_{m}", teacher, trainable=False)
        self._params: dict[str, list[nn.Parameter]] | None = None

    def smp_window(self, ctx: StepContext) -> bool:
        """SMP epochs: smp_start ≤ e ≤ ⌊smp_end_frac·E⌋ (inclusive, 0-based; 150 of 300 in the code)."""
        end = int(self.hp.smp_end_frac * ctx.epochs_in_phase)
        return self.hp.smp and self.hp.smp_start <= ctx.epoch <= end

    def _suppressible(self, ctx: StepContext) -> dict[str, list[nn.Parameter]]:
        if self._params is None:
            model, rule = ctx.raw_model, self.hp.smp_params
            keep = {"weights": lambda p: p.dim() >= 2, "conv4d": lambda p: p.dim() == 4, "all": lambda p: True}[rule]
            self._params = {m: [p for p in model.encoder_parameters(m) if p.requires_grad and keep(p)] for m in self.mods}
        return self._params

    # ------------------------------------------------------------------ training
    def teacher_outputs(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Each frozen teacher on its own modality, without gradient, under the student's autocast."""
        outs = {}
        with torch.no_grad(), ctx.accelerator.autocast():
            for m in self.mods:
                outs[m] = ctx.modules[f"g2d_teacher_{m}"]({m: batch[m]})
        return outs

    def feature_loss(self, ctx: StepContext, m: str, student_out: Any, teacher_out: Any) -> torch.Tensor:
        proj = ctx.modules.get(f"g2d_projector_{m}")
        if self.target == "pooled":
            z = student_out.pooled[m]
            return F.mse_loss((proj(z) if proj is not None else z).float(), teacher_out.pooled[m].float())
        student, teacher = ctx.raw_model, ctx.modules[f"g2d_teacher_{m}"]
        total = torch.zeros((), device=ctx.device, dtype=torch.float32)
        for z, t in zip(output_tensors(student_out.features[m]), output_tensors(teacher_out.features[m])):
            pairs = [(proj(z), t)] if proj is not None else list(zip(student.feature_parts(m, z).values(),
                                                                      teacher.feature_parts(m, t).values()))
            for a, b in pairs:
                total = total + F.mse_loss(a.float(), b.float())
        return total

    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        y = batch["label"]
        task = ctx.task.name
        out = ctx.forward(batch)
        loss_task = ctx.task.loss(out.logits, y)
        t_out = self.teacher_outputs(ctx, batch)
        kl = torch.stack([distill_logits(task, out.logits, t_out[m].logits, self.hp.tau) for m in self.mods])
        mse = torch.stack([self.feature_loss(ctx, m, out, t_out[m]) for m in self.mods])
        loss = loss_task + self.hp.w_logit * kl.sum() + self.hp.w_feat * mse.sum()
        if self.smp_window(ctx):
            rho = score_sums(task, {m: t_out[m].logits for m in self.mods}, y, self.tau_y)
            self._rho = torch.cat([rho.float(), torch.ones(1, device=rho.device) * y.shape[0]])
        else:
            self._rho = None
        ctx.log_many([f"g2d/kl_{m}" for m in self.mods] + [f"g2d/mse_{m}" for m in self.mods],
                     torch.cat([kl, mse]).detach())
        return StepOutput(loss, out, {"g2d/loss_task": loss_task.detach()})

    def after_backward(self, ctx: StepContext) -> None:
        """SMP: ρ SUM-reduced over ranks, then the chosen encoders' gradients × 0 (or None)."""
        if self._rho is None:
            return
        s = ctx.reduce_sum(self._rho)
        rho = s[:-1]
        supp = smp_suppressed(rho, self.hp.smp_rule)
        stats = torch.cat([(rho / s[-1]).float(), supp])
        ctx.log_many([f"g2d/rho_{m}" for m in self.mods] + [f"g2d/suppressed_{m}" for m in self.mods], stats)
        self._last = stats
        params = self._suppressible(ctx)
        if self.hp.smp_zero == "freeze":  # a host decision: gradients set to None (one read per step)
            for m, flag in zip(self.mods, supp.tolist()):
                if flag:
                    for p in params[m]:
                        p.grad = None
            return
        grads, factors = [], []
        keep = (1.0 - supp).unbind()
        for k, m in enumerate(self.mods):
            for p in params[m]:
                if p.grad is not None:
                    grads.append(p.grad)
                    factors.append(keep[k])
        if grads:
            torch._foreach_mul_(grads, factors)

    # ------------------------------------------------------------------ records
    def metrics(self) -> dict[str, float]:
        """Teacher cost charged to this run, and the last SMP step's ρ_m/B and choice (identical on every
        rank: computed from the SUM-reduced confidences)."""
        out = teacher_costs(self.teachers)
        if self._last is not None:
            vals = self._last.tolist()
            M = len(self.mods)
            out.update({f"rho_{m}": vals[k] for k, m in enumerate(self.mods)})
            out.update({f"suppressed_{m}": vals[M + k] for k, m in enumerate(self.mods)})
        return out

    def teacher_record(self) -> list[dict[str, Any]]:
        return jsonable_infos(self.teachers)
