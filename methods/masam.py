"""MASAM — multimodal adaptive sharpness-aware minimisation (Z. Chen, K. Yin, W. Yao, W. K. Cheung, J. Qin,
ICLR 2026, OpenReview AUKeDukcUi; official code Orange2107/MASAM-Multimodal-Adaptive-SAM @ 713f931;
docs/methods/masam.md).

L = L_mm + Σ_m L_m with separate unimodal heads (``--uniloss``). Per step, on the clean gradients
(g^mm = ∇L_mm, g = ∇L; g^u = g − g^mm on encoder m, exact because L_k, k ≠ m, does not depend on θ_m):

1. loss decay: MA_m ← β·MA_m + (1 − β)·L_m, d_m = max(0, last_m − MA_m), last_m ← L_m (first step:
   MA_m = L_m, d_m = 0) (``masam.py:274-283``);
2. agreement s_m = mean over encoder-m tensors p of cos(g^u_p, g^mm_p) (``sam_decomp_closure.py:288-306``);
3. score A_m = w·d_m + (1 − w)·s_m, dominant m* = argmax A (first on ties) (``masam.py:288-295``);
4. direction per tensor of m*: v_p = (⟨g^u_p, g^mm_p⟩/‖g^mm_p‖²)·g^mm_p if ⟨·⟩ ≥ 0, else g^mm_p
   (0 when ‖g^mm_p‖ = 0) (``:263-276``);
5. ε_p = ρ·γ_p·v_p/(‖v‖ + 1e-12), γ_p = cos_p if cos_p > 0 else 1 (``:151-164``);
6. θ_{m*} += ε; forward 2 with the normalisation statistics frozen; the engine backpropagates L(θ + ε);
   θ restored exactly; encoders keep ∇L(θ + ε), every non-encoder parameter gets its clean g (``:166-181``).

Preset ``masam_static``: no selection, every encoder perturbed with its own ‖v‖ (``:107-109``).
Everything stays on the device: m* is applied as a one-hot mask over all encoders' ε (ε = 0 elsewhere);
per-tensor dot products and norms are taken on views of the flat gradients (foreach kernels).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from mmbalance.methods._unimodal import UnimodalOutputs, unimodal_logs, unimodal_losses

from mmbalance.errors import ConfigError, MethodNotApplicable
from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import LogUniform, Uniform

__all__ = ["MASAM", "MASAMHParams", "sharpness_perturbation", "tensor_agreement", "perturbation_factor", "loss_decay",
           "segment_sum"]


@dataclass
class MASAMHParams:
    """Hyperparameters (docs/methods/masam.md).

    - ``rho`` (ρ) 0.3 and ``score_weight`` (w) 0.8, ``ema`` (β) 0.91: ``configs/masam_cremad.yaml``,
      ``masam_ks.yaml``, ``masam_food101.yaml`` (the CLI defaults 0.5 / 0.9 silently replace them in the
      released code, ``main.py:123-125``).
    - ``mode`` ``dynamic`` (YAML ``dynamic_mode: true``, paper); ``static`` = preset ``masam_static``.
    - ``gamma_source`` ``per_tensor`` (fix: the code scales every tensor by the LAST tensor's cosine);
      ``last_tensor`` (code literal); ``mean`` (s_m).
    - ``direction`` ``decomposed`` (code: projection of g^u onto g^mm); ``fused``: v = g^mm.
    - ``others_grad`` ``perturbed`` (code: non-dominant encoders keep ∇L(θ + ε)); ``clean``.
    - ``uni_head`` ``auto`` (separate linear heads, pixel heads for segmentation; ``--uniloss``);
      ``shared_slice`` (head slices, the code without ``--uniloss``).
    """

    rho: float = field(default=0.3, metadata={"search": LogUniform(0.05, 1.0)})
    score_weight: float = field(default=0.8, metadata={"search": Uniform(0.0, 1.0)})
    ema: float = 0.91
    mode: Literal["dynamic", "static"] = "dynamic"
    gamma_source: Literal["per_tensor", "last_tensor", "mean"] = "per_tensor"
    direction: Literal["decomposed", "fused"] = "decomposed"
    others_grad: Literal["perturbed", "clean"] = "perturbed"
    uni_head: Literal["auto", "shared_slice"] = "auto"

    def validate(self) -> None:
        if self.rho < 0 or not 0 <= self.score_weight <= 1 or not 0 <= self.ema < 1:
            raise ValueError(f"need rho >= 0, 0 <= score_weight <= 1, 0 <= ema < 1; got {self.rho}, "
                             f"{self.score_weight}, {self.ema}")
        for name, ok in (("mode", ("dynamic", "static")), ("gamma_source", ("per_tensor", "last_tensor", "mean")),
                         ("direction", ("decomposed", "fused")), ("others_grad", ("perturbed", "clean")),
                         ("uni_head", ("auto", "shared_slice"))):
            if getattr(self, name) not in ok:
                raise ValueError(f"{name} must be one of {', '.join(ok)}, got {getattr(self, name)!r}")


# ------------------------------------------------------------------------------------------ formulas
def segment_sum(x: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """Σ of ``x`` per segment id (``seg`` has x's length): one kernel for all tensors of all encoders."""
    return torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, seg, x)


def loss_decay(ma: torch.Tensor, last: torch.Tensor, started: torch.Tensor, loss: torch.Tensor,
               beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(MA', d): MA' = β·MA + (1 − β)·L and d = max(0, last − MA') once started; MA' = L, d = 0 on the
    first step (``masam.py:274-283``)."""
    ma_new = torch.where(started, beta * ma + (1 - beta) * loss, loss)
    d = torch.where(started, (last - ma_new).clamp_min(0), torch.zeros_like(loss))
    return ma_new, d


def tensor_agreement(g_u: list[torch.Tensor], g_mm: list[torch.Tensor], tensor_owner: torch.Tensor,
                     n_mod: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per tensor p (lists of the encoders' gradient tensors; ``tensor_owner`` [T] = each one's encoder):
    (cos_p, ⟨g^u_p, g^mm_p⟩, ‖g^mm_p‖², s [M]) with cos_p = 0 when either vector is 0 and s_m the mean of
    cos_p over encoder m (``sam_decomp_closure.py:288-306``). Norms by one foreach kernel each."""
    dot = torch.stack([torch.vdot(a.reshape(-1), b.reshape(-1)) for a, b in zip(g_u, g_mm)])
    nu = torch.stack(torch._foreach_norm(g_u))
    nmm = torch.stack(torch._foreach_norm(g_mm))
    prod = nu * nmm
    cos = torch.where(prod > 0, dot / prod.clamp_min(torch.finfo(prod.dtype).tiny), torch.zeros_like(dot))
    counts = segment_sum(torch.ones_like(cos), tensor_owner, n_mod)
    return cos, dot, nmm * nmm, segment_sum(cos, tensor_owner, n_mod) / counts.clamp_min(1)


def perturbation_factor(cos: torch.Tensor, dot: torch.Tensor, nmm2: torch.Tensor, s: torch.Tensor,
                        tensor_owner: torch.Tensor, n_mod: int, rho: float, *, gamma_source: str = "per_tensor",
                        direction: str = "decomposed", last_tensor: torch.Tensor | None = None) -> torch.Tensor:
    """f_p with ε_p = f_p·g^mm_p, for every encoder with its own norm:

    v_p = c_p·g^mm_p with c_p = ⟨g^u_p, g^mm_p⟩/‖g^mm_p‖² if ⟨·⟩ ≥ 0, else 1 (``:145-149, 263-276``), and
    c_p = 0 when ‖g^mm_p‖ = 0 (the code's 0/0); ``direction=fused``: c_p = 1. ‖v‖²_m = Σ_p c_p²·‖g^mm_p‖².
    f_p = ρ·γ_p·c_p/(‖v‖_m + 1e-12), γ_p = cos_p if cos_p > 0 else 1 (``:151-164``; ``last_tensor``: the
    encoder's last tensor's cosine, ``mean``: s_m)."""
    if direction == "decomposed":
        coef = torch.where(dot >= 0, dot / nmm2.clamp_min(torch.finfo(nmm2.dtype).tiny), torch.ones_like(dot))
        coef = torch.where(nmm2 > 0, coef, torch.zeros_like(coef))
    else:
        coef = torch.ones_like(dot)
    vnorm = segment_sum(coef * coef * nmm2, tensor_owner, n_mod).sqrt()
    c = cos if gamma_source == "per_tensor" else (cos[last_tensor] if gamma_source == "last_tensor" else s)[tensor_owner]
    gamma = torch.where(c > 0, c, torch.ones_like(c))
    return rho * gamma * coef / (vnorm[tensor_owner] + 1e-12)


def sharpness_perturbation(g_u: torch.Tensor, g_mm: torch.Tensor, seg: torch.Tensor, tensor_owner: torch.Tensor,
                           n_mod: int, rho: float, *, gamma_source: str = "per_tensor", direction: str = "decomposed",
                           last_tensor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ε [N], s [M], cos [T]) over FLAT encoder gradients (``seg`` [N]: the tensor id of each element, in
    order), for every encoder with its own norm (:func:`tensor_agreement`, :func:`perturbation_factor`)."""
    sizes = torch.bincount(seg, minlength=tensor_owner.numel()).tolist()
    gu, gm = list(g_u.split(sizes)), list(g_mm.split(sizes))
    cos, dot, nmm2, s = tensor_agreement(gu, gm, tensor_owner, n_mod)
    f = perturbation_factor(cos, dot, nmm2, s, tensor_owner, n_mod, rho, gamma_source=gamma_source,
                            direction=direction, last_tensor=last_tensor)
    return torch.cat([fi * g for fi, g in zip(f.unbind(), gm)]), s, cos


# ------------------------------------------------------------------------------------------ the method
@register_method("masam", "MASAM: sharpness-aware step on the dominant encoder (loss-decay + gradient-agreement score)")
@register_method("masam_static", "MASAM without selection: every encoder perturbed, each with its own norm (README commands)",
                 mode="static")
class MASAM(BalancingMethod):
    name = "masam"
    hparams_cls = MASAMHParams
    min_modalities = 2

    def __init__(self, hparams: MASAMHParams | None = None) -> None:
        super().__init__(hparams)
        self.ma: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        self.started: torch.Tensor | None = None
        self.score: torch.Tensor | None = None
        self._handle = None
        self._clean: list[torch.Tensor] | None = None
        self._keep_perturbed: torch.Tensor | None = None

    def setup(self, ctx: StepContext) -> None:
        model = ctx.raw_model
        self.uni = UnimodalOutputs(self.hp.uni_head, "masam", "masam_heads", auto_shared=None)
        self.uni.setup(ctx)
        mods = ctx.modalities
        owner: dict[int, str] = {}
        for m in mods:
            for p in model.encoder_parameters(m):
                if id(p) in owner and owner[id(p)] != m:
                    raise MethodNotApplicable(f"masam: a parameter is shared by the encoders of {owner[id(p)]!r} and "
                                              f"{m!r}; the perturbation group of each encoder must be its own")
                owner[id(p)] = m
        self.enc = {m: [p for p in model.encoder_parameters(m) if p.requires_grad] for m in mods}
        self.enc_flat = [p for m in mods for p in self.enc[m]]
        heads = [] if self.uni.shared else list(ctx.accelerator.unwrap_model(ctx.modules["masam_heads"]).parameters())
        enc_ids = {id(p) for p in self.enc_flat}
        self.other = [p for p in [*model.parameters(), *heads] if p.requires_grad and id(p) not in enc_ids]
        if not all(self.enc.values()):
            raise ConfigError("masam: every modality needs trainable encoder parameters")
        dev = ctx.device
        tensor_owner = [k for k, m in enumerate(mods) for _ in self.enc[m]]
        self._tensor_owner_list = tensor_owner
        self.tensor_owner = torch.tensor(tensor_owner, device=dev)
        ends = torch.cumsum(torch.tensor([len(self.enc[m]) for m in mods], device=dev), 0)
        self.last_tensor = ends - 1
        M = len(mods)
        self.ma = torch.zeros(M, dtype=torch.float64, device=dev)
        self.last = torch.zeros(M, dtype=torch.float64, device=dev)
        self.started = torch.zeros((), dtype=torch.bool, device=dev)
        self.score = torch.zeros(M, dtype=torch.float64, device=dev)
        self.d = torch.zeros(M, dtype=torch.float64, device=dev)
        self.s = torch.zeros(M, dtype=torch.float64, device=dev)
        self._mods = list(mods)
        self._keys = tuple(f"masam/{k}_{m}" for k in ("A", "d", "s", "selected") for m in mods) + (
            "masam/eps_norm", "masam/sharpness")

    # ------------------------------------------------------------------ step
    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        y = batch["label"]
        mods = ctx.modalities
        out = ctx.forward(batch)
        loss_fused = ctx.task.loss(out.logits, y)
        u = self.uni(ctx, out, y)
        losses = unimodal_losses(ctx, u, y)
        loss = loss_fused + sum(losses.values())
        logs = unimodal_logs(ctx, "masam", losses, u, y)
        # clean gradients (rank-local autograd.grad, all-reduced by synced_grads): 2 backward passes
        g_mm, ok_mm = ctx.synced_grads(loss_fused, self.enc_flat, retain_graph=True)
        g_all, ok_all = ctx.synced_grads(loss, [*self.enc_flat, *self.other])
        finite = ok_mm & ok_all
        n_enc = len(self.enc_flat)
        self._clean = g_all[n_enc:]
        if self.hp.others_grad == "clean":
            self._clean_enc = g_all[:n_enc]
        # loss values of the global batch: Σ_i ℓ_i and n SUM-reduced in one call
        n = float(len(y))
        sums = ctx.reduce_sum(torch.stack([*(losses[m].detach().double() * n for m in mods),
                                           loss.new_full((), n, dtype=torch.float64)]))
        lval = sums[:-1] / sums[-1]
        g_u = torch._foreach_sub(list(g_all[:n_enc]), list(g_mm))
        cos, dot, nmm2, s = tensor_agreement(g_u, list(g_mm), self.tensor_owner, len(mods))
        if self.hp.mode == "dynamic":
            ma, d = loss_decay(self.ma, self.last, self.started, lval, self.hp.ema)
            score = self.hp.score_weight * d + (1 - self.hp.score_weight) * s.double()
            # m* = the first maximum on ties (dataset order), as a one-hot on the device (no host read)
            onehot = (torch.arange(len(mods), device=loss.device) == torch.argmax(score)).float()
            # fp16: a non-finite clean gradient → no perturbation, no EMA update for this step
            self.ma = torch.where(finite, ma, self.ma)
            self.last = torch.where(finite, lval, self.last)
            self.started = self.started | finite
            self.score = torch.where(finite, score, self.score)
            self.d, self.s = torch.where(finite, d, self.d), torch.where(finite, s.double(), self.s)
        else:
            d = torch.zeros_like(lval)
            score = s.double()
            onehot = torch.ones(len(mods), dtype=torch.float32, device=loss.device)
            self.score, self.d, self.s = score, d, s.double()
        self._keep_perturbed = onehot
        f = perturbation_factor(cos, dot, nmm2, s, self.tensor_owner, len(mods), self.hp.rho,
                                gamma_source=self.hp.gamma_source, direction=self.hp.direction,
                                last_tensor=self.last_tensor) * onehot[self.tensor_owner]
        if ctx.accelerator.scaler is not None:  # fp16 overflow: ε = 0 (a NaN·0 would still be NaN)
            f = torch.where(finite, f, torch.zeros_like(f))
            g_mm = [torch.where(finite, g, torch.zeros_like(g)) for g in g_mm]
        deltas = [fi * g for fi, g in zip(f.unbind(), g_mm)]
        eps_norm = torch.stack(torch._foreach_norm(deltas)).norm()
        self._handle = ctx.perturb(self.enc_flat, deltas)
        with ctx.frozen_norm_stats():
            out2 = ctx.forward(batch)
            u2 = self.uni(ctx, out2, y)
            loss2 = ctx.task.loss(out2.logits, y) + sum(unimodal_losses(ctx, u2, y).values())
        ctx.log_many(self._keys, torch.cat([score.float(), d.float(), s.float(), onehot,
                                            eps_norm.reshape(1), (loss2 - loss).detach().float().reshape(1)]))
        logs["masam/loss_fused"] = loss_fused.detach()
        return StepOutput(loss2, out2, logs)

    def after_backward(self, ctx: StepContext) -> None:
        """Restore θ exactly, then the clean gradient for every non-encoder parameter (and, with
        ``others_grad=clean``, for the encoders that were not perturbed)."""
        if self._handle is None:
            return
        self._handle.restore()
        self._handle = None
        for p, g in zip(self.other, self._clean):
            if p.grad is None:
                p.grad = g.to(p.dtype).clone()
            else:
                p.grad.copy_(g)
        if self.hp.others_grad == "clean" and self.hp.mode == "dynamic":
            keep = self._keep_perturbed
            for p, g, k in zip(self.enc_flat, self._clean_enc, self._tensor_owner_list):
                g = g.to(p.dtype)
                p.grad = g.clone() if p.grad is None else torch.where(keep[k] > 0, p.grad, g)
            self._clean_enc = None
        self._clean = None

    # ------------------------------------------------------------------ state
    _STATE = ("ma", "last", "started", "score", "d", "s")

    def state_dict(self) -> dict[str, Any]:
        """MA and last (the EMA runs across epochs: exact resume needs them), the started flag, and the
        last step's A, d, s (compared across ranks by the DDP test)."""
        if self.ma is None:
            return {}
        return {k: getattr(self, k).detach().cpu().clone() for k in self._STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        dev = self.ma.device if self.ma is not None else torch.device("cpu")
        for k in self._STATE:
            setattr(self, k, state[k].to(dev))

    def metrics(self) -> dict[str, float]:
        """The last step's A_m, d_m, s_m and MA_m (one host read per epoch)."""
        if self.ma is None:
            return {}
        vals = torch.stack([self.score, self.d, self.s, self.ma]).tolist()
        return {f"{k}_{m}": v for k, row in zip(("A", "d", "s", "ma"), vals) for m, v in zip(self._mods, row)}
