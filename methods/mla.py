"""MLA — Multimodal Learning with Alternating unimodal adaptation (Zhang, Yoon, Bansal, Yao, CVPR 2024,
arXiv 2311.10707; official code Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation @ ab6c184).

Joint training is replaced by alternating unimodal sub-steps: for every batch, each modality m in turn
is trained alone through one head H shared by all modalities (its own optimizer step, through the
engine's ``training_substeps`` capability). Before each step after the very first one, H's weight
gradient is projected away from the feature subspace H has seen (OWM-style, ``utils/utils.py``
``GSPlugin``): α = 0.1^(1 + b/N), r = batch mean of z̄_m, k = P·rᵀ, P ← P − k·kᵀ/(α + r·k),
P ← P/‖P‖_F, ∇W ← ∇W·Pᵀ. At test time the unimodal outputs H(z̄_m) are fused with weights
softmax_m(−entropy_m) (dynamic fusion, README "MLA (dynamic fusion)"; ``main.py`` 65–106).

Presets: ``mla_released`` = what the released code does (the projection never runs there, its
parameter-name check cannot match); ``mla_alternate`` = one modality per batch (batch t trains
modality t mod M), one step per batch.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.errors import ConfigError, MethodNotApplicable
from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.registry import register_method

__all__ = ["MLA", "MLAHParams", "SharedHead", "projection_alpha", "update_projector", "project_gradient",
           "entropy_weights", "fuse_outputs"]


@dataclass
class MLAHParams:
    """Hyperparameters (docs/methods/mla.md).

    - ``head_projection`` true: paper ("gradient modification"); false = the released code, where the
      check ``n == "module.weight"`` never matches (preset ``mla_released``).
    - ``projection_denominator`` ``scalar``: OWM's α + r·P·rᵀ (fix); ``elementwise``: the code's
      α + k·r outer-product matrix divided elementwise (``utils.py:36``).
    - ``projection_apply`` ``replace``: ∇W ← ∇W·Pᵀ (``utils.py:41``); ``add``: ∇W += ∇W·Pᵀ (BalanceBenchmark).
    - ``fusion`` ``auto``: ``dynamic`` (entropy gating) for classification and segmentation, ``fixed``
      for regression (no predictive distribution); ``fixed``: Σ_m a_m·H(z̄_m) with ``fixed_weights``.
    - ``entropy_axis`` ``sample``: per-sample entropy (fix); ``batch``: the code's softmax over the
      batch axis, one weight per modality per evaluation batch (``main.py:66``).
    - ``fixed_weights``: None = uniform 1/M (mmbalance); official audio-visual [0.55, 0.45].
    - ``substep_zero`` ``official``: gradients zero-filled between sub-steps (torch 1.8.1 ``zero_grad()``,
      the pinned version), so encoders stepped earlier in the batch take momentum/weight-decay steps in
      later sub-steps; ``set_to_none``: each parameter is stepped only in its own sub-step.
    - ``projector`` ``none``: pooled widths must be equal; ``linear``: per-modality Linear(d_m → d)
      before H, trained with encoder m (mmbalance generalisation).
    - ``schedule`` ``substeps``: M sub-steps per batch (official); ``alternate``: batch t trains only
      modality t mod M (preset ``mla_alternate``, non-official).
    """

    head_projection: bool = True
    projection_denominator: Literal["scalar", "elementwise"] = "scalar"
    projection_apply: Literal["replace", "add"] = "replace"
    fusion: Literal["auto", "dynamic", "fixed"] = "auto"
    entropy_axis: Literal["sample", "batch"] = "sample"
    fixed_weights: list[float] | None = None
    substep_zero: Literal["official", "set_to_none"] = "official"
    projector: Literal["none", "linear"] = "none"
    schedule: Literal["substeps", "alternate"] = "substeps"

    def validate(self) -> None:
        if self.fixed_weights is not None and any(w < 0 for w in self.fixed_weights):
            raise ValueError(f"fixed_weights must be non-negative, got {self.fixed_weights}")


# ---------------------------------------------------------------------------------------- formulas
def projection_alpha(step: int, steps_per_epoch: int) -> float:
    """α = 0.1^(1 + b/N) for batch b of N in the epoch (``utils.py:26-27``)."""
    return 0.1 ** (1.0 + step / max(1, steps_per_epoch))


def update_projector(P: torch.Tensor, r: torch.Tensor, alpha: float, denominator: str = "scalar") -> torch.Tensor:
    """OWM projector update (``utils.py:29-38``): k = P·rᵀ; P ← P − k·kᵀ/(α + r·k); P ← P/‖P‖_F.
    ``denominator="elementwise"`` divides by the code's α + k·r matrix (d × d) instead of the scalar."""
    r = r.reshape(1, -1).to(P.dtype)
    k = P @ r.t()  # [d, 1]
    if denominator == "scalar":
        P = P - (k @ k.t()) / (alpha + (r @ k))
    else:
        P = P - (k @ k.t()) / (alpha + k @ r)
    return P / torch.linalg.matrix_norm(P)


