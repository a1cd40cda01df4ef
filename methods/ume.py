"""UME — Uni-Modal Ensemble (docs/methods/ume.md; Du et al., ICML 2023, arXiv 2305.01233).

Phase U (shared with UMT, ``mmbalance.teachers``): each ``<m>-only`` model is trained alone, selected on
validation, and cached. No joint training: the run's model *is* the ensemble of the M cached unimodal
models (``unimodal_ensemble``; parameter count = Σ unimodal models, no fusion module, ume.md §8 test 2),
and its output is o(x) = Σ_m w_m·f_m(x_m) with w_m = 1/M (ume.md §2 step 3).

Engine mapping (the engine has no ``owns_loop``): one phase ``ensemble`` of ONE epoch in which no
parameter changes (every parameter group has ``lr_mult = 0`` and the step's loss touches no
parameter), followed by the usual validation → selection → single test evaluation. This costs one pass
over the batch indices and nothing else; the engine needs one evaluated epoch to select a checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from mmbalance.data import ModelSpec, MultimodalData
from mmbalance.errors import ConfigError, MethodNotApplicable
from mmbalance.interface import BalancingMethod, ModelOutput, Phase, StepContext, StepOutput
from mmbalance.models.base import MultimodalModel
from mmbalance.registry import create_model, register_method, register_model
from mmbalance.teachers import TeacherInfo, jsonable_infos, teacher_costs, train_unimodal


class UnimodalEnsemble(MultimodalModel):
    """M independent ``<m>-only`` models; ``logits`` = weighted average of their outputs (ume.md §2.3).

    ``average="logits"``: Σ_m w_m·f_m(x_m) (classification logits, regression values, segmentation
    logit maps); ``average="probs"``: log Σ_m w_m·softmax(f_m(x_m)) over the class axis (log of the
    averaged probabilities: same argmax as the probability average, and a proper input to the
    cross-entropy used for the validation loss). ``fused`` stacks the member outputs on axis 1.
    """

    def __init__(self, members: dict[str, MultimodalModel], average: str = "logits",
                 weights: dict[str, float] | None = None) -> None:
        first = next(iter(members.values()))
        super().__init__({m: members[m].encoders[m] for m in members}, nn.Identity(), nn.Identity(),
                         feature_kinds={m: members[m].feature_kinds[m] for m in members},
                         feature_dims={m: members[m].feature_dims[m] for m in members}, out_dim=first.out_dim)
        del self.encoders  # the members own their encoders; keep a single copy of each parameter
        self.members = nn.ModuleDict(members)
        self.average = average
        w = weights or {m: 1.0 / len(members) for m in members}
        self.register_buffer("weights", torch.tensor([float(w[m]) for m in members]), persistent=False)
        self.variant = "late"

    @property
    def encoders(self) -> nn.ModuleDict:  # type: ignore[override]
        return nn.ModuleDict({m: mod.encoders[m] for m, mod in self.members.items()})

    def combine(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """ume.md §2 step 3 on a list of member outputs (modality order)."""
        w = self.weights.to(outputs[0].dtype)
        if self.average == "probs":
            probs = sum(w[k] * o.float().softmax(dim=1) for k, o in enumerate(outputs))
            return probs.clamp_min(1e-12).log()
        return sum(w[k] * o for k, o in enumerate(outputs))

    def forward(self, inputs: dict[str, torch.Tensor], absent: Any = ()) -> ModelOutput:
        absent = set(absent)
        outs = {m: self.members[m]({m: torch.zeros_like(inputs[m]) if m in absent else inputs[m]})
                for m in self.modalities}
        logits_list = [outs[m].logits for m in self.modalities]
        return ModelOutput({m: outs[m].features[m] for m in self.modalities},
                           {m: outs[m].pooled[m] for m in self.modalities},
                           torch.stack(logits_list, dim=1), self.combine(logits_list))


@register_model("unimodal_ensemble", "UME: average of independent <m>-only models (no fusion parameters)")
def unimodal_ensemble(*, modalities: list[str], input_shapes: dict[str, tuple[int, ...]], out_dim: int,
                      base: str, average: str = "logits", **base_kwargs: Any) -> UnimodalEnsemble:
    members = {m: create_model(base, modalities=[m], input_shapes=input_shapes, out_dim=out_dim, **base_kwargs)
               for m in modalities}
    return UnimodalEnsemble(members, average)


@dataclass
class UMEHParams:
    """``weights``: ``uniform`` w_m = 1/M (ume.md §4, paper; unverified). ``average``: ``logits``
    (ume.md §4 default) or ``probs`` (softmax average, classification only)."""

    weights: Literal["uniform"] = "uniform"
    average: Literal["logits", "probs"] = "logits"


@register_method("ume", "Uni-Modal Ensemble: average of independently trained unimodal models (cached)")
class UME(BalancingMethod):
    """ume.md: train (or reuse) the ``<m>-only`` models, predict with their average; no joint training."""

    name = "ume"
    hparams_cls = UMEHParams
    min_modalities = 1

    def __init__(self, hparams: Any = None) -> None:
        super().__init__(hparams)
        self.teachers: list[TeacherInfo] = []

    def check_applicable(self, data: MultimodalData, modalities: list[str]) -> None:
        super().check_applicable(data, modalities)
        if self.hp.average == "probs" and data.task == "regression":
            raise MethodNotApplicable("ume: average=probs needs class outputs; dataset "
                                      f"{data.name!r} is a regression task (use average=logits)")

    def configure_model(self, spec: ModelSpec, data: MultimodalData) -> ModelSpec:
        if spec.name == "unimodal_ensemble":
            return spec
        return ModelSpec("unimodal_ensemble", {"base": spec.name, **spec.kwargs, "average": self.hp.average},
                         spec.modalities)

    def setup(self, ctx: StepContext) -> None:
        model = ctx.raw_model
        if not isinstance(model, UnimodalEnsemble):
            raise ConfigError("ume: the model must be 'unimodal_ensemble' (do not override model.name for ume)")
        self.teachers = []
        for m in model.modalities:
            teacher, info = train_unimodal(ctx, m)
            model.members[m].load_state_dict(teacher.state_dict())
            self.teachers.append(info)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """No joint training: every group has lr_mult 0 (ume.md §2 step 2, "no phase J")."""
        return [{"params": list(model.parameters()), "name": "ensemble", "lr_mult": 0.0}]

    def phases(self) -> list[Phase]:
        return [Phase("ensemble", epochs=1, evaluate=True)]

    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        # Nothing to train: a constant loss that reaches no parameter (no gradient, no update).
        return StepOutput(torch.zeros((), device=ctx.device, requires_grad=True))

    @torch.no_grad()
    def predict(self, ctx: StepContext, batch: dict[str, torch.Tensor], absent: tuple[str, ...] = ()) -> torch.Tensor:
        """o(x) = Σ_m w_m·f_m(x_m) (ume.md §2 step 3)."""
        return ctx.forward(batch, absent).logits

    def metrics(self) -> dict[str, float]:
        return teacher_costs(self.teachers)

    def teacher_record(self) -> list[dict[str, Any]]:
        return jsonable_infos(self.teachers)
