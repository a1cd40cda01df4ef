"""QMF — Quality-aware Multimodal Fusion (docs/methods/qmf.md; Zhang et al., ICML 2023).

Default = official text-image code (``QingyangZhang/QMF`` @ fe6c4c6, ``late_fusion.py``,
``train_qmf.py``): per-modality heads, energy confidence w_m = LSE(o_m)/10, fused logits
o = Σ_m sg(w_m)·o_m, loss CE(o) + Σ_m CE(o_m) + λ·Σ_m L_rank,m with a per-sample loss history
(qmf.md §2 steps 1–8). Preset ``qmf_rgbd``: the RGB-D script (no detach, λ = 0.1, history after).
QMF replaces the canonical fusion module and head: they are removed from the model in ``setup``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import LogUniform


@dataclass
class QMFHParams:
    """Hyperparameters (qmf.md §4, fidelity table §6).

    - ``lambda_rank`` 1.0: text-image code (rank loss unweighted); RGB-D 0.1.
    - ``detach_w`` true: text-image code; RGB-D false.
    - ``history_update`` ``before``: text-image order; RGB-D ``after``.
    - ``margin`` ``code``: official hinge with tolerance δ; ``crl``: required gap δ (CRL form).
    - ``temperature_scale`` 10: official (w = LSE/10).
    - ``clamp_w`` true: mmbalance fix (negative confidence inverts the vote); false = official.
    - ``regression_head`` ``gaussian``: mmbalance generalisation (§5; heads predict μ and log σ²).
    """

    lambda_rank: float = field(default=1.0, metadata={"search": LogUniform(0.01, 1.0)})
    detach_w: bool = True
    history_update: Literal["before", "after"] = "before"
    margin: Literal["code", "crl"] = "code"
    temperature_scale: float = 10.0
    clamp_w: bool = True
    regression_head: Literal["gaussian"] = "gaussian"

    def validate(self) -> None:
        if self.temperature_scale <= 0:
            raise ValueError(f"temperature_scale must be > 0, got {self.temperature_scale}")
        if self.lambda_rank < 0:
            raise ValueError(f"lambda_rank must be >= 0, got {self.lambda_rank}")


# ---------------------------------------------------------------------- the formulas
def energy_confidence(logits: torch.Tensor, scale: float = 10.0, dim: int = 1) -> torch.Tensor:
    """w = logsumexp(o)/scale (qmf.md §2 step 2; ``torch.logsumexp`` in fp32, never log Σ exp)."""
    return torch.logsumexp(logits.float(), dim=dim) / scale


def fuse(logits: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], detach: bool) -> torch.Tensor:
    """o = Σ_m w_m·o_m (step 4); w_m has the logits' shape minus the class dim (dim 1)."""
    out = None
    for m, o in logits.items():
        w = weights[m].detach() if detach else weights[m]
        term = w.unsqueeze(1).to(o.dtype) * o
        out = term if out is None else out + term
    return out


def normalise_history(h: torch.Tensor) -> torch.Tensor:
    """Ĥ = (H − min H)/(max H − min H + 1e-8), min/max over the whole array (step 7; +1e-8 is a fix)."""
    lo, hi = h.min(), h.max()
    return (h - lo) / (hi - lo + 1e-8)


def rank_loss(w: torch.Tensor, h_norm: torch.Tensor, margin: str = "code") -> torch.Tensor:
    """Ranking regulariser over circular pairs (i, j = i+1) of the batch (step 7):
    t = sign(Ĥ_i − Ĥ_j), δ = |Ĥ_i − Ĥ_j|; code: mean max(0, t·(w_i − w_j) − δ); crl: … + δ."""
    h = h_norm.to(w.dtype)
    w_j, h_j = w.roll(-1), h.roll(-1)
    t = torch.sign(h - h_j)
    delta = (h - h_j).abs()
    gap = t * (w - w_j)
    return F.relu(gap - delta).mean() if margin == "code" else F.relu(gap + delta).mean()


