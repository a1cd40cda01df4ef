"""ReconBoost (docs/methods/reconboost.md; Hua et al., ICML 2024; official code huacong/ReconBoost@14ab57a).

Model (``reconboost_late``, reconboost.md §2): the canonical encoders φ_m, no fusion module, one head H
shared by all modalities (Linear(d, 256) → ReLU → Linear(256, C); for feature maps the dataset model's
one-input decoder — BraTS: DeepLabV3+ decoder, upsampled to the label size — or, for models without one,
a 3×3-conv → ReLU → 1×1-conv head), learners f_m = H∘φ_m and a learnable scalar β; F(x) = β·Σ_m f_m(x_m).

Engine mapping. Stage t = two engine phases: ``s<t>_boost_<m>`` (phase 1, ``e1`` epochs, not evaluated)
and ``s<t>_rectify`` (phase 2, ``e2`` epochs, the last epoch evaluated on VALIDATION, so the engine's
best-evaluated-epoch selection is the best-stage selection). S = ⌊P/(e1 + e2)⌋ stages, P = ``pass_budget``
(default: the dataset's epochs). The main optimizer holds one group per encoder, H and β; "re-creating
the optimizer" at the start of each phase (reconboost.md §2 steps 2-3) = clearing its state (momentum)
and setting ``lr_mult`` to 1 for the phase's trainable groups and 0 for the others (phase 1: φ_m and H;
phase 2: everything). Inactive encoders also get no gradient in phase 1 (F_{−m} is computed under
``no_grad``), hence ``find_unused_parameters = True``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.data import ModelSpec, MultimodalData
from mmbalance.engine import LRSchedule
from mmbalance.errors import ConfigError, MethodNotApplicable
from mmbalance.interface import BalancingMethod, ModelOutput, Phase, StepContext, StepOutput
from mmbalance.models.base import MultimodalModel, pool_feature
from mmbalance.models.heads import dense_unimodal_head
from mmbalance.registry import create_model, register_method, register_model
from mmbalance.search import Uniform


class SharedHead(nn.Module):
    """H of reconboost.md §2 (``common_space``): pooled vector → Linear(d, hidden) → ReLU → Linear(hidden, C);
    feature maps (segmentation generalisation, §5) → Conv3×3(d, hidden) → ReLU → Conv1×1(hidden, C)."""

    def __init__(self, kind: str, dim: int, out_dim: int, hidden: int, dense: bool | None = None) -> None:
        super().__init__()
        self.kind = kind
        #: per-pixel outputs (segmentation); a classification model with feature maps pools them first
        self.dense = kind == "map" if dense is None else dense
        if self.dense:
            self.net: nn.Module = nn.Sequential(nn.Conv2d(dim, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, out_dim, 1))
        else:
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z if self.dense else pool_feature(z, self.kind))


class ReconBoostModel(MultimodalModel):
    """Encoders + shared head H + scalar β (``boost_rate``). ``forward`` → logits β·Σ_m f_m(x_m),
    ``fused`` = stacked learner outputs [B, M, ...]. ``forward(..., active=m)`` computes f_m with
    gradient and every other learner under ``no_grad`` (phase 1: F_{−m} without gradient)."""

    def __init__(self, encoders: dict[str, nn.Module], feature_kinds: dict[str, str], feature_dims: dict[str, int],
                 out_dim: int, head_hidden: int, beta_init: float, head: nn.Module | None = None,
                 dense: bool | None = None) -> None:
        dims = set(feature_dims.values())
        kinds = set(feature_kinds.values())
        if len(dims) != 1 or len(kinds) != 1:
            raise MethodNotApplicable(f"reconboost: the shared head needs equal encoder widths and feature kinds; "
                                      f"got widths {feature_dims} and kinds {feature_kinds}")
        kind, dim = kinds.pop(), dims.pop()
        super().__init__(encoders, nn.Identity(), head if head is not None else SharedHead(kind, dim, out_dim, head_hidden, dense),
                         feature_kinds=feature_kinds, feature_dims=feature_dims, out_dim=out_dim)
        self.beta = nn.Parameter(torch.tensor(float(beta_init)))
        self.variant = "late"

    def learner(self, m: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoders[m](x)
        return z, self.head(z)

    def forward(self, inputs: dict[str, torch.Tensor], absent: Any = (), active: str | None = None) -> ModelOutput:
        absent = set(absent)
        feats, outs = {}, []
        for m in self.modalities:
            x = torch.zeros_like(inputs[m]) if m in absent else inputs[m]
            with torch.set_grad_enabled(torch.is_grad_enabled() and (active is None or m == active)):
                feats[m], o = self.learner(m, x)
            outs.append(o)
        stacked = torch.stack(outs, dim=1)
        pooled = {m: self.pool(m, z) for m, z in feats.items()}
        # In phase 1 (active set) β takes no part in the loss: keep it out of the output's graph, or DDP
        # (find_unused_parameters) would wait for its gradient.
        beta = self.beta if active is None else self.beta.detach()
        return ModelOutput(feats, pooled, stacked, beta * stacked.sum(dim=1))


@register_model("reconboost_late", "ReconBoost: canonical encoders, shared head H, scalar β (no fusion)")
def reconboost_late(*, modalities: list[str], input_shapes: dict[str, tuple[int, ...]], out_dim: int, base: str,
                    head_hidden: int = 256, beta_init: float = 1.0, **base_kwargs: Any) -> ReconBoostModel:
    """Feature maps: H is the canonical model's own one-input decoder when it has one (reconboost.md §5; BraTS:
    the DeepLabV3+ decoder on (ASPP_m, layer1_m), logits at the label resolution), shared by every modality;
    otherwise :class:`SharedHead`."""
    canonical = create_model(base, modalities=modalities, input_shapes=input_shapes, out_dim=out_dim, **base_kwargs)
    head = None
    # dense (segmentation) when the canonical head ends in a conv; feature maps of a classifier (av_resnet18) are pooled
    final_w = getattr(canonical.final_layer(), "weight", None)
    dense = None if final_w is None else final_w.dim() == 4
    if set(canonical.feature_kinds.values()) == {"map"} and dense is not False:
        head = dense_unimodal_head(canonical, canonical.modalities[0])
    return ReconBoostModel(dict(canonical.encoders), canonical.feature_kinds, canonical.feature_dims, out_dim,
                           head_hidden, beta_init, head, dense)


@dataclass
class ReconBoostHParams:
    """reconboost.md §4. ``w1``/``w2``: 5.0/1.0 (official CREMA-D command; mfeat, Food-101, BraTS; MOSI and
    IEMOCAP use 1.0/0.25 via dataset defaults); ``alpha`` 0.5 and ``ga_grad`` false (official: the
    memory-consolidation term is detached on both sides, zero gradient); ``beta_init`` 1.0 (official;
    None = 1 for classification/segmentation, 1/M for regression, §5); ``e1``/``e2`` 1/1 and
    ``pass_budget`` = dataset epochs (mmbalance fixed budget); ``order`` = dataset modality order;
    ``head_hidden`` 256 (official); ``init_from_unimodal`` false (official MSA script);
    ``class_mean_factor`` true (official 1/C); ``optimizer`` ``dataset`` (mmbalance) or ``official``
    (SGD lr 0.01, momentum 0.9, wd 5e-4); ``official_decay``: (every_stages, factor) for ``official``."""

    w1: float = field(default=5.0, metadata={"search": Uniform(1.0, 8.0)})
    w2: float = 1.0
    alpha: float = field(default=0.5, metadata={"search": Uniform(0.1, 1.0)})
    ga_grad: bool = False
    beta_init: float | None = None
    e1: int = 1
    e2: int = 1
    pass_budget: int | None = None
    max_stages: int | None = None
    order: list[str] | None = None
    head_hidden: int = 256
    init_from_unimodal: bool = False
    class_mean_factor: bool = True
    optimizer: Literal["dataset", "official"] = "dataset"
    official_decay: tuple[int, float] = (30, 0.1)

    def validate(self) -> None:
        if self.e1 < 1 or self.e2 < 1:
            raise ValueError(f"e1 and e2 must be >= 1, got {self.e1}, {self.e2}")
        if self.w1 - self.w2 < 0:
            raise ValueError(f"w1 - w2 must be >= 0 (sample weights a_i in [w1 - w2, w1]), got {self.w1}, {self.w2}")


@dataclass
class _PhaseInfo:
    stage: int
    kind: str  # "boost" | "rectify"
    modality: str
    prev: str | None


def sample_weights(s: torch.Tensor, w1: float, w2: float) -> torch.Tensor:
    """a_i = w1 − w2·s_i ∈ [w1 − w2, w1] (reconboost.md §2 step 2)."""
    return w1 - w2 * s


@register_method("reconboost", "ReconBoost: modality-alternating boosting with reconcilement + global rectification")
@register_method("reconboost_official_schedule", "ReconBoost with the official 4+4-epoch stages and SGD settings",
                 e1=4, e2=4, optimizer="official")
@register_method("reconboost_pretrained", "ReconBoost with encoders initialised from the cached <m>-only models",
                 init_from_unimodal=True)
class ReconBoost(BalancingMethod):
    """reconboost.md §2: stages of (phase 1: boost modality m; phase 2: rectify all), best stage on validation."""

    name = "reconboost"
    hparams_cls = ReconBoostHParams
    min_modalities = 2
    find_unused_parameters = True

    def __init__(self, hparams: Any = None) -> None:
        super().__init__(hparams)
        self.plan: list[_PhaseInfo] = []
        self._phases: list[Phase] = []
        self.tau = 1.0
        self.teachers: list[Any] = []
        self._model: ReconBoostModel | None = None
        self._train_cfg: Any = None

    # ---------------------------------------------------------------- build
    def configure_model(self, spec: ModelSpec, data: MultimodalData) -> ModelSpec:
        if spec.name == "reconboost_late":
            return spec
        beta = self.hp.beta_init
        if beta is None:
            beta = 1.0 / len(spec.modalities or data.modalities) if data.task == "regression" else 1.0
        return ModelSpec("reconboost_late", {"base": spec.name, **spec.kwargs, "head_hidden": self.hp.head_hidden,
                                             "beta_init": beta}, spec.modalities)

    def setup(self, ctx: StepContext) -> None:
        model = ctx.raw_model
        if not isinstance(model, ReconBoostModel):
            raise ConfigError("reconboost: the model must be 'reconboost_late' (do not override model.name)")
        self._model = model
        from mmbalance.config import TrainConfig, build_hparams

        cfg = ctx.config.train
        self._train_cfg = cfg if isinstance(cfg, TrainConfig) else build_hparams(TrainConfig, dict(cfg), where="train")
        mods = model.modalities
        order = list(self.hp.order or mods)
        if sorted(order) != sorted(mods):
            raise ConfigError(f"reconboost: order {order} must be a permutation of the modalities {mods}")
        epochs = int(ctx.config.train["epochs"]) if isinstance(ctx.config.train, dict) else int(ctx.config.train.epochs)
        budget = self.hp.pass_budget or epochs
        if self.hp.max_stages is not None:
            budget = (self.hp.e1 + self.hp.e2) * self.hp.max_stages
        n_stages = budget // (self.hp.e1 + self.hp.e2)
        if n_stages < 1:
            raise ConfigError(f"reconboost: pass budget {budget} is smaller than one stage (e1 + e2 = "
                              f"{self.hp.e1 + self.hp.e2}); raise --epochs or pass_budget")
        self.plan, self._phases = [], []
        for t in range(n_stages):
            m = order[t % len(order)]
            prev = order[(t - 1) % len(order)] if t > 0 else None
            self.plan.append(_PhaseInfo(t, "boost", m, prev))
            self._phases.append(Phase(f"s{t}_boost_{m}", self.hp.e1, evaluate=False))
            if self.hp.e2 > 1:
                self.plan.append(_PhaseInfo(t, "rectify", m, prev))
                self._phases.append(Phase(f"s{t}_rectify", self.hp.e2 - 1, evaluate=False))
            self.plan.append(_PhaseInfo(t, "rectify_end", m, prev))
            self._phases.append(Phase(f"s{t}_rectify_eval", 1, evaluate=True))
        if ctx.task.name == "regression":  # τ = training-target std (reconboost.md §5)
            labels = getattr(ctx.data.train, "labels", None)
            self.tau = float(labels.float().std()) if labels is not None else 1.0
        if self.hp.init_from_unimodal:
            from mmbalance.teachers import train_unimodal

            for m in mods:
                uni, info = train_unimodal(ctx, m)
                model.encoders[m].load_state_dict(uni.encoders[m].state_dict())
                self.teachers.append(info)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        groups = [{"params": list(model.encoders[m].parameters()), "name": f"enc:{m}"} for m in model.modalities]
        groups.append({"params": list(model.head.parameters()), "name": "head"})
        groups.append({"params": [model.beta], "name": "beta"})
        return groups

    def train_config(self, cfg: Any) -> Any:
        """``optimizer=official``: SGD lr 0.01, momentum 0.9, weight decay 5e-4 for both phases, whatever the
        dataset's optimizer, and no dataset lr schedule (the official stage decay is applied through the
        group multipliers, :meth:`_lr_factor`; reconboost.md §2 "Learning rates")."""
        if self.hp.optimizer != "official":
            return cfg
        return replace(cfg, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, scheduler="none",
                       warmup_epochs=0, warmup_start_lr=0.0)

    def phases(self) -> list[Phase]:
        if not self._phases:
            raise RuntimeError("reconboost: phases() called before setup()")
        return list(self._phases)

    # ---------------------------------------------------------------- stage control
    def stage_of(self, ctx: StepContext) -> _PhaseInfo:
        return self.plan[ctx.phase_index]

    def stage_modalities(self) -> list[str]:
        """The trained modality sequence, one entry per stage (reconboost.md §8 test 1)."""
        return [p.modality for p in self.plan if p.kind == "boost"]

    def on_phase_start(self, ctx: StepContext) -> None:
        info = self.stage_of(ctx)
        active = {f"enc:{info.modality}", "head"} if info.kind == "boost" else None
        for g in ctx.optimizer.param_groups:
            g["lr_mult"] = 1.0 if active is None or g["name"] in active else 0.0
        # "Re-create the optimizer" (momentum reset) at the start of each stage phase; a resumed run
        # re-entering a finished phase (ctx.epoch > 0) keeps the restored state.
        fresh = ctx.epoch == 0 and info.kind in {"boost", "rectify"} or (
            ctx.epoch == 0 and info.kind == "rectify_end" and self.hp.e2 == 1)
        if fresh:
            opt = getattr(ctx.optimizer, "optimizer", ctx.optimizer)
            opt.state.clear()

    def _lr_factor(self, ctx: StepContext) -> float:
        """lr multiplier making the step's lr the dataset schedule's lr at the current pass count
        (``optimizer=dataset``) or the official decay (``optimizer=official``), divided by the factor
        the engine applies for the phase-local epoch (reconboost.md §2 "Learning rates")."""
        if self.hp.optimizer == "official":
            every, factor = self.hp.official_decay
            return factor ** (self.stage_of(ctx).stage // max(1, every))
        tc = self._train_cfg
        if tc is None or tc.scheduler in {"none", "plateau"}:
            return 1.0
        passes = sum(p.epochs or 0 for p in self._phases[:ctx.phase_index]) + ctx.epoch
        total = sum(p.epochs or 0 for p in self._phases)
        want = LRSchedule(tc, total, ctx.steps_per_epoch).factor(passes, ctx.step)
        have = LRSchedule(tc, ctx.epochs_in_phase, ctx.steps_per_epoch).factor(ctx.epoch, ctx.step)
        return want / have if have > 0 else 0.0

    # ---------------------------------------------------------------- training
    def _per_sample_loss(self, ctx: StepContext, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if ctx.task.name == "regression":
            return (out.reshape(y.shape[0]) - y.reshape(y.shape[0]).to(out.dtype)).abs()
        return F.cross_entropy(out.float(), y.long(), reduction="none")

    def _agreement(self, ctx: StepContext, others: torch.Tensor, n_others: int, y: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """s_i: softmax(F_{−m})[y_i] (classification, per pixel for segmentation); regression:
        exp(−(y − mean_{k≠m} f_k)²/(2τ²)) (reconboost.md §2 step 2, §5)."""
        if ctx.task.name == "regression":
            mean = others.reshape(y.shape[0], -1).sum(1) / max(1, n_others)
            return torch.exp(-(y.reshape(-1).float() - mean.float()) ** 2 / (2 * self.tau ** 2))
        logits = (beta * others).float()
        return logits.softmax(dim=1).gather(1, y.long().unsqueeze(1)).squeeze(1)

    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        info = self.stage_of(ctx)
        y = batch["label"]
        if info.kind != "boost":  # phase 2, global rectification: ℓ(β·Σ_m f_m, y)
            out = ctx.forward(batch)
            loss = ctx.task.loss(out.logits, y)
            return StepOutput(loss, out, {"rectify_loss": loss.detach()})
        # phase 1: f_m with gradient, the other learners without (one DDP forward)
        out = ctx.model(ctx.inputs(batch), absent=(), active=info.modality)
        mods = ctx.modalities
        k = mods.index(info.modality)
        f_m = out.fused[:, k]
        with torch.no_grad():
            others = out.fused.detach().sum(dim=1) - out.fused[:, k].detach()
            s = self._agreement(ctx, others, len(mods) - 1, y, ctx.raw_model.beta.detach())
            a = sample_weights(s, self.hp.w1, self.hp.w2)
        per = self._per_sample_loss(ctx, f_m, y)
        loss_b = (a * per).mean()
        if ctx.task.name != "regression" and self.hp.class_mean_factor:
            loss_b = loss_b / ctx.raw_model.out_dim
        loss = loss_b
        logs: dict[str, Any] = {"boost_loss": loss_b.detach(), "mean_weight": a.mean()}
        if self.hp.ga_grad and info.prev is not None:  # memory consolidation with gradient (switch)
            prev = out.fused[:, mods.index(info.prev)].detach()
            if ctx.task.name == "regression":
                ga = F.mse_loss(f_m.float(), prev.float())
            else:
                ga = F.mse_loss(f_m.float().softmax(dim=1), prev.float().softmax(dim=1))
            loss = loss + self.hp.alpha * ga
            logs["ga_loss"] = ga.detach()
        return StepOutput(loss, out, logs)

    def after_backward(self, ctx: StepContext) -> None:
        """Schedule correction of the group learning rates (applied by the engine right after this hook)."""
        info = self.stage_of(ctx)
        factor = self._lr_factor(ctx)
        for g in ctx.optimizer.param_groups:
            active = info.kind != "boost" or g["name"] in {f"enc:{info.modality}", "head"}
            g["lr_mult"] = factor if active else 0.0

    @torch.no_grad()
    def predict(self, ctx: StepContext, batch: dict[str, torch.Tensor], absent: tuple[str, ...] = ()) -> torch.Tensor:
        """β·Σ_m f_m(x_m) (reconboost.md §2)."""
        return ctx.forward(batch, absent).logits

    def metrics(self) -> dict[str, float]:
        beta = float(self._model.beta.detach()) if self._model is not None else math.nan
        out = {"beta": beta}
        if self.teachers:  # reconboost_pretrained: the unimodal phase is charged to this run
            from mmbalance.teachers import teacher_costs

            out.update(teacher_costs(self.teachers))
        return out

    def on_epoch_end(self, ctx: StepContext) -> None:
        info = self.stage_of(ctx)
        ctx.log("stage", info.stage)
        ctx.log("modality_index", ctx.modalities.index(info.modality))
