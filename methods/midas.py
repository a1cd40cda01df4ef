"""MIDAS — Misalignment-based Data Augmentation Strategy (docs/methods/midas.md; Hwang, Choi, Whang, NeurIPS
2025, arXiv 2509.25831). No official code could be inspected: this follows the paper (§3, Algorithm 1,
App. A.2–A.3) and every choice it leaves open is a switch.

After a warm-up that trains the encoders and separate unimodal heads g_m only (L = Σ_m CE(g_m(f^m), y)),
each step builds misaligned samples by swapping one modality's features with those of a sample of another
class, labels each with the confidence-weighted mixture ỹ = Σ_m α_m·c̃^m·e_{y(m)} (c̃^m = a_m/Σ_k a_k,
a_m = the unimodal head's true-class probability on its own source sample; §3.3), weights it by the
hard-sample factor h = 1 + (cos(f_i^m, f_j^m) + 1)/2 of the replaced modality (§3.5), and trains
L = mean_i[CE_i + U_i] + λ·mean_x̃ h·CE(p̃, ỹ) (Eq. 11). The weak-modality weight α_m̂ of the modality with
the lowest mean c̃ grows by η·(mean c̃^m̂ − mean r) while the fused model under-predicts its class
(Eq. 5–7, Algorithm 1 lines 18–20), floored at 1; every other α is 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from mmbalance.methods._unimodal import UnimodalOutputs

from mmbalance.errors import MethodNotApplicable
from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.registry import register_method
from mmbalance.search import LogUniform

__all__ = ["MIDAS", "MIDASHParams", "alpha_update", "draw_sources", "hard_weights", "misaligned_loss", "soft_weights"]

REGRESSION_REASON = ("MIDAS labels a misaligned sample with a confidence-weighted mixture of two source class labels; "
                     "a regression target has neither class confidences nor class mixtures (the paper restricts "
                     "MIDAS to classification)")
SEGMENTATION_REASON = ("swapping one modality between two images pairs unregistered anatomy, and the paper defines "
                       "no per-pixel mixture of two label maps")


@dataclass
class MIDASHParams:
    """Hyperparameters (paper App. A.3, Tables 2, 6, 8; no official code).

    - ``lam`` (λ) 1: weight of the misaligned loss (5 for Kinetics-Sounds; Table 6: too large collapses).
    - ``eta`` (η) 0.05: step of the weak-modality weight, all data sets.
    - ``warmup_epochs`` (E_w): None = max(1, round(0.1·E)), at most E − 1 (unstated in the paper); 0 = no
      warm-up (ablation "W").
    - ``pairing`` ``different_label``: per sample a partner drawn among the other-class samples of the
      batch (§3.2); ``shuffle_mask``: one permutation, same-label pairs dropped (Algorithm 1's "shuffling").
    - ``alpha_signal`` ``difference`` (§3.4 prose: batch-averaged difference) or ``sign`` (transcription).
    - ``alpha_reset`` ``epoch`` (Algorithm 1 line 9: α = 1 at every epoch start) or ``never``.
    - ``weak_weight``, ``hard_weight``: the α update and the factor h (ablations "WM", "HS").
    - ``swap_level`` ``feature`` (A.3: swap encoder outputs) or ``input`` (re-encode swapped inputs, A.4).
    - ``n_mis`` 2: both swap directions per sample (§3.2 "symmetrically"); 1: swap the last modality only.
    """

    lam: float = field(default=1.0, metadata={"search": LogUniform(0.5, 5.0)})
    eta: float = field(default=0.05, metadata={"search": LogUniform(0.01, 0.1)})
    warmup_epochs: int | None = None
    pairing: Literal["different_label", "shuffle_mask"] = "different_label"
    alpha_signal: Literal["difference", "sign"] = "difference"
    alpha_reset: Literal["epoch", "never"] = "epoch"
    weak_weight: bool = True
    hard_weight: bool = True
    swap_level: Literal["feature", "input"] = "feature"
    n_mis: int = 2

    def validate(self) -> None:
        if self.lam < 0 or self.eta < 0:
            raise ValueError(f"lam and eta must be >= 0, got {self.lam}, {self.eta}")
        if self.warmup_epochs is not None and self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0 or None (auto), got {self.warmup_epochs}")
        if self.n_mis not in (1, 2):
            raise ValueError(f"n_mis must be 1 or 2, got {self.n_mis}")


# ---------------------------------------------------------------------------------------- the pieces
def _partner(y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample a uniformly random partner with another label (§3.2): (index [B], has_one [B] bool)."""
    B = y.shape[0]
    other = y[None, :] != y[:, None]
    score = torch.rand(B, B, generator=generator, device=y.device).masked_fill(~other, -1.0)
    return score.argmax(1), other.any(1)


def draw_sources(y: torch.Tensor, n_modalities: int, generator: torch.Generator, pairing: str = "different_label",
                 n_mis: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The misaligned rows: (src [K, M] — the batch sample each modality comes from, anchor [K] — the
    sample i the row was built for, valid [K] bool — the row mixes at least two labels).

    M = 2: x̃^(2) = (f_i^1, f_j^2) and, with ``n_mis=2``, x̃^(1) = (f_j^1, f_i^2) (§3.2, "symmetrically").
    M ≥ 3 (App. A.2): sources {i, j_1, …, j_{M−1}} (j_1 from ``pairing``, the others uniform over the batch)
    assigned to the modalities by a uniformly random permutation, ``n_mis`` draws per sample."""
    B, M, dev = y.shape[0], n_modalities, y.device
    i = torch.arange(B, device=dev)
    rows_src, rows_anchor = [], []
    for _ in range(n_mis if M > 2 else 1):
        if pairing == "different_label":
            j, _ = _partner(y, generator)
        else:
            j = torch.randperm(B, generator=generator, device=dev)
        if M == 2:
            rows_src.append(torch.stack([i, j], 1))
            rows_anchor.append(i)
            if n_mis == 2:
                rows_src.append(torch.stack([j, i], 1))
                rows_anchor.append(i)
            continue
        others = torch.randint(B, (B, M - 2), generator=generator, device=dev)
        sources = torch.cat([i[:, None], j[:, None], others], 1)
        perm = torch.rand(B, M, generator=generator, device=dev).argsort(1)
        rows_src.append(sources.gather(1, perm))
        rows_anchor.append(i)
    src, anchor = torch.cat(rows_src), torch.cat(rows_anchor)
    labels = y[src]
    valid = (labels != labels[:, :1]).any(1)
    return src, anchor, valid


def soft_weights(a: torch.Tensor) -> torch.Tensor:
    """c̃^m = a_m / Σ_k a_k over the sources of each row (Eq. 2–3; a = (0.9, 0.3) → (0.75, 0.25))."""
    return a / a.sum(1, keepdim=True).clamp_min(1e-12)


def hard_weights(pooled: dict[str, torch.Tensor], src: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """h = 1 + (s̃ + 1)/2 ∈ [1, 2] per row (§3.5, Eq. 10): s̃ the mean, over the replaced modalities m
    (src_m ≠ anchor), of cos(f_anchor^m, f_src^m) — the replaced feature against the swapped-in one."""
    sims, counts = 0.0, 0.0
    for k, m in enumerate(pooled):
        f = pooled[m].float().flatten(1)  # the caller runs this under no_grad: h is a constant
        replaced = (src[:, k] != anchor).float()
        cos = F.cosine_similarity(f[anchor], f[src[:, k]], dim=1)
        sims = sims + replaced * cos
        counts = counts + replaced
    s = sims / torch.as_tensor(counts).clamp_min(1.0)
    return 1.0 + (s + 1.0) / 2.0


def misaligned_loss(logits: torch.Tensor, labels: torch.Tensor, c: torch.Tensor, alpha: torch.Tensor,
                    h: torch.Tensor) -> torch.Tensor:
    """ℓ_mis per row (Eq. 10): h·[−Σ_c (Σ_m α_m·c̃^m·e_{y(m)})_c·log p̃_c], the α-weighted target not
    renormalised; float32."""
    logp = F.log_softmax(logits.float(), dim=1)
    picked = logp.gather(1, labels)  # [K, M]: log p̃ of each source's class
    return -h * (alpha[None, :] * c * picked).sum(1)


def alpha_update(alpha: torch.Tensor, c_sum: torch.Tensor, r_sum: torch.Tensor, count: torch.Tensor, eta: float,
                 signal: str = "difference") -> torch.Tensor:
    """§3.4 (Eq. 5–7): m̂ = argmin_m mean c̃^m; Δ = mean c̃^m̂ − mean r_m̂ (or its sign);
    α_m̂ ← max(1, α_m̂ + η·Δ) and every other α = 1. No misaligned row (count 0): α unchanged."""
    m_hat = c_sum.argmin()
    n = count.clamp_min(1.0)
    delta = (c_sum[m_hat] - r_sum[m_hat]) / n
    if signal == "sign":
        delta = torch.sign(delta)
    raised = (alpha.gather(0, m_hat[None]) + eta * delta).clamp_min(1.0)
    new = torch.where(F.one_hot(m_hat, alpha.numel()).bool(), raised.to(alpha.dtype), torch.ones_like(alpha))
    return torch.where(count > 0, new, alpha)


# ---------------------------------------------------------------------------------------- the method
@register_method("midas", "MIDAS: misaligned feature swaps labelled by unimodal-confidence soft labels, with "
                          "weak-modality and hard-sample weights (paper only)")
class MIDAS(BalancingMethod):
    name = "midas"
    hparams_cls = MIDASHParams
    supported_tasks = frozenset({"classification"})
    unsupported_reason = {"regression": REGRESSION_REASON, "segmentation": SEGMENTATION_REASON}
    min_modalities = 2
    find_unused_parameters = True  # the fused head gets no gradient during the warm-up

    def __init__(self, hparams: MIDASHParams | None = None) -> None:
        super().__init__(hparams)
        self.alpha: torch.Tensor | None = None
        self.t = 0
        self._loaded: torch.Tensor | None = None
        self._stats: torch.Tensor | None = None  # the last α update's SUM-reduced statistics
        self.last: dict[str, Any] = {}

    def setup(self, ctx: StepContext) -> None:
        model = ctx.raw_model
        if getattr(model, "variant", "canonical") == "mmtm" and self.hp.swap_level == "feature":
            raise MethodNotApplicable("midas: MMTM mixes modalities inside the encoders, so a swapped feature still "
                                      "carries its own sample's other modality; use swap_level=input")
        self.mods = list(ctx.modalities)
        self.uni = UnimodalOutputs("linear", "midas", "midas_heads")  # separate heads g_m (§3.1)
        self.uni.setup(ctx)

    def warmup(self, ctx: StepContext) -> int:
        if self.hp.warmup_epochs is not None:
            return self.hp.warmup_epochs
        E = ctx.epochs_in_phase
        return 0 if E < 2 else min(max(1, round(0.1 * E)), E - 1)

    def _alpha(self, ctx: StepContext) -> torch.Tensor:
        if self.alpha is None:
            self.alpha = (self._loaded.to(ctx.device) if self._loaded is not None
                          else torch.ones(len(self.mods), device=ctx.device))
        return self.alpha

    def on_epoch_start(self, ctx: StepContext) -> None:
        if self.hp.alpha_reset == "epoch":  # Algorithm 1 line 9
            self.alpha = torch.ones(len(self.mods), device=ctx.device)

    # ------------------------------------------------------------------ training
    def misaligned_logits(self, ctx: StepContext, batch: dict[str, torch.Tensor], out: Any,
                          src: torch.Tensor) -> torch.Tensor:
        """Fused logits of the misaligned rows: swapped encoder outputs through fusion and head
        (``feature``), or the swapped raw inputs through the whole model (``input``)."""
        if self.hp.swap_level == "input":
            swapped = {m: batch[m].index_select(0, src[:, k]) for k, m in enumerate(self.mods)}
            return ctx.forward(swapped).logits
        feats = {m: out.features[m].index_select(0, src[:, k]) for k, m in enumerate(self.mods)}
        pooled = {m: out.pooled[m].index_select(0, src[:, k]) for k, m in enumerate(self.mods)}
        return ctx.raw_model.fuse_and_head(feats, pooled)[1]

    def draw(self, ctx: StepContext, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rank-local pairing within this rank's shard (the paper uses one GPU)."""
        return draw_sources(y, len(self.mods), ctx.device_generator, self.hp.pairing, self.hp.n_mis)

    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        y = batch["label"]
        out = ctx.forward(batch)
        u = self.uni(ctx, out, y)
        loss_uni = sum(F.cross_entropy(um.float(), y) for um in u.values())
        if ctx.epoch < self.warmup(ctx):  # encoders and unimodal heads only (Algorithm 1 lines 3–7)
            return StepOutput(loss_uni, out, {"midas/loss_uni": loss_uni.detach(), "midas/warmup": 1.0})
        alpha = self._alpha(ctx)
        loss_fused = F.cross_entropy(out.logits.float(), y)
        src, anchor, valid = self.draw(ctx, y)
        logits_mis = self.misaligned_logits(ctx, batch, out, src)
        labels = y[src]  # [K, M]: the class each modality's source carries
        with torch.no_grad():  # targets and weights are constants (§3.3, §3.5)
            conf = torch.stack([um.detach().float().softmax(1).gather(1, y[:, None]).squeeze(1) for um in u.values()], 1)
            c = soft_weights(conf.gather(0, src))  # a_m = conf of modality m on its own source sample
            h = hard_weights(out.pooled, src, anchor) if self.hp.hard_weight else torch.ones_like(c[:, 0])
        w = valid.float()
        n_valid = w.sum()
        per_row = misaligned_loss(logits_mis, labels, c, alpha, h)
        loss_mis = (w * per_row).sum() / n_valid.clamp_min(1.0)
        loss = loss_fused + loss_uni + self.hp.lam * loss_mis
        self.last = {"src": src, "anchor": anchor, "valid": valid, "c": c, "h": h, "alpha": alpha,
                     "logits_mis": logits_mis.detach()}
        if self.hp.weak_weight:
            with torch.no_grad():
                p = logits_mis.detach().float().softmax(1).gather(1, labels)  # [K, M]: p̃ of each source class
                r = p / p.sum(1, keepdim=True).clamp_min(1e-12)
                local = torch.cat([(w[:, None] * c).sum(0), (w[:, None] * r).sum(0), n_valid[None]])
                stats = ctx.reduce_sum(local)  # SUM over ranks: α identical everywhere
                M = len(self.mods)
                self._stats = stats
                self.alpha = alpha_update(alpha, stats[:M], stats[M:2 * M], stats[-1], self.hp.eta,
                                          self.hp.alpha_signal).to(alpha.dtype)
        self.t += 1
        ctx.log_many([f"midas/alpha_{m}" for m in self.mods] + [f"midas/c_{m}" for m in self.mods],
                     torch.cat([alpha, (w[:, None] * c).sum(0) / n_valid.clamp_min(1.0)]).float())
        logs = {"midas/loss_mis": loss_mis.detach(), "midas/loss_fused": loss_fused.detach(),
                "midas/loss_uni": loss_uni.detach(), "midas/skipped": 1.0 - n_valid / w.numel(), "midas/warmup": 0.0}
        return StepOutput(loss, out, logs)

    # ------------------------------------------------------------------ state
    def metrics(self) -> dict[str, float]:
        """The current weak-modality weights α and the last update's global statistics (mean c̃_m and
        mean r_m over every rank's misaligned rows; identical on every rank), and the step counter."""
        out: dict[str, float] = {"t": float(self.t)}
        if self.alpha is not None:
            out.update({f"alpha_{m}": v for m, v in zip(self.mods, self.alpha.tolist())})
        if self._stats is not None:
            M = len(self.mods)
            vals = self._stats.tolist()
            n = max(vals[-1], 1.0)
            out.update({f"c_mean_{m}": vals[k] / n for k, m in enumerate(self.mods)})
            out.update({f"r_mean_{m}": vals[M + k] / n for k, m in enumerate(self.mods)})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": None if self.alpha is None else self.alpha.detach().cpu(), "t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = state.get("alpha")
        self.alpha = None
        self.t = int(state.get("t", 0))
