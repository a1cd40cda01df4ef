"""SMV: sample-level modality valuation and re-sampling (docs/methods/smv.md).

Wei, Feng, Wang, Hu, "Enhancing Multimodal Cooperation via Sample-level Modality Valuation", CVPR 2024
(arXiv 2309.06255); official code GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation @ 7ed12b0
(``code/sample_level.py``, ``code/modality_level.py``, ``code/datasets/dataloader.py``,
``code/models/models.py``). The paper body was not available: formulas are cited by their place in the code.

Before every epoch e ≥ W (``sample_level.py:321-333``):

1. valuation (eval mode, no gradient): for every training sample and non-empty subset S of the
   modalities, the fused prediction with the other modalities' fusion inputs set to 0
   (``models.py:74-86``); v(S) = |S|·1[correct] (``sample_level.py:107-116``); exact Shapley values
   φ_m = Σ_{S ⊆ M∖{m}} |S|!(M−|S|−1)!/M!·[v(S ∪ {m}) − v(S)] (``:117-118`` at M = 2);
2. copies (``dataloader.py:154-186``): c = 1 if 0.4 < φ < 1, 2 if −0.1 < φ < 0.4, 3 if φ < −0.1, else 0;
   each copy of sample i keeps only modality m (the others' fusion inputs are 0, ``models.py:61-67``);
3. the epoch is one shuffled pass over the originals and all copies, mixed in the same batches: one
   epoch-plan group whose per-sample tags say which modality a row keeps (−1 = all).

``smv_modality`` (``modality_level.py:143-177``, ``dataloader.py:296-316``): mean φ over ⌊ρ·N⌋ samples
drawn with replacement, gap_m = 1 − φ̄_m, d = α·(2/3)·|gap_a − gap_v|, ⌊d·N⌋ copies (drawn with replacement)
keeping only the modality with the larger gap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Literal

import torch
from mmbalance.methods._outputs import map_tensors
from torch import nn

from mmbalance.data.batching import collate_dicts
from mmbalance.data.containers import TensorSplit
from mmbalance.errors import MethodNotApplicable
from mmbalance.interface import BalancingMethod, BatchGroup, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import Choice

__all__ = ["SMV", "SMVModality", "SMVHParams", "SMVModalityHParams", "shapley_matrix", "shapley_values",
           "copies_from_phi", "plan_from_copies", "modality_level_copies", "auto_warmup_epochs"]


@dataclass
class SMVHParams:
    """Hyperparameters (docs/methods/smv.md "Hyperparameters").

    - ``warmup_epochs`` ``auto`` = max(1, round(E·5/60)): the official 5 of 60 epochs (``--warmup 5``);
      an integer overrides (5 = official, 1 = BalanceBenchmark ``modulation_starts``).
    - ``value`` ``size_weighted``: v(S) = |S|·1[correct] (``sample_level.py:107-118``); ``indicator``:
      v(S) = 1[correct] (BalanceBenchmark).
    - ``mask_level`` ``feature``: absent modalities' fusion inputs × 0 (``models.py:61-67``); ``input``:
      neutral inputs (BalanceBenchmark; the only choice on MMTM models).
    - ``batching`` ``mixed``: originals and copies in the same batches (official); ``grouped``: batches
      of one kind each, in a seeded random order (non-official).
    """

    warmup_epochs: int | Literal["auto"] = "auto"
    value: Literal["size_weighted", "indicator"] = "size_weighted"
    mask_level: Literal["feature", "input"] = "feature"
    batching: Literal["mixed", "grouped"] = "mixed"

    def validate(self) -> None:
        if self.warmup_epochs != "auto" and (not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0):
            raise ValueError(f"warmup_epochs must be an integer >= 0 or 'auto', got {self.warmup_epochs!r}")


@dataclass
class SMVModalityHParams(SMVHParams):
    """Modality-level variant (``smv_modality``): ``part_ratio`` ρ 0.2 (``modality_level.py:51``),
    ``alpha`` α 1 (``:52``; BalanceBenchmark 0.5, unused there), ``func`` ``linear`` (``dataloader.py:300-306``;
    ``tanh``, ``square``)."""

    part_ratio: float = field(default=0.2, metadata={"search": Choice((0.1, 0.2, 0.5))})
    alpha: float = field(default=1.0, metadata={"search": Choice((0.5, 1.0, 2.0))})
    func: Literal["linear", "tanh", "square"] = "linear"

    def validate(self) -> None:
        super().validate()
        if not 0 < self.part_ratio <= 1:
            raise ValueError(f"part_ratio must be in (0, 1], got {self.part_ratio}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")


# ---------------------------------------------------------------------------------------- formulas
def auto_warmup_epochs(epochs: int) -> int:
    return max(1, round(epochs * 5 / 60))


def shapley_matrix(n_modalities: int) -> torch.Tensor:
    """A [2^M, M] (float64) with φ = V·A for V[i, S] = v_i(S) (subset S as a bit mask, v(∅) = 0):
    A[S ∪ {m}, m] += w(|S|), A[S, m] −= w(|S|), w(k) = k!(M−k−1)!/M! over S ⊆ M∖{m}."""
    M = n_modalities
    A = torch.zeros(2 ** M, M, dtype=torch.float64)
    for m in range(M):
        others = [k for k in range(M) if k != m]
        for size in range(M):
            w = math.factorial(size) * math.factorial(M - size - 1) / math.factorial(M)
            for sub in combinations(others, size):
                mask = sum(1 << k for k in sub)
                A[mask | (1 << m), m] += w
                A[mask, m] -= w
    return A


def shapley_values(values: torch.Tensor) -> torch.Tensor:
    """φ [B, M] from v [B, 2^M] (column S = bit mask of the subset; column 0 = v(∅) = 0)."""
    M = int(round(math.log2(values.shape[1])))
    return values.double() @ shapley_matrix(M).to(values.device)


def copies_from_phi(phi: torch.Tensor) -> torch.Tensor:
    """Copies per (sample, modality) (``dataloader.py:154-186``): 1 if 0.4 < φ < 1, 2 if −0.1 < φ < 0.4,
    3 if φ < −0.1, else 0 (φ ≥ 1, or exactly on a threshold)."""
    c = torch.zeros(phi.shape, dtype=torch.long)
    c[(phi > 0.4) & (phi < 1)] = 1
    c[(phi > -0.1) & (phi < 0.4)] = 2
    c[phi < -0.1] = 3
    return c


def plan_from_copies(copies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, tags) of one epoch: every original once with tag −1, then copies[i, m] rows of sample i
    with tag m (only modality m kept)."""
    n, M = copies.shape
    idx = [torch.arange(n)]
    tags = [torch.full((n,), -1, dtype=torch.long)]
    for m in range(M):
        rep = torch.repeat_interleave(torch.arange(n), copies[:, m].long())
        idx.append(rep)
        tags.append(torch.full((len(rep),), m, dtype=torch.long))
    return torch.cat(idx), torch.cat(tags)


