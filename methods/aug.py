"""AUG — sustained boosting with adaptive classifier assignment (Q.-Y. Jiang, L. Huang, Y. Yang, NeurIPS 2025,
arXiv 2502.20120; official code njustkmg/NeurIPS25-AUG @ 841d079; docs/methods/aug.md).

Late fusion. Each modality m has a boosted ensemble over its pooled feature z̄_m (its feature map, with
1×1-conv members, for segmentation); member k is
g_{m,k}(z) = W·ReLU(A_{m,k}z + a_{m,k}) + b, with (W, b) shared by every member of every modality
(``model/AudioVideo.py:40-104``). With K = K_m added members: F = Σ_{k≤K} g_k (ensemble), P = Σ_{k<K} g_k
(earlier members), N = g_K (newest). Loss of modality m (``train_CREMAD.py:52-57``):

    K = 0:  L_m = CE(F, y)
    K ≥ 1:  L_m = CE(F, y) + CE(P, y) + mean_i (1 − λ·sg[softmax(P_i)_{y_i}])·CE(N_i, y_i)

(the code's CE(N, y) − λ·CE(N, y ⊙ sg softmax(P)), linear in the target). One optimizer sub-step per
modality per batch (``:49-75``). S_m = Σ_i softmax(F_i)_{y_i} over the epoch (``:82-85``); at a check epoch
(c = ⌊E/10⌋ if E > 10 else 1; e = 0 or (e + 1) mod c = 0; ``:205-208, 220``) r = S_1/S_2: r > λ_a + 0.01
→ modality 2 gets a member, r < λ_a − 0.01 → modality 1 (``:220-228``). Prediction: Σ_m α_m·F_m.

Members live in a pre-allocated :class:`~mmbalance.pool.ModulePool` (in the optimizer, DDP and every
checkpoint from the start); the released code's ``add_layer`` after the optimizer was built leaves them
untrained (fixed; preset ``aug_released`` reproduces it).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.errors import ConfigError
from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.pool import ModulePool
from mmbalance.registry import register_method
from mmbalance.search import IntUniform, Uniform

__all__ = ["AUG", "AUGHParams", "AUGHeads", "aug_loss", "check_epochs", "assignment"]


@dataclass
class AUGHParams:
    """Hyperparameters (docs/methods/aug.md).

    - ``residual_lambda`` (λ) 0.5: ``train_CREMAD.py:57, 70`` (0.2 in the first upload ``966dbf5``).
    - ``assign_lambda`` (λ_a) 1.0: ``--lam`` (``:165``); ``assign_margin`` 0.01 (``:222, 225``).
    - ``checks`` 10: check period ⌊E/checks⌋ when E > checks, else every epoch; epoch 0 always (``:205-208``).
    - ``hidden`` (h) 256: ``AudioVideo.py:47-57``.
    - ``train_added`` true: added members are trained (fix); false = preset ``aug_released`` (the
      released code builds the optimizer before ``add_layer``: added members stay random).
    - ``merge_weights``: None = uniform 1/M (mmbalance); the official audio-visual run uses [0.4, 0.6].
    - ``substep_zero`` ``official``: gradients zero-filled between the sub-steps (torch 1.11 ``zero_grad()``);
      ``set_to_none``.
    - ``kappa`` 0.8 (M ≥ 3): every m with S_m < κ·mean_{k≠m} S_k gets a member (``966dbf5``
      ``train_NVGesture.py:297-305``).
    """

    residual_lambda: float = field(default=0.5, metadata={"search": Uniform(0.0, 0.9)})
    assign_lambda: float = 1.0
    assign_margin: float = 0.01
    checks: int = field(default=10, metadata={"search": IntUniform(4, 20)})
    hidden: int = 256
    train_added: bool = True
    merge_weights: list[float] | None = None
    substep_zero: Literal["official", "set_to_none"] = "official"
    kappa: float = 0.8

    def validate(self) -> None:
        if not 0 <= self.residual_lambda <= 1:
            raise ValueError(f"residual_lambda must lie in [0, 1], got {self.residual_lambda}")
        if self.checks < 1 or self.hidden < 1:
            raise ValueError(f"checks and hidden must be >= 1, got {self.checks}, {self.hidden}")
        if self.merge_weights is not None and any(w < 0 for w in self.merge_weights):
            raise ValueError(f"merge_weights must be non-negative, got {self.merge_weights}")
        if self.substep_zero not in ("official", "set_to_none"):
            raise ValueError(f"substep_zero must be 'official' or 'set_to_none', got {self.substep_zero!r}")


# ------------------------------------------------------------------------------------------ formulas
def check_epochs(epochs: int, checks: int = 10) -> list[int]:
    """Epochs (0-based) after which the assignment is checked: c = ⌊E/checks⌋ if E > checks else 1;
    e = 0 or (e + 1) mod c = 0 (``train_CREMAD.py:205-208, 220``)."""
    c = epochs // checks if epochs > checks else 1
    return [e for e in range(epochs) if e == 0 or (e + 1) % c == 0]


def assignment(S: list[float], assign_lambda: float = 1.0, margin: float = 0.01, kappa: float = 0.8) -> list[int]:
    """Which modalities (indices) receive a member. M = 2: r = S_1/S_2 > λ_a + margin → [1],
    r < λ_a − margin → [0], else [] (strict, ``:220-228``). M ≥ 3: every m with S_m < κ·mean_{k≠m} S_k."""
    if len(S) == 2:
        r = S[0] / S[1] if S[1] != 0 else float("inf")
        if r > assign_lambda + margin:
            return [1]
        if r < assign_lambda - margin:
            return [0]
        return []
    out = []
    for m, s in enumerate(S):
        others = [x for k, x in enumerate(S) if k != m]
        if s < kappa * sum(others) / len(others):
            out.append(m)
    return out


def aug_loss(Fo: torch.Tensor, P: torch.Tensor | None, N: torch.Tensor | None, y: torch.Tensor, lam: float,
             task: str = "classification", tau: float = 1.0,
             task_loss=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_m, residual weight mean, confidence sum S) for one modality (float32).

    L_m = ℓ(F) + ℓ(P) + mean (1 − λ·sg[c(P)])·ℓ_i(N) when K ≥ 1 (P, N given), else ℓ(F); ℓ = ``task_loss``
    (the dataset's loss; per-sample CE when None), ℓ_i the per-sample (per-pixel) loss of the residual term.
    Classification: c = softmax(·)_y, S = Σ_i c(F)_i. Segmentation (gen.): per pixel, S = Σ over images
    of the mean over pixels of c(F). Regression (gen.): ℓ_i = |ŷ − y|, c = exp(−ℓ_i/τ)."""
    Fo = Fo.float()
    yl = y.reshape(-1).float() if task == "regression" else y.long()

    def per_sample(o: torch.Tensor) -> torch.Tensor:
        if task == "regression":
            return (o.float().reshape(-1) - yl).abs()
        return F.cross_entropy(o.float(), yl, reduction="none")

    def confidence(o: torch.Tensor) -> torch.Tensor:
        if task == "regression":
            return torch.exp(-per_sample(o) / tau)
        return torch.softmax(o.float(), 1).gather(1, yl.unsqueeze(1)).squeeze(1)

    def full(o: torch.Tensor) -> torch.Tensor:
        return task_loss(o.float(), y) if task_loss is not None else per_sample(o).mean()

    loss = full(Fo)
    with torch.no_grad():
        c = confidence(Fo)
        conf_sum = c.flatten(1).mean(1).sum() if c.dim() > 1 else c.sum()
    if P is None:
        return loss, torch.ones((), device=Fo.device), conf_sum
    weight = 1 - lam * confidence(P).detach()  # residual label y − λ·y⊙sg(p_prev)
    loss = loss + full(P) + (weight * per_sample(N)).mean()
    return loss, weight.mean().detach(), conf_sum


