"""PMR — Prototypical Modal Rebalance (docs/methods/pmr.md; Fan et al., CVPR 2023).

Default = official code (``fanyunfeng-bit/Modal-Imbalance-PMR`` @ 3615e48, ``main_Prototype_grad.py``):
per-class prototypes of each modality's pooled embedding, recomputed at every epoch start from ≈10% of
the TRAINING batches; a prototypical cross-entropy (PCE) on the lagging modality with the binary
coefficient β = α (pmr.md §2 steps 1–10). Preset ``pmr_paper``: smooth coefficient and PER (§2.1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from mmbalance.errors import DatasetFormatError
from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import LogUniform


@dataclass
class PMRHParams:
    """Hyperparameters (pmr.md §4).

    - ``alpha`` 2.0: official scripts (AVE; CREMA-D concat with Adam, repository issue #3).
    - ``momentum`` 0.0: every published command (argparse default 0.2 is never used).
    - ``start_epoch``/``end_epoch`` 0/last (None): mmbalance (official windows 0–70, 0–100).
    - ``subset_fraction`` 0.1: official (``len(loader)//10`` batches).
    - ``coef_rule`` ``binary``: official; ``smooth`` = ``pmr_paper`` (§2.1, form unverified).
    - ``per_weight``/``per_epochs`` 0/0: official has no PER (issues #4, #7, #9); ``pmr_paper`` needs values.
    - ``pixels_per_image`` 1024: segmentation generalisation (§5).
    """

    alpha: float = field(default=2.0, metadata={"search": LogUniform(0.2, 5.0)})
    momentum: float = 0.0
    start_epoch: int = 0
    end_epoch: int | None = None
    subset_fraction: float = 0.1
    coef_rule: Literal["binary", "smooth"] = "binary"
    per_weight: float = 0.0
    per_epochs: int = 0
    pixels_per_image: int = 1024

    def validate(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 < self.subset_fraction <= 1.0:
            raise ValueError(f"subset_fraction must be in (0, 1], got {self.subset_fraction}")
        if self.alpha < 0 or self.per_weight < 0:
            raise ValueError("alpha and per_weight must be >= 0")


def prototype_logits(z: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """logits[i, k] = −‖z_i − P[k]‖₂ (Euclidean, not squared, no temperature; pmr.md §2 step 6).
    fp32; the square root is taken of max(‖·‖², 1e-12) so that the gradient stays finite at 0."""
    diff = z.float()[:, None, :] - protos.float()[None, :, :]
    return -diff.pow(2).sum(-1).clamp_min(1e-12).sqrt()


def coefficients(scores: torch.Tensor, alpha: float, rule: str = "binary") -> tuple[torch.Tensor, torch.Tensor]:
    """(β, ρ) from per-modality scores s (pmr.md §2 steps 8–9, §5): ρ_m = s_m / mean_{k≠m} s_k;
    binary: β_m = α if ρ_m < 1 else 0; smooth (``pmr_paper``): β_m = α·max(0, tanh(1/ρ_m − 1))."""
    s = scores.double()
    n = len(s)
    others = (s.sum() - s) / max(1, n - 1)
    rho = s / others.clamp_min(1e-12)
    if rule == "binary":
        beta = torch.where(rho < 1, torch.full_like(rho, alpha), torch.zeros_like(rho))
    else:
        beta = alpha * torch.tanh(1.0 / rho.clamp_min(1e-12) - 1.0).clamp_min(0.0)
    return beta, rho


@register_method("pmr", "PMR: prototypical cross-entropy for the lagging modality (official binary rule, α=2)")
@register_method("pmr_paper", "PMR, paper variant: smooth coefficient (PER needs per_weight/per_epochs)",
                 coef_rule="smooth")
class PMR(BalancingMethod):
    name = "pmr"
    hparams_cls = PMRHParams
    supported_tasks = frozenset({"classification", "segmentation"})
    unsupported_reason = {"regression": "pmr: requires a classification or segmentation task (class prototypes "
                                        "need classes; a quantile-binning extension would not be faithful)"}
    min_modalities = 2

    def __init__(self, hparams: PMRHParams | None = None) -> None:
        super().__init__(hparams)
        self.prototypes: torch.Tensor | None = None  # [M, C, d] (d = max feature dim, zero-padded)
        self.n_computations = 0
        self.last_subset_idx: torch.Tensor | None = None

    # ------------------------------------------------------------------ set-up
    def setup(self, ctx: StepContext) -> None:
        dims = ctx.raw_model.feature_dims
        self.dims = [dims[m] for m in ctx.modalities]
        self.num_classes = int(ctx.task.num_classes)
        self._mods = list(ctx.modalities)

    # ------------------------------------------------------------------ prototypes
    def _pooled_and_labels(self, ctx: StepContext, out: Any, label: torch.Tensor, m: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (classification) or per-pixel (segmentation, feature-map resolution) embeddings
        with their labels: ([n, d], [n]). Segmentation: the ASPP output when z_m packs it with other
        maps (BraTS z_m = cat(up(ASPP_m), layer1_m); pmr.md §5: "BraTS: ASPP output")."""
        if ctx.task.name == "segmentation":
            parts = ctx.raw_model.feature_parts(m, out.features[m])
            z = parts.get("aspp", out.features[m])  # [B, d, h, w]
            lab = F.interpolate(label[:, None].float(), size=z.shape[-2:], mode="nearest")[:, 0].long()
            return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), lab.reshape(-1)
        return out.pooled[m], label.long()

    def _subset_batches(self, ctx: StepContext):
        """The shuffled training loader of this epoch (seeded by epoch; TRAIN only)."""
        return ctx.train_batches(split="train", shuffle=True, key=1_000_000 + ctx.phase_index * 10_007 + ctx.epoch)

    @torch.no_grad()
    def compute_prototypes(self, ctx: StepContext) -> torch.Tensor:
        """pmr.md §2 steps 1–4: class means of the pooled embeddings over the first ⌊n_batches·f⌋
        batches of a shuffled TRAIN loader (eval mode, no gradient); sums and counts SUM-reduced."""
        mods, c = ctx.modalities, self.num_classes
        d = max(self.dims)
        n_train = len(ctx.data.train) if ctx.heldout is None else len(ctx.data.train) - len(ctx.heldout)
        bs = int(ctx.config.train.get("batch_size", 64)) if isinstance(ctx.config.train, dict) else 64
        n_batches = math.ceil(math.ceil(n_train / ctx.world_size) / bs)
        k = max(1, int(n_batches * self.hp.subset_fraction))
        sums = torch.zeros(len(mods), c, d, dtype=torch.float64, device=ctx.device)
        counts = torch.zeros(len(mods), c, dtype=torch.float64, device=ctx.device)
        model = ctx.model
        was_training = model.training
        model.eval()
        first = self.prototypes is None
        used: list[torch.Tensor] = []
        try:
            for i, batch in enumerate(self._subset_batches(ctx)):
                if i >= k:
                    # first computation: keep drawing until every class has a sample (step 3)
                    if not first or bool((ctx.reduce_sum(counts) > 0).all()):
                        break
                out = ctx.forward(batch)
                used.append(batch["idx"].detach())
                for j, m in enumerate(mods):
                    z, y = self._pooled_and_labels(ctx, out, batch["label"], m)
                    sums[j, :, : z.shape[1]].index_add_(0, y, z.double())
                    counts[j].index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        finally:
            model.train(was_training)
        sums, counts = ctx.reduce_sum(sums), ctx.reduce_sum(counts)
        self.last_subset_idx = torch.cat(used).cpu() if used else torch.zeros(0, dtype=torch.long)  # one copy
        present = counts > 0
        new = (sums / counts.clamp_min(1)[..., None]).float()
        if first:
            if not bool(present.all()):
                missing = sorted({int(x) for x in (~present).nonzero()[:, 1]})
                raise DatasetFormatError(f"pmr: classes {missing} have no sample in the training split of "
                                         f"dataset {ctx.data.name!r}; prototypes cannot be computed")
            protos = new
        else:
            old = self.prototypes.to(new.device)
            new = torch.where(present[..., None], new, old)  # absent classes keep their prototype (step 3)
            protos = (1 - self.hp.momentum) * new + self.hp.momentum * old  # step 4
        self.prototypes = protos
        self.n_computations += 1
        return protos

    def on_epoch_start(self, ctx: StepContext) -> None:
        self.compute_prototypes(ctx)

    def _active(self, ctx: StepContext) -> bool:
        end = self.hp.end_epoch if self.hp.end_epoch is not None else math.inf
        return self.hp.start_epoch <= ctx.epoch <= end

    # ------------------------------------------------------------------ training step
    def _sample_pixels(self, ctx: StepContext, z: torch.Tensor, y: torch.Tensor, batch_size: int):
        """Segmentation: ``pixels_per_image`` random pixels per image, drawn on the device
        (``ctx.device_generator``: ``ctx.generator`` on the CPU)."""
        hw = z.shape[0] // batch_size
        p = min(self.hp.pixels_per_image, hw)
        pick = torch.randint(hw, (batch_size, p), generator=ctx.device_generator, device=z.device)
        flat = (pick + torch.arange(batch_size, device=z.device)[:, None] * hw).reshape(-1)
        return z[flat], y[flat], p

    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        out = ctx.forward(batch)
        loss = ctx.task.loss(out.logits, batch["label"])
        if not self._active(ctx) or self.prototypes is None:
            return StepOutput(loss, out, {"pmr/active": 0.0})
        mods = ctx.modalities
        bsz = int(batch["label"].shape[0])
        pce, ent, scores, acc = [], [], [], []
        for j, m in enumerate(mods):
            z, y = self._pooled_and_labels(ctx, out, batch["label"], m)
            per_image = 1
            if ctx.task.name == "segmentation":
                z, y, per_image = self._sample_pixels(ctx, z, y, bsz)
            logits = prototype_logits(z, self.prototypes[j, :, : z.shape[1]].to(z.device))
            pce.append(F.cross_entropy(logits, y))
            p = logits.softmax(-1)
            ent.append(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())
            with torch.no_grad():
                true_p = p.gather(1, y[:, None])[:, 0].detach()
                # s_m = Σ_i p_m,i[y_i] (segmentation: per-image mean over sampled pixels, summed)
                scores.append(true_p.sum() / per_image)
                acc.append((logits.argmax(-1) == y).float().mean())
        s = ctx.reduce_sum(torch.stack(scores))
        beta, rho = coefficients(s, self.hp.alpha, self.hp.coef_rule)
        # On the device, no host read (step 10): a zero β_m adds exactly 0 to the loss and 0·∇PCE_m to
        # the gradients, the same numbers as skipping the term. β is float32 here, as a Python-float
        # factor is in a float32 product.
        beta_f = beta.to(pce[0].dtype)
        total = loss
        for j in range(len(mods)):
            total = total + beta_f[j] * pce[j]
        if self.hp.per_weight > 0 and ctx.epoch < self.hp.per_epochs:
            for j in range(len(mods)):  # PER on the leading modalities ρ_m > 1 (pmr_paper, §2.1)
                total = total - torch.where(rho[j] > 1, self.hp.per_weight * ent[j], torch.zeros_like(ent[j]))
        logs: dict[str, Any] = {"pmr/active": 1.0}
        for j, m in enumerate(mods):
            logs[f"pmr/beta_{m}"] = beta[j]
            logs[f"pmr/rho_{m}"] = rho[j]
            logs[f"pmr/proto_acc_{m}"] = acc[j]
        self._last = (beta.detach(), rho.detach())  # read by metrics() once per epoch
        return StepOutput(total, out, logs)

    def metrics(self) -> dict[str, float]:
        """The last step's β_m and ρ_m (from the SUM-reduced scores: identical on every rank); one host
        read for all of them."""
        last = getattr(self, "_last", None)
        if last is None:
            return {}
        beta, rho = torch.stack(last).tolist()
        return {**{f"beta_{m}": b for m, b in zip(self._mods, beta)}, **{f"rho_{m}": r for m, r in zip(self._mods, rho)}}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"prototypes": None if self.prototypes is None else self.prototypes.cpu(),
                "n_computations": self.n_computations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prototypes = state.get("prototypes")
        self.n_computations = int(state.get("n_computations", 0))
