"""Gradient-Blending (docs/methods/gblending.md; Wang, Tran, Feiszli, CVPR 2020, Algorithms 1–3).

Unimodal heads C_1..C_M next to the fused head C_{M+1}; the training loss is L = Σ_i w_i·ℓ(C_i, y)
with w_i ∝ G_i/O_i² estimated by GB_Estimate: short trainings of copies of each sub-network (encoder_i
+ C_i, and all encoders + fused head) measured on a held-out part V of the TRAINING split (never
validation or test). Online mode (default, Algorithm 3): re-estimated every super-epoch; offline
(``gblending_offline``, Algorithm 2): once, with full-length sub-network trainings. Prediction uses
the fused head only.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import Choice

from .qmf import PixelHead, UnimodalHeads, segmentation_head


@dataclass
class GBlendHParams:
    """Hyperparameters (gblending.md §4).

    - ``mode`` ``online``: paper Algorithm 3 (best results); ``offline``: Algorithm 2.
    - ``first_super_epoch`` 10: paper (Kinetics); ``super_epoch`` 5: paper (BalanceBenchmark 10).
    - ``heldout_fraction`` 0.08: paper (Kinetics, mini-Sports).
    - ``min_weight`` 1e-3: mmbalance guard (§6).
    - ``measure`` ``loss``: paper; ``accuracy``: G/O from accuracies (paper: equally effective).
    - ``weights`` None: fixed weights [w_1..w_M, w_fused] = official VMZ behaviour (no estimation,
      no held-out split).
    - ``noise_floor`` False (paper). True (mmbalance, preset ``gblending_offline_robust``): the
      denominator O_i² becomes O_i² + SE(O_i)², SE from the per-sample loss changes on V and T′
      (:func:`overfit_standard_error`), so a head whose ΔO is indistinguishable from 0 cannot take
      all the weight (Eq. w ∝ G/O² divides by a noise-dominated square otherwise).
    - ``max_weight`` None (paper): optional cap on every weight after normalisation, the excess
      shared among the other heads in proportion to their weights.
    """

    mode: Literal["online", "offline"] = "online"
    first_super_epoch: int = 10
    super_epoch: int = field(default=5, metadata={"search": Choice((3, 5, 10))})
    heldout_fraction: float = 0.08
    min_weight: float = 1e-3
    measure: Literal["loss", "accuracy"] = "loss"
    weights: list[float] | None = None
    noise_floor: bool = False
    max_weight: float | None = None

    def validate(self) -> None:
        if self.first_super_epoch < 1 or self.super_epoch < 1:
            raise ValueError("first_super_epoch and super_epoch must be >= 1")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if not 0 <= self.min_weight < 1:
            raise ValueError(f"min_weight must be in [0, 1), got {self.min_weight}")
        if self.weights is not None and (any(w < 0 for w in self.weights) or sum(self.weights) <= 0):
            raise ValueError(f"weights must be non-negative with a positive sum, got {self.weights}")
        if self.max_weight is not None and not 0 < self.max_weight <= 1:
            raise ValueError(f"max_weight must be in (0, 1], got {self.max_weight}")


def blend_weights(g: torch.Tensor, o: torch.Tensor, min_weight: float = 1e-3, *,
                  o_se: torch.Tensor | None = None, max_weight: float | None = None) -> torch.Tensor:
    """Guarded G-Blend weights (paper Algorithm 1 with the guard of §6): w̃ = max(G, 0)/(O² + 1e-8);
    uniform when Σ w̃ = 0; normalise; floor at ``min_weight``; renormalise.

    Noise-aware variant: with ``o_se`` the denominator is O² + SE(O)² + 1e-8 (the expected square of
    the measured ΔO when its true value is O and its sampling noise has standard deviation SE);
    ``max_weight`` then caps each weight (:func:`cap_weights`)."""
    g, o = torch.as_tensor(g, dtype=torch.float64), torch.as_tensor(o, dtype=torch.float64)
    denom = o.pow(2) + 1e-8
    if o_se is not None:
        denom = denom + torch.as_tensor(o_se, dtype=torch.float64).pow(2)
    raw = g.clamp_min(0) / denom
    w = torch.full_like(raw, 1.0 / len(raw)) if float(raw.sum()) <= 0 else raw / raw.sum()
    w = w.clamp_min(min_weight)
    w = w / w.sum()
    return w if max_weight is None else cap_weights(w, max_weight)


def cap_weights(w: torch.Tensor, cap: float) -> torch.Tensor:
    """Normalised weights with every w_i ≤ ``cap``: capped weights are fixed at the cap and the excess
    is shared among the uncapped ones in proportion to their weights, repeated until none exceeds it
    (a cap below 1/n is raised to 1/n: uniform)."""
    w = torch.as_tensor(w, dtype=torch.float64).clone()
    cap = max(float(cap), 1.0 / len(w))
    fixed = torch.zeros(len(w), dtype=torch.bool)
    while bool((w > cap + 1e-15).any()):
        fixed |= w >= cap
        free = ~fixed
        w[fixed] = cap
        rest = 1.0 - cap * int(fixed.sum())
        if not bool(free.any()) or float(w[free].sum()) <= 0:
            w[free] = rest / max(1, int(free.sum()))
            break
        w[free] = w[free] * rest / w[free].sum()
    return w


def _se_part(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """s²/n of the paired changes b − a (one term of :func:`overfit_standard_error`), as a float64 tensor
    on the inputs' device (0 for fewer than 2 samples)."""
    d = (b - a).double()
    return d.var(unbiased=True) / len(d) if len(d) > 1 else d.new_zeros(())


