"""MMPareto — Pareto integration of multimodal and unimodal gradients (docs/methods/mmpareto.md).

Wei & Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance", ICML 2024,
arXiv 2405.17730; official code GeWu-Lab/MMPareto_ICML2024 @ a339db3 (``code/MMPareto.py:57-213``,
``code/min_norm_solvers.py``). Loss L = L_mm + Σ_m L_m with separate unimodal heads. Encoder m gets
two gradients, g^mm_m = ∇_{θ_m} L_mm and g^u_m = ∇_{θ_m} L_m:

- cos_m > 0: weight c_m = ½ on g^mm (``MMPareto.py:165-167``); otherwise the two-vector min-norm
  (MGDA) weight (``min_norm_solvers.py:9-30``);
- per tensor: s = g^mm + g^u, ĝ = 2·(c·g^mm + (1 − c)·g^u), grad = γ·max(1, ‖s‖/‖ĝ‖)·ĝ with γ = 1.5
  (``MMPareto.py:178, 184-207``); heads keep their plain gradients.

Cost: 2 backward passes for any M (official: M + 2). g^mm comes from one ``autograd.grad`` of L_mm
(all-reduced by hand under DDP: autograd.grad bypasses DDP's reducer); the engine's backward of L
leaves s in ``.grad`` (synchronised), and g^u = s − g^mm is exact because L_k does not depend on θ_m
for k ≠ m. Under fp16 the extra gradient is taken of scale·L_mm and divided by the scale.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from mmbalance.methods._unimodal import UnimodalOutputs, unimodal_logs, unimodal_losses

from mmbalance.errors import ConfigError
from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import Uniform

__all__ = ["MMPareto", "MMParetoHParams", "min_norm_weight", "pareto_integrate", "pareto_integrate_many"]

#: ‖ĝ‖ at or below this fraction of its triangle-inequality bound 2·(c‖g^mm‖ + (1 − c)‖g^u‖) counts as 0.
ZERO_TOL = 1e-6


@dataclass
class MMParetoHParams:
    """Hyperparameters.

    - ``gamma`` (γ) 1.5: ``MMPareto.py:178`` (hard-coded; BalanceBenchmark ``alpha`` 1.5).
    - ``uni_head`` ``separate``: one light head per modality (``models.py:154-156``: Linear(512, C)
      per modality next to the fused head); ``shared_slice``: slices of a concat-linear fused head.
    - ``grad_mode`` ``subtract`` (mmbalance: g^u = s − g^mm, 2 backward passes) or ``separate`` (one
      ``autograd.grad`` per unimodal loss, M + 1 passes; for cross-checking, single process only).
    """

    gamma: float = field(default=1.5, metadata={"search": Uniform(1.0, 2.5)})
    uni_head: Literal["separate", "shared_slice"] = "separate"
    grad_mode: Literal["subtract", "separate"] = "subtract"

    def validate(self) -> None:
        if self.gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if self.uni_head not in ("separate", "shared_slice"):
            raise ValueError(f"uni_head must be 'separate' or 'shared_slice', got {self.uni_head!r}")
        if self.grad_mode not in ("subtract", "separate"):
            raise ValueError(f"grad_mode must be 'subtract' or 'separate', got {self.grad_mode!r}")


# ------------------------------------------------------------------------------------------ the maths
def min_norm_weight(v11: torch.Tensor, v12: torch.Tensor, v22: torch.Tensor) -> torch.Tensor:
    """Weight c on the first vector of argmin_c ‖c·g1 + (1 − c)·g2‖² (``min_norm_solvers.py:9-30``):
    0.999 if v12 ≥ v11, else 0.001 if v12 ≥ v22, else (v22 − v12)/(v11 + v22 − 2·v12). Tensor ops only."""
    den = (v11 + v22 - 2 * v12).clamp_min(torch.finfo(v11.dtype).tiny)
    inner = (v22 - v12) / den
    return torch.where(v12 >= v11, torch.full_like(v11, 0.999), torch.where(v12 >= v22, torch.full_like(v11, 0.001), inner))


def pareto_integrate(g_mm: list[torch.Tensor], g_u: list[torch.Tensor], gamma: float = 1.5,
                     c_override: torch.Tensor | None = None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Integrated gradients of one encoder (its tensors, in order) and the statistics.

    cos = ⟨g^mm, g^u⟩/(‖g^mm‖·‖g^u‖) over the concatenation of all tensors (0 if either is 0,
    ``F.cosine_similarity`` semantics); c = ½ if cos > 0 else :func:`min_norm_weight`; per tensor
    s = g^mm + g^u, ĝ = 2·(c·g^mm + (1 − c)·g^u), grad = γ·(‖s‖/‖ĝ‖)·ĝ if ‖s‖ > ‖ĝ‖ else γ·ĝ, and 0 when
    ‖ĝ‖ = 0 (the official code gives inf·0 = NaN there). ``c_override`` fixes c (tests).
    ‖ĝ‖ = 0 means ‖ĝ‖ ≤ 1e-6 of its bound 2·(c‖g^mm‖ + (1 − c)‖g^u‖) (float32 round-off).
    """
    outs, stats = pareto_integrate_many([(g_mm, g_u)], gamma, c_override)
    return outs[0], {k: v[0] for k, v in stats.items()}


