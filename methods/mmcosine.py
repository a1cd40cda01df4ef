"""MMCosine — multi-modal cosine loss (Xu, Feng, Zhang, Hu, ICASSP 2023, arXiv 2303.05338; official code
GeWu-Lab/MMCosine_ICASSP23 @ 00ba0a9, ``main_CD.py:113-118``; docs/methods/mmcosine.md).

Each modality's logits are a scaled cosine between its pooled feature and every class weight vector,
u_m = s·(z̄_m/‖z̄_m‖)·(W_m[c]/‖W_m[c]‖)ᵀ ∈ [−s, s]^C, and the fused logits are their sum
o_cos = Σ_m u_m; the loss is CE(o_cos, y). No modality can win by feature or weight norm. W_m is the
column block of the fused concat-linear head (``head=shared``, official) or a bias-free per-modality
weight (``head=late``, mmbalance generalisation for heads that are not linear over per-modality
blocks, and per pixel for segmentation). The prediction is argmax o_cos (the official CREMA-D script
evaluates the untrained linear output instead, ``main_CD.py:196``: not reproduced).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.errors import ConfigError
from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import Choice, LogUniform

__all__ = ["MMCosine", "MMCosineHParams", "CosineHeads", "cosine_logits", "fused_cosine_logits", "nce_loss"]


@dataclass
class MMCosineHParams:
    """Hyperparameters (docs/methods/mmcosine.md).

    - ``scale`` (s) 10: ``main_CD.py:59`` CLI default and the README command (BalanceBenchmark uses 15).
    - ``head`` ``auto``: ``shared`` (slices of the fused concat-linear head, bias frozen; official) when
      the model has ``split_head()``, else ``late`` (bias-free cosine classifier per modality).
    - ``nce_weight`` 0: the supplementary NCE term (``main_CD.py:18-50``, ``--lam`` default 0).
    - ``nce_tau`` 0.1: ``main_CD.py:20``.
    """

    scale: float = field(default=10.0, metadata={"search": LogUniform(4.0, 40.0)})
    head: Literal["auto", "shared", "late"] = "auto"
    nce_weight: float = field(default=0.0, metadata={"search": Choice([0.0, 0.1, 0.5])})
    nce_tau: float = 0.1

    def validate(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.head not in ("auto", "shared", "late"):
            raise ValueError(f"head must be 'auto', 'shared' or 'late', got {self.head!r}")
        if self.nce_weight < 0 or not self.nce_tau > 0:
            raise ValueError(f"nce_weight must be >= 0 and nce_tau > 0, got {self.nce_weight}, {self.nce_tau}")


# ------------------------------------------------------------------------------------------ formulas
def cosine_logits(z: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """u = s·ẑ·Ŵᵀ (``main_CD.py:113-118``): ẑ = z/max(‖z‖, 1e-12) per sample (per pixel for a map
    [B, d, H, W]), Ŵ[c] = W[c]/max(‖W[c]‖, 1e-12) per class row of ``weight`` [C, d]. Float32
    with autocast off (an fp16 ‖z‖² underflows and the 1e-12 floor is not representable)."""
    with torch.autocast(z.device.type, enabled=False):  # the product too: autocast would make it half
        w_hat = F.normalize(weight.float(), dim=1)
        z_hat = F.normalize(z.float(), dim=1)
        if z.dim() == 2:
            return scale * z_hat @ w_hat.t()
        return scale * torch.einsum("bd...,cd->bc...", z_hat, w_hat)


def normalize_blocks(x: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """Each column block of ``x`` [N, Σd_m] L2-normalised per row (``F.normalize`` semantics): the
    per-sample ẑ_m of concatenated features, or the per-class Ŵ_m[c] of a concatenated weight. Float32;
    equal widths take one view (one op and one backward node instead of M)."""
    x = x.float()
    if len(set(widths)) == 1:
        return F.normalize(x.view(x.shape[0], len(widths), widths[0]), dim=2).view(x.shape[0], -1)
    return torch.cat([F.normalize(b, dim=1) for b in x.split(widths, dim=1)], 1)


def fused_cosine_logits(z: torch.Tensor, weight: torch.Tensor, widths: list[int], scale: float) -> torch.Tensor:
    """o_cos = Σ_m s·ẑ_m·Ŵ_mᵀ as ONE product s·[ẑ_1 … ẑ_M]·[Ŵ_1 … Ŵ_M]ᵀ of the block-normalised
    concatenations (z [B, Σd_m], weight [C, Σd_m]); the same value as summing :func:`cosine_logits`."""
    with torch.autocast(z.device.type, enabled=False):
        return scale * normalize_blocks(z, widths) @ normalize_blocks(weight, widths).t()


def nce_loss(f1: torch.Tensor, f2: torch.Tensor, y: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Supplementary NCE term (``main_CD.py:18-50``): c_ij = ⟨f̂_1,i, f̂_2,j⟩ (the code writes
    1 − ½‖f̂_1,i − f̂_2,j‖²), P_ij = softmax_j(c_ij/τ); per row, mean −log(P_ij + 1e-10) over positives
    (y_i = y_j, j = i included) plus mean −log(1 − P_ij + 1e-10) over negatives (0 for a row without
    negatives: the code's 0/0 NaN is not reproduced); the mean over rows."""
    a, b = F.normalize(f1.float(), dim=1), F.normalize(f2.float(), dim=1)
    sim = 1 - 0.5 * torch.cdist(a, b).pow(2)
    p = torch.softmax(sim / tau, dim=1)
    pos = (y[:, None] == y[None, :]).float()
    neg = 1 - pos
    pos_term = (-(p + 1e-10).log() * pos).sum(1) / pos.sum(1)
    neg_term = (-(1 - p + 1e-10).log() * neg).sum(1) / neg.sum(1).clamp_min(1)
    return (pos_term + neg_term).mean()


