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

__all__ = ["CGGM", "CGGMHParams", "CGGMClassifiers", "GroupedHeads", "convert_optimizer_state", "SegDecoderHead", "PAPER_TABLE7", "balance_coefficients",
           "encoder_scope_parameters", "direction_loss", "direction_loss_and_grad", "with_gradient"]

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
                         guard_tol: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7: B_m = Σ_{k≠m}Δ_k / Σ_kΔ_k (float64), and whether the guard fired (cggm.md §2 step 7c).

    guard: |S| < guard_tol → B = 1; raw: S' = S + 1e-8, B_m = (S' − Δ_m)/S'. ``rho_in_b``: B^p = ρ·B.
    No clipping, no absolute value: B may be negative or > 1 (official behaviour). Decided on the
    tensors' device (no host read): ``hit`` is a 0-d bool tensor (``bool(hit)`` reads it).
    """
    delta = delta.to(torch.float64)
    s = delta.sum()
    if guard:
        hit = s.abs() < guard_tol
        b = torch.where(hit, 1.0, (s - delta) / s)
    else:
        hit = torch.zeros((), dtype=torch.bool, device=delta.device)
        s = s + 1e-8
        b = (s - delta) / s
    return (rho * b if rho_in_b else b), hit


def direction_loss(b: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Eq. 12: L_gm = (1/M)(Σ_m |B_m| − Σ_m B_m·c_m); the Σ|B| offset only matches the logged value."""
    b = b.to(cos.dtype)
    return (b.abs().sum() - (b * cos).sum()) / b.numel()


