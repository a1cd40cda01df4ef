"""OGM-GE and OGM: on-the-fly gradient modulation (docs/methods/ogm_ge.md).

Peng et al., "Balanced Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022; official
code GeWu-Lab/OGM-GE_CVPR2022 (commit 343dc1d). Per step: per-modality scores s_m (true-class
probability of each modality's share of the fused head, or of an auxiliary probe), ratio
ρ_m = s_m / mean_{k≠m} s_k, coefficient k_m = 1 − tanh(α·ρ_m) for ρ_m > 1 (paper Eq. 10), encoder
gradients g ← k_m·g + N(0, std(g)²) (GE, paper §3.3) inside the epoch window.

This module also holds two pieces reused by MSLR: :class:`ModalityProbes` (README "Auxiliary probes")
and :func:`modality_param_groups` (one optimizer group per modality plus a shared group).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from mmbalance.methods._per_model import PerModel
from torch import nn

from mmbalance.errors import ConfigError
from mmbalance.interface import BalancingMethod, ModelOutput, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import LogUniform

__all__ = ["OGMGE", "OGMGEHParams", "ModalityProbes", "probe_kinds", "modality_param_groups", "ogm_coefficients",
           "discrepancy_ratios", "modulate_gradients", "score_sums", "train_target_tau"]


# ---------------------------------------------------------------------------------------- shared pieces
def probe_kinds(model: nn.Module) -> dict[str, str]:
    """The model's feature kinds as the probes read them: ``map`` only for dense (segmentation) models,
    whose head ends in a conv; the feature maps of a classifier (av_resnet18) are read pooled."""
    weight = getattr(model.final_layer(), "weight", None)
    dense = weight is None or weight.dim() == 4
    return {m: k if k != "map" or dense else "pooled" for m, k in model.feature_kinds.items()}


class ModalityProbes(nn.Module):
    """Per-modality linear probes on DETACHED features (README "Auxiliary probes"): Linear on the pooled
    feature for vector/sequence encoders, 1×1 conv on the feature map (+ bilinear upsampling to the
    label size) for map encoders. They never send gradient into the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.kinds = probe_kinds(model)
        self.probes = nn.ModuleDict()
        for m in model.modalities:
            d = model.feature_dims[m]
            self.probes[m] = nn.Conv2d(d, model.out_dim, 1) if self.kinds[m] == "map" else nn.Linear(d, model.out_dim)

    @staticmethod
    def inputs_from(out: ModelOutput, kinds: dict[str, str]) -> dict[str, torch.Tensor]:
        """Detached, float32 probe inputs: feature maps for map encoders, pooled features otherwise."""
        return {m: (out.features[m] if kinds[m] == "map" else out.pooled[m]).detach().float() for m in kinds}

    def forward(self, feats: dict[str, torch.Tensor], size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        res = {}
        for m, x in feats.items():
            u = self.probes[m](x)
            if u.dim() == 4 and size is not None and tuple(u.shape[-2:]) != tuple(size):
                u = F.interpolate(u, size=size, mode="bilinear", align_corners=False)
            res[m] = u.float()
        return res


def probe_outputs(ctx: StepContext, probes: nn.Module, out: ModelOutput, label: torch.Tensor,
                  kinds: dict[str, str]) -> dict[str, torch.Tensor]:
    size = tuple(label.shape[-2:]) if ctx.task.name == "segmentation" else None
    return probes(ModalityProbes.inputs_from(out, kinds), size=size)


def train_probes(ctx: StepContext, u: dict[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
    """Backward of Σ_m ℓ(u_m, y) into the probes only (their own optimizer steps with the main one)."""
    loss = sum(ctx.task.loss(um, label) for um in u.values())
    ctx.accelerator.backward(loss)
    return loss.detach()


def modality_param_groups(model: nn.Module, mults: dict[str, float]) -> list[dict[str, Any]]:
    """One optimizer group per modality (``name`` ``modality/<m>``, ``modality`` m, ``lr_mult``) with
    ``encoder_parameters(m)``, plus one ``shared`` group with every other trainable parameter."""
    groups, seen = [], set()
    for m in model.modalities:
        params = [p for p in model.encoder_parameters(m) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        groups.append({"params": params, "name": f"modality/{m}", "modality": m, "lr_mult": float(mults.get(m, 1.0))})
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups.append({"params": rest, "name": "shared", "lr_mult": 1.0})
    return groups


def per_sample_loss(task_name: str, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample task loss for regression (L1, the task's loss) → [B]."""
    if task_name != "regression":
        raise ValueError("per_sample_loss is defined for regression only")
    return (u.reshape(u.shape[0]).float() - y.reshape(y.shape[0]).float()).abs()


def score_sums(task_name: str, u: dict[str, torch.Tensor], y: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Per-modality batch scores s_m (ogm_ge.md §2 step 4, §5), vectorised (bug 7.7):
    classification Σ_i softmax(u_m,i)[y_i]; regression Σ_i exp(−ℓ(u_m,i, y_i)/τ);
    segmentation Σ_images mean_pixels softmax(u_m)[y]."""
    out = []
    for um in u.values():
        um = um.float()
        if task_name == "classification":
            out.append(um.softmax(-1).gather(1, y.long()[:, None]).sum())
        elif task_name == "regression":
            out.append(torch.exp(-per_sample_loss(task_name, um, y) / tau).sum())
        else:
            p = um.softmax(1).gather(1, y.long()[:, None]).squeeze(1)
            out.append(p.flatten(1).mean(1).sum())
    return torch.stack(out)


def train_target_tau(ctx: StepContext) -> float:
    """τ = mean_i |ȳ − y_i| over the training targets (ogm_ge.md §5), SUM-reduced across processes."""
    labels = getattr(ctx.data.train, "labels", None)
    if labels is not None:
        y = labels.double().reshape(len(labels))
        mean = y.mean()
        tau = float((y - mean).abs().mean())
    else:  # on-disk datasets: one pass over this process's shard, sums reduced across processes
        ys = torch.cat([b["label"].double().reshape(-1).cpu() for b in ctx.train_batches("train")])
        s = ctx.reduce_sum(torch.tensor([float(ys.sum()), float(len(ys))], dtype=torch.float64))
        mean = float(s[0] / s[1])
        d = ctx.reduce_sum(torch.tensor([float((ys - mean).abs().sum()), float(len(ys))], dtype=torch.float64))
        tau = float(d[0] / d[1])
    return tau if tau > 0 and math.isfinite(tau) else 1.0


# ---------------------------------------------------------------------------------------- OGM-GE maths
def discrepancy_ratios(s: torch.Tensor, mode: str = "mean_others") -> torch.Tensor:
    """ρ_m = s_m / mean_{k≠m} s_k (``mean_others``, ogm_ge.md §2 step 5; M = 2: s_a/s_v) or
    s_m / min_{k≠m} s_k (``min``). The modality itself is excluded (bug 7.5, ModalBed)."""
    s = s.double()
    M = s.numel()
    if M < 2:
        return torch.ones_like(s)
    if mode == "mean_others":
        den = (s.sum() - s) / (M - 1)
    else:
        big = torch.full((M, M), float("inf"), dtype=s.dtype, device=s.device)
        big = torch.where(torch.eye(M, dtype=torch.bool, device=s.device), big, s[None, :].expand(M, M))
        den = big.min(dim=1).values
    return s / den.clamp_min(1e-12)


def ogm_coefficients(rho: torch.Tensor, alpha: float, form: str = "official") -> torch.Tensor:
    """k_m = 1 − tanh(α·ρ_m) if ρ_m > 1 else 1 (paper Eq. 10; ``shifted``: 1 − tanh(α·(ρ_m − 1)))."""
    arg = rho if form == "official" else rho - 1
    return torch.where(rho > 1, 1 - torch.tanh(alpha * arg), torch.ones_like(rho))


def modulate_gradients(params: dict[str, list[nn.Parameter]], k: dict[str, float | torch.Tensor], *, ge: bool,
                       generator: torch.Generator | None, scale_grad: bool = True,
                       noise_std_source: str = "pre", scope: str = "all") -> int:
    """ogm_ge.md §2 step 7: g ← k_m·g (+ ξ ~ N(0, (σ + 1e-8)²) with σ = std(g) when ``ge``).
    σ is taken before scaling (``pre``, official) or after (``post``); 0 for fewer than 2 elements or
    non-finite. ``scope='conv4d'`` keeps only 4-D gradients (official filter). Returns #tensors edited.
    ξ is drawn on the gradient's device from ``generator`` (which must live there) and σ stays a
    device tensor: no host sync and no host-to-device copy per tensor.

    The per-tensor arithmetic is batched (one ``_foreach`` call per modality for the scaling, one for the
    noise products and sums, the σ clean-up on one stacked vector): the same element-wise operations in
    the same precision, so the result is bit-identical to editing one tensor at a time; ξ is drawn one
    tensor at a time in parameter order (one draw of all of them would give different numbers)."""
    groups: list[tuple[float | torch.Tensor, list[torch.Tensor]]] = []
    for m, plist in params.items():
        km = k[m] if scale_grad else 1.0  # a Python float or a 0-d device tensor (no host read)
        if isinstance(km, torch.Tensor):
            km = km.to(torch.float32)
        grads = [p.grad for p in plist if p.grad is not None and (scope != "conv4d" or p.grad.dim() == 4)]
        if grads:
            groups.append((km, grads))
    grads = [g for _, gs in groups for g in gs]
    if not grads:
        return 0
    scale = None
    if ge and noise_std_source == "pre":
        scale = _noise_scales(grads)
    for km, gs in groups:
        if isinstance(km, torch.Tensor):
            if all(g.device == km.device for g in gs):
                torch._foreach_mul_(gs, km)
            else:
                for g in gs:
                    g.mul_(km.to(g.device))
        elif km != 1.0:
            torch._foreach_mul_(gs, km)
    if ge:
        if noise_std_source == "post":
            scale = _noise_scales(grads)
        noise = [torch.randn(g.shape, generator=generator, device=g.device, dtype=torch.float32) for g in grads]
        torch._foreach_mul_(noise, scale)
        torch._foreach_add_(grads, [xi if xi.dtype == g.dtype else xi.to(g.dtype) for xi, g in zip(noise, grads)])
    return len(grads)


def _std(g: torch.Tensor) -> torch.Tensor:
    """std(g) as a 0-d float32 tensor on g's device; 0 for fewer than 2 elements or a non-finite std."""
    if g.numel() < 2:
        return torch.zeros((), dtype=torch.float32, device=g.device)
    s = g.float().std()
    return torch.where(torch.isfinite(s), s, torch.zeros_like(s))


def _noise_scales(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """σ + 1e-8 per gradient (σ = :func:`_std`; the sum in float64, as a Python float would be) as 0-d
    float32 tensors on the gradients' devices. One std per tensor; the finiteness check and the sum on the
    stacked values (element-wise, so the same numbers as per tensor)."""
    dev = grads[0].device
    if any(g.device != dev for g in grads):
        return [(_std(g).double() + 1e-8).float() for g in grads]
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    s = torch.stack([g.float().std() if g.numel() >= 2 else zero for g in grads])
    s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    return list((s.double() + 1e-8).float().unbind())


# ---------------------------------------------------------------------------------------- the method
@dataclass
class OGMGEHParams:
    """OGM-GE hyperparameters (ogm_ge.md §4).

    ``alpha``: 0.1, official README default. ``start_epoch``/``end_epoch``: 0/50 inclusive, 0-based
    (official CLI). ``ge``: true (official ``OGM_GE``; false = preset ``ogm``). ``param_scope``: ``all``
    (mmbalance, §6; ``conv4d`` = official filter). ``score_source``: ``auto`` (head split when the head is
    linear over concatenated features, else probes; ``head_split``, ``aux_probe``). ``ratio``:
    ``mean_others`` (mmbalance, = official at M = 2; ``min``). ``coef_form``: ``official`` (``shifted``,
    non-official). ``apply_to``: ``grad`` (official; ``lr`` = scale the modality's group lr by k_m for the
    step). ``noise_std_source``: ``pre`` (official; ``post`` = May-2022 version).
    """

    alpha: float = field(default=0.1, metadata={"search": LogUniform(0.03, 1.0)})
    start_epoch: int = 0
    end_epoch: int = 50
    ge: bool = True
    param_scope: Literal["all", "conv4d"] = "all"
    score_source: Literal["auto", "head_split", "aux_probe"] = "auto"
    ratio: Literal["mean_others", "min"] = "mean_others"
    coef_form: Literal["official", "shifted"] = "official"
    apply_to: Literal["grad", "lr"] = "grad"
    noise_std_source: Literal["pre", "post"] = "pre"

    def validate(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.end_epoch < self.start_epoch:
            raise ValueError(f"end_epoch ({self.end_epoch}) must be >= start_epoch ({self.start_epoch})")


@register_method("ogm_ge", "OGM-GE: scale the dominant modality's encoder gradients by 1 − tanh(α·ρ) plus GE noise")
@register_method("ogm", "OGM: OGM-GE without generalisation-enhancement noise", ge=False)
class OGMGE(BalancingMethod):
    """OGM-GE (ogm_ge.md). Scores are SUM-reduced over processes before the ratio; GE noise comes from
    ``ctx.generator`` (identical on every rank); gradients are edited only in ``after_backward``."""

    name = "ogm_ge"
    hparams_cls = OGMGEHParams
    min_modalities = 2

    def __init__(self, hparams: Any = None) -> None:
        super().__init__(hparams)
        self.source = "head_split"
        self.tau = 1.0
        self.k: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self._noise_gen: torch.Generator | None = None
        self._noise_state: torch.Tensor | None = None
        # each modality's encoder parameters, listed once per model (walking the modules every step cost
        # ≈ 60 µs on mfeat)
        self._encoder_params = PerModel(lambda model: {m: list(model.encoder_parameters(m)) for m in self.modalities})

    # ------------------------------------------------------------------ set-up
    def setup(self, ctx: StepContext) -> None:
        model, task = ctx.raw_model, ctx.task.name
        decomposable = model.split_head() is not None and task == "classification"
        src = self.hp.score_source
        if src == "auto":
            src = "head_split" if decomposable else "aux_probe"
        if src == "head_split" and not decomposable:
            why = ("a split head gives partial sums, not predictions, for " + task) if task != "classification" \
                else "the model's head is not linear over concatenated per-modality features"
            raise ConfigError(f"ogm_ge: score_source=head_split is not possible here ({why}); "
                              "use score_source=aux_probe or auto")
        self.source = src
        if src == "aux_probe":
            ctx.add_module("ogm_probes", ModalityProbes(model))
        if task == "regression":
            self.tau = train_target_tau(ctx)
        self.modalities = list(model.modalities)
        self.kinds = probe_kinds(model)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]] | None:
        if self.hp.apply_to != "lr":
            return None
        return modality_param_groups(model, {})

    def in_window(self, epoch: int) -> bool:
        return self.hp.start_epoch <= epoch <= self.hp.end_epoch

    # ------------------------------------------------------------------ training
    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        out = ctx.forward(batch)
        y = batch["label"]
        loss = ctx.task.loss(out.logits, y)
        logs: dict[str, float | torch.Tensor] = {}
        if self.source == "aux_probe":
            u = probe_outputs(ctx, ctx.modules["ogm_probes"], out, y, self.kinds)
            logs["ogm/probe_loss"] = train_probes(ctx, u, y)
            u = {m: v.detach() for m, v in u.items()}
        else:
            with torch.no_grad():
                u = ctx.raw_model.unimodal_logits({m: p.detach().float() for m, p in out.pooled.items()})
        with torch.no_grad():
            s = ctx.reduce_sum(score_sums(ctx.task.name, u, y, self.tau))  # SUM over ranks (§9)
            rho = discrepancy_ratios(s, self.hp.ratio)
            k = ogm_coefficients(rho, self.hp.alpha, self.hp.coef_form)
        # k stays on the device (no host sync per step); apply_to=lr needs Python floats for the lr.
        ks = k.unbind()
        self.k = {m: (float(k[i]) if self.hp.apply_to == "lr" else ks[i]) for i, m in enumerate(self.modalities)}
        acc = None
        if ctx.task.name == "classification":
            # one argmax for all modalities when their logits stack (exact: a mean of 0/1 values)
            shapes = {tuple(v.shape) for v in u.values()}
            acc = ((torch.stack([u[m] for m in self.modalities]).argmax(-1) == y).float().mean(1).unbind()
                   if len(shapes) == 1 else [(u[m].argmax(-1) == y).float().mean() for m in self.modalities])
        for i, (m, si, ri) in enumerate(zip(self.modalities, s.unbind(), rho.unbind())):
            logs[f"ogm/s_{m}"] = si
            logs[f"ogm/rho_{m}"] = ri
            logs[f"ogm/k_{m}"] = ks[i]
            if acc is not None:
                logs[f"ogm/acc_{m}"] = acc[i]
        return StepOutput(loss, out, logs)

    def after_backward(self, ctx: StepContext) -> None:
        model = ctx.raw_model
        active = self.in_window(ctx.epoch)
        k = self.k if active else {m: 1.0 for m in self.modalities}
        if self.hp.apply_to == "lr":
            for g in ctx.optimizer.param_groups:
                if "modality" in g:
                    g["lr_mult"] = k.get(g["modality"], 1.0)
        if not active:
            return
        params = self._encoder_params(model)
        modulate_gradients(params, k, ge=self.hp.ge, generator=self.noise_generator(ctx),
                           scale_grad=self.hp.apply_to == "grad", noise_std_source=self.hp.noise_std_source,
                           scope=self.hp.param_scope)
        self.last = {f"k_{m}": v for m, v in k.items()}

    def noise_generator(self, ctx: StepContext) -> torch.Generator:
        """The GE-noise generator, identical on every rank (§9). CPU: ``ctx.generator`` (checkpointed
        by the engine). Accelerator device: a generator on that device seeded from the run seed, its
        state in this method's checkpoint state, so the noise is drawn where the gradients live."""
        if ctx.device.type == "cpu":
            return ctx.generator
        if self._noise_gen is None:
            self._noise_gen = torch.Generator(device=ctx.device)
            self._noise_gen.manual_seed(ctx.seed * 7919 + 4243)
            if self._noise_state is not None:
                self._noise_gen.set_state(self._noise_state)
        return self._noise_gen

    def state_dict(self) -> dict[str, Any]:
        return {} if self._noise_gen is None else {"noise_generator": self._noise_gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._noise_state = state.get("noise_generator")
        if self._noise_gen is not None and self._noise_state is not None:
            self._noise_gen.set_state(self._noise_state)

    def metrics(self) -> dict[str, float]:
        return {key: float(v) for key, v in self.last.items()}
