"""OPM: on-the-fly prediction modulation (docs/methods/opm.md).

Wei, Hu, Du, Wen, "On-the-fly Modulation for Balanced Multimodal Learning", IEEE TPAMI 2024; official
code GeWu-Lab/BML_TPAMI2024 @ 4b3aa4f (``code/models/Classifier.py``, ``code/main.py``). The paper body
was not available: every formula is cited by its place in the official code.

Per training step after the warm-up (``main.py:91``), in a forward pre-hook on the fusion module:

1. scores s_m = Σ_i softmax(u_m,i)[y_i], u_m = z̄_m·W_mᵀ + b/M from the detached concat head
   (``Classifier.py:112-143``), SUM-reduced over ranks;
2. ρ_m = s_m / mean_{k≠m} s_k; q_m = min(1, q_base·(1 + λ·tanh(ρ_m − 1))) if ρ_m > 1 else 0
   (``calcu_q``, ``:58-72``);
3. with probability p_exe (one draw per step, ``:34-36``): keep mask κ_{i,m} ~ Bernoulli(1 − q_m)
   (``:45``), θ = Σ_m d_m·q_m / Σ_m d_m (``:39-41``), fusion input z̄_{i,m} ← κ_{i,m}·z̄_{i,m}/(1 − θ)
   (``:47-49``).

The loss is the task loss on the fused output; evaluation never drops. θ is a constant here: the
released rescale passes θ itself back as "its gradient", which adds ∇(θ²/2) to the encoders' update
(``:17-21``); ``theta_grad=official`` reproduces that term for ablations.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from mmbalance.methods.ogm_ge import (
    ModalityProbes,
    discrepancy_ratios,
    score_sums,
    train_probes,
    train_target_tau,
)
from torch import nn

from mmbalance.errors import ConfigError, MethodNotApplicable
from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import Choice

__all__ = ["OPM", "OPMHParams", "auto_warmup_epochs", "drop_probabilities", "opm_ratios", "shared_theta",
           "draw_keep", "rescale_factors"]


@dataclass
class OPMHParams:
    """Hyperparameters (docs/methods/opm.md "Hyperparameters").

    - ``q_base`` 0.5: ``scripts/train_opm.sh`` and the argparse default (``main.py:42``; BalanceBenchmark 0.4).
    - ``lam`` (λ) 0.5: ``train_opm.sh``, ``main.py:43``.
    - ``p_exe`` 0.7: ``train_opm.sh``, ``main.py:44``.
    - ``warmup_epochs`` ``auto`` = max(1, round(0.06·E)): the official 6 of 100 epochs (``main.py:91``).
    - ``score_source`` ``auto``: ``head_split`` (official) when the head is linear over concatenated
      features, else ``aux_probe`` (per-modality probes on detached features, own optimizer).
    - ``ratio`` ``mean_others`` (= official at M = 2); ``sum_others`` (BalanceBenchmark), ``min``.
    - ``rescale`` ``shared_theta`` (official 1/(1 − θ)); ``per_modality`` (κ/(1 − q_m)), ``none``.
    - ``theta_grad`` ``none`` (θ a constant, the fix); ``official`` adds the released ∇(θ²/2) term.
    """

    q_base: float = field(default=0.5, metadata={"search": Choice((0.3, 0.4, 0.5, 0.6))})
    lam: float = field(default=0.5, metadata={"search": Choice((0.25, 0.5, 1.0))})
    p_exe: float = field(default=0.7, metadata={"search": Choice((0.5, 0.7, 0.9))})
    warmup_epochs: int | Literal["auto"] = "auto"
    score_source: Literal["auto", "head_split", "aux_probe"] = "auto"
    ratio: Literal["mean_others", "sum_others", "min"] = "mean_others"
    rescale: Literal["shared_theta", "per_modality", "none"] = "shared_theta"
    theta_grad: Literal["none", "official"] = "none"

    def validate(self) -> None:
        for name in ("q_base", "p_exe"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.warmup_epochs != "auto" and (not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0):
            raise ValueError(f"warmup_epochs must be an integer >= 0 or 'auto', got {self.warmup_epochs!r}")


# ---------------------------------------------------------------------------------------- formulas
def auto_warmup_epochs(epochs: int) -> int:
    """max(1, round(0.06·E)): the official 6 warm-up epochs of 100, scaled to the run's budget."""
    return max(1, round(0.06 * epochs))