def modality_level_copies(phi_mean: torch.Tensor, n: int, alpha: float, func: str,
                          generator: torch.Generator) -> torch.Tensor:
    """Copies [n, M] of the modality-level rule (``modality_level.py:143-177``, ``dataloader.py:296-316``):
    gap_m = 1 − φ̄_m, w = argmax gap (ties → the later modality, official "keeps modality 2"),
    d = α·f(gap_w − mean_{k≠w} gap_k) with f = (2/3)·x (``linear``), tanh, or x² (``square``) — at M = 2
    exactly α·(2/3)·|gap_a − gap_v|; R = ⌊d·n⌋ samples drawn uniformly with replacement, one copy each."""
    gap = 1 - phi_mean.double()
    M = gap.numel()
    w = M - 1 - int(torch.argmax(gap.flip(0)))  # argmax, ties to the later modality
    diff = float(gap[w] - (gap.sum() - gap[w]) / (M - 1))
    f = {"linear": lambda x: 2 / 3 * x, "tanh": math.tanh, "square": lambda x: x * x}[func]
    d = alpha * f(abs(diff))
    r = int(math.floor(round(d * n, 6)))  # ⌊d·N⌋ robust to float noise in φ̄ (0.4·1000 → 400, not 399)
    copies = torch.zeros(n, M, dtype=torch.long)
    if r > 0:
        picks = torch.randint(n, (r,), generator=generator)
        copies[:, w] = torch.bincount(picks, minlength=n)
    return copies