class AUGHeads(nn.Module):
    """Per modality a pool of members Linear(d_m → h) (member 0 active from the start), one shared output
    layer Linear(h → C); Xavier-normal weights and zero biases (``utils.py:81-84``). ``maps``
    (segmentation, gen.): 1×1 convolutions on the feature map, outputs upsampled to the label size."""

    def __init__(self, dims: dict[str, int], hidden: int, out_dim: int, capacity: int, maps: bool = False) -> None:
        super().__init__()

        def layer(d: int, h: int) -> nn.Module:
            lin = nn.Conv2d(d, h, 1) if maps else nn.Linear(d, h)
            nn.init.xavier_normal_(lin.weight)
            nn.init.zeros_(lin.bias)
            return lin

        self.maps = maps
        self.pools = nn.ModuleDict({m: ModulePool(lambda k, d=d: layer(d, hidden), capacity, initial=1)
                                    for m, d in dims.items()})
        self.out = layer(hidden, out_dim)

    def forward(self, m: str, z: torch.Tensor, size: tuple[int, int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(F, P, N) of modality m: every active member g_k(z) = W·ReLU(A_k z + a_k) + b."""
        outs = [self.out(torch.relu(g(z))) for g in self.pools[m].active()]
        if self.maps and size is not None and tuple(outs[0].shape[-2:]) != tuple(size):
            outs = [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs]
        Fo = outs[0] if len(outs) == 1 else torch.stack(outs).sum(0)
        if len(outs) == 1:
            return Fo, None, None
        P = outs[0] if len(outs) == 2 else torch.stack(outs[:-1]).sum(0)
        return Fo, P, outs[-1]


# ------------------------------------------------------------------------------------------ the method
@register_method("aug", "AUG: per-modality boosted ensembles on a shared output layer; the weaker modality gets new members")
@register_method("aug_released", "AUG as released: added members are never trained (optimizer built before add_layer)",
                 train_added=False)
class AUG(BalancingMethod):
    name = "aug"
    hparams_cls = AUGHParams
    min_modalities = 2
    find_unused_parameters = True  # one encoder and its active members per sub-step; pool members idle

    def __init__(self, hparams: AUGHParams | None = None) -> None:
        super().__init__(hparams)
        self.substep_set_to_none = self.hp.substep_zero == "set_to_none"
        self.K: dict[str, int] = {}
        self.pending: list[str] = []
        self._S: torch.Tensor | None = None
        self.last: dict[str, float] = {}

    def check_applicable(self, data, modalities) -> None:
        super().check_applicable(data, modalities)
        mw = self.hp.merge_weights
        if mw is not None and len(mw) != len(modalities):
            raise ConfigError(f"aug: merge_weights has {len(mw)} values but the model has {len(modalities)} "
                              f"modalities ({', '.join(modalities)})")

    def setup(self, ctx: StepContext) -> None:
        model = ctx.raw_model
        epochs = int(ctx.config.train["epochs"])
        self.checks = set(check_epochs(epochs, self.hp.checks))
        capacity = 1 + len(self.checks)  # member 0 + at most one per check
        model.fusion = nn.Identity()  # late fusion: AUG has no fusion module (as MLA, QMF)
        model.head = nn.Identity()
        model.variant = "late"
        self.maps = ctx.task.name == "segmentation"
        heads = AUGHeads({m: int(model.feature_dims[m]) for m in ctx.modalities}, self.hp.hidden, ctx.data.out_dim,
                         capacity, maps=self.maps)
        if not self.hp.train_added:  # aug_released: members 1.. are fixed random projections (gradient still
            for pool in heads.pools.values():  # flows through them into the encoder)
                for g in pool.members[1:]:
                    g.requires_grad_(False)
        ctx.add_module("aug_heads", heads, own_optimizer=False)
        self.K = {m: 0 for m in ctx.modalities}
        self.pending = []
        w = self.hp.merge_weights or [1.0] * len(ctx.modalities)
        self.alpha = dict(zip(ctx.modalities, (float(x) for x in w)))
        self.task = ctx.task.name
        self.tau = 1.0
        if self.task == "regression":  # τ = mean |ȳ − y| over TRAIN (ogm_ge.md §5)
            y = ctx.data.train.labels.float().reshape(-1)
            self.tau = max(float((y - y.mean()).abs().mean()), 1e-8)
        self._keys = tuple(f"aug/{k}_{m}" for k in ("loss", "residual_weight") for m in ctx.modalities)

    def _pools(self, ctx: StepContext) -> dict[str, ModulePool]:
        return ctx.raw_module("aug_heads").pools

    # ------------------------------------------------------------------ epochs
    def on_epoch_start(self, ctx: StepContext) -> None:
        """Apply the assignment decided after the previous epoch's validation; reset S."""
        pools = self._pools(ctx)
        for m in self.pending:
            pools[m].activate(1)
            self.K[m] += 1
        self.pending = []
        self._S = torch.zeros(len(ctx.modalities), dtype=torch.float64, device=ctx.device)

    def on_epoch_end(self, ctx: StepContext) -> None:
        """S SUM-reduced over ranks; at a check epoch the weaker modality's member becomes pending."""
        S = ctx.reduce_sum(self._S).tolist()  # one read per epoch
        n = len(ctx.data.train)
        self.last = {f"S_{m}": s / n for m, s in zip(ctx.modalities, S)}
        self.last.update({f"K_{m}": float(self.K[m]) for m in ctx.modalities})
        if ctx.epoch in self.checks:
            cap = self._pools(ctx)[ctx.modalities[0]].capacity - 1
            gets = [ctx.modalities[i] for i in assignment(S, self.hp.assign_lambda, self.hp.assign_margin, self.hp.kappa)]
            self.pending = [m for m in gets if self.K[m] < cap]
        self.last["r"] = S[0] / S[1] if S[1] else float("inf")

    # ------------------------------------------------------------------ training
    def _unimodal(self, ctx: StepContext, batch: dict[str, torch.Tensor], k: int, m: str) -> StepOutput:
        y = batch["label"]
        out = ctx.forward(batch, only=(m,))
        Fo, P, N = ctx.modules["aug_heads"](*self._head_input(out, m, y))
        loss, wmean, conf = aug_loss(Fo, P, N, y, self.hp.residual_lambda, self.task, self.tau, ctx.task.loss)
        self._S[k] += conf
        ctx.log_many((self._keys[k], self._keys[len(self.K) + k]), torch.stack([loss.detach(), wmean.float()]))
        return StepOutput(loss)

    def _head_input(self, out, m: str, y: torch.Tensor) -> tuple:
        """(m, z, size): the pooled vector, or the feature map and the label size (segmentation)."""
        if self.maps:
            return m, out.features[m], tuple(y.shape[-2:])
        return m, out.pooled[m], None

    def training_substeps(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> Iterator[StepOutput] | None:
        return (self._unimodal(ctx, batch, k, m) for k, m in enumerate(ctx.modalities))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, ctx: StepContext, batch: dict[str, torch.Tensor], absent: tuple[str, ...] = ()) -> torch.Tensor:
        """o = Σ_m α_m·F_m / Σ_m α_m over the present modalities (``:125-128``)."""
        present = tuple(m for m in ctx.modalities if m not in set(absent))
        neutral: tuple[str, ...] = ()
        if not present:
            present = neutral = tuple(ctx.modalities)
        out = ctx.forward(batch, absent=neutral, only=present)
        heads = ctx.modules["aug_heads"]
        total = sum(self.alpha[m] for m in present)
        fused = None
        for m in present:
            term = (self.alpha[m] / total) * heads(*self._head_input(out, m, batch["label"]))[0].float()
            fused = term if fused is None else fused + term
        return fused

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """K_m and the pending assignment (the active-member counts are also in the pools' buffers)."""
        return {"K": dict(self.K), "pending": list(self.pending)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.K = {m: int(k) for m, k in state["K"].items()}
            self.pending = list(state["pending"])

    def metrics(self) -> dict[str, float]:
        return dict(self.last)