def opm_ratios(s: torch.Tensor, mode: str = "mean_others") -> torch.Tensor:
    """ρ_m = s_m / mean_{k≠m} s_k (``mean_others``; M = 2: the official s_a/s_v), s_m / Σ_{k≠m} s_k
    (``sum_others``, BalanceBenchmark) or s_m / min_{k≠m} s_k (``min``)."""
    if mode == "sum_others":
        return s.double() / (s.double().sum() - s.double()).clamp_min(1e-12)
    return discrepancy_ratios(s, mode)


def drop_probabilities(rho: torch.Tensor, q_base: float, lam: float) -> torch.Tensor:
    """q_m = min(1, q_base·(1 + λ·tanh(ρ_m − 1))) for ρ_m > 1, else 0 (``calcu_q``, Classifier.py:58-72)."""
    q = (q_base * (1 + lam * torch.tanh(rho - 1))).clamp(max=1.0)
    return torch.where(rho > 1, q, torch.zeros_like(q))


def shared_theta(q: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """θ = Σ_m d_m·q_m / Σ_m d_m, the expected dropped fraction of the fused input (Classifier.py:39-41)."""
    d = dims.to(q.dtype)
    return (d * q).sum() / d.sum()


def rescale_factors(q: torch.Tensor, dims: torch.Tensor, mode: str, theta: torch.Tensor | None = None) -> torch.Tensor:
    """Per-modality multiplier of the kept rows: 1/(1 − θ) for every modality (``shared_theta``,
    official ``:47-49``), 1/(1 − q_m) (``per_modality``; 0 where q_m = 1, nothing is kept there) or 1."""
    if mode == "shared_theta":
        theta = shared_theta(q, dims) if theta is None else theta
        return (1.0 / (1.0 - theta)).expand(q.shape)
    if mode == "per_modality":
        return torch.where(q < 1, 1.0 / (1.0 - q).clamp_min(1e-12), torch.zeros_like(q))
    return torch.ones_like(q)


def draw_keep(q: torch.Tensor, rows: int, p_exe: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One execute flag (Bernoulli(p_exe), Classifier.py:34-36) and the keep mask κ [rows, M] ~
    Bernoulli(1 − q_m) per sample and modality (``:45``), both on q's device from ``generator``.
    Uniforms are drawn first, then compared, so the stream does not depend on q."""
    dev = q.device
    u_exe = torch.rand((), generator=generator, device=dev)
    u = torch.rand((rows, q.numel()), generator=generator, device=dev)
    return u_exe < p_exe, u >= q.to(u.dtype)


# ---------------------------------------------------------------------------------------- the method
@register_method("opm", "OPM: drop the dominant modality's fusion inputs per sample with a discrepancy-driven probability")
class OPM(BalancingMethod):
    """The drop acts in a forward pre-hook on ``raw_model.fusion`` (every canonical model calls
    ``fusion(dict)``), active only in train mode inside an OPM training step past the warm-up."""

    name = "opm"
    hparams_cls = OPMHParams
    min_modalities = 2

    def __init__(self, hparams: OPMHParams | None = None) -> None:
        super().__init__(hparams)
        self.source = "head_split"
        self.tau = 1.0
        self._y: torch.Tensor | None = None  # set by training_step: the hook is armed only then
        self._theta_live: torch.Tensor | None = None
        self._exec: torch.Tensor | None = None
        self.last: dict[str, torch.Tensor] = {}  # last active step: global s, q, θ, execute flag, global κ
        self._dropped: torch.Tensor | None = None  # this rank's dropped rows per modality in the epoch
        self._rows = 0

    # ------------------------------------------------------------------ set-up
    def setup(self, ctx: StepContext) -> None:
        model, task = ctx.raw_model, ctx.task.name
        if getattr(model, "variant", "canonical") == "mmtm":
            raise MethodNotApplicable("opm: OPM drops a modality's fusion input, but MMTM blocks have already mixed "
                                      "it into the other modalities' features, so the drop would not remove it")
        decomposable = model.split_head() is not None and task == "classification"
        src = self.hp.score_source
        if src == "auto":
            src = "head_split" if decomposable else "aux_probe"
        if src == "head_split" and not decomposable:
            raise ConfigError("opm: score_source=head_split needs a classification model whose head is one linear "
                              "layer over concatenated per-modality features; use score_source=aux_probe or auto")
        if self.hp.theta_grad == "official" and src != "head_split":
            raise ConfigError("opm: theta_grad=official reproduces the gradient the released scores send through "
                              "the features of the concat head; it needs score_source=head_split")
        self.source = src
        if src == "aux_probe":
            ctx.add_module("opm_probes", ModalityProbes(model))
        if task == "regression":
            self.tau = train_target_tau(ctx)
        self.mods = list(model.modalities)
        self.kinds = dict(model.feature_kinds)
        self.dims = torch.tensor([float(model.feature_dims[m]) for m in self.mods], dtype=torch.float64,
                                 device=ctx.device)
        self._ctx = ctx
        if src == "head_split":  # [D, M] indicator of each modality's columns of the concat head
            slices = model.split_head()
            self._block = torch.zeros(model.final_layer().weight.shape[1], len(self.mods), device=ctx.device)
            for k, m in enumerate(self.mods):
                self._block[slices[m], k] = 1.0
        model.fusion.register_forward_pre_hook(self._fusion_hook)

    def warmup(self, ctx: StepContext) -> int:
        w = self.hp.warmup_epochs
        return auto_warmup_epochs(ctx.epochs_in_phase) if w == "auto" else int(w)

    # ------------------------------------------------------------------ the drop (fusion pre-hook)
    def _unimodal(self, ctx: StepContext, inputs: dict[str, torch.Tensor], live: bool) -> dict[str, torch.Tensor] | torch.Tensor:
        """u_m for the scores. ``head_split``: the concat head's slices with detached weights, all modalities
        in one product, [B, C, M] (``live``: gradient through z̄ only, as the released code). Probes: {m: u_m}
        from the probes on detached features."""
        model = ctx.raw_model
        if model.fusion_input == "pooled":  # the fusion receives z̄ itself
            pooled = [inputs[m] for m in self.mods]
        else:
            pooled = [model.pool(m, inputs[m]) for m in self.mods]
        if self.source == "head_split":
            layer = model.final_layer()
            z = torch.cat(pooled, 1).float()
            z = z if live else z.detach()
            # u[b, c, m] = Σ_{j ∈ block m} z[b, j]·W[c, j] + b_c/M: the per-modality slices W_m·z̄_m in one matmul
            u = (z[:, None, :] * layer.weight.detach().float()[None]) @ self._block
            return u + (layer.bias.detach().float() / len(self.mods))[None, :, None] if layer.bias is not None else u
        probes = ctx.raw_module("opm_probes")
        feats = {m: (inputs[m] if self.kinds[m] == "map" else p).detach().float() for m, p in zip(self.mods, pooled)}
        size = tuple(self._y.shape[-2:]) if ctx.task.name == "segmentation" else None
        return probes(feats, size=size)

    def _scores(self, ctx: StepContext, u: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """s_m = Σ_i softmax(u_m,i)[y_i] (Classifier.py:142-143); probe outputs as OGM-GE scores them."""
        if isinstance(u, torch.Tensor):  # [B, C, M] from the head split
            y = self._y.long()[:, None, None].expand(-1, 1, u.shape[2])
            return u.softmax(1).gather(1, y).sum((0, 1))
        return score_sums(ctx.task.name, u, self._y, self.tau)

    def _fusion_hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self._y is None or not module.training:
            return None
        ctx, hp = self._ctx, self.hp
        inputs = args[0]
        live = hp.theta_grad == "official"
        with torch.set_grad_enabled(live and torch.is_grad_enabled()):
            s_local = self._scores(ctx, self._unimodal(ctx, inputs, live))
        s = ctx.reduce_sum(s_local.detach())  # SUM over ranks before the ratios (distributed rule 1)
        rho = opm_ratios(s, hp.ratio)
        q = drop_probabilities(rho, hp.q_base, hp.lam)
        q = q.scatter(0, s.argmin().reshape(1), 0.0)  # the weakest modality (ρ ≤ 1) is never dropped: no empty row
        dims = self.dims
        B = int(self._y.shape[0])
        world, rank = ctx.world_size, ctx.accelerator.process_index
        exe, keep_global = draw_keep(q, B * world, hp.p_exe, ctx.device_generator)
        keep = keep_global[rank * B:(rank + 1) * B]  # this rank's rows of the global batch's mask
        theta = shared_theta(q, dims)
        factor = rescale_factors(q, dims, hp.rescale, theta).float()
        mult = torch.where(exe, keep * factor, 1.0)  # [B, M]: 1 everywhere in a step that is not executed
        if live:
            s_diff = s_local.double() + (s - s_local.double()).detach()  # global value, local gradient
            q_live = drop_probabilities(opm_ratios(s_diff, hp.ratio), hp.q_base, hp.lam)
            q_live = q_live * (q > 0)  # same support as q
            self._theta_live = shared_theta(q_live, dims)
        self._exec = exe
        self.last = {"scores": s, "rho": rho, "q": q, "theta": theta, "executed": exe, "keep_global": keep_global}
        out = {}
        for k, m in enumerate(self.mods):
            z = inputs[m]
            col = mult[:, k] if z.dtype == torch.float32 else mult[:, k].to(z.dtype)
            out[m] = z * (col[:, None] if z.dim() == 2 else col.view(-1, *([1] * (z.dim() - 1))))
        self._step_logs = (s, rho, q, exe, keep)
        return (out, *args[1:])

    # ------------------------------------------------------------------ training
    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        y = batch["label"]
        active = ctx.epoch >= self.warmup(ctx)
        self._y = y if active else None
        self._theta_live = None
        try:
            out = ctx.forward(batch)
        finally:
            self._y = None
        loss = ctx.task.loss(out.logits, y)
        logs: dict[str, Any] = {}
        if self.source == "aux_probe":  # the probes learn every step (also in the warm-up), on detached features
            size = tuple(y.shape[-2:]) if ctx.task.name == "segmentation" else None
            feats = ModalityProbes.inputs_from(out, self.kinds)
            logs["opm/probe_loss"] = train_probes(ctx, ctx.modules["opm_probes"](feats, size=size), y)
        if active:
            if self._theta_live is not None:  # theta_grad=official: + ∇(θ²/2) on executed steps, value unchanged
                t = self._theta_live
                extra = (t * t.detach() - (t * t.detach()).detach()) * self._exec.to(t.dtype)
                loss = loss + extra.to(loss.dtype)
            s, rho, q, exe, keep = self._step_logs
            dropped_rows = (~keep).sum(0).to(torch.float32) * exe.to(torch.float32)
            self._dropped = dropped_rows if self._dropped is None else self._dropped + dropped_rows
            self._rows += int(y.shape[0])
            dropped = dropped_rows / y.shape[0]
            vals = torch.cat([s.float(), rho.float(), q.float(), exe.float().reshape(1), dropped])
            ctx.log_many(self._log_keys(), vals)
        return StepOutput(loss, out, logs)

    def _log_keys(self) -> tuple[str, ...]:
        if not hasattr(self, "_keys"):
            self._keys = (*(f"opm/s_{m}" for m in self.mods), *(f"opm/rho_{m}" for m in self.mods),
                          *(f"opm/q_{m}" for m in self.mods), "opm/executed",
                          *(f"opm/dropped_{m}" for m in self.mods))
        return self._keys

    def on_epoch_start(self, ctx: StepContext) -> None:
        self._dropped, self._rows = None, 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The last active step's global statistics (identical on every rank): scores, ρ, q, θ, the execute
        flag and the global keep mask. Diagnostics only: nothing is read back (the engine checkpoints the
        generators, so a resumed run draws the same masks)."""
        return {k: v.detach().cpu().clone() for k, v in self.last.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}

    def metrics(self) -> dict[str, float]:
        if not self.last:
            return {}
        q = self.last["q"].tolist()
        out = {**{f"q_{m}": v for m, v in zip(self.mods, q)}, "theta": float(self.last["theta"])}
        if self._dropped is not None and self._rows:  # this rank's rows (ranks draw different rows)
            out.update({f"drop_rate_{m}": v / self._rows for m, v in zip(self.mods, self._dropped.tolist())})
        return out
