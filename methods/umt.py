"""UMT — Uni-Modal Teacher (docs/methods/umt.md; Du et al., ICML 2023, arXiv 2305.01233), and the
UMT/UME choice rule (umt.md §2 "Choice between UMT and UME").

Phase U: the ``<m>-only`` models (``mmbalance.teachers``; shared, cached, selected on validation) are
loaded as frozen teachers (eval mode, no gradient, not DDP-wrapped; umt.md §3, §7 bug 1). Phase J: the
canonical model from scratch with L = ℓ(ŷ, y) + λ·Σ_m Σ_j MSE(z_m^{(j)}, t_m^{(j)}) (umt.md §2 step 4),
MSE in fp32 over all elements.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from mmbalance.methods._outputs import output_tensors
from torch import nn

from mmbalance.errors import MethodNotApplicable
from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import LogUniform
from mmbalance.tasks import Task
from mmbalance.teachers import TeacherInfo, jsonable_infos, teacher_costs, train_unimodal


class FeatureProjector(nn.Module):
    """Student-side map to the teacher's width (``umt.projector=true``, umt.md §3; generalisation):
    Linear on the channel-last axis for vectors/sequences, 1×1 conv for maps."""

    def __init__(self, kind: str, d_in: int, d_out: int) -> None:
        super().__init__()
        self.kind = kind
        self.proj: nn.Module = nn.Conv2d(d_in, d_out, 1) if kind == "map" else nn.Linear(d_in, d_out)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(z)


@dataclass
class UMTHParams:
    """umt.md §4. ``lam`` λ = 10 (BalanceBenchmark ``UMT: scaling: 10``; paper value unverified);
    ``student_init``: ``scratch`` (paper, unverified) or ``teacher`` (warm start, a different method);
    ``projector``: learned student-side projector when shapes differ (off); ``normalize``: ``none`` or
    ``teacher_var`` (each MSE divided by the teacher feature variance)."""

    lam: float = field(default=10.0, metadata={"search": LogUniform(0.3, 30.0)})
    student_init: Literal["scratch", "teacher"] = "scratch"
    projector: bool = False
    normalize: Literal["none", "teacher_var"] = "none"

    def validate(self) -> None:
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")


@register_method("umt", "Uni-Modal Teacher: feature distillation from frozen unimodal teachers (cached)")
class UMT(BalancingMethod):
    """umt.md §2: task loss + λ·Σ_m MSE(student encoder output, frozen teacher encoder output)."""

    name = "umt"
    hparams_cls = UMTHParams

    def __init__(self, hparams: Any = None) -> None:
        super().__init__(hparams)
        self.teachers: list[TeacherInfo] = []
        self._last_distill = 0.0

    def setup(self, ctx: StepContext) -> None:
        student = ctx.raw_model
        self.teachers = []
        for m in student.modalities:
            teacher, info = train_unimodal(ctx, m)
            self.teachers.append(info)
            s_kind, t_kind = student.feature_kinds[m], teacher.feature_kinds[m]
            s_dim, t_dim = student.feature_dims[m], teacher.feature_dims[m]
            if (s_kind, s_dim) != (t_kind, t_dim):
                if not self.hp.projector or s_kind != t_kind:
                    raise MethodNotApplicable(
                        f"umt: modality {m!r}: student features ({s_kind}, width {s_dim}) and teacher features "
                        f"({t_kind}, width {t_dim}) differ; set projector=true to add a learned projector")
                ctx.add_module(f"umt_projector_{m}", FeatureProjector(s_kind, s_dim, t_dim), own_optimizer=False)
            if self.hp.student_init == "teacher":
                student.encoders[m].load_state_dict(teacher.encoders[m].state_dict())
            ctx.add_module(f"umt_teacher_{m}", teacher, trainable=False)

    def distill_loss(self, ctx: StepContext, batch: dict[str, torch.Tensor],
                     features: dict[str, Any]) -> torch.Tensor:
        """Σ_m Σ_j MSE(z_m^{(j)}, t_m^{(j)}) in fp32 (umt.md §2 step 4, §9): j runs over every tensor that
        enters fusion, including the parts one z_m packs (BraTS: ASPP output and layer1 features, one
        MSE each, not one MSE over their concatenation, which would average them). Teachers run
        without grad, under the student's autocast (§9)."""
        total = torch.zeros((), device=ctx.device, dtype=torch.float32)
        student = ctx.raw_model
        for m in ctx.modalities:
            teacher = ctx.modules[f"umt_teacher_{m}"]
            with torch.no_grad(), ctx.accelerator.autocast():
                t_feats = teacher.encode({m: batch[m]})[m]
            proj = ctx.modules.get(f"umt_projector_{m}")
            pairs = []
            for z, t in zip(output_tensors(features[m]), output_tensors(t_feats)):
                if proj is not None:  # a projected z is compared whole
                    pairs.append((proj(z), t))
                else:
                    zp, tp = student.feature_parts(m, z), teacher.feature_parts(m, t)
                    pairs.extend((zp[k], tp[k]) for k in zp)
            for z, t in pairs:
                mse = F.mse_loss(z.float(), t.detach().float())
                if self.hp.normalize == "teacher_var":
                    mse = mse / t.float().var().clamp_min(1e-8)
                total = total + mse
        return total

    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        out = ctx.forward(batch)
        task_loss = ctx.task.loss(out.logits, batch["label"])
        distill = self.distill_loss(ctx, batch, out.features)
        loss = task_loss + self.hp.lam * distill
        self._last_distill = distill.detach()  # a tensor: no host read per step
        return StepOutput(loss, out, {"task_loss": task_loss.detach(), "distill": distill.detach()})

    def metrics(self) -> dict[str, float]:
        return teacher_costs(self.teachers)

    def teacher_record(self) -> list[dict[str, Any]]:
        return jsonable_infos(self.teachers)