_LAYOUTS: dict[tuple[tuple[int, ...], str], tuple[torch.Tensor, torch.Tensor]] = {}


def _layout(counts: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(each tensor's group, the [K, max count] table of each group's positions padded with the index one past
    the end) for groups of ``counts`` consecutive tensors; built once per layout and device."""
    key = (tuple(counts), str(device))
    if key not in _LAYOUTS:
        total, width = sum(counts), max(counts)
        table, start = [], 0
        for n in counts:
            table.append(list(range(start, start + n)) + [total] * (width - n))
            start += n
        group = [k for k, n in enumerate(counts) for _ in range(n)]
        _LAYOUTS[key] = (torch.tensor(group, device=device), torch.tensor(table, device=device))
    return _LAYOUTS[key]


def _sequential_sums(values: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """[R, K]: per row of ``values`` [R, T] and group k, 0 + v_1 + v_2 + … over the group's ``counts[k]``
    consecutive entries, added in order in ``values``' precision (as a Python loop over one group would), every
    row and group at once: a zero-padded [R, K, max count] table summed column by column (adding the padding's
    +0 leaves a sum unchanged)."""
    _, table = _layout(counts, values.device)
    padded = torch.cat([values, values.new_zeros(values.shape[0], 1)], dim=1)[:, table]
    total = values.new_zeros(values.shape[0], len(counts))
    for j in range(table.shape[1]):
        total = total + padded[:, :, j]
    return total


def pareto_integrate_many(groups: list[tuple[list[torch.Tensor], list[torch.Tensor]]], gamma: float = 1.5,
                          c_override: torch.Tensor | None = None
                          ) -> tuple[list[list[torch.Tensor]], dict[str, torch.Tensor]]:
    """:func:`pareto_integrate` for several encoders at once (``groups``: one (g^mm, g^u) pair of tensor lists
    per encoder): the integrated gradients per encoder and each statistic as a vector over the encoders.

    The arithmetic is batched over all tensors of all encoders (``_foreach`` calls, stacked norms, the
    per-encoder scalars as vectors): the same element-wise operations in the same order and precision as
    one encoder and one tensor at a time, so the numbers are bit-identical to that, in a few dozen calls
    per step instead of ≈ 75 small ones per encoder."""
    counts = [len(a) for a, _ in groups]
    a_list = [a.float() for g_mm, _ in groups for a in g_mm]
    b_list = [b.float() for _, g_u in groups for b in g_u]
    dev = a_list[0].device

    sq = torch.stack([x.sum() for x in torch._foreach_mul(a_list + b_list + a_list, a_list + b_list + b_list)])
    v11, v22, v12 = _sequential_sums(sq.reshape(3, -1), counts).double().unbind()  # Σ over each encoder's tensors
    norm_prod = (v11 * v22).sqrt()
    cos = torch.where(norm_prod > 0, v12 / norm_prod.clamp_min(1e-300), torch.zeros_like(v12))
    conflict = cos <= 0
    c = torch.where(conflict, min_norm_weight(v11, v12, v22), torch.full_like(v11, 0.5))
    if c_override is not None:
        c = torch.as_tensor(c_override, dtype=torch.float64, device=dev).expand(len(groups)).clone()
    cf = c.float()
    cf_t = cf[_layout(counts, dev)[0]]  # each tensor's encoder's c
    s_list = torch._foreach_add(a_list, b_list)  # s = g^mm + g^u
    g_list = torch._foreach_mul(a_list, list(cf_t.unbind()))  # ĝ = 2·(c·g^mm + (1 − c)·g^u)
    torch._foreach_add_(g_list, torch._foreach_mul(b_list, list((1 - cf_t).unbind())))
    torch._foreach_mul_(g_list, 2)
    ns, ng = torch.stack(torch._foreach_norm(s_list)), torch.stack(torch._foreach_norm(g_list))
    na, nb = torch.stack(torch._foreach_norm(a_list)), torch.stack(torch._foreach_norm(b_list))
    # ĝ = 0 up to float32 round-off (e.g. opposite collinear gradients): no common descent direction.
    # Without the tolerance the round-off residual would be rescaled to ‖s‖ in a random direction.
    zero = ng <= ZERO_TOL * 2 * (cf_t * na + (1 - cf_t) * nb)
    factor = torch.where(ns > ng, ns / ng.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(ns))
    factor = torch.where(zero, torch.zeros_like(ns), factor)
    flat = torch._foreach_mul(g_list, list((gamma * factor).unbind()))
    outs, k = [], 0
    for n in counts:
        outs.append(flat[k:k + n])
        k += n
    norm_s, norm_g = _sequential_sums(torch.stack([ns, ng]), counts).unbind()
    stats = {"cos": cos, "c": c, "conflict": conflict.double(), "norm_s": norm_s, "norm_g": norm_g}
    return outs, stats


# ------------------------------------------------------------------------------------------ the method
@register_method("mmpareto", "MMPareto: per-encoder min-norm (MGDA) integration of fused and unimodal gradients, x1.5")
class MMPareto(BalancingMethod):
    name = "mmpareto"
    hparams_cls = MMParetoHParams
    min_modalities = 2

    def __init__(self, hparams: MMParetoHParams | None = None) -> None:
        super().__init__(hparams)
        self._g_mm: torch.Tensor | None = None
        self._g_mm_finite: torch.Tensor | None = None
        self._g_u_sep: dict[str, list[torch.Tensor]] | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._steps = 0
        self.last: dict[str, float] = {}

    def setup(self, ctx: StepContext) -> None:
        kind = "auto" if self.hp.uni_head == "separate" else "shared_slice"
        self.uni = UnimodalOutputs(kind, "mmpareto", "mmpareto_heads", auto_shared=None)
        self.uni.setup(ctx)
        if self.hp.grad_mode == "separate" and ctx.world_size > 1:
            raise ConfigError("mmpareto: grad_mode=separate is a single-process cross-check; use grad_mode=subtract")
        self.collect_parameters(ctx.raw_model)

    def collect_parameters(self, model) -> None:
        """θ_m = ``encoder_parameters(m)`` per modality, by the model's modality map (never by name)."""
        owner: dict[int, list[str]] = {}
        for m in model.modalities:
            for p in model.encoder_parameters(m):
                owner.setdefault(id(p), []).append(m)
        # parameters shared between encoders are left unedited (docs/methods/mmpareto.md "Generalisation")
        self.params = {m: [p for p in model.encoder_parameters(m) if p.requires_grad and len(owner[id(p)]) == 1]
                       for m in model.modalities}
        self.flat_params = [p for m in model.modalities for p in self.params[m]]
        self.sizes = [p.numel() for p in self.flat_params]
        counts = [len(self.params[m]) for m in model.modalities if self.params[m]]
        if counts:  # the per-encoder layout tables go to the device here, once, not inside a training step
            _layout(counts, self.flat_params[0].device)

    # ------------------------------------------------------------------ step
    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        y = batch["label"]
        out = ctx.forward(batch)
        loss_fused = ctx.task.loss(out.logits, y)
        u = self.uni(ctx, out, y)
        losses = unimodal_losses(ctx, u, y)
        loss = loss_fused + sum(losses.values())
        scaler = ctx.accelerator.scaler
        scale = scaler.get_scale() if scaler is not None else 1.0  # fp16: gradients of the scaled loss
        g = torch.autograd.grad(loss_fused * scale if scaler is not None else loss_fused, self.flat_params,
                                retain_graph=True, allow_unused=True)
        flat = torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1).float()
                          for gi, p in zip(g, self.flat_params)])
        if scaler is not None:
            flat = flat / scale
        if ctx.world_size > 1:  # autograd.grad is rank-local: average by hand, one flat buffer
            flat = ctx.accelerator.reduce(flat, reduction="sum") / ctx.world_size
        self._g_mm = flat
        if self.hp.grad_mode == "separate":
            self._g_u_sep = {}
            for m in ctx.modalities:
                gu = torch.autograd.grad(losses[m], self.params[m], retain_graph=True, allow_unused=True)
                self._g_u_sep[m] = [(gi if gi is not None else torch.zeros_like(p)).float()
                                    for gi, p in zip(gu, self.params[m])]
        logs = unimodal_logs(ctx, "mmpareto", losses, u, y)
        logs["mmpareto/loss_fused"] = loss_fused.detach()
        return StepOutput(loss, out, logs)

    def after_backward(self, ctx: StepContext) -> None:
        if self._g_mm is None:
            return
        fp16 = ctx.accelerator.scaler is not None
        pieces = list(torch.split(self._g_mm, self.sizes))
        k = 0
        mods, groups, sums = [], [], []
        for m in ctx.modalities:
            ps = self.params[m]
            g_mm = [t.view_as(p) for t, p in zip(pieces[k:k + len(ps)], ps)]
            k += len(ps)
            if not ps:
                continue
            s = [p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32) for p in ps]
            g_u = self._g_u_sep[m] if self._g_u_sep is not None else torch._foreach_sub(s, g_mm)  # g^u = s − g^mm
            if fp16:  # non-finite g^mm only: fall back to c = ½ (p.grad = γ·s)
                finite = torch.stack([t.isfinite().all() for t in g_mm]).all()
                g_mm = [torch.where(finite, a, torch.zeros_like(a)) for a in g_mm]
                g_u = [torch.where(finite, b, si) for b, si in zip(g_u, s)]
            mods.append(m)
            groups.append((g_mm, g_u))
            sums.append(s)
        if groups:
            # every encoder at once (bit-identical to one at a time, pareto_integrate_many)
            new, stats = pareto_integrate_many(groups, self.hp.gamma)
            for i, m in enumerate(mods):
                for p, gnew, s_p in zip(self.params[m], new[i], sums[i]):
                    if fp16:  # s non-finite: the scaler skips the step; leave the gradient unedited
                        gnew = torch.where(s_p.isfinite().all(), gnew, s_p)
                    if p.grad is None:
                        p.grad = gnew.to(p.dtype)
                    else:
                        p.grad.copy_(gnew)
            vals = {key: v.unbind() for key, v in stats.items()}
            for i, m in enumerate(mods):
                for key, v in vals.items():
                    name = f"{key}/{m}"
                    self._sums[name] = self._sums.get(name, 0) + v[i].detach().double()
                    ctx.log(f"mmpareto/{key}_{m}", v[i])
        self._steps += 1
        self._g_mm, self._g_u_sep = None, None

    def on_epoch_start(self, ctx: StepContext) -> None:
        self._sums, self._steps = {}, 0

    def on_epoch_end(self, ctx: StepContext) -> None:
        n = max(1, self._steps)
        self.last = {k: float(v) / n for k, v in self._sums.items()}

    def metrics(self) -> dict[str, float]:
        return dict(self.last)
