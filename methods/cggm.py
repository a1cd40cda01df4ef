"""CGGM — Classifier-Guided Gradient Modulation (docs/methods/cggm.md; Guo et al., NeurIPS 2024).

Every modality m gets an auxiliary classifier f_m on its DETACHED encoder output z_m (trained only by
its own loss, own optimizer, lr ``cls_lr``). After each backward the change of the classifiers' batch
metrics Δε_m sets the balancing coefficients B_m (paper Eq. 7); the gradients of each encoder body are
multiplied by ρ·B_m (Eq. 8-9, magnitude) and a direction term λ·L_gm (Eq. 12) pulls the fusion head's
final layer towards the classifiers of lagging modalities.

Presets: ``cggm`` (official-code semantics, mmbalance default, with the sign-safe guard) and
``cggm_paper`` (paper-literal: same-step gradient cosine, ρ inside B).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.errors import MethodNotApplicable
from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.models.base import MultimodalModel
from mmbalance.registry import register_method
from mmbalance.search import LogUniform, Uniform

__all__ = ["CGGM", "CGGMHParams", "CGGMClassifiers", "SegDecoderHead", "PAPER_TABLE7", "balance_coefficients",
           "encoder_scope_parameters", "direction_loss"]

#: Per-dataset method defaults, CGGM paper Table 7 (cggm.md §4; classifier weight decay: official code,
#: IEMOCAP: AdamW default). Dataset modules import this into ``method_defaults["cggm"]``.
PAPER_TABLE7: dict[str, dict[str, float]] = {
    "food101": {"rho": 1.3, "lam": 0.15, "cls_lr": 5e-4, "cls_weight_decay": 3e-3},
    "mosi": {"rho": 1.3, "lam": 0.2, "cls_lr": 5e-4, "cls_weight_decay": 0.0},
    "iemocap": {"rho": 1.3, "lam": 0.15, "cls_lr": 5e-4, "cls_weight_decay": 0.01},
    "brats2021": {"rho": 1.2, "lam": 0.1, "cls_lr": 6e-3, "cls_weight_decay": 3e-4},
}

#: Sub-module names treated as an encoder's input projection (excluded from scope ``encoder_body``).
INPUT_PROJECTION_NAMES = ("proj", "input_proj", "projection")


@dataclass
class CGGMHParams:
    """CGGM hyperparameters (cggm.md §4 and §6). Per-dataset values: :data:`PAPER_TABLE7`, mfeat in
    ``datasets/mfeat.py``; the defaults below are the generic ones (used e.g. for synthetic data).

    - ``rho`` (ρ, Eq. 8-9): magnitude scale; encoder m's gradient × ρ·B_m. Default 1.3 (Table 7, M=3 sets).
    - ``lam`` (λ, Eq. 13): weight of the direction term L_gm. Default 0.2 (Table 7, MOSI).
    - ``cls_lr``: classifier optimizer lr (constant, never scheduled); None = the main lr.
    - ``cls_weight_decay``: classifier optimizer weight decay; None = the dataset's weight decay.
    - ``guard`` (denominator of Eq. 7): True (mmbalance fix) → B_m = 1 for all m when |Σ_kΔ_k| < ``guard_tol``;
      False → official raw formula with Σ_kΔ_k + 1e-8 (coefficients up to ~1e7).
    - ``guard_tol``: 1e-3 (mmbalance).
    - ``scale_scope``: ``encoder_body`` (official: encoder body, not its input projection) or
      ``modality_all`` (whole per-modality encoder including input projection).
    - ``cos_source`` (Eq. 12's similarity): ``weights_stale`` (official: cosine of final-layer WEIGHTS,
      computed after step t and added to the loss at t+1, gradient only to the fusion head's final
      weight W_F) or ``grads_same_step`` (paper: cosine of the final-layer GRADIENTS of the same step,
      with ``autograd.grad(create_graph=True)``; second-order gradient reaches encoders and fusion).
    - ``rho_in_b`` (Eq. 7 vs. code): False (official: ρ only in the magnitude scaling) or True (paper:
      B_m^p = ρ·Σ_{k≠m}Δ_k/Σ_kΔ_k, used for magnitude and direction).
    - ``direction_pairing``: ``auto`` | ``full`` (classifier final weight has W_F's shape) | ``block``
      (concat-linear head: W_F's column block of modality m; mmbalance generalisation).
    - ``aux_loss_reduction``: ``sum`` (official Σ_m ℓ(o_m, y)) or ``mean`` (÷M).
    - ``start_epoch``: the direction term is added from this epoch on (official: 0).
    - ``metric`` (ε of Eq. 6): ``auto`` (task: top-1 accuracy / sign accuracy / mean region Dice) or
      ``neg_mae`` (regression with non-centred targets; ε = −MAE).
    """

    rho: float = field(default=1.3, metadata={"search": Uniform(1.0, 1.6)})
    lam: float = field(default=0.2, metadata={"search": LogUniform(0.02, 1.0)})
    cls_lr: float | None = None
    cls_weight_decay: float | None = None
    guard: bool = True
    guard_tol: float = 1e-3
    scale_scope: Literal["encoder_body", "modality_all"] = "encoder_body"
    cos_source: Literal["weights_stale", "grads_same_step"] = "weights_stale"
    rho_in_b: bool = False
    direction_pairing: Literal["auto", "full", "block"] = "auto"
    aux_loss_reduction: Literal["sum", "mean"] = "sum"
    start_epoch: int = 0
    metric: Literal["auto", "neg_mae"] = "auto"

    def validate(self) -> None:
        if self.guard_tol < 0:
            raise ValueError(f"guard_tol must be >= 0, got {self.guard_tol}")
        if self.cls_lr is not None and self.cls_lr <= 0:
            raise ValueError(f"cls_lr must be > 0, got {self.cls_lr}")
        if self.start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {self.start_epoch}")


# --------------------------------------------------------------------------- pure pieces


def balance_coefficients(delta: torch.Tensor, *, rho: float = 1.0, rho_in_b: bool = False, guard: bool = True,
                         guard_tol: float = 1e-3) -> tuple[torch.Tensor, bool]:
    """Eq. 7: B_m = Σ_{k≠m}Δ_k / Σ_kΔ_k (float64), and whether the guard fired (cggm.md §2 step 7c).

    guard: |S| < guard_tol → B = 1; raw: S' = S + 1e-8, B_m = (S' − Δ_m)/S'. ``rho_in_b``: B^p = ρ·B.
    No clipping, no absolute value: B may be negative or > 1 (official behaviour).
    """
    delta = delta.to(torch.float64)
    s = delta.sum()
    hit = False
    if guard:
        if abs(float(s)) < guard_tol:
            b, hit = torch.ones_like(delta), True
        else:
            b = (s - delta) / s
    else:
        s = s + 1e-8
        b = (s - delta) / s
    return (rho * b if rho_in_b else b), hit


def direction_loss(b: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Eq. 12: L_gm = (1/M)(Σ_m |B_m| − Σ_m B_m·c_m); the Σ|B| offset only matches the logged value."""
    b = b.to(cos.dtype)
    return (b.abs().sum() - (b * cos).sum()) / b.numel()


def _cos(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Cosine of two flattened tensors (no epsilon beyond F.cosine_similarity's 1e-8)."""
    return F.cosine_similarity(a.reshape(1, -1), w.reshape(1, -1), dim=1, eps=1e-8)[0]


def encoder_scope_parameters(model: nn.Module, m: str, scope: str) -> list[nn.Parameter]:
    """Parameters of modality m's encoder in ``scope`` (cggm.md §3): ``modality_all`` = the whole
    encoder; ``encoder_body`` = without its input projection (sub-modules named ``proj``/``input_proj``).
    A model whose ``encoder_parameters`` accepts ``scope`` decides itself (e.g. BraTS: backbone + ASPP)."""
    fn = getattr(model, "encoder_parameters", None)
    if fn is not None and "scope" in inspect.signature(fn).parameters:
        return [p for p in fn(m, scope=scope) if p.requires_grad]
    enc = model.encoders[m]
    if scope == "modality_all":
        return [p for p in enc.parameters() if p.requires_grad]
    excluded = {id(p) for name in INPUT_PROJECTION_NAMES if isinstance(getattr(enc, name, None), nn.Module)
                for p in getattr(enc, name).parameters()}
    return [p for p in enc.parameters() if p.requires_grad and id(p) not in excluded]


def _detach(z: Any) -> Any:
    """sg(z) for a tensor or a (nested) tuple/list/dict of tensors (e.g. BraTS: ASPP + low-level maps)."""
    if isinstance(z, torch.Tensor):
        return z.detach()
    if isinstance(z, dict):
        return {k: _detach(v) for k, v in z.items()}
    if isinstance(z, (tuple, list)):
        return type(z)(_detach(v) for v in z)
    return z


def _final_layer(module: nn.Module) -> nn.Module:
    """A classifier's final layer: its ``final_layer()`` or its last Linear/Conv."""
    final = getattr(module, "final_layer", None)
    if callable(final):
        return final()
    last = None
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            last = sub
    if last is None:
        raise MethodNotApplicable(f"cggm: classifier {type(module).__name__} has no final Linear/Conv layer")
    return last


# --------------------------------------------------------------------------- modules


class SegDecoderHead(nn.Module):
    """Light segmentation classifier on a detached feature map [B, C_m, h, w]: 3×3 conv + ReLU, then a
    1×1 conv to class logits (the method resizes them to the label resolution). ``hidden`` defaults to
    the fusion head's final-conv input width so that ``full`` direction pairing applies."""

    def __init__(self, in_ch: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_ch, hidden, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(hidden, out_dim, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(z))

    def final_layer(self) -> nn.Module:
        return self.out


class CGGMClassifiers(nn.Module):
    """The M auxiliary classifiers as one module (one DDP wrapper, one optimizer; cggm.md §9)."""

    def __init__(self, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.heads = nn.ModuleDict(heads)

    def forward(self, features: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {m: head(features[m]) for m, head in self.heads.items()}


def build_classifier(model: nn.Module, m: str) -> nn.Module:
    """cggm.md §3.1: the model's ``make_unimodal_head(m, "cggm")``; for feature maps of a model without
    its own factory, a :class:`SegDecoderHead` whose hidden width matches the head's final conv."""
    own_factory = type(model).make_unimodal_head is not MultimodalModel.make_unimodal_head
    if getattr(model, "feature_kinds", {}).get(m) == "map" and not own_factory:
        wf = model.final_layer().weight
        return SegDecoderHead(model.feature_dims[m], int(wf.shape[1]), model.out_dim)
    return model.make_unimodal_head(m, "cggm")


# --------------------------------------------------------------------------- the method


@register_method("cggm_paper", "CGGM, paper-literal: same-step gradient cosine (create_graph), rho inside B",
                 cos_source="grads_same_step", rho_in_b=True)
@register_method("cggm", "CGGM: classifier-guided gradient magnitude (rho*B_i) and direction (lambda*L_gm) modulation")
class CGGM(BalancingMethod):
    """Classifier-guided gradient modulation (cggm.md §2; switches: :class:`CGGMHParams`).

    One step (default ``cggm``): forward; o_m = f_m(sg(z_m)); loss = ℓ(ŷ, y) + Σ_m ℓ(o_m, y)
    [+ λ·L_gm(t−1)]; backward; ``after_backward``: ε_m (SUM-reduced parts) → Δ_m → B_m (Eq. 7) →
    encoder-body grads × ρ·B_m (Eq. 8-9) → L_gm(t) from the cosine of sg(W_m) with a clone of W_F (Eq. 12,
    stale by one step, gradient only to W_F). ``cggm_paper``: ε, Δ, B^p in ``training_step``; L_gm from the
    same step's gradient cosine (create_graph); encoder grads × B^p.
    """

    name = "cggm"
    hparams_cls = CGGMHParams
    min_modalities = 2  # M = 1: S = Δ_1 and B_1 = 0, undefined (cggm.md §5)
    MODULE = "cggm_classifiers"

    def __init__(self, hparams: CGGMHParams | None = None) -> None:
        super().__init__(hparams)
        self.eps_prev: torch.Tensor | None = None
        self.lgm_prev: torch.Tensor | None = None
        self._lgm_snapshot: dict[str, Any] | None = None  # values behind lgm_prev (checkpointing)
        self._parts: torch.Tensor | None = None  # [2, M] numerators/denominators of ε (this rank)
        self._b: torch.Tensor | None = None  # coefficients of the current step (B or B^p)
        self._latest: dict[str, float | torch.Tensor] = {}
        self.lgm_now: torch.Tensor | None = None
        self._last_aux: dict[str, torch.Tensor] | None = None
        self.guard_hits = 0

    # ---------------------------------------------------------------- set-up
    def setup(self, ctx: StepContext) -> None:
        model = ctx.raw_model
        self.modalities = list(model.modalities)
        heads = {m: build_classifier(model, m) for m in self.modalities}
        self.pairing = self._resolve_pairing(model, heads)
        self._raw_model, self._raw_classifiers = model, CGGMClassifiers(heads)  # unwrapped (DDP keeps these objects)
        ctx.add_module(self.MODULE, self._raw_classifiers, lr=self.hp.cls_lr)
        self._scoped = {m: encoder_scope_parameters(model, m, self.hp.scale_scope) for m in self.modalities}
        for m in self.modalities:
            if not self._scoped[m]:
                raise MethodNotApplicable(f"cggm: encoder of modality {m!r} has no parameter in scope "
                                          f"{self.hp.scale_scope!r} (nothing to modulate)")

    def _resolve_pairing(self, model: nn.Module, heads: dict[str, nn.Module]) -> dict[str, slice | None]:
        """m → None (full: the whole W_F) or the column slice of W_F paired with classifier m (block)."""
        wf = tuple(model.final_layer().weight.shape)
        shapes = {m: tuple(_final_layer(h).weight.shape) for m, h in heads.items()}
        mode = self.hp.direction_pairing
        if mode in {"auto", "full"} and all(s == wf for s in shapes.values()):
            return {m: None for m in heads}
        split = model.split_head() if hasattr(model, "split_head") else None
        if mode in {"auto", "block"} and split is not None and len(wf) == 2:
            if all(shapes[m] == (wf[0], split[m].stop - split[m].start) for m in heads):
                return {m: split[m] for m in heads}
        raise MethodNotApplicable(
            f"cggm: classifier final layer shape(s) {sorted(set(shapes.values()))} do not match fusion-head final "
            f"layer {wf}" + ("" if split is not None else " and the head is not a concat-linear head")
            + f" (direction_pairing={mode!r})")

    def on_phase_start(self, ctx: StepContext) -> None:
        wd = self.hp.cls_weight_decay
        opt = ctx.extra[self.MODULE].optimizer
        if wd is not None and opt is not None:
            for g in opt.param_groups:
                g["weight_decay"] = wd

    # ---------------------------------------------------------------- helpers
    def _w_f(self, ctx: StepContext) -> nn.Parameter:
        return self._raw_model.final_layer().weight

    def _w_i(self, ctx: StepContext, m: str) -> nn.Parameter:
        return _final_layer(self._raw_classifiers.heads[m]).weight

    def _block(self, wf: torch.Tensor, m: str) -> torch.Tensor:
        s = self.pairing[m]
        return wf if s is None else wf[:, s]

    def _score_parts(self, ctx: StepContext, o: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(numerator, denominator) of ε for one classifier (cggm.md §2 step 7a, §5)."""
        if self.hp.metric == "neg_mae":
            pred = o.reshape(o.shape[0]).float()
            return -(pred - y.reshape(-1).float()).abs().sum(), torch.tensor(float(y.shape[0]), device=o.device)
        return ctx.task.batch_score_parts(o, y)

    def _batch_eps(self, ctx: StepContext) -> torch.Tensor:
        """ε_m on the global batch: numerators and denominators SUM-reduced before dividing (§9)."""
        parts = ctx.reduce_sum(self._parts)
        return parts[0] / parts[1].clamp_min(1e-12)

    def _update_coefficients(self, ctx: StepContext) -> torch.Tensor:
        eps = self._batch_eps(ctx).to(torch.float64).cpu()
        prev = torch.zeros_like(eps) if self.eps_prev is None else self.eps_prev
        delta = eps - prev
        self.eps_prev = eps
        b, hit = balance_coefficients(delta, rho=self.hp.rho, rho_in_b=self.hp.rho_in_b, guard=self.hp.guard,
                                      guard_tol=self.hp.guard_tol)
        self.guard_hits += int(hit)
        ctx.log("cggm/guard_hit", float(hit))
        for k, m in enumerate(self.modalities):  # host tensors (eps came back once): read at the epoch's end
            ctx.log(f"cggm/eps/{m}", eps[k])
            ctx.log(f"cggm/delta/{m}", delta[k])
            ctx.log(f"cggm/B/{m}", b[k])
            self._latest[f"eps/{m}"] = eps[k]
            self._latest[f"B/{m}"] = b[k]
        self._latest["guard_hits"] = float(self.guard_hits)
        self._b = b
        return b

    def _stale_lgm(self, ctx: StepContext, wf_value: torch.Tensor | None = None) -> torch.Tensor:
        """L_gm(t) from weights (official): c_m = cos(vec(sg(W_m)), vec(W̃_F)), W̃_F = clone of W_F now
        (or, after a resume, the saved value with W_F's autograd edge)."""
        wf = self._w_f(ctx)
        with torch.enable_grad():
            if wf_value is None:
                wt = wf.clone()
                wis = [self._w_i(ctx, m).detach().clone() for m in self.modalities]
            else:
                wt = wf + (wf_value.to(wf) - wf).detach()
                wis = self._lgm_snapshot["w_i"]
            cos = torch.stack([_cos(w_i.to(wt), self._block(wt, m)) for w_i, m in zip(wis, self.modalities)])
            lgm = direction_loss(self._b.to(wt.device), cos)
        self._lgm_snapshot = {"w_f": wt.detach().clone(), "w_i": wis, "b": self._b.clone()}
        return lgm

    # ---------------------------------------------------------------- training
    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        hp = self.hp
        y = batch["label"]
        out = ctx.forward(batch)
        task_loss = ctx.task.loss(out.logits, y)
        aux = ctx.modules[self.MODULE]({m: _detach(out.features[m]) for m in self.modalities})
        if ctx.task.name == "segmentation":
            aux = {m: o if o.shape[-2:] == y.shape[-2:] else
                   F.interpolate(o, size=y.shape[-2:], mode="bilinear", align_corners=False) for m, o in aux.items()}
        aux_losses = {m: ctx.task.loss(aux[m], y) for m in self.modalities}
        aux_loss = sum(aux_losses.values())
        if hp.aux_loss_reduction == "mean":
            aux_loss = aux_loss / len(self.modalities)
        with torch.no_grad():
            parts = [self._score_parts(ctx, aux[m].detach(), y) for m in self.modalities]
            self._parts = torch.stack([torch.stack([n.float() for n, _ in parts]),
                                       torch.stack([d.float().to(parts[0][0].device) for _, d in parts])])
        self._last_aux = {m: o.detach() for m, o in aux.items()}
        loss = task_loss + aux_loss
        logs: dict[str, float | torch.Tensor] = {"cggm/task_loss": task_loss.detach(), "cggm/aux_loss": aux_loss.detach()}
        direction_on = ctx.epoch >= hp.start_epoch
        if hp.cos_source == "grads_same_step":
            b = self._update_coefficients(ctx)  # steps 7a-7c moved before the backward (§2.1)
            if hp.lam != 0 and direction_on:
                lgm = self._same_step_lgm(ctx, task_loss, aux_losses, b)
                loss = loss + hp.lam * lgm
                self.lgm_now = lgm  # with its graph (inspection/tests)
                logs["cggm/lgm"] = lgm.detach()
                self._latest["lgm"] = lgm.detach()
        elif self.lgm_prev is not None and direction_on:
            loss = loss + hp.lam * self.lgm_prev
            logs["cggm/lgm_added"] = self.lgm_prev.detach()
        return StepOutput(loss, out, logs)

    def _same_step_lgm(self, ctx: StepContext, task_loss: torch.Tensor, aux_losses: dict[str, torch.Tensor],
                       b: torch.Tensor) -> torch.Tensor:
        """§2.1: g_F = ∂ℓ(ŷ)/∂W_F (create_graph), g_m = ∂ℓ(o_m)/∂W_m (detached); c_m = cos(g_m, g_F block)."""
        g_f = torch.autograd.grad(task_loss, self._w_f(ctx), create_graph=True, retain_graph=True)[0]
        cos = []
        for m in self.modalities:
            g_m = torch.autograd.grad(aux_losses[m], self._w_i(ctx, m), retain_graph=True)[0].detach()
            cos.append(_cos(g_m, self._block(g_f, m)))
        return direction_loss(b.to(g_f.device), torch.stack(cos))

    def after_backward(self, ctx: StepContext) -> None:
        hp = self.hp
        # B was computed before the backward with grads_same_step (§2.1), here otherwise (step 7a-7c)
        b = self._b if hp.cos_source == "grads_same_step" else self._update_coefficients(ctx)
        factors = b if hp.rho_in_b else hp.rho * b  # Eq. 8-9: ρ·B_m, or B_m^p that already holds ρ
        host = factors.tolist() if isinstance(factors, torch.Tensor) else list(factors)  # B lives on the host
        for k, m in enumerate(self.modalities):
            params = [p for p in self._scoped[m] if p.grad is not None]
            f = host[k]
            if params:  # logged as device tensors: no host sync per step
                raw = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad.detach() for p in params])))
                ctx.log(f"cggm/grad_norm_raw/{m}", raw)
                ctx.log(f"cggm/grad_norm/{m}", abs(f) * raw)
                torch._foreach_mul_([p.grad for p in params], f)  # Eq. 8-9: magnitude modulation, in place
            else:
                ctx.log(f"cggm/grad_norm_raw/{m}", 0.0)
                ctx.log(f"cggm/grad_norm/{m}", 0.0)
            ctx.log(f"cggm/factor/{m}", f)
            self._latest[f"factor/{m}"] = f
        self.lgm_now, self._last_aux = None, None  # release the same-step graph before the next forward
        if hp.cos_source == "weights_stale":
            self.lgm_prev = self._stale_lgm(ctx)
            ctx.log("cggm/lgm", self.lgm_prev.detach())
            self._latest["lgm"] = self.lgm_prev.detach()

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        snap = self._lgm_snapshot
        return {"eps_prev": None if self.eps_prev is None else self.eps_prev.clone(), "guard_hits": self.guard_hits,
                "lgm_snapshot": None if snap is None else {"w_f": snap["w_f"].cpu(), "w_i": [w.cpu() for w in snap["w_i"]],
                                                           "b": snap["b"].cpu()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.eps_prev = state.get("eps_prev")
        self.guard_hits = int(state.get("guard_hits", 0))
        self._pending_snapshot = state.get("lgm_snapshot")

    def on_epoch_start(self, ctx: StepContext) -> None:
        snap = getattr(self, "_pending_snapshot", None)
        if snap is not None and self.hp.cos_source == "weights_stale":  # resume: rebuild the stale term exactly
            self._lgm_snapshot = {"w_i": [w.to(ctx.device) for w in snap["w_i"]]}
            self._b = snap["b"]
            self.lgm_prev = self._stale_lgm(ctx, snap["w_f"].to(ctx.device))
        self._pending_snapshot = None

    def metrics(self) -> dict[str, float]:
        """Latest B_m, ε_m, magnitude factors, L_gm and the guard counter."""
        return {k: float(v) for k, v in self._latest.items()}
