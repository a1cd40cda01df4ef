"""AGM: Adaptive Gradient Modulation (docs/methods/agm.md).

Li et al., "Boosting Multi-modal Model Performance with Adaptive Gradient Modulation", ICCV 2023;
official code lihong2303/AGM_ICCV2023 (commit 5a65542, ``GradMod`` in model/CREMAD_net.py, 3-modality
form in model/URFunny_net.py). Per step: the full pass f(N) and every non-empty proper coalition
f(S) (other modalities absent, eval mode, with autograd) give Shapley mono-modal responses m_m with
Σ_m m_m = f(N); the loss is taken on Σ_m GradScale_{κ_m}(m_m), so the backward multiplies each
response's gradient by κ_m = exp(α·min(r̄_m − r_m, C)).
"""
from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from mmbalance.methods._per_model import PerModel
from torch import nn

from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import LogUniform

__all__ = ["AGM", "AGMHParams", "GradScale", "ScaledSum", "train_invariant", "shapley_coefficients", "permutation_coefficients",
           "mono_responses", "agm_coefficients", "per_modality_accuracy"]

LOG_FLOOR = math.log(1e-8)  # official: −log p with p floored at 1e-8 (agm.md §2 step 4)


class GradScale(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by κ (agm.md §2 step 10; an autograd
    Function, not a module backward hook: bug 7.4). κ is a number or a 0-d tensor (kept on the device)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, kappa: float | torch.Tensor) -> torch.Tensor:
        ctx.kappa = kappa.detach() if isinstance(kappa, torch.Tensor) else float(kappa)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.kappa, None