def overfit_standard_error(v0: torch.Tensor, v1: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor) -> float:
    """Standard error of ΔO = mean_V(v1 − v0) − mean_T′(t1 − t0) from per-sample losses before (0) and
    after (1) a sub-network's training, on the same samples: SE² = s²_V/|V| + s²_T′/|T′| with s² the
    sample variance (ddof 1) of the paired per-sample changes (V and T′ are disjoint, so independent).
    Equals the bootstrap standard deviation of ΔO (resampling V and T′) up to O(1/n)."""
    def part(a: torch.Tensor, b: torch.Tensor) -> float:
        d = (b - a).double()
        return float(d.var(unbiased=True)) / len(d) if len(d) > 1 else 0.0

    return (part(v0, v1) + part(t0, t1)) ** 0.5


def estimation_epochs(total: int, first: int, every: int, mode: str = "online") -> list[int]:
    """Main epochs before which GB_Estimate runs: online 0, n0, n0+n, … < E; offline [0]."""
    if mode == "offline":
        return [0]
    out, e = [0], first
    while e < total:
        out.append(e)
        e += every
    return out


class UnimodalSubnet(nn.Module):
    """Sub-network i ≤ M: a copy of encoder φ_i and head C_i, run on modality i alone."""

    def __init__(self, modality: str, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.modality = modality
        self.encoder = encoder
        self.head = head

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        z = self.encoder(batch[self.modality])
        if isinstance(self.head, PixelHead):
            return self.head(z, tuple(batch["label"].shape[-2:]))
        return self.head(z)


class FusedSubnet(nn.Module):
    """Sub-network M+1: a copy of the whole canonical model (all encoders + fused head)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model({m: batch[m] for m in self.model.modalities}).logits


def per_sample_loss(task: Any, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample task losses [B] (means over any set are then independent of batching)."""
    if task.name == "classification":
        w = None if task.class_weights is None else task.class_weights.to(logits.device, torch.float32)
        return F.cross_entropy(logits.float(), y.long(), weight=w, reduction="none",
                               label_smoothing=task.label_smoothing)
    if task.name == "regression":
        return (logits.reshape(-1).float() - y.reshape(-1).float()).abs()
    return torch.stack([task.loss(logits[i:i + 1], y[i:i + 1]) for i in range(len(y))]).float()


def per_sample_score(task: Any, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample accuracy-like score [B] (``measure=accuracy``): correct / sign agreement / Dice."""
    if task.name == "classification":
        return (logits.argmax(-1) == y.long()).float()
    if task.name == "regression":
        return ((logits.reshape(-1) > 0) == (y.reshape(-1) > 0)).float()
    return task.region_dice(task.prediction(logits), y.long()).mean(1).float()


@register_method("gblending", "Gradient-Blending: unimodal+fused heads weighted by G/O² (online, super-epochs 10/5)")
@register_method("gblending_offline", "Gradient-Blending, offline (Algorithm 2): one full-length estimate",
                 mode="offline")
@register_method("gblending_offline_robust", "Gradient-Blending, offline, noise-aware: O² + SE(O)² in the "
                 "denominator (mmbalance variant)", mode="offline", noise_floor=True)
class GBlending(BalancingMethod):
    name = "gblending"
    hparams_cls = GBlendHParams
    min_modalities = 2
    needs_heldout = True
    find_unused_parameters = True  # zero-weight heads are skipped (README distributed rule 4)

    def __init__(self, hparams: GBlendHParams | None = None) -> None:
        super().__init__(hparams)
        self.heldout_fraction = self.hp.heldout_fraction
        if self.hp.weights is not None:
            self.needs_heldout = False  # fixed weights (VMZ): no estimation, full training split
        self._weights: torch.Tensor | None = None
        self._w_host: list[float] = []
        self.history: list[dict[str, Any]] = []
        self.subnet_epochs = 0
        self.t_prime: torch.Tensor | None = None

    @property
    def weights(self) -> torch.Tensor | None:
        """[w_1..w_M, w_fused] (float64, host-side: set once per estimate, never read from a device)."""
        return self._weights

    @weights.setter
    def weights(self, w: torch.Tensor | None) -> None:
        self._weights = w
        self._w_host = [] if w is None else w.tolist()  # the step's factors: Python floats, no read per step

    # ------------------------------------------------------------------ set-up
    def setup(self, ctx: StepContext) -> None:
        model = ctx.raw_model
        n = len(model.modalities) + 1
        heads: dict[str, nn.Module] = {}
        for m in model.modalities:
            if ctx.task.name == "segmentation":  # the dataset's per-modality decoder (gblending.md §5)
                heads[m] = segmentation_head(model, m, ctx.data.out_dim)
            else:
                heads[m] = model.make_unimodal_head(m, "linear")
        ctx.add_module("gb_heads", UnimodalHeads(heads), own_optimizer=False)
        if self.hp.weights is not None:
            if len(self.hp.weights) != n:
                raise ValueError(f"gblending: weights needs {n} values (one per modality, then the fused head), "
                                 f"got {len(self.hp.weights)}")
            w = torch.tensor(self.hp.weights, dtype=torch.float64)
            self.weights = w / w.sum()
            return
        self.weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
        # T′: a fixed random subset of TRAIN minus V with |T′| = |V| (positions in the train split)
        n_rest = len(ctx.data.train) - len(ctx.heldout)
        k = min(len(ctx.heldout), n_rest)
        self.t_prime = torch.randperm(n_rest, generator=ctx.generator)[:k].sort().values

    # ------------------------------------------------------------------ measurement
    def measure(self, ctx: StepContext, net: nn.Module, split: str) -> float:
        """Mean per-sample loss (or score) of ``net`` on V (``heldout``) or T′ (``train``)."""
        return float(self.measure_samples(ctx, net, split).mean())

    @torch.no_grad()
    def measure_samples(self, ctx: StepContext, net: nn.Module, split: str) -> torch.Tensor:
        """Per-sample losses (or scores) of ``net`` on V or T′, in position order (float64, on ctx.device):
        per-position SUM buffers are SUM-reduced across ranks, so padded duplicates count once. T′: every
        batch is evaluated and the rows outside T′ get count 0 (no per-batch host decision or mask)."""
        # positions are < len(TRAIN) whether batches index the carved split or the original one
        n = len(ctx.data.train)
        total = torch.zeros(n, dtype=torch.float64, device=ctx.device)
        count = torch.zeros(n, dtype=torch.float64, device=ctx.device)
        select = None
        if split == "train":
            select = torch.zeros(n, dtype=torch.bool, device=ctx.device)
            select[self.t_prime.to(ctx.device)] = True
        bs = int(ctx.config.train.get("eval_batch_size", 512)) if isinstance(ctx.config.train, dict) else 512
        was = net.training
        net.eval()
        for batch in ctx.train_batches(split=split, batch_size=bs, shuffle=False):
            idx = batch["idx"].to(ctx.device).long()
            logits = net(batch)
            fn = per_sample_score if self.hp.measure == "accuracy" else per_sample_loss
            vals = fn(ctx.task, logits, batch["label"]).double()
            ones = torch.ones_like(vals)
            if select is not None:
                keep = select[idx]
                vals, ones = torch.where(keep, vals, 0.0), keep.to(vals.dtype)
            total.index_put_((idx,), vals)
            count.index_put_((idx,), ones)
        net.train(was)
        total, count = ctx.reduce_sum(total), ctx.reduce_sum(count)
        seen = (count > 0).nonzero().squeeze(1)  # one sync per pass (the number of samples seen)
        return total.index_select(0, seen) / count.index_select(0, seen)

    def _train_subnet(self, ctx: StepContext, net: nn.Module, epochs: int, lr: float, tag: int) -> None:
        """n epochs on TRAIN minus V with a fresh optimizer of the dataset's type at ``lr`` (no
        scheduler); gradients averaged across ranks by hand (the copy is not DDP-wrapped)."""
        from mmbalance.config import TrainConfig, build_hparams
        from mmbalance.engine import build_optimizer

        cfg = build_hparams(TrainConfig, dict(ctx.config.train), where="gblending sub-network")
        params = [p for p in net.parameters() if p.requires_grad]
        opt = build_optimizer([{"params": params}], cfg, lr)
        net.train()
        for e in range(epochs):
            key = 50_000_000 + tag * 10_007 + e
            for step, batch in enumerate(ctx.train_batches(split="train", shuffle=True, key=key)):
                if cfg.max_steps_per_epoch is not None and step >= cfg.max_steps_per_epoch:
                    break
                loss = ctx.task.loss(net(batch), batch["label"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if ctx.world_size > 1:
                    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                    flat = ctx.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
                    offset = 0
                    for p in params:
                        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
                        offset += p.numel()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
            self.subnet_epochs += 1

    def subnetworks(self, ctx: StepContext) -> list[nn.Module]:
        """Fresh copies of the current parameters: [encoder_i + C_i for each i] + [whole model]."""
        model = ctx.raw_model
        heads = ctx.raw_module("gb_heads").heads
        nets: list[nn.Module] = [UnimodalSubnet(m, copy.deepcopy(model.encoders[m]), copy.deepcopy(heads[m]))
                                 for m in model.modalities]
        nets.append(FusedSubnet(copy.deepcopy(model)))
        for net in nets:
            for h in list(net.modules()):
                h._forward_hooks.clear()  # copies never carry other methods' hooks
            net.requires_grad_(True)
        return nets

    def estimate(self, ctx: StepContext, epochs: int) -> torch.Tensor:
        """GB_Estimate(φ, n) (§2 steps 1–4): returns normalised, guarded weights; the main model, its
        optimizer and the global RNG stream are left untouched."""
        rng = torch.get_rng_state()
        lr = float(ctx.optimizer.param_groups[0]["lr"])
        sign = -1.0 if self.hp.measure == "accuracy" else 1.0  # accuracy: "loss" = −score
        g_list, o_list = [], []
        tag0 = len(self.history) * 101
        se_list = []
        stats = []  # per sub-network, on the device: the 4 means and the 2 SE² parts, read once below
        for i, net in enumerate(self.subnetworks(ctx)):
            v0, t0 = sign * self.measure_samples(ctx, net, "heldout"), sign * self.measure_samples(ctx, net, "train")
            self._train_subnet(ctx, net, epochs, lr, tag0 + i)
            v1, t1 = sign * self.measure_samples(ctx, net, "heldout"), sign * self.measure_samples(ctx, net, "train")
            stats.append(torch.stack([v0.mean(), t0.mean(), v1.mean(), t1.mean(),
                                      _se_part(v0, v1), _se_part(t0, t1)]))
            del net
        for lv0, lt0, lv1, lt1, se_v, se_t in torch.stack(stats).tolist():
            o_list.append((lv1 - lt1) - (lv0 - lt0))  # ΔO = O_{N+n} − O_N
            g_list.append(lv0 - lv1)  # ΔG = L^V_N − L^V_{N+n}
            se_list.append((se_v + se_t) ** 0.5)  # overfit_standard_error
        torch.set_rng_state(rng)
        g, o = torch.tensor(g_list, dtype=torch.float64), torch.tensor(o_list, dtype=torch.float64)
        o_se = torch.tensor(se_list, dtype=torch.float64)
        w = blend_weights(g, o, self.hp.min_weight, o_se=o_se if self.hp.noise_floor else None,
                          max_weight=self.hp.max_weight)
        if ctx.world_size > 1:
            from accelerate.utils import broadcast

            w = broadcast(w.to(ctx.device)).cpu()
        self.history.append({"epoch": ctx.epoch, "n": epochs, "G": g.tolist(), "O": o.tolist(), "O_se": o_se.tolist(),
                             "w": w.tolist()})
        return w

    # ------------------------------------------------------------------ hooks
    def schedule(self, ctx: StepContext) -> list[int]:
        return estimation_epochs(ctx.epochs_in_phase, self.hp.first_super_epoch, self.hp.super_epoch, self.hp.mode)

    def on_epoch_start(self, ctx: StepContext) -> None:
        if self.hp.weights is not None or ctx.epoch not in self.schedule(ctx):
            return
        if self.hp.mode == "offline":
            n = ctx.epochs_in_phase
        else:
            n = self.hp.first_super_epoch if ctx.epoch == 0 else self.hp.super_epoch
        self.weights = self.estimate(ctx, n)

    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        """L_blend = Σ_{i=1}^{M+1} w_i·ℓ(C_i(·), y) (§2 step 6); zero-weight heads are skipped."""
        out = ctx.forward(batch)
        y = batch["label"]
        mods = ctx.modalities
        w = self._w_host  # Python floats (host bookkeeping, set per estimate): no host read here
        size = tuple(y.shape[-2:]) if ctx.task.name == "segmentation" else None
        uni = ctx.modules["gb_heads"]({m: out.features[m] for m in mods if w[mods.index(m)] > 0}, size)
        total = None
        logs: dict[str, Any] = {}
        for k, m in enumerate(mods):
            if m in uni:
                lm = ctx.task.loss(uni[m], y)
                logs[f"gb/loss_{m}"] = lm.detach()
                total = w[k] * lm if total is None else total + w[k] * lm
        fused = ctx.task.loss(out.logits, y)
        if w[-1] > 0:
            total = w[-1] * fused if total is None else total + w[-1] * fused
        logs["gb/loss_fused"] = fused.detach()
        return StepOutput(total, out, logs)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {"subnet_epochs": float(self.subnet_epochs)}
        if self.weights is not None:
            out.update({f"w_{i}": v for i, v in enumerate(self._w_host)})
        if self.history:
            last = self.history[-1]
            for i, (g, o) in enumerate(zip(last["G"], last["O"])):
                out[f"G_{i}"], out[f"O_{i}"] = g, o
                if "O_se" in last:
                    out[f"O_se_{i}"] = last["O_se"][i]
                if g != 0:
                    out[f"OGR_{i}"] = abs(o / g)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"weights": None if self.weights is None else self.weights.clone(), "history": list(self.history),
                "subnet_epochs": self.subnet_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("weights") is not None:
            self.weights = state["weights"].clone()
        self.history = list(state.get("history", []))
        self.subnet_epochs = int(state.get("subnet_epochs", 0))