# ---------------------------------------------------------------------------------------- the method
@register_method("smv", "SMV: per-sample Shapley valuation of each modality; low-contributing ones re-sampled alone")
class SMV(BalancingMethod):
    """Valuation in ``on_epoch_start``; re-sampling through the engine's epoch plan with per-sample tags;
    the per-row masks act in encoder forward hooks (feature level) or on the inputs."""

    name = "smv"
    hparams_cls = SMVHParams
    min_modalities = 2
    modality_level = False

    def __init__(self, hparams: SMVHParams | None = None) -> None:
        super().__init__(hparams)
        self.phi: torch.Tensor | None = None  # [N, M] float32 (NaN where a sample was not valued)
        self.copies: torch.Tensor | None = None  # [N, M] copies of the current epoch
        self._mult: torch.Tensor | None = None  # [B, M] row multipliers of the current step
        self.samples_trained = 0  # originals + copies over every epoch so far (the run record's data count)

    def setup(self, ctx: StepContext) -> None:
        model = ctx.raw_model
        if getattr(model, "variant", "canonical") == "mmtm" and self.hp.mask_level == "feature":
            raise MethodNotApplicable("smv: zeroed fusion inputs would still carry the modality through the "
                                      "MMTM-mixed features of the others; use mask_level=input")
        self.mods = list(model.modalities)
        self._cols = torch.arange(len(self.mods), device=ctx.device)
        if self.hp.mask_level == "feature":
            for k, m in enumerate(self.mods):
                model.encoders[m].register_forward_hook(self._make_hook(k))

    def _make_hook(self, k: int):
        def hook(module: nn.Module, args: Any, out: Any) -> Any:
            if self._mult is None or not module.training:
                return None
            col = self._mult[:, k]
            return map_tensors(out, lambda z: z * col.to(z.dtype).view(-1, *([1] * (z.dim() - 1))))
        return hook

    def warmup(self, ctx: StepContext) -> int:
        w = self.hp.warmup_epochs
        return auto_warmup_epochs(ctx.epochs_in_phase) if w == "auto" else int(w)

    # ------------------------------------------------------------------ valuation
    def _correct_values(self, ctx: StepContext, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per sample: 1[correct] (classification; regression: the sign decision), or the image's mean
        region Dice (segmentation)."""
        task = ctx.task
        if task.name == "classification":
            return (logits.argmax(-1) == y.long()).double()
        if task.name == "regression":
            return ((logits.reshape(-1).float() > 0) == (y.reshape(-1).float() > 0)).double()
        return task.region_dice(task.prediction(logits), y.long()).mean(1).double()

    @torch.no_grad()
    def batch_values(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """v [B, 2^M]: v(S) = |S|·correct(S) (``size_weighted``) or correct(S); the encoders run once
        (feature level), the fusion and head once per non-empty subset."""
        mods, y = self.mods, batch["label"]
        M = len(mods)
        cols = [torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)]
        out = ctx.forward(batch) if self.hp.mask_level == "feature" else None
        for mask in range(1, 2 ** M):
            present = {m for k, m in enumerate(mods) if mask >> k & 1}
            if out is not None:
                feats = {m: (z if m in present else z * 0) for m, z in out.features.items()}
                logits = ctx.raw_model.fuse_and_head(feats)[1]
            else:
                logits = ctx.forward(batch, absent=tuple(m for m in mods if m not in present)).logits
            size = len(present) if self.hp.value == "size_weighted" else 1
            cols.append(size * self._correct_values(ctx, logits, y))
        return torch.stack(cols, 1)

    def _batches_of(self, ctx: StepContext, positions: torch.Tensor):
        """Batches of the training rows at ``positions`` (this rank's share: r, r+W, …, padded by
        wrap-around), for the modality-level subset."""
        world, rank = ctx.world_size, ctx.accelerator.process_index
        total = -(-len(positions) // world) * world
        pos = positions.repeat(-(-total // max(1, len(positions))))[:total][rank::world]
        split = ctx.data.train
        bsz = self._batch_size(ctx)
        for start in range(0, len(pos), bsz):
            chunk = pos[start:start + bsz]
            if isinstance(split, TensorSplit):
                batch = split.batch(chunk)
            else:
                batch = collate_dicts([split[int(i)] for i in chunk])
            batch["slot"] = torch.arange(start, start + len(chunk)) * world + rank  # position in ``positions``
            yield {k: v.to(ctx.device) for k, v in batch.items()}

    @staticmethod
    def _batch_size(ctx: StepContext) -> int:
        """The per-rank training batch size (the first batch of a pass over TRAIN)."""
        for batch in ctx.train_batches("train", shuffle=False):
            return int(batch["label"].shape[0])
        return 1

    @torch.no_grad()
    def valuate(self, ctx: StepContext, positions: torch.Tensor | None = None) -> torch.Tensor:
        """φ [N, M] (float64) of every training sample (or of ``positions``: [len, M] in their order), in
        eval mode without gradient; (key, φ) rows are all-gathered across ranks, padding removed by key."""
        modules = [ctx.model, *ctx.modules.values()]
        states = [mod.training for mod in modules]
        for mod in modules:
            mod.eval()
        keys, rows = [], []
        try:
            batches = ctx.train_batches("train", shuffle=False) if positions is None else self._batches_of(ctx, positions)
            for batch in batches:
                phi = shapley_values(self.batch_values(ctx, batch))
                key = (batch["idx"] if positions is None else batch["slot"]).to(phi.device).contiguous()
                if ctx.world_size > 1:
                    key, phi = ctx.accelerator.gather((key, phi.contiguous()))
                keys.append(key)
                rows.append(phi)
        finally:
            for mod, st in zip(modules, states):
                mod.train(st)
        key, phi = torch.cat(keys).cpu(), torch.cat(rows).cpu()  # one copy per pass
        n = len(ctx.data.train) if positions is None else len(positions)
        table = torch.full((n, len(self.mods)), float("nan"), dtype=torch.float64)
        table[key] = phi  # padded duplicates carry identical values
        return table

    def on_epoch_start(self, ctx: StepContext) -> None:
        n = len(ctx.data.train)
        if ctx.epoch < self.warmup(ctx):
            self.samples_trained += n
            return
        if not self.modality_level:
            phi = self.valuate(ctx)
            self.phi = phi.float()
            self.copies = copies_from_phi(phi)
        else:
            z = torch.randint(n, (max(1, int(self.hp.part_ratio * n)),), generator=ctx.generator)
            phi_z = self.valuate(ctx, z)
            self.phi = torch.full((n, len(self.mods)), float("nan"))
            self.phi[z] = phi_z.float()
            self.phi_mean = phi_z.mean(0)
            self.copies = modality_level_copies(self.phi_mean, n, self.hp.alpha, self.hp.func, ctx.generator)
        self.samples_trained += n + int(self.copies.sum())

    # ------------------------------------------------------------------ the plan
    def epoch_plan(self, ctx: StepContext) -> list[BatchGroup] | None:
        if ctx.epoch < self.warmup(ctx) or self.copies is None:
            return None  # warm-up: the default shuffled loader, every modality present
        idx, tags = plan_from_copies(self.copies)
        if self.hp.batching == "mixed":
            return [BatchGroup(idx, tags=tags)]
        # grouped: originals, then each modality's copies, cut into global batches in a seeded random order
        g = torch.Generator().manual_seed(ctx.seed * 1_000_003 + 131 * ctx.epoch + 7)
        bsz = self._batch_size(ctx) * ctx.world_size
        chunks = []
        for t in range(-1, len(self.mods)):
            sel = torch.nonzero(tags == t).flatten()
            sel = sel[torch.randperm(len(sel), generator=g)]
            chunks += [BatchGroup(idx[sel[i:i + bsz]], tags=tags[sel[i:i + bsz]], shuffle=False)
                       for i in range(0, len(sel), bsz)]
        order = torch.randperm(len(chunks), generator=g).tolist()
        return [chunks[i] for i in order]

    # ------------------------------------------------------------------ training
    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        tags = batch.get("plan_tag")
        if tags is None:  # warm-up: plain joint training
            out = ctx.forward(batch)
            return StepOutput(ctx.task.loss(out.logits, batch["label"]), out)
        t = tags[:, None]
        mult = ((t == -1) | (t == self._cols[None, :])).to(torch.float32)  # [B, M]: 1 where the row keeps m
        if self.hp.mask_level == "feature":
            self._mult = mult
            try:
                out = ctx.forward(batch)
            finally:
                self._mult = None
        else:
            model, batch = ctx.raw_model, dict(batch)
            for k, m in enumerate(self.mods):
                x = batch[m]
                keep = mult[:, k].view(-1, *([1] * (x.dim() - 1))) > 0
                batch[m] = torch.where(keep, x, model.neutral_input(m, x))
            out = ctx.forward(batch)
        loss = ctx.task.loss(out.logits, batch["label"])
        return StepOutput(loss, out, {"smv/copy_fraction": (tags >= 0).float().mean()})

    # ------------------------------------------------------------------ state and logs
    def state_dict(self) -> dict[str, Any]:
        """The last valuation (φ, N × M) and the epoch's copies (N × M): identical on every rank."""
        return {"phi": None if self.phi is None else self.phi.clone(),
                "copies": None if self.copies is None else self.copies.to(torch.int16),
                "samples_trained": self.samples_trained}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phi = None if state.get("phi") is None else state["phi"].clone()
        self.copies = None if state.get("copies") is None else state["copies"].long()
        self.samples_trained = int(state.get("samples_trained", 0))

    def metrics(self) -> dict[str, float]:
        if self.copies is None:
            return {"samples_trained": float(self.samples_trained)} if self.samples_trained else {}
        out = {"samples_trained": float(self.samples_trained)}
        out.update({f"copies_{m}": float(self.copies[:, k].sum()) for k, m in enumerate(self.mods)})
        out["epoch_samples"] = float(self.copies.shape[0] + self.copies.sum())
        if self.phi is not None:
            valued = ~torch.isnan(self.phi[:, 0])
            out.update({f"phi_mean_{m}": float(self.phi[valued, k].double().mean()) for k, m in enumerate(self.mods)})
        return out


@register_method("smv_modality", "SMV modality-level: global valuation on a subset, copies of the weaker modality")
class SMVModality(SMV):
    name = "smv_modality"
    hparams_cls = SMVModalityHParams
    modality_level = True