class ScaledSum(torch.autograd.Function):
    """Σ_m GradScale_{κ_m}(m_m) for stacked responses [M, …]: forward Σ_m m_m, backward κ_m·g to
    response m (agm.md §2 step 10, the M GradScale calls in one node; κ a device vector)."""

    @staticmethod
    def forward(ctx: Any, mono: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
        ctx.kappa = kappa.detach().to(mono.dtype).view(-1, *([1] * (mono.dim() - 1)))
        return mono.sum(0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.unsqueeze(0) * ctx.kappa, None


#: Layers whose output does not depend on train/eval mode (no dropout, no batch statistics).
TRAIN_INVARIANT_LAYERS = (nn.Linear, nn.Identity, nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU,
                          nn.ELU, nn.Flatten, nn.LayerNorm, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _invariant_layer(sub: nn.Module) -> bool:
    """A layer of :data:`TRAIN_INVARIANT_LAYERS` (or a subclass keeping its forward), or a plain
    ``nn.Sequential``: its forward never reads ``training``."""
    for base in TRAIN_INVARIANT_LAYERS + (nn.Sequential,):
        if isinstance(sub, base) and type(sub).forward is base.forward:
            return True
    return False


def train_invariant(module: nn.Module) -> bool:
    """Whether ``module`` computes the same in train and eval mode: built only from
    :data:`TRAIN_INVARIANT_LAYERS` inside plain ``nn.Sequential`` containers (subclasses that keep
    the forward count). Conservative: any other module type (dropout, batch norm, attention, custom
    forwards) answers False."""
    return all(_invariant_layer(sub) for sub in module.modules())


def _standard_model(raw: nn.Module) -> bool:
    """A model on the base contract (each encoder sees only its own modality; forward = encode →
    pool → fuse_and_head), whose pieces AGM may call directly."""
    from mmbalance.models.base import MultimodalModel

    return (isinstance(raw, MultimodalModel) and type(raw).encode is MultimodalModel.encode
            and type(raw).forward is MultimodalModel.forward)


def mode_sensitive(model: nn.Module) -> list[nn.Module]:
    """The sub-modules whose forward may read ``training`` (every module but the invariant layers)."""
    return [sub for sub in model.modules() if not _invariant_layer(sub)]


@contextlib.contextmanager
def _eval_mode(mods: list[nn.Module]) -> Iterator[None]:
    """``model.eval()`` … restore for ``mods = mode_sensitive(model)``: the same forward, without
    :meth:`nn.Module.train` walking the whole module tree twice every step."""
    before = [sub.training for sub in mods]
    try:
        for sub in mods:
            sub.training = False
        yield
    finally:
        for sub, flag in zip(mods, before):
            sub.training = flag


def _autocast(ctx: Any) -> Any:
    """The accelerator's autocast (what the prepared model's forward runs under), for calls into the
    raw model's pieces; a no-op without an accelerator (unit-test contexts)."""
    acc = getattr(ctx, "accelerator", None)
    return acc.autocast() if acc is not None else contextlib.nullcontext()


def _mask(subset: tuple[int, ...] | list[int]) -> int:
    return sum(1 << i for i in subset)


def shapley_coefficients(M: int) -> dict[int, torch.Tensor]:
    """Exact Shapley combination (agm.md §2 step 3): {coalition bitmask: [M] weights} such that
    m_m = Σ_S coef[S][m]·f(S), i.e. m_m = Σ_{∅≠S⊆N∖{m}} w_S·[f(S∪{m}) − f(S)] + f({m})/M with
    w_S = |S|!(M−|S|−1)!/M!. The empty coalition is never needed (its 1/M share cancels)."""
    coef: dict[int, torch.Tensor] = {}
    for m in range(M):
        others = [k for k in range(M) if k != m]
        for r in range(0, M):
            w = math.factorial(r) * math.factorial(M - r - 1) / math.factorial(M)
            for S in itertools.combinations(others, r):
                with_m = _mask(S) | (1 << m)
                coef.setdefault(with_m, torch.zeros(M, dtype=torch.float64))[m] += w
                if r > 0:
                    coef.setdefault(_mask(S), torch.zeros(M, dtype=torch.float64))[m] -= w
    return coef


def permutation_coefficients(M: int, K: int, generator: torch.Generator) -> dict[int, torch.Tensor]:
    """Monte-Carlo Shapley (``shapley=permutations``): average over K random orders of the marginal
    contributions f(prefix ∪ {m}) − f(prefix), with f(∅) := 0 (so each order sums to f(N)). Unbiased."""
    coef: dict[int, torch.Tensor] = {}
    for _ in range(K):
        order = torch.randperm(M, generator=generator).tolist()
        prefix = 0
        for m in order:
            nxt = prefix | (1 << m)
            coef.setdefault(nxt, torch.zeros(M, dtype=torch.float64))[m] += 1.0 / K
            if prefix:
                coef.setdefault(prefix, torch.zeros(M, dtype=torch.float64))[m] -= 1.0 / K
            prefix = nxt
    return coef


def mono_responses(passes: dict[int, torch.Tensor], coef: dict[int, torch.Tensor | list[float]],
                   M: int) -> list[torch.Tensor]:
    """m_m = Σ_S coef[S][m]·f(S) (float32)."""
    res: list[torch.Tensor] = []
    host = {S: (c.tolist() if isinstance(c, torch.Tensor) else c) for S, c in coef.items()}  # host floats
    for m in range(M):
        terms = [passes[S].float() * c[m] for S, c in host.items() if c[m] != 0.0]
        res.append(torch.stack(terms).sum(0))
    return res


def agm_coefficients(s: torch.Tensor, s_bar: torch.Tensor, alpha: float, cap: float | None,
                     clamp: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """agm.md §2 steps 5–7: r_m = exp(M/(M−1)·(mean_k s_k − s_m)); r̄_m the same from S̄;
    κ_m = exp(α·min(r̄_m − r_m, C)) (no lower bound unless ``kappa_clamp``). Returns (r, r̄, κ)."""
    s, s_bar = s.double(), s_bar.double()
    M = s.numel()
    f = M / (M - 1)
    r = torch.exp(f * (s.mean() - s))
    r_bar = torch.exp(f * (s_bar.mean() - s_bar))
    diff = r_bar - r
    if cap is not None:
        diff = diff.clamp(max=cap)
    kappa = torch.exp(alpha * diff)
    if clamp is not None:
        kappa = kappa.clamp(clamp[0], clamp[1])
    return r, r_bar, kappa


def per_modality_accuracy(mono: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Accuracy of each modality's own response, counted separately (regression test for the official
    swapped report, agm.md bug 7.1); 0-d device tensors (no host sync)."""
    return {m: (u.argmax(-1) == y).float().mean() for m, u in mono.items()}


@dataclass
class AGMHParams:
    """AGM hyperparameters (agm.md §4).

    ``alpha``: 1.0 (official config default). ``start_epoch``/``end_epoch``: 0 / last epoch (None) —
    official runs modulate the whole run (issues #3, #5); κ = 1 outside the window (mmbalance).
    ``C``: 10, exponent cap (official CREMA-D; None disables). ``cond_clip``: 1.0 (official CREMA-D;
    None disables). ``absent``: ``zeros`` (official; ``feature_mean`` = replace the encoder output by its
    running training mean, only the fusion re-runs). ``coalition_mode``: ``eval`` (official; ``train``).
    ``shapley``: ``exact`` (official formula M = 2, 3; mmbalance for M ≥ 4) or ``permutations`` with
    ``num_permutations``. ``avg``: ``cumulative`` (official) or ``ema`` with ``ema_beta`` (mmbalance value
    0.9; first step S̄ = s). ``kappa_clamp``: None (official) or [lo, hi].
    """

    alpha: float = field(default=1.0, metadata={"search": LogUniform(0.1, 3.0)})
    start_epoch: int = 0
    end_epoch: int | None = None
    C: float | None = 10.0
    cond_clip: float | None = 1.0
    absent: Literal["zeros", "feature_mean"] = "zeros"
    coalition_mode: Literal["eval", "train"] = "eval"
    shapley: Literal["exact", "permutations"] = "exact"
    num_permutations: int = 4
    avg: Literal["cumulative", "ema"] = "cumulative"
    ema_beta: float = 0.9
    kappa_clamp: tuple[float, float] | None = None

    def validate(self) -> None:
        if self.num_permutations < 1:
            raise ValueError("num_permutations must be >= 1")
        if not 0 <= self.ema_beta < 1:
            raise ValueError("ema_beta must be in [0, 1)")
        if self.kappa_clamp is not None and not 0 < self.kappa_clamp[0] <= self.kappa_clamp[1]:
            raise ValueError(f"kappa_clamp must be [lo, hi] with 0 < lo <= hi, got {self.kappa_clamp}")


@register_method("agm", "AGM: Shapley mono-modal responses over absent-modality passes, adaptive gradient scaling")
class AGM(BalancingMethod):
    """AGM (agm.md). s_m is computed on the global batch (per-sample sums and counts SUM-reduced), so
    S̄ and κ are identical on every rank."""

    name = "agm"
    hparams_cls = AGMHParams
    min_modalities = 2

    def __init__(self, hparams: Any = None) -> None:
        super().__init__(hparams)
        self.t = 0
        self.s_bar: torch.Tensor | None = None
        self.kappa: torch.Tensor | None = None
        self.feat_sum: dict[str, torch.Tensor] = {}
        self.feat_count = 0.0
        # read from the model once, not walked every step
        self._sensitive = PerModel(mode_sensitive)  # the modules whose forward reads train/eval mode
        self._train_invariant_encoders = PerModel(lambda raw: {m: train_invariant(raw.encoders[m])
                                                               for m in self.modalities})
        self._params = PerModel(lambda model: list(model.parameters()))

    def setup(self, ctx: StepContext) -> None:
        self.modalities = list(ctx.raw_model.modalities)
        self.M = len(self.modalities)
        dev = getattr(ctx, "device", torch.device("cpu"))
        self.s_bar = torch.zeros(self.M, dtype=torch.float64, device=dev)  # made on the device (no copy per step)
        self.kappa = torch.ones(self.M, dtype=torch.float64, device=dev)
        self.exact = shapley_coefficients(self.M) if self.hp.shapley == "exact" else None
        self._exact_host = None if self.exact is None else {S: c.tolist() for S, c in self.exact.items()}
        self._coef_cache: dict[Any, torch.Tensor] = {}
        if self.exact is not None:  # the [M, K] weight matrix, copied to the device once
            full_mask = (1 << self.M) - 1
            self._coef_matrix(self.exact, [full_mask, *sorted(S for S in self.exact if S != full_mask)], dev)

    def in_window(self, ctx: StepContext) -> bool:
        end = self.hp.end_epoch if self.hp.end_epoch is not None else math.inf
        return self.hp.start_epoch <= ctx.epoch <= end

    # ------------------------------------------------------------------ coalition passes
    def coalition_passes(self, ctx: StepContext, batch: dict[str, torch.Tensor], masks: list[int],
                         full) -> dict[int, torch.Tensor]:
        """f(S) for each proper coalition mask, with autograd, in eval mode (``coalition_mode``)."""
        return dict(zip(masks, self.coalition_logits(ctx, batch, masks, full).unbind(0)))

    def coalition_logits(self, ctx: StepContext, batch: dict[str, torch.Tensor], masks: list[int],
                         full) -> torch.Tensor:
        """[K, B, …] stacked f(S) of the K coalitions ``masks``, with autograd.

        Eval mode with zero (neutral) inputs: every coalition in ONE batched forward
        (:meth:`batched_coalition_logits`); each sample's output does not depend on the other rows
        in eval mode (BatchNorm uses its running statistics, dropout is off), so this equals the
        passes one by one to float rounding. ``coalition_mode=train`` (batch statistics, dropout
        masks) and ``absent=feature_mean`` run them one by one."""
        model = ctx.model
        batched = self.hp.coalition_mode == "eval" and (self.hp.absent == "zeros" or self.feat_count == 0)
        if batched and _standard_model(ctx.raw_model):  # runs the raw model's pieces: switch only what reads the mode
            with _eval_mode(self._sensitive(ctx.raw_model)):
                return self.batched_coalition_logits(ctx, batch, masks, full)
        was_training = model.training
        if self.hp.coalition_mode == "eval":
            model.eval()
        try:
            if batched:
                return self.batched_coalition_logits(ctx, batch, masks, full)
            res = []
            for S in masks:
                absent = tuple(m for i, m in enumerate(self.modalities) if not S >> i & 1)
                if self.hp.absent == "zeros" or self.feat_count == 0:  # no earlier batch yet: zero input
                    res.append(ctx.forward(batch, absent).logits)
                else:
                    res.append(self._feature_mean_pass(ctx, full, set(absent)))
            return torch.stack(res)
        finally:
            model.train(was_training)

    def batched_coalition_logits(self, ctx: StepContext, batch: dict[str, torch.Tensor], masks: list[int],
                                 full=None) -> torch.Tensor:
        """[K, B, …] logits of the K coalitions ``masks`` (modality i present iff bit i is set, the
        others on their neutral input), with autograd, from one forward of the (eval-mode) model.

        A model on the standard contract (the base ``encode``/``forward``: each encoder sees only its
        own modality) runs each encoder on the real and on the neutral input once, and the fusion
        and head once on the K·B rows the coalitions combine from these. The real-input output is
        the full pass's own ``full.features[m]`` when encoder m behaves the same in train and eval
        mode (only Linear/conv/activation/LayerNorm layers: :func:`train_invariant`); the zero
        neutral input (the base ``neutral_input``) is encoded on one row and broadcast. Any other
        model runs once on its inputs stacked along the batch dimension (K·B rows). Both are, per
        sample, the computation of ``ctx.forward(batch, absent)``. The caller sets eval mode."""
        from mmbalance.models.base import MultimodalModel

        raw = ctx.raw_model
        K, B = len(masks), batch["label"].shape[0]
        bits = [[bool(S >> i & 1) for S in masks] for i in range(self.M)]
        if _standard_model(raw):
            zero_neutral = type(raw).neutral_input is MultimodalModel.neutral_input
            reuse = self._train_invariant_encoders(raw) if full is not None else {}
            with _autocast(ctx):  # the prepared forward's mixed precision
                feats = {}
                for i, m in enumerate(self.modalities):
                    x = batch[m]
                    z_real = z_neutral = None
                    if any(bits[i]):
                        z_real = full.features[m] if reuse.get(m) else raw.encoders[m](x)
                    if not all(bits[i]):
                        if zero_neutral:  # zeros for every sample: one row, the same output for each
                            z_neutral = raw.encoders[m](raw.neutral_input(m, x[:1]))
                            z_neutral = z_neutral.expand(B, *z_neutral.shape[1:])
                        else:
                            z_neutral = raw.encoders[m](raw.neutral_input(m, x))
                    # float32 rows: each encoder output's gradient (summed over the coalitions using it)
                    # accumulates in float32 under bf16/fp16 autocast, as the separate passes' did
                    z = {True: z_real, False: z_neutral}
                    z = {k: v if v is None or v.dtype == torch.float64 else v.float() for k, v in z.items()}
                    feats[m] = torch.cat([z[b] for b in bits[i]])
                pooled = {m: raw.pool(m, z) for m, z in feats.items()}
                logits = raw.fuse_and_head(feats, pooled)[1]
        else:
            inputs = {}
            for i, m in enumerate(self.modalities):
                x = batch[m]
                neutral = raw.neutral_input(m, x) if not all(bits[i]) else None
                inputs[m] = torch.cat([x if b else neutral for b in bits[i]])
            logits = ctx.model(inputs).logits
        return logits.reshape(K, B, *logits.shape[1:])

    def _feature_mean_pass(self, ctx: StepContext, full, absent: set[str]) -> torch.Tensor:
        raw = ctx.raw_model
        feats = {m: (self._feature_mean(m, z) if m in absent else z) for m, z in full.features.items()}
        with _autocast(ctx):  # the prepared model's mixed precision (bf16 crashed here before)
            return raw.fuse_and_head(feats)[1]

    def _feature_mean(self, m: str, z: torch.Tensor) -> torch.Tensor:
        mean = self.feat_sum[m] / max(self.feat_count, 1.0)
        return mean.to(z.device, z.dtype).unsqueeze(0).expand_as(z)

    def _update_feature_means(self, ctx: StepContext, full) -> None:
        """Running training mean of each encoder output (``absent=feature_mean``), SUM-reduced; updated
        after the step's coalition passes, so an absent modality is replaced by the mean over the
        previous batches only (no information from the current samples; on the run's first step there
        is none and the coalition passes use the official zero input)."""
        n = ctx.reduce_sum(float(next(iter(full.features.values())).shape[0]))
        for m, z in full.features.items():
            s = ctx.reduce_sum(z.detach().double().sum(0)).cpu()
            self.feat_sum[m] = self.feat_sum.get(m, torch.zeros_like(s)) + s
        self.feat_count += float(n)

    # ------------------------------------------------------------------ scores
    def scores(self, ctx: StepContext, mono: list[torch.Tensor] | torch.Tensor, passes: dict[int, torch.Tensor],
               coef: dict[int, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """s_m (agm.md §2 step 4 and §5): mean cross-entropy of m_m (probability floored at 1e-8) for
        classification (per pixel for segmentation); loss-space Shapley −c_m for regression (v(∅) := 0,
        which shifts every s_m equally and leaves r, r̄, κ unchanged). Numerators and counts are
        SUM-reduced across processes before dividing. A float64 tensor on the device (no host read)."""
        task = ctx.task.name
        with torch.no_grad():
            if task == "regression":
                yy = y.reshape(y.shape[0]).float()
                v = {S: -(f.detach().float().reshape(f.shape[0]) - yy).abs() for S, f in passes.items()}
                host = {S: (c.tolist() if isinstance(c, torch.Tensor) else c) for S, c in coef.items()}
                num = torch.stack([-sum(c[m] * v[S] for S, c in host.items()).sum() for m in range(self.M)])
                count = float(y.shape[0])
            else:
                u = mono.detach().float() if isinstance(mono, torch.Tensor) else torch.stack([x.detach().float() for x in mono])
                logp = F.log_softmax(u, dim=2)  # [M, B, C, ...]: the class dimension of every response
                idx = y.long().unsqueeze(1).unsqueeze(0).expand(self.M, *y.shape[:1], 1, *y.shape[1:])
                picked = logp.gather(2, idx).clamp_min(LOG_FLOOR)
                num = -picked.flatten(1).sum(1)
                count = float(y.numel())
            tot = ctx.reduce_sum(torch.cat([num.double().reshape(-1),  # made on the device: no host→device copy
                                            torch.full((1,), count, dtype=torch.float64, device=num.device)]))
        return tot[:-1] / tot[-1]

    def _coef_matrix(self, coef: dict[int, torch.Tensor], keys: list[int], device: torch.device) -> torch.Tensor:
        """[M, K] float32 matrix A with m_m = Σ_k A[m, k]·f(keys[k]) (cached for the exact weights)."""
        cache_key = (tuple(keys), device) if coef is self.exact else None
        if cache_key is not None and cache_key in self._coef_cache:
            return self._coef_cache[cache_key]
        a = torch.stack([coef[S].to(torch.float64) for S in keys], dim=1).to(device=device, dtype=torch.float32)
        if cache_key is not None:
            self._coef_cache[cache_key] = a
        return a

    # ------------------------------------------------------------------ step
    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        M, y = self.M, batch["label"]
        full = ctx.forward(batch)
        full_mask = (1 << M) - 1
        coef = self.exact if self.exact is not None else permutation_coefficients(M, self.hp.num_permutations,
                                                                                  ctx.generator)
        masks = sorted(S for S in coef if S != full_mask)
        coal = self.coalition_logits(ctx, batch, masks, full)
        if self.hp.absent == "feature_mean":  # after the passes: the mean of EARLIER batches stands in (like S̄)
            self._update_feature_means(ctx, full)
        keys = [full_mask, *masks]
        P = torch.cat([full.logits.float().unsqueeze(0), coal.float()])  # f(S) for S in keys: [K, B, …]
        passes = dict(zip(keys, P.unbind(0))) if ctx.task.name == "regression" else {}
        # m_m = Σ_S coef[S][m]·f(S) for every m at once: [M, K] × [K, B·C] (float32)
        A = self._coef_matrix(coef, keys, P.device)
        mono = (A @ P.reshape(len(keys), -1)).reshape(M, *P.shape[1:])

        host = self._exact_host if self.exact is not None else {S: c.tolist() for S, c in coef.items()}  # CPU weights
        s = self.scores(ctx, mono, passes, host, y)
        s_bar = self.s_bar.to(s)
        r, r_bar, kappa = agm_coefficients(s, s_bar, self.hp.alpha, self.hp.C, self.hp.kappa_clamp)
        self.t += 1
        if self.hp.avg == "cumulative" or self.t == 1:
            self.s_bar = s_bar * (self.t - 1) / self.t + s / self.t
        else:
            self.s_bar = self.hp.ema_beta * s_bar + (1 - self.hp.ema_beta) * s
        self.kappa = kappa.to(s) if self.in_window(ctx) else torch.ones_like(s)

        out = ScaledSum.apply(mono, self.kappa)  # Σ_m GradScale_{κ_m}(m_m), float32, = f(N)
        loss = ctx.task.loss(out, y)
        logs: dict[str, float | torch.Tensor] = {}
        vals = torch.stack([s, r.to(s), r_bar.to(s), self.kappa]).unbind(0)
        for name, vec in zip(("s", "r", "rbar", "kappa"), vals):  # device tensors, averaged at the epoch's end
            for m, v in zip(self.modalities, vec.unbind(0)):
                logs[f"agm/{name}_{m}"] = v
        if ctx.task.name == "classification":
            accs = (mono.detach().argmax(-1) == y).float().mean(-1)  # per_modality_accuracy, all at once
            logs.update({f"agm/acc_{m}": a for m, a in zip(self.modalities, accs.unbind(0))})
        return StepOutput(loss, full, logs)

    def after_backward(self, ctx: StepContext) -> None:
        """Conditional clip (agm.md §2 step 11): if max |∂L/∂W_head| > cond_clip, clip the model's
        global gradient norm to cond_clip (unscaled gradients; before the loop's own clipping)."""
        c = self.hp.cond_clip
        if c is None:
            return
        w = getattr(ctx.raw_model.final_layer(), "weight", None)
        if w is None or w.grad is None:
            return
        # Decided on the device (no host sync): the factor is clip_grad_norm_'s min(1, c/(‖g‖+1e-6)) when
        # the condition holds and exactly 1 otherwise.
        gmax = w.grad.detach().abs().max()
        grads = [p.grad for p in self._params(ctx.raw_model) if p.grad is not None]
        total = nn.utils.get_total_norm(grads, 2.0)
        factor = torch.clamp(c / (total + 1e-6), max=1.0)
        cond = torch.isfinite(gmax) & (gmax > c)
        factor = torch.where(cond.to(factor.device), factor, torch.ones_like(factor))
        torch._foreach_mul_(grads, factor)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "s_bar": self.s_bar.cpu(), "kappa": self.kappa.cpu(), "feat_sum": self.feat_sum,
                "feat_count": self.feat_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.s_bar, self.kappa = int(state["t"]), state["s_bar"], state["kappa"]
        self.feat_sum, self.feat_count = dict(state.get("feat_sum", {})), float(state.get("feat_count", 0.0))

    def metrics(self) -> dict[str, float]:
        if self.kappa is None:
            return {}
        kappa, s_bar = self.kappa.tolist(), self.s_bar.tolist()  # once per epoch
        out = {f"kappa_{m}": float(kappa[i]) for i, m in enumerate(self.modalities)}
        out.update({f"s_bar_{m}": float(s_bar[i]) for i, m in enumerate(self.modalities)})
        return out