def project_gradient(grad: torch.Tensor, P: torch.Tensor, apply: str = "replace") -> torch.Tensor:
    """∇W·Pᵀ (``utils.py:41``) for a weight of shape [C, d] (a 1×1 conv weight is viewed as [C, d]);
    ``apply="add"`` returns ∇W + ∇W·Pᵀ."""
    g = grad.reshape(grad.shape[0], -1)
    proj = g @ P.t().to(g.dtype)
    out = proj if apply == "replace" else g + proj
    return out.reshape(grad.shape)


def entropy_weights(outputs: list[torch.Tensor], axis: str = "sample") -> torch.Tensor:
    """Dynamic-fusion weights w = softmax_m(−e_m) (equal to the code's exp(max e − e_m)/Σ exp(max e − e_j)).

    ``sample``: e_m = −Σ_c p_c·log p_c per sample (per pixel), p = softmax over classes (dim 1); the
    result has shape [M, B, (H, W)]. ``batch`` (code literal, ``main.py:65-70``): softmax over dim 0
    (the batch), entropy summed over everything: one weight per modality, shape [M]."""
    if axis == "sample":
        e = torch.stack([-(F.softmax(o.float(), 1) * F.log_softmax(o.float(), 1)).sum(1) for o in outputs])
    else:
        e = torch.stack([-(F.softmax(o.float(), 0) * F.log_softmax(o.float(), 0)).sum() for o in outputs])
    return torch.softmax(-e, dim=0)