# ---------------------------------------------------------------------- modules
class PixelHead(nn.Module):
    """Segmentation unimodal head: 1×1 conv on the modality's feature map, upsampled to ``size``."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.out = nn.Conv2d(dim, out_dim, 1)

    def forward(self, z: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        o = self.out(z)
        if size is not None and tuple(o.shape[-2:]) != tuple(size):
            o = F.interpolate(o, size=size, mode="bilinear", align_corners=False)
        return o


class UnimodalHeads(nn.Module):
    """One head per modality; ``forward(features) → {m: o_m}`` (one DDP-wrappable module)."""

    def __init__(self, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.heads = nn.ModuleDict(heads)

    def forward(self, features: dict[str, torch.Tensor], size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for m, z in features.items():
            head = self.heads[m]
            out[m] = head(z, size) if isinstance(head, PixelHead) else head(z)
        return out


def segmentation_head(model: nn.Module, m: str, out_dim: int) -> nn.Module:
    """The dataset's unimodal segmentation head (qmf.md §2, gblending.md §5): the model's own one-input
    decoder where it has one (BraTS: DeepLabV3+ decoder on (ASPP_m, layer1_m), as CGGM's classifier),
    else a 1×1-conv :class:`PixelHead` (models whose z_m are full-resolution maps, e.g. ``conv_seg``)."""
    from mmbalance.models.heads import dense_unimodal_head

    head = dense_unimodal_head(model, m)
    return head if head is not None else PixelHead(model.feature_dims[m], out_dim)


def make_heads(model: nn.Module, task: str, out_dim: int) -> UnimodalHeads:
    """Linear head on pooled z_m (classification, ``make_unimodal_head``), a (μ, log σ²) head
    (regression), or the dataset's segmentation head (:func:`segmentation_head`)."""
    from mmbalance.models.heads import UnimodalHead

    heads: dict[str, nn.Module] = {}
    for m in model.modalities:
        if task == "segmentation":
            heads[m] = segmentation_head(model, m, out_dim)
        elif task == "regression":
            heads[m] = UnimodalHead(model.feature_kinds[m], model.feature_dims[m], 2, "linear")
        else:
            heads[m] = model.make_unimodal_head(m, "linear")
    return UnimodalHeads(heads)


# ---------------------------------------------------------------------- the method
@register_method("qmf", "QMF: energy-confidence dynamic late fusion + history ranking regulariser (text-image code)")
@register_method("qmf_rgbd", "QMF, official RGB-D script settings (no detach, lambda 0.1, history after)",
                 detach_w=False, lambda_rank=0.1, history_update="after")
class QMF(BalancingMethod):
    name = "qmf"
    hparams_cls = QMFHParams
    min_modalities = 2

    def __init__(self, hparams: QMFHParams | None = None) -> None:
        super().__init__(hparams)
        self.history: torch.Tensor | None = None  # [M, N] cumulative per-sample loss, on ctx.device
        self._device = torch.device("cpu")

    def setup(self, ctx: StepContext) -> None:
        model = ctx.raw_model
        # QMF has no fusion module: the canonical fusion and head are replaced (qmf.md §3, "late")
        model.fusion = nn.Identity()
        model.head = nn.Identity()
        model.variant = "late"
        ctx.add_module("qmf_heads", make_heads(model, ctx.task.name, ctx.data.out_dim), own_optimizer=False)
        n = len(ctx.data.train) if ctx.heldout is None else len(ctx.data.train) - len(ctx.heldout)
        self._device = ctx.device  # the history lives where the losses are: no copy per step
        self.history = torch.zeros(len(ctx.modalities), n, dtype=torch.float64, device=ctx.device)

    # ------------------------------------------------------------------ pieces
    def _unimodal(self, ctx: StepContext, batch: dict[str, torch.Tensor], absent: tuple[str, ...] = ()):
        out = ctx.forward(batch, absent)
        size = tuple(batch["label"].shape[-2:]) if ctx.task.name == "segmentation" else None
        return out, ctx.modules["qmf_heads"](out.features, size)

    def _confidences(self, ctx: StepContext, logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Raw (unclamped) confidences: energy LSE/T (classification, per pixel for segmentation);
        exp(−log σ²) for the Gaussian regression heads."""
        if ctx.task.name == "regression":
            return {m: torch.exp(-o[:, 1].float().clamp(-20, 20)) for m, o in logits.items()}
        return {m: energy_confidence(o, self.hp.temperature_scale) for m, o in logits.items()}

    def _fused(self, ctx: StepContext, logits: dict[str, torch.Tensor], conf: dict[str, torch.Tensor],
               detach: bool) -> torch.Tensor:
        if ctx.task.name == "regression":
            w = {m: (c.detach() if detach else c) for m, c in conf.items()}
            num = sum(w[m] * logits[m][:, 0].float() for m in logits)
            den = sum(w[m] for m in logits)
            return (num / den.clamp_min(1e-12))[:, None]  # ŷ = Σ w μ / Σ w (normalised, §5)
        w = {m: c.clamp_min(0) if self.hp.clamp_w else c for m, c in conf.items()}
        return fuse(logits, w, detach)

    def _per_sample_losses(self, ctx: StepContext, logits: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """[B, M] detached per-sample unimodal losses for the history (CE; per-image mean pixel CE;
        |μ_m − y| for regression)."""
        outs = list(logits.values())
        if ctx.task.name == "classification" and len({(o.shape, o.dtype) for o in outs}) == 1:
            # one cross-entropy over the M stacked logits: each row's value is computed as alone (row-wise)
            M, B = len(outs), outs[0].shape[0]
            ce = F.cross_entropy(torch.cat(outs).float(), y.long().repeat(M), reduction="none")
            return ce.reshape(M, B).t().detach().double()
        cols = []
        for o in outs:
            if ctx.task.name == "regression":
                cols.append((o[:, 0].float() - y.reshape(-1).float()).abs())
            elif ctx.task.name == "segmentation":
                cols.append(F.cross_entropy(o.float(), y.long(), reduction="none").flatten(1).mean(1))
            else:
                cols.append(F.cross_entropy(o.float(), y.long(), reduction="none"))
        return torch.stack(cols, 1).detach().double()

    def _update_history(self, ctx: StepContext, idx: torch.Tensor, losses: torch.Tensor) -> None:
        """H_m[idx] += loss (step 6); every rank applies the (idx, loss) pairs of all ranks (§9)."""
        if ctx.world_size > 1:
            idx, losses = ctx.accelerator.gather((idx.contiguous(), losses.contiguous()))
        self.history.index_add_(1, idx.long(), losses.t())

    # ------------------------------------------------------------------ hooks
    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        if "idx" not in batch:
            raise KeyError("qmf: batches must carry 'idx' (sample position in the training split)")
        y = batch["label"]
        out, logits = self._unimodal(ctx, batch)
        conf = self._confidences(ctx, logits)
        fused = self._fused(ctx, logits, conf, self.hp.detach_w)
        reg = ctx.task.name == "regression"
        if reg:
            task_loss = ctx.task.loss(fused, y)
            uni = [0.5 * (o[:, 1].clamp(-20, 20) + (y.reshape(-1) - o[:, 0]) ** 2 * torch.exp(-o[:, 1].clamp(-20, 20))).mean()
                   for o in logits.values()]  # Gaussian NLL (up to a constant)
        else:
            task_loss = ctx.task.loss(fused, y)
            uni = [ctx.task.loss(o, y) for o in logits.values()]
        loss_cls = task_loss + sum(uni)
        per_sample = self._per_sample_losses(ctx, logits, y)
        idx = batch["idx"]
        if self.hp.history_update == "before":
            self._update_history(ctx, idx, per_sample)
        rank_terms = []
        # Ĥ of the batch's samples, all modalities at once: min/max over each whole row, then the
        # element-wise normalisation of the B picked entries only (the same values as normalising the row)
        lo, hi = self.history.aminmax(dim=1, keepdim=True)
        h_batch = (self.history[:, idx.long()] - lo) / (hi - lo + 1e-8)
        for k, m in enumerate(logits):
            h_norm = h_batch[k]
            w = conf[m] if conf[m].dim() == 1 else conf[m].flatten(1).mean(1)  # segmentation: per image
            rank_terms.append(rank_loss(w, h_norm, self.hp.margin))
        if self.hp.history_update == "after":
            self._update_history(ctx, idx, per_sample)
        rank = sum(rank_terms)
        loss = loss_cls + self.hp.lambda_rank * rank
        logs: dict[str, Any] = {"qmf/rank_loss": rank.detach(), "qmf/task_loss": task_loss.detach()}
        for m, c in conf.items():
            logs[f"qmf/conf_{m}"] = c.detach().mean()
        return StepOutput(loss, out, logs)

    @torch.no_grad()
    def predict(self, ctx: StepContext, batch: dict[str, torch.Tensor], absent: tuple[str, ...] = ()) -> torch.Tensor:
        """Σ_m w_m·o_m with the training-time (clamped) confidences; absent modalities are left out of
        the sum (per-modality evaluation = that modality's head weighted by its confidence)."""
        _, logits = self._unimodal(ctx, batch, absent)
        logits = {m: o for m, o in logits.items() if m not in absent}
        return self._fused(ctx, logits, self._confidences(ctx, logits), detach=True)

    def state_dict(self) -> dict[str, Any]:
        return {"history": None if self.history is None else self.history.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("history") is not None:
            self.history = state["history"].to(self._device, copy=True)