class CosineHeads(nn.Module):
    """``head=late``: one bias-free class-weight matrix [C, d_m] per modality, initialised like
    ``nn.Linear``'s weight (Kaiming-uniform, a = √5)."""

    def __init__(self, dims: dict[str, int], out_dim: int) -> None:
        super().__init__()
        self.weight = nn.ParameterDict({m: nn.Parameter(torch.empty(out_dim, d)) for m, d in dims.items()})
        for w in self.weight.values():
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))

    def forward(self, feats: dict[str, torch.Tensor], scale: float,
                size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for m, z in feats.items():
            u = cosine_logits(z, self.weight[m], scale)
            if u.dim() == 4 and size is not None and tuple(u.shape[-2:]) != tuple(size):
                u = F.interpolate(u, size=size, mode="bilinear", align_corners=False)
            out[m] = u
        return out


# ------------------------------------------------------------------------------------------ the method
@register_method("mmcosine", "MMCosine: per-modality scaled cosine logits (feature and class weights L2-normalised), summed")
class MMCosine(BalancingMethod):
    name = "mmcosine"
    hparams_cls = MMCosineHParams
    supported_tasks = frozenset({"classification", "segmentation"})
    unsupported_reason = {"regression": "mmcosine: logits are s·cos(feature, class weight vector); a regression "
                                        "output has no class vectors"}
    min_modalities = 2

    def setup(self, ctx: StepContext) -> None:
        model = ctx.raw_model
        seg = ctx.task.name == "segmentation"
        head = self.hp.head
        if head == "auto":
            head = "shared" if (model.split_head() is not None and not seg) else "late"
        if head == "shared" and (model.split_head() is None or seg):
            raise ConfigError(f"mmcosine: head=shared needs a fused head that is one Linear over the concatenated "
                              f"per-modality features; model {type(model).__name__} ({type(model.head).__name__}) "
                              "has none; use head=late (or auto)")
        self.head = head
        if self.hp.nce_weight > 0:
            if seg:
                raise ConfigError("mmcosine: nce_weight > 0 needs pooled class-level features; segmentation "
                                  "has per-pixel labels (set nce_weight=0)")
            if len(set(model.feature_dims.values())) > 1:
                raise ConfigError("mmcosine: nce_weight > 0 compares features across modalities and needs equal "
                                  "widths; got " + ", ".join(f"{m}={d}" for m, d in model.feature_dims.items()))
        if head == "shared":
            # b takes no part in o_cos: frozen before the optimizer and DDP are built (not optimised,
            # not a DDP parameter that never receives a gradient)
            bias = model.final_layer().bias
            if bias is not None:
                bias.requires_grad_(False)
            self.slices = dict(model.split_head())
        else:  # late fusion: the canonical fusion and head are replaced (as QMF, MLA)
            model.fusion = nn.Identity()
            model.head = nn.Identity()
            model.variant = "late"
            ctx.add_module("mmcosine_heads", CosineHeads(dict(model.feature_dims), ctx.data.out_dim),
                           own_optimizer=False)
        mods = ctx.modalities
        self._widths = [int(model.feature_dims[m]) for m in mods]
        sl = model.split_head() if head == "shared" else None
        self._contiguous = sl is not None and [(sl[m].start, sl[m].stop) for m in mods] == [
            (sum(self._widths[:k]), sum(self._widths[:k + 1])) for k in range(len(mods))]
        self._keys = tuple(f"mmcosine/{k}_{m}" for k in ("metric", "wnorm") for m in mods)
        self._cos_keys = tuple(f"mmcosine/cos_true_{m}" for m in mods)

    # ------------------------------------------------------------------ pieces
    def unimodal_cosine(self, ctx: StepContext, features: dict[str, torch.Tensor], pooled: dict[str, torch.Tensor],
                        size: tuple[int, int] | None) -> dict[str, torch.Tensor]:
        """u_m for the modalities in ``pooled`` (eq. of :func:`cosine_logits`)."""
        if self.head == "shared":
            weight = ctx.raw_model.final_layer().weight
            return {m: cosine_logits(z, weight[:, self.slices[m]], self.hp.scale) for m, z in pooled.items()}
        feats = features if ctx.task.name == "segmentation" else pooled
        return ctx.modules["mmcosine_heads"](feats, self.hp.scale, size)

    def _weights(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.head == "shared":
            w = ctx.raw_model.final_layer().weight
            return {m: w[:, s] for m, s in self.slices.items()}
        return dict(ctx.raw_module("mmcosine_heads").weight.items())

    def _concat_weight(self, ctx: StepContext) -> torch.Tensor:
        """[C, Σd_m] in modality order: the shared head's weight columns, or the late heads' weights."""
        if self.head == "shared":
            w = ctx.raw_model.final_layer().weight
            return w if self._contiguous else torch.cat([w[:, self.slices[m]] for m in ctx.modalities], 1)
        heads = ctx.raw_module("mmcosine_heads").weight
        return torch.cat([heads[m] for m in ctx.modalities], 1)

    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        y = batch["label"]
        out = ctx.forward(batch)
        if ctx.task.name == "segmentation":  # per pixel, per modality, upsampled
            u = self.unimodal_cosine(ctx, out.features, out.pooled, tuple(y.shape[-2:]))
            o_cos = sum(u.values())
        else:  # vectors: one product over the concatenation (the late heads are read unwrapped, like
            # the shared head; their gradient reaches DDP's hooks in the same backward)
            z = torch.cat([out.pooled[m] for m in ctx.modalities], 1)
            o_cos = fused_cosine_logits(z, self._concat_weight(ctx), self._widths, self.hp.scale)
            u = None
        loss = ctx.task.loss(o_cos, y)
        if self.hp.nce_weight > 0:
            pairs = list(combinations(ctx.modalities, 2))
            nce = sum(nce_loss(out.pooled[a], out.pooled[b], y, self.hp.nce_tau) for a, b in pairs) / len(pairs)
            loss = loss + self.hp.nce_weight * nce
            ctx.log("mmcosine/nce", nce.detach())
        self._log(ctx, out, u, y)
        return StepOutput(loss, out)

    @torch.no_grad()
    def _log(self, ctx: StepContext, out, u: dict[str, torch.Tensor] | None, y: torch.Tensor) -> None:
        """Per-modality batch metric of u_m, ‖W_m‖_F and (classification) the mean true-class cosine
        (the official ``logit_a/v``): logged as device vectors, no host sync."""
        if u is None:  # vectors: every u_m from the detached pieces in one batched product
            if len(set(self._widths)) == 1:
                d = self._widths[0]
                zh = normalize_blocks(torch.cat([out.pooled[m] for m in ctx.modalities], 1).detach(), self._widths)
                wh = normalize_blocks(self._concat_weight(ctx).detach(), self._widths)
                U = self.hp.scale * torch.einsum("bmd,cmd->mbc", zh.view(len(zh), -1, d), wh.view(len(wh), -1, d))
            else:
                U = torch.stack(list(self.unimodal_cosine(ctx, out.features, out.pooled, None).values()))
        else:
            U = None
        if ctx.task.name == "classification":
            yl = y.long()
            metrics = (U.argmax(2) == yl).float().mean(1)
            cos = U.gather(2, yl.view(1, -1, 1).expand(U.shape[0], -1, 1)).mean((1, 2)) / self.hp.scale
            ctx.log_many(self._cos_keys, cos)
        else:
            parts = [ctx.task.batch_score_parts(um.detach(), y) for um in u.values()]
            metrics = torch.stack([(num / den).reshape(()).float() for num, den in parts])
        norms = torch.stack([w.detach().float().norm() for w in self._weights(ctx).values()])
        ctx.log_many(self._keys, torch.cat([metrics, norms]))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, ctx: StepContext, batch: dict[str, torch.Tensor], absent: tuple[str, ...] = ()) -> torch.Tensor:
        """o_cos summed over the present modalities only (the absent ones' u_m are dropped, not computed
        on a neutral input); with none present, every modality's neutral input."""
        present = tuple(m for m in ctx.modalities if m not in set(absent))
        neutral: tuple[str, ...] = ()
        if not present:
            present = neutral = tuple(ctx.modalities)
        model = ctx.raw_model
        feats = model.encode(ctx.inputs(batch), absent=neutral, only=present)
        pooled = {m: model.pool(m, z) for m, z in feats.items()}
        size = tuple(batch["label"].shape[-2:]) if ctx.task.name == "segmentation" else None
        return sum(self.unimodal_cosine(ctx, feats, pooled, size).values())