def choose_umt_or_ume(baseline_val: dict[str, float], ume_val: dict[str, float], task: Task | str,
                      metric: str | None = None) -> str:
    """The UMT/UME choice rule (umt.md §2, paper rule paraphrased; unverified), on VALIDATION only.

    If the naive joint model (``baseline``) beats UME on the selection metric, paired features matter
    and UMT is recommended (returns ``"umt"``); if UME is at least as good, uni-modal features dominate
    (returns ``"ume"``). ``task`` gives the metric and its direction (a Task, or ``"regression"`` etc.).
    """
    if isinstance(task, str):
        from mmbalance.tasks import create_task

        kwargs = {"num_classes": 2} if task in {"classification", "segmentation"} else {}
        task = create_task(task, **kwargs)
    key = metric or task.primary_metric
    b, u = float(baseline_val[key]), float(ume_val[key])
    if math.isnan(b) or math.isnan(u):
        raise ValueError(f"umt_ume_auto: validation {key} is NaN (baseline {b}, ume {u})")
    return "umt" if task.compare(b, u) > 0 else "ume"


def umt_ume_auto(baseline: dict[str, Any], ume: dict[str, Any], umt: dict[str, Any]) -> dict[str, Any]:
    """Derived leaderboard entry ``umt_ume_auto`` from three ``result.json`` contents of the same
    dataset/seed: the choice is made on validation; its test result is the chosen method's test result
    (umt.md §2). The choice is recorded under ``choice``."""
    for r in (baseline, ume, umt):
        if r.get("status") != "ok":
            raise ValueError(f"umt_ume_auto: run {r.get('method')!r} did not finish ({r.get('status')})")
    task = baseline["task"]
    key = baseline["primary_metric"]
    from mmbalance.tasks import Task as _Task

    class _Cmp(_Task):
        primary_metric = key
        higher_is_better = bool(baseline["higher_is_better"])

    choice = choose_umt_or_ume(baseline["val"], ume["val"], _Cmp(), key)
    chosen = umt if choice == "umt" else ume
    return {"method": "umt_ume_auto", "choice": choice, "task": task, "primary_metric": key,
            "val": chosen["val"], "test": chosen["test"], "seed": chosen.get("seed"),
            "dataset": chosen.get("dataset"), "rule_inputs": {"baseline_val": baseline["val"][key],
                                                               "ume_val": ume["val"][key]}}