def direction_loss_and_grad(w_f: torch.Tensor, w_i: list[torch.Tensor] | torch.Tensor, b: torch.Tensor,
                            pairing: list[slice | None], eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 12 of the default (``weights_stale``) direction term and its gradient in closed form:
    ``(L_gm, ∂L_gm/∂W_F)``, with no autograd graph.

    f_m = W_F (``full`` pairing) or W_F's column block of modality m (``block``); w_m = sg(W_m), the
    classifier's final weight. With F.cosine_similarity's definition ŵ = w/max(‖w‖, ε),
    f̂ = f/max(‖f‖, ε) and c_m = ⟨ŵ_m, f̂_m⟩ (Eq. 12's similarity), for ‖f_m‖ > ε

        ∂c_m/∂f_m = (ŵ_m − c_m·f̂_m)/‖f_m‖,
        L_gm = (1/M)(Σ_m |B_m| − Σ_m B_m·c_m)   ⇒   ∂L_gm/∂f_m = −(B_m/M)·(ŵ_m − c_m·f̂_m)/‖f_m‖
                                                             = α_m·w_m + β_m·f_m,
        α_m = −B_m/(M·‖w_m‖·‖f_m‖),   β_m = B_m·c_m/(M·‖f_m‖²),

    and ∂L_gm/∂W_F is the sum of these over m, each placed on its block (``full``: on the whole W_F).
    B gets no gradient (it comes from the classifiers' metrics). All M modalities are evaluated at once
    when the blocks are W_F itself or W_F's consecutive equal column blocks in modality order (W_F
    viewed as [C, M, d], no copy); otherwise one by one.
    """
    M = len(pairing)
    wis = list(w_i.unbind(0)) if isinstance(w_i, torch.Tensor) else list(w_i)
    bb = b.to(device=w_f.device, dtype=w_f.dtype)  # L_gm in W_F's precision, as direction_loss
    full = all(s is None for s in pairing)
    if w_f.dim() == 2 and all(w.shape == wis[0].shape for w in wis) and (
            (full and wis[0].shape == w_f.shape) or _consecutive_blocks(pairing, w_f.shape[1], wis[0].shape)):
        C = w_f.shape[0]
        W = torch.stack(wis, dim=1).to(w_f)  # [C, M, d]
        Fb = w_f.unsqueeze(1) if full else w_f.view(C, M, -1)  # [C, 1 or M, d]
        dot = (W * Fb).sum((0, 2))
        nw = torch.linalg.vector_norm(W, dim=(0, 2)).clamp_min(eps)
        nf = torch.linalg.vector_norm(Fb, dim=(0, 2)).clamp_min(eps)
        cos = dot / (nw * nf)
        alpha = bb * (-1.0 / M) / (nw * nf)
        beta = bb * cos / (M * nf * nf)
        g = W * alpha.view(1, -1, 1) + Fb * beta.view(1, -1, 1)  # [C, M, d]
        grad = g.sum(1) if full else g.reshape(w_f.shape)
        return direction_loss(bb, cos), grad
    grad = torch.zeros_like(w_f)
    cos_list = []
    for k, (w, s) in enumerate(zip(wis, pairing)):
        blk = w_f if s is None else w_f[:, s]
        w = w.to(w_f)
        nf = torch.linalg.vector_norm(blk).clamp_min(eps)
        wn, fn = w / torch.linalg.vector_norm(w).clamp_min(eps), blk / nf
        c = (wn * fn).sum()
        g = -(bb[k] / M) * (wn - c * fn) / nf
        if s is None:
            grad += g
        else:
            grad[:, s] += g
        cos_list.append(c)
    return direction_loss(bb, torch.stack(cos_list)), grad


def _consecutive_blocks(pairing: list[slice | None], width: int, shape: tuple[int, ...]) -> bool:
    """Whether the block slices are W_F's columns cut into len(pairing) consecutive blocks of the
    classifier weights' width, in modality order."""
    if len(shape) != 2 or any(s is None or s.step not in (None, 1) for s in pairing):
        return False
    d = shape[1]
    return d * len(pairing) == width and all(s.start == k * d and s.stop == (k + 1) * d for k, s in enumerate(pairing))


def with_gradient(value: torch.Tensor, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``value`` as a tensor whose gradient with respect to ``param`` is ``grad``:
    value + Σ (param − sg(param))·grad. The added term is exactly 0, so the value is unchanged; its
    backward is one multiplication (the closed-form gradient of :func:`direction_loss_and_grad`
    replaces the cosine graph)."""
    return value + ((param - param.detach()) * grad.detach()).sum()


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
    """The M auxiliary classifiers as one module (one DDP wrapper, one optimizer; cggm.md §9).

    When every classifier is the same vector MLP (:class:`~mmbalance.models.heads.UnimodalHead`:
    Linear → ReLU → Linear, or one Linear) on features of one width, they are ONE grouped module
    (:class:`GroupedHeads`: per layer one stacked weight [M, in, out] and bias [M, 1, out], one
    ``torch.baddbmm`` per layer for all M). ``heads[m]`` then gives views of head m (its forward, ``body``
    and ``final_layer()`` read the stacked parameters). Otherwise (sequence/map classifiers) the heads
    are kept one by one in ``heads`` (an ``nn.ModuleDict``).

    ``forward(features)`` returns {m: o_m}; ``forward(features, stacked=True)`` o as one [M, B, C]
    tensor. Checkpoint layout: grouped ``grouped.weight{j}``/``grouped.bias{j}``; a checkpoint of the
    per-head layout (``heads.<m>.body.0.weight``, …, written before the grouping) is converted on load,
    and so is its classifier-optimizer state (:func:`convert_optimizer_state`).
    """

    def __init__(self, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.names = list(heads)
        layers = _grouped_layers(list(heads.values()))
        self.grouped: GroupedHeads | None = GroupedHeads(layers) if layers is not None else None
        self.loaded_old_layout = False
        if self.grouped is None:
            self._modules["heads"] = nn.ModuleDict(heads)  # a child named like the ``heads`` property
        else:
            self._old_keys = ("body.0", "out") if len(layers) == 2 else ("out",)  # per-head layer names
            self._register_load_state_dict_pre_hook(self._convert_per_head_keys)

    @property
    def heads(self) -> dict[str, nn.Module]:  # type: ignore[override]
        if self.grouped is None:
            return self._modules["heads"]  # type: ignore[return-value]
        return {m: _HeadView(self.grouped, k) for k, m in enumerate(self.names)}

    def forward(self, features: dict[str, Any], stacked: bool = False) -> dict[str, torch.Tensor] | torch.Tensor:
        if self.grouped is not None:
            o = self.grouped(torch.stack([features[m] for m in self.names]))  # [M, B, d] → [M, B, C]
            return o if stacked else dict(zip(self.names, o.unbind(0)))
        if not stacked:
            return {m: head(features[m]) for m, head in self._modules["heads"].items()}
        return torch.stack([head(features[m]) for m, head in self._modules["heads"].items()])

    def _convert_per_head_keys(self, state: dict[str, Any], prefix: str, *args: Any) -> None:
        """Load a per-head checkpoint (``heads.<m>.<layer>.weight`` [out, in]) into the stacked layout."""
        keys = [f"{prefix}heads.{m}.{layer}.{kind}" for m in self.names for layer in self._old_keys
                for kind in ("weight", "bias")]
        if not all(k in state for k in keys):
            return
        for j, layer in enumerate(self._old_keys):
            state[f"{prefix}grouped.weight{j}"] = torch.stack([state.pop(f"{prefix}heads.{m}.{layer}.weight").t()
                                                               for m in self.names])
            state[f"{prefix}grouped.bias{j}"] = torch.stack([state.pop(f"{prefix}heads.{m}.{layer}.bias")
                                                             for m in self.names]).unsqueeze(1)
        self.loaded_old_layout = True


class GroupedHeads(nn.Module):
    """M vector MLP heads with stacked parameters: layer j has ``weight{j}`` [M, in, out] (head k's
    W_jᵀ) and ``bias{j}`` [M, 1, out]; h ← ReLU(baddbmm(b_j, h, W_j)) on h = [M, B, in] (no ReLU after
    the last layer) computes y_k = x_k·W_kᵀ + b_k for every head k at once."""

    def __init__(self, layers: list[list[nn.Linear]]) -> None:
        super().__init__()
        self.n_layers = len(layers)
        for j, lins in enumerate(layers):  # the heads' own initial values (same seed stream as before)
            self.register_parameter(f"weight{j}", nn.Parameter(torch.stack([lin.weight.detach().t() for lin in lins])))
            self.register_parameter(f"bias{j}", nn.Parameter(torch.stack([lin.bias.detach() for lin in lins]).unsqueeze(1)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        params = self._parameters
        for j in range(self.n_layers):
            h = torch.baddbmm(params[f"bias{j}"], h, params[f"weight{j}"])
            if j < self.n_layers - 1:
                h = torch.relu(h)
        return h

    def final_weight(self) -> torch.Tensor:
        """[M, out, in]: every head's final-layer weight W_m (a view of the stacked parameter)."""
        return self._parameters[f"weight{self.n_layers - 1}"].transpose(1, 2)


class _LinearView:
    """Layer j of head k of a :class:`GroupedHeads` (``weight`` [out, in] and ``bias`` are views)."""

    def __init__(self, grouped: GroupedHeads, k: int, j: int) -> None:
        self.weight = grouped._parameters[f"weight{j}"][k].t()
        self.bias = grouped._parameters[f"bias{j}"][k, 0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _HeadView(nn.Module):
    """Head k of a :class:`GroupedHeads` as a module: ``body`` (the layers before the last, with
    their ReLU), ``final_layer()`` and the forward read the stacked parameters (inspection, tests)."""

    def __init__(self, grouped: GroupedHeads, k: int) -> None:
        super().__init__()
        object.__setattr__(self, "_grouped", grouped)  # not a child: the view owns no parameters
        self.k = k

    def body(self, z: torch.Tensor) -> torch.Tensor:
        for j in range(self._grouped.n_layers - 1):
            z = torch.relu(_LinearView(self._grouped, self.k, j)(z))
        return z

    def final_layer(self) -> _LinearView:
        return _LinearView(self._grouped, self.k, self._grouped.n_layers - 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.final_layer()(self.body(z))


def convert_optimizer_state(state: dict[str, Any], n_heads: int, n_layers: int) -> dict[str, Any]:
    """A classifier-optimizer state_dict of the per-head layout (parameters head by head: W_0, b_0, …,
    each W [out, in]) in the stacked layout of :class:`GroupedHeads` (W_0s, b_0s, …): per-parameter
    tensors of the parameter's shape (momentum, Adam moments) are stacked as the parameters are; other
    entries (Adam's step) are taken from the first head."""
    per_head = 2 * n_layers
    groups = state["param_groups"]
    if len(groups) != 1 or len(groups[0]["params"]) != n_heads * per_head:
        return state
    old_ids = groups[0]["params"]
    new_state: dict[int, dict[str, Any]] = {}
    for i in range(per_head):
        entries = [state["state"].get(old_ids[k * per_head + i]) for k in range(n_heads)]
        if any(e is None for e in entries):
            continue
        merged = {}
        for key, v0 in entries[0].items():
            if isinstance(v0, torch.Tensor) and v0.dim() >= 1:
                vals = [e[key] for e in entries]
                merged[key] = torch.stack([v.t() for v in vals]) if i % 2 == 0 else torch.stack(vals).unsqueeze(1)
            else:
                merged[key] = v0
        new_state[i] = merged
    return {"state": new_state, "param_groups": [{**groups[0], "params": list(range(per_head))}]}


def _grouped_layers(heads: list[nn.Module]) -> list[list[nn.Linear]] | None:
    """Per layer, the M heads' Linear modules, when the heads can run as one batched product: every
    head a vector :class:`UnimodalHead` without sequence encoder whose body is Identity or
    Linear → ReLU, with biases, and all of one shape. None otherwise (sequence/map classifiers)."""
    from mmbalance.models.heads import UnimodalHead

    plans = []
    for h in heads:
        if type(h) is not UnimodalHead or h.encoder is not None or h.feature_kind != "vector":
            return None
        body = h.body
        if isinstance(body, nn.Identity):
            layers = [h.out]
        elif (isinstance(body, nn.Sequential) and len(body) == 2 and type(body[0]) is nn.Linear
              and type(body[1]) is nn.ReLU):
            layers = [body[0], h.out]
        else:
            return None
        if any(type(lin) is not nn.Linear or lin.bias is None for lin in layers):
            return None
        plans.append(layers)
    shapes = [[tuple(lin.weight.shape) for lin in layers] for layers in plans]
    if not plans or any(s != shapes[0] for s in shapes):
        return None
    return [list(layer) for layer in zip(*plans)]


def build_classifier(model: nn.Module, m: str) -> nn.Module:
    """cggm.md §3.1: the model's ``make_unimodal_head(m, "cggm")``; for feature maps of a model without
    its own factory whose fusion head ends in a conv (segmentation), a :class:`SegDecoderHead` whose hidden
    width matches the head's final conv."""
    own_factory = type(model).make_unimodal_head is not MultimodalModel.make_unimodal_head
    wf = model.final_layer().weight
    if getattr(model, "feature_kinds", {}).get(m) == "map" and not own_factory and wf.dim() == 4:
        # a segmentation head (final 1×1 conv); a classification head on pooled maps (av_resnet18) takes
        # the model's own unimodal head below
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
        self._latest: dict[str, torch.Tensor] = {}  # latest eps/B/factor vectors and lgm, on the device
        self.lgm_now: torch.Tensor | None = None
        self._last_aux: dict[str, torch.Tensor] | None = None
        self._guard_hits: int | torch.Tensor = 0  # a device counter during training (no host read per step)
        self._coef_logs: tuple[torch.Tensor, ...] | None = None  # ε, Δ, B, guard flag of the step (logged once)
        self._stacked = False

    @property
    def guard_hits(self) -> int:
        """How often the guard of Eq. 7 fired (reads the device counter)."""
        return int(self._guard_hits)

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
        # vector MLP classifiers are one grouped module (one batched product per layer)
        self._stacked = self._raw_classifiers.grouped is not None
        self._ctx = ctx
        # the modality index of every scaled gradient, copied to the device once (every scoped parameter)
        self._owner_index([k for k, m in enumerate(self.modalities) for _ in self._scoped[m]], ctx.device)

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
        """Steps 7a–7c on the device: ε (global batch) → Δ = ε − ε^prev → B (Eq. 7); nothing is read
        back to the host (logged in :meth:`after_backward` as one device vector per step)."""
        eps = self._batch_eps(ctx)
        prev = torch.zeros_like(eps) if self.eps_prev is None else self.eps_prev.to(eps)
        delta = eps - prev
        self.eps_prev = eps
        b, hit = balance_coefficients(delta, rho=self.hp.rho, rho_in_b=self.hp.rho_in_b, guard=self.hp.guard,
                                      guard_tol=self.hp.guard_tol)
        self._guard_hits = self._guard_hits + hit  # a long device tensor after the first step
        self._coef_logs = (eps, delta, b, hit)
        self._latest["eps"], self._latest["B"] = eps, b
        self._b = b
        return b

    def _log_keys(self) -> tuple[str, ...]:
        """Keys of the per-step log vector (cached per modality list)."""
        cached = getattr(self, "_log_keys_cached", None)
        if cached is None or cached[0] != self.modalities:
            keys = tuple(f"cggm/{name}/{m}" for name in ("eps", "delta", "B", "grad_norm_raw", "grad_norm", "factor")
                         for m in self.modalities) + ("cggm/guard_hit",)
            cached = self._log_keys_cached = (list(self.modalities), keys)
        return cached[1]

    def _stale_lgm(self, ctx: StepContext) -> torch.Tensor:
        """L_gm(t) from weights (official): c_m = cos(vec(sg(W_m)), vec(W̃_F)) with W̃_F the value of W_F
        now. Value and ∂L_gm/∂W_F in closed form (:func:`direction_loss_and_grad`, no graph); the
        returned tensor carries that gradient to W_F only (:func:`with_gradient`), however W_F changes
        before the next step adds it (stale by one step). The snapshot (value, gradient) is what a
        checkpoint saves to rebuild the term exactly on resume."""
        wf = self._w_f(ctx)
        grouped = self._raw_classifiers.grouped
        wis = (list(grouped.final_weight().detach().unbind(0)) if grouped is not None
               else [self._w_i(ctx, m).detach() for m in self.modalities])
        value, grad = direction_loss_and_grad(wf.detach(), wis, self._b, [self.pairing[m] for m in self.modalities])
        self._lgm_snapshot = {"value": value, "grad": grad, "b": self._b}
        return self._lgm_from_snapshot(ctx)

    def _lgm_from_snapshot(self, ctx: StepContext) -> torch.Tensor:
        wf = self._w_f(ctx)
        snap = self._lgm_snapshot
        with torch.enable_grad():
            return with_gradient(snap["value"].to(wf.device), wf, snap["grad"].to(wf))

    # ---------------------------------------------------------------- training
    def _aux_outputs(self, ctx: StepContext, out: Any, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor,
                                                                                  torch.Tensor | None]:
        """o_m = f_m(sg(z_m)) and Σ_m ℓ(o_m, y); with grouped classifiers also o as one [M, B, C] tensor."""
        feats = {m: _detach(out.features[m]) for m in self.modalities}
        task = ctx.task
        if self._stacked:
            o = ctx.modules[self.MODULE](feats, stacked=True)
            aux = dict(zip(self.modalities, o.unbind(0)))
            if task.name == "classification":  # Σ_m mean_i CE(o_m,i) = M·mean over the M·B rows (same labels)
                total = task.loss(o.flatten(0, 1), y.repeat(len(self.modalities))) * len(self.modalities)
            else:
                total = torch.stack([task.loss(a, y) for a in aux.values()]).sum()
            return aux, total, o
        aux = ctx.modules[self.MODULE](feats)
        if task.name == "segmentation":
            aux = {m: o if o.shape[-2:] == y.shape[-2:] else
                   F.interpolate(o, size=y.shape[-2:], mode="bilinear", align_corners=False) for m, o in aux.items()}
        return aux, sum(task.loss(aux[m], y) for m in self.modalities), None

    def _eps_parts(self, ctx: StepContext, aux: dict[str, torch.Tensor], stacked: torch.Tensor | None,
                   y: torch.Tensor) -> torch.Tensor:
        """[2, M]: numerators and denominators of ε_m on this rank's batch (step 7a)."""
        M = len(self.modalities)
        if stacked is not None and ctx.task.name == "classification" and self.hp.metric == "auto":
            num = (ctx.task.prediction(stacked) == y.long()).sum(-1).to(torch.float32)  # top-1 hits per classifier
            return torch.stack([num, torch.full((M,), float(y.shape[0]), device=num.device)])
        parts = [self._score_parts(ctx, aux[m], y) for m in self.modalities]
        return torch.stack([torch.stack([n.float() for n, _ in parts]),
                            torch.stack([d.float().to(parts[0][0].device) for _, d in parts])])

    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        hp = self.hp
        y = batch["label"]
        out = ctx.forward(batch)
        task_loss = ctx.task.loss(out.logits, y)
        aux, aux_sum, stacked = self._aux_outputs(ctx, out, y)
        aux_loss = aux_sum / len(self.modalities) if hp.aux_loss_reduction == "mean" else aux_sum
        if stacked is not None:
            od = stacked.detach()
            self._last_aux = dict(zip(self.modalities, od.unbind(0)))
        else:
            od, self._last_aux = None, {m: o.detach() for m, o in aux.items()}
        with torch.no_grad():
            self._parts = self._eps_parts(ctx, self._last_aux, od, y)
        loss = task_loss + aux_loss
        logs: dict[str, float | torch.Tensor] = {"cggm/task_loss": task_loss.detach(), "cggm/aux_loss": aux_loss.detach()}
        direction_on = ctx.epoch >= hp.start_epoch
        if hp.cos_source == "grads_same_step":
            b = self._update_coefficients(ctx)  # steps 7a-7c moved before the backward (§2.1)
            if hp.lam != 0 and direction_on:
                lgm = self._same_step_lgm(ctx, task_loss, aux_sum, b)
                loss = loss + hp.lam * lgm
                self.lgm_now = lgm  # with its graph (inspection/tests)
                logs["cggm/lgm"] = lgm.detach()
                self._latest["lgm"] = lgm.detach()
        elif self.lgm_prev is not None and direction_on:
            loss = loss + hp.lam * self.lgm_prev
            logs["cggm/lgm_added"] = self.lgm_prev.detach()
        return StepOutput(loss, out, logs)

    def _same_step_lgm(self, ctx: StepContext, task_loss: torch.Tensor, aux_sum: torch.Tensor,
                       b: torch.Tensor) -> torch.Tensor:
        """§2.1: g_F = ∂ℓ(ŷ)/∂W_F (create_graph), g_m = ∂ℓ(o_m)/∂W_m (detached); c_m = cos(g_m, g_F block).
        g_m for every m from one call: W_m enters only ℓ(o_m), so ∂(Σ_k ℓ(o_k))/∂W_m = ∂ℓ(o_m)/∂W_m."""
        g_f = torch.autograd.grad(task_loss, self._w_f(ctx), create_graph=True, retain_graph=True)[0]
        grouped = self._raw_classifiers.grouped
        if grouped is not None:  # the stacked final weight [M, in, out]: g_m = (its gradient)[m]ᵀ
            w_last = grouped._parameters[f"weight{grouped.n_layers - 1}"]
            g_ms = torch.autograd.grad(aux_sum, w_last, retain_graph=True)[0].transpose(1, 2).unbind(0)
        else:
            g_ms = torch.autograd.grad(aux_sum, [self._w_i(ctx, m) for m in self.modalities], retain_graph=True)
        cos = [_cos(g_m.detach(), self._block(g_f, m)) for g_m, m in zip(g_ms, self.modalities)]
        return direction_loss(b.to(g_f.device), torch.stack(cos))

    def after_backward(self, ctx: StepContext) -> None:
        hp = self.hp
        # B was computed before the backward with grads_same_step (§2.1), here otherwise (step 7a-7c)
        b = self._b if hp.cos_source == "grads_same_step" else self._update_coefficients(ctx)
        factors = b if hp.rho_in_b else hp.rho * b  # Eq. 8-9: ρ·B_m, or B_m^p that already holds ρ
        grads, owner = [], []
        for k, m in enumerate(self.modalities):
            for p in self._scoped[m]:
                if p.grad is not None:
                    grads.append(p.grad)
                    owner.append(k)
        M = len(self.modalities)
        if grads:  # one foreach norm and one foreach scaling for every encoder's parameters
            f = factors.to(device=grads[0].device, dtype=grads[0].dtype)
            sq = torch.stack(torch._foreach_norm(grads)).square()
            raw = torch.zeros(M, dtype=sq.dtype, device=sq.device).index_add_(0, self._owner_index(owner, sq.device),
                                                                              sq).sqrt()
            per_factor = f.unbind(0)
            torch._foreach_mul_(grads, [per_factor[k] for k in owner])  # Eq. 8-9: magnitude modulation, in place
            scaled = f.abs() * raw
        else:
            raw = scaled = torch.zeros(M, dtype=torch.float32, device=factors.device)
        eps, delta, _, hit = self._coef_logs
        # one device vector per step: ε, Δ, B, raw and modulated encoder gradient norms, factors, guard flag
        ctx.log_many(self._log_keys(), torch.cat([eps, delta, b, raw, scaled, factors, hit.reshape(1)]))
        self._latest["factor"] = factors
        self.lgm_now, self._last_aux = None, None  # release the same-step graph before the next forward
        if hp.cos_source == "weights_stale":
            self.lgm_prev = self._stale_lgm(ctx)
            ctx.log("cggm/lgm", self.lgm_prev.detach())
            self._latest["lgm"] = self.lgm_prev.detach()

    def _owner_index(self, owner: list[int], device: torch.device) -> torch.Tensor:
        """The modality index of every scaled gradient as a device tensor, built once per layout."""
        key = (tuple(owner), device)
        cached = getattr(self, "_owner_cached", None)
        if cached is None or cached[0] != key:
            cached = self._owner_cached = (key, torch.tensor(owner, device=device))
        return cached[1]

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        snap = self._lgm_snapshot
        return {"eps_prev": None if self.eps_prev is None else self.eps_prev.cpu().clone(),
                "guard_hits": self.guard_hits,
                "lgm_snapshot": None if snap is None else {k: v.cpu() for k, v in snap.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        clf = getattr(self, "_raw_classifiers", None)
        if clf is not None and clf.loaded_old_layout:  # the engine loads the classifier optimizer next
            self._convert_optimizer_on_load(clf)
        self.eps_prev = state.get("eps_prev")
        self._guard_hits = int(state.get("guard_hits", 0))
        self._pending_snapshot = state.get("lgm_snapshot")

    def _convert_optimizer_on_load(self, clf: CGGMClassifiers) -> None:
        """A resumed per-head checkpoint: convert its classifier-optimizer state when it is loaded."""
        clf.loaded_old_layout = False
        ctx = getattr(self, "_ctx", None)
        opt = None if ctx is None else ctx.extra[self.MODULE].optimizer
        while opt is not None and hasattr(opt, "optimizer") and isinstance(opt, torch.optim.Optimizer):
            opt = opt.optimizer  # accelerate's wrapper → the torch optimizer
        if opt is None:
            return
        n_heads, n_layers = len(clf.names), clf.grouped.n_layers
        handle = None

        def hook(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
            handle.remove()  # one checkpoint
            return convert_optimizer_state(state, n_heads, n_layers)

        handle = opt.register_load_state_dict_pre_hook(hook)

    def on_epoch_start(self, ctx: StepContext) -> None:
        snap = getattr(self, "_pending_snapshot", None)
        if snap is not None and self.hp.cos_source == "weights_stale":  # resume: rebuild the stale term exactly
            self._b = snap["b"].to(ctx.device)
            if "grad" in snap:
                self._lgm_snapshot = {"value": snap["value"].to(ctx.device), "grad": snap["grad"].to(ctx.device),
                                      "b": self._b}
            else:  # a checkpoint of an earlier version keeps the weights behind the term: recompute it from them
                value, grad = direction_loss_and_grad(snap["w_f"].to(ctx.device), [w.to(ctx.device) for w in snap["w_i"]],
                                                      self._b, [self.pairing[m] for m in self.modalities])
                self._lgm_snapshot = {"value": value, "grad": grad, "b": self._b}
            self.lgm_prev = self._lgm_from_snapshot(ctx)
        self._pending_snapshot = None

    def metrics(self) -> dict[str, float]:
        """Latest B_m, ε_m, magnitude factors, L_gm and the guard counter (read once, at the epoch's end)."""
        out: dict[str, float] = {}
        for name in ("eps", "B"):
            if name in self._latest:
                out.update({f"{name}/{m}": float(v) for m, v in zip(self.modalities, self._latest[name].tolist())})
        if "eps" in self._latest:
            out["guard_hits"] = float(self.guard_hits)
        if "factor" in self._latest:
            out.update({f"factor/{m}": float(v) for m, v in zip(self.modalities, self._latest["factor"].tolist())})
        if "lgm" in self._latest:
            out["lgm"] = float(self._latest["lgm"])
        return out