def fuse_outputs(outputs: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """o = Σ_m w_m·o_m; ``weights`` is [M] (one scalar per modality) or [M, B, …] (per sample/pixel)."""
    fused = None
    for k, o in enumerate(outputs):
        w = weights[k]
        if w.dim() > 0:
            w = w.unsqueeze(1)
        term = w.to(torch.float32) * o.float()
        fused = term if fused is None else fused + term
    return fused


# ---------------------------------------------------------------------------------------- modules
class SharedHead(nn.Module):
    """H shared by every modality: Linear(d → C) on pooled z̄_m, or a 1×1 conv on the feature map
    (segmentation, upsampled to the label size); optional per-modality Linear(d_m → d) projectors."""

    def __init__(self, kinds: dict[str, str], dims: dict[str, int], out_dim: int, projector: bool,
                 segmentation: bool | None = None) -> None:
        super().__init__()
        self.kinds = dict(kinds)
        # per-pixel head for segmentation; feature maps of a classifier (av_resnet18) are pooled
        self.segmentation = any(k == "map" for k in kinds.values()) if segmentation is None else segmentation
        d = max(dims.values()) if projector else next(iter(dims.values()))
        self.dim = d
        self.proj = nn.ModuleDict({m: (nn.Conv2d(dm, d, 1) if self.segmentation else nn.Linear(dm, d))
                                   for m, dm in dims.items()}) if projector else None
        self.out = nn.Conv2d(d, out_dim, 1) if self.segmentation else nn.Linear(d, out_dim)

    def represent(self, m: str, z: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """What H's weight multiplies: the map (segmentation) or the pooled vector, after the projector."""
        x = z if self.segmentation else pooled
        return self.proj[m](x) if self.proj is not None else x

    def forward(self, m: str, z: torch.Tensor, pooled: torch.Tensor,
                size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, r-input): the head output and the feature H saw (for the projector's batch mean)."""
        x = self.represent(m, z, pooled)
        o = self.out(x)
        if self.segmentation and size is not None and tuple(o.shape[-2:]) != tuple(size):
            o = F.interpolate(o, size=size, mode="bilinear", align_corners=False)
        return o, x


# ---------------------------------------------------------------------------------------- the method
@register_method("mla", "MLA: alternating unimodal sub-steps through one shared head, OWM head projection, entropy fusion")
@register_method("mla_released", "MLA as the released code runs it (head projection never applied)",
                 head_projection=False)
@register_method("mla_alternate", "MLA, one modality per batch (batch t trains modality t mod M), one step per batch",
                 schedule="alternate")
class MLA(BalancingMethod):
    name = "mla"
    hparams_cls = MLAHParams
    min_modalities = 2
    find_unused_parameters = True  # each sub-step's forward uses one encoder only

    def __init__(self, hparams: MLAHParams | None = None) -> None:
        super().__init__(hparams)
        self.substep_set_to_none = self.hp.substep_zero == "set_to_none"
        self.P: torch.Tensor | None = None
        self.n = 0  # sub-steps so far, over the whole run (utils.py: the first one is not projected)
        self._r: tuple[torch.Tensor, torch.Tensor] | None = None  # (Σ_b x̄, count) of the current sub-step
        self._alpha_last = float("nan")
        self._fixed_w: dict[tuple[str, ...], torch.Tensor] = {}  # fusion=fixed weights per present set

    # ------------------------------------------------------------------ set-up
    def check_applicable(self, data, modalities) -> None:
        super().check_applicable(data, modalities)
        fw = self.hp.fixed_weights
        if fw is not None and len(fw) != len(modalities):
            raise ConfigError(f"mla: fixed_weights has {len(fw)} values but the model has {len(modalities)} "
                              f"modalities ({', '.join(modalities)})")
        if data.task == "regression" and self.hp.fusion == "dynamic":
            raise ConfigError("mla: fusion=dynamic needs a predictive distribution (entropy); regression "
                              "uses fusion=fixed (or leave fusion=auto)")

    def setup(self, ctx: StepContext) -> None:
        model = ctx.raw_model
        dims = {m: int(model.feature_dims[m]) for m in model.modalities}
        if self.hp.projector == "none" and len(set(dims.values())) > 1:
            raise MethodNotApplicable("mla needs equal pooled widths for its shared head; got "
                                      + ", ".join(f"{m}={d}" for m, d in dims.items())
                                      + " (use --set projector=linear)")
        kinds = dict(model.feature_kinds)
        if "map" in kinds.values() and set(kinds.values()) != {"map"}:
            raise MethodNotApplicable("mla: mixing feature maps and vectors in one shared head is not supported")
        # MLA has no fusion module: the canonical fusion and head are replaced (late fusion)
        model.fusion = nn.Identity()
        model.head = nn.Identity()
        model.variant = "late"
        head = SharedHead(kinds, dims, ctx.data.out_dim, self.hp.projector == "linear",
                          segmentation=ctx.task.name == "segmentation")
        ctx.add_module("mla_head", head, own_optimizer=False)
        self.P = torch.eye(head.dim, dtype=torch.float32, device=ctx.device)
        self.n = 0
        self.fusion = self.hp.fusion if self.hp.fusion != "auto" else (
            "fixed" if ctx.task.name == "regression" else "dynamic")

    # ------------------------------------------------------------------ training
    def _unimodal(self, ctx: StepContext, batch: dict[str, torch.Tensor], m: str) -> StepOutput:
        out = ctx.forward(batch, only=(m,))
        size = tuple(batch["label"].shape[-2:]) if ctx.task.name == "segmentation" else None
        o, x = ctx.modules["mla_head"](m, out.features[m], out.pooled[m], size)
        xd = x.detach().float()
        rows = xd if xd.dim() == 2 else xd.flatten(2).mean(-1)  # maps: mean over pixels, then over the batch
        self._r = (rows.sum(0), rows.new_full((), float(rows.shape[0])))  # the count made on the device
        loss = ctx.task.loss(o, batch["label"])
        return StepOutput(loss, None, {f"mla/loss_{m}": loss.detach()})

    def training_substeps(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> Iterator[StepOutput] | None:
        if self.hp.schedule == "alternate":
            return None
        return (self._unimodal(ctx, batch, m) for m in ctx.modalities)

    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        """``schedule=alternate``: batch t (counted over the run) trains modality t mod M."""
        mods = ctx.modalities
        return self._unimodal(ctx, batch, mods[ctx.global_step % len(mods)])

    def after_backward(self, ctx: StepContext) -> None:
        """Head projection on unscaled, all-reduced gradients; r is the global batch mean (Σ and count
        all-reduced before dividing)."""
        n, self.n = self.n, self.n + 1
        if n == 0 or not self.hp.head_projection or self._r is None:
            return
        total, count = self._r
        if ctx.world_size > 1:
            total, count = ctx.reduce_sum(total), ctx.reduce_sum(count)
        r = (total / count).to(torch.float32)
        alpha = projection_alpha(ctx.step, ctx.steps_per_epoch)
        self._alpha_last = alpha
        P = self.P.to(r.device)
        self.P = update_projector(P, r, alpha, self.hp.projection_denominator)
        weight = ctx.raw_module("mla_head").out.weight
        if weight.grad is not None:
            weight.grad.copy_(project_gradient(weight.grad, self.P, self.hp.projection_apply))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, ctx: StepContext, batch: dict[str, torch.Tensor], absent: tuple[str, ...] = ()) -> torch.Tensor:
        present = tuple(m for m in ctx.modalities if m not in set(absent))
        if present:  # the sum runs over the present modalities only (weights renormalised)
            out = ctx.forward(batch, only=present)
        else:  # nothing present (a diagnostics baseline): every modality's neutral input, as the model does
            present = tuple(ctx.modalities)
            out = ctx.forward(batch, absent=present, only=present)
        size = tuple(batch["label"].shape[-2:]) if ctx.task.name == "segmentation" else None
        head = ctx.modules["mla_head"]
        outputs = [head(m, out.features[m], out.pooled[m], size)[0].float() for m in present]
        if len(outputs) == 1:
            return outputs[0]
        if self.fusion == "dynamic":
            w = entropy_weights(outputs, self.hp.entropy_axis)
        else:
            w = self._fixed_w.get(present)
            if w is None:  # built once per set of present modalities, not per batch
                all_w = self.hp.fixed_weights or [1.0] * len(ctx.modalities)
                a = torch.tensor([all_w[ctx.modalities.index(m)] for m in present], dtype=torch.float32,
                                 device=outputs[0].device)
                w = self._fixed_w[present] = a / a.sum()
        return fuse_outputs(outputs, w)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"P": None if self.P is None else self.P.detach().cpu().clone(), "n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.P = state["P"].clone() if state.get("P") is not None else None
        self.n = int(state["n"])

    def metrics(self) -> dict[str, float]:
        if self.P is None:
            return {}
        return {"substeps": float(self.n), "alpha_last": self._alpha_last,
                "projector_trace": float(torch.trace(self.P))}
