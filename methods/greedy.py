"""Greedy — balanced multimodal learning against greedy learning (docs/methods/greedy.md; Wu et al.,
ICML 2022; official code nyukat/greedy_multimodal_learning@a190e03, ``Bias_Mitigation_Strong``).

Model: the ``mmtm`` variant of the canonical model (``mmbalance.models.mmtm``; ``configure_model``
switches mlp_concat → mlp_mmtm, seq_transformer → seq_mmtm, conv_seg → conv_mmtm, msa_transformer → msa_mmtm
(MOSI, IEMOCAP, Food-101), deeplab_multi → deeplab_mmtm (BraTS)). Loss Σ_m ℓ(ŷ_m, y);
prediction mean_m ŷ_m (greedy.md §2.2). After each backward: conditional learning speeds from the
(all-reduced) gradients of the main/bypass parameter groups decide whether the next ``window`` steps
re-balance (the caring branch's gates replaced by their running average; §2.3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from mmbalance.data import ModelSpec, MultimodalData
from mmbalance.errors import MethodNotApplicable
from mmbalance.interface import BalancingMethod, StepContext, StepOutput
from mmbalance.models.mmtm import MMTMModel
from mmbalance.registry import register_method
from mmbalance.search import LogUniform

MMTM_VARIANTS = {"mlp_concat": "mlp_mmtm", "mlp_transformer_fusion": "mlp_mmtm", "seq_transformer": "seq_mmtm",
                 "conv_seg": "conv_mmtm", "av_gru_mlp": "av_gru_mlp_mmtm", "msa_transformer": "msa_mmtm",
                 "deeplab_multi": "deeplab_mmtm", "av_resnet18": "av_resnet18_mmtm"}


def group_ratio(params: list[torch.nn.Parameter]) -> float:
    """r_G = Σ_{p∈G} ‖∇p‖² / Σ_{p∈G} ‖p‖² (ratio of sums, greedy.md §2.3); parameters without a
    gradient contribute 0 to the numerator."""
    return group_ratios({"g": params})["g"]


def group_ratios(groups: dict[str, list[torch.nn.Parameter]]) -> dict[str, float]:
    """``group_ratio`` of every group with ONE host read: the per-parameter float32 sums of squares are
    computed on the device, stacked, read once, and summed in Python in the same order (identical)."""
    parts: list[torch.Tensor] = []
    layout: list[tuple[str, int, int]] = []
    for name, params in groups.items():
        nums = [p.grad.detach().float().pow(2).sum() for p in params if p.grad is not None]
        dens = [p.detach().float().pow(2).sum() for p in params]
        layout.append((name, len(nums), len(dens)))
        parts += nums + dens
    host = torch.stack(parts).tolist() if parts else []
    out, i = {}, 0
    for name, n_num, n_den in layout:
        num = sum(host[i:i + n_num])
        den = sum(host[i + n_num:i + n_num + n_den])
        i += n_num + n_den
        out[name] = num / den if den > 0 else 0.0
    return out


def speeds(acc: dict[str, float], modalities: list[str]) -> list[float]:
    """s_m = log10(A_{bypass_m} / A_{main_m}) (greedy.md §2.3 step 2)."""
    out = []
    for m in modalities:
        b, a = acc.get(f"bypass_{m}", 0.0), acc.get(f"main_{m}", 0.0)
        out.append(math.log10(b / a) if a > 0 and b > 0 else 0.0)
    return out


def caring_branch(s: list[float], epsilon: float) -> int | None:
    """Re-balance when max_m s_m − min_m s_m > ε, caring branch = argmax_m s_m (greedy.md §2.3 step 4;
    M = 2: |s_0 − s_1| > ε, c = 0 if s_0 − s_1 > 0 else 1, the official rule)."""
    if len(s) < 2 or not max(s) - min(s) > epsilon:
        return None
    return max(range(len(s)), key=lambda k: (s[k], -k))


@dataclass
class GreedyHParams:
    """greedy.md §4: ``epsilon`` ε = 0.01 (official ``configs/training_guided.gin``; ∞ in
    ``greedy_vanilla``), ``window`` Q = 5 steps (official), ``start_epoch`` 2 (official),
    ``mmtm_ratio`` 4 (official), ``gate_avg`` ``cumulative`` (official, restricted to training
    forwards) or ``ema`` with ``ema_beta``; ``mode``: ``guided`` (official ``Bias_Mitigation_Strong``)
    or ``random`` (``Bias_Mitigation_Random``, preset ``greedy_random``)."""

    epsilon: float = field(default=0.01, metadata={"search": LogUniform(0.003, 0.1)})
    window: int = 5
    start_epoch: int = 2
    mmtm_ratio: int = 4
    gate_avg: Literal["cumulative", "ema"] = "cumulative"
    ema_beta: float = 0.99
    mode: Literal["guided", "random"] = "guided"

    def validate(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.mmtm_ratio < 1:
            raise ValueError(f"mmtm_ratio must be >= 1, got {self.mmtm_ratio}")


@dataclass
class GreedyState:
    """The re-balancing state machine (greedy.md §2.3), checkpointed."""

    acc: dict[str, float] = field(default_factory=dict)
    caring: int | None = None  # mode of the NEXT forward
    remaining: int = 0  # re-balancing steps left (guided mode)
    last_d: float = float("nan")  # speed range used for the last decision
    rebalance_steps: int = 0
    normal_steps: int = 0


@register_method("greedy", "Greedy: MMTM mid-fusion with conditional-learning-speed re-balancing (model variant mmtm)")
@register_method("greedy_vanilla", "Greedy's MMTM model and per-branch loss without re-balancing (ε = ∞)",
                 epsilon=math.inf)
@register_method("greedy_random", "Greedy with random re-balancing (official Bias_Mitigation_Random)", mode="random")
class Greedy(BalancingMethod):
    """greedy.md §2-3."""

    name = "greedy"
    hparams_cls = GreedyHParams
    min_modalities = 2
    find_unused_parameters = True

    def __init__(self, hparams: Any = None) -> None:
        super().__init__(hparams)
        self.state = GreedyState()
        self._groups: dict[str, list[torch.nn.Parameter]] = {}
        self._mods: list[str] = []
        self._rebalanced_this_step = False

    def configure_model(self, spec: ModelSpec, data: MultimodalData) -> ModelSpec:
        """The mmtm variant of the dataset's canonical model (greedy.md §3.1)."""
        # ratio is passed only when it differs from the builders' default (4), so that a user override
        # model.name=<canonical> reaches setup() and is refused there with the spec's message.
        kwargs = {**spec.kwargs, **({"ratio": self.hp.mmtm_ratio} if self.hp.mmtm_ratio != 4 else {})}
        if spec.name.endswith("_mmtm"):
            return replace(spec, kwargs=kwargs)
        if spec.name not in MMTM_VARIANTS:
            raise MethodNotApplicable(f"greedy: model {spec.name!r} has no MMTM variant (Greedy needs MMTM mid-fusion "
                                      f"blocks and one head per branch); models with one: "
                                      f"{', '.join(sorted(MMTM_VARIANTS))}")
        return replace(spec, name=MMTM_VARIANTS[spec.name], kwargs=kwargs)

    def setup(self, ctx: StepContext) -> None:
        model = ctx.raw_model
        if not isinstance(model, MMTMModel) or not len(model.mmtm_blocks):
            raise MethodNotApplicable(f"greedy: model {type(model).__name__} exposes no MMTM blocks; leave model.name "
                                      f"unset (Greedy selects the MMTM variant itself) or name one of "
                                      f"{', '.join(sorted(set(MMTM_VARIANTS.values())))}")
        self._groups = model.greedy_groups()
        self._mods = list(model.modalities)

    # ---------------------------------------------------------------- training
    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        model: MMTMModel = ctx.raw_model
        st = self.state
        if self.hp.mode == "random":  # official Bias_Mitigation_Random: per step uniform over {normal, care k}
            st.caring = None
            if ctx.epoch >= self.hp.start_epoch:
                pick = int(torch.randint(len(self._mods) + 1, (1,), generator=ctx.generator))
                st.caring = None if pick == 0 else pick - 1
        model.set_rebalance(st.caring)
        self._rebalanced_this_step = st.caring is not None
        out = ctx.forward(batch)
        y = batch["label"]
        losses = [ctx.task.loss(out.fused[:, k], y) for k in range(len(self._mods))]
        loss = torch.stack(losses).sum()
        self._update_gate_averages(ctx, model)
        logs: dict[str, Any] = {f"loss_{m}": v.detach() for m, v in zip(self._mods, losses)}
        logs["rebalancing"] = float(self._rebalanced_this_step)
        return StepOutput(loss, out, logs)

    def _update_gate_averages(self, ctx: StepContext, model: MMTMModel) -> None:
        """ḡ_m from the SUM-reduced gate sums and batch sizes (greedy.md §9): identical on every rank.
        The batch size rides in the same buffer as the sums (one reduction, made on the device: no host
        read or host→device copy per step)."""
        for block in model.mmtm_blocks:
            if block.last_gate_sum is None:
                continue
            sums = [s.detach() for s in block.last_gate_sum]
            flat = torch.cat([*sums, sums[0].new_full((1,), float(block.last_count))]).to(torch.float64)
            total = ctx.reduce_sum(flat).to(block.gate_avg(0).device)
            parts = list(torch.split(total[:-1], block.dims))
            block.update_running_average(parts, total[-1], self.hp.gate_avg, self.hp.ema_beta)
            block.last_gate_sum = None

    def after_backward(self, ctx: StepContext) -> None:
        """r_G on all-reduced gradients → A → next step's mode (greedy.md §2.3)."""
        st = self.state
        if self._rebalanced_this_step:  # no accumulation during re-balancing steps
            st.rebalance_steps += 1
            if self.hp.mode == "guided":
                st.remaining -= 1
                if st.remaining <= 0:
                    st.caring, st.remaining = None, 0
            return
        ratios = group_ratios(self._groups)  # the next step's mode is a host decision: one read per step
        if not all(math.isfinite(r) for r in ratios.values()):  # fp16 overflow step: skipped by the scaler
            return
        self.observe(ratios, ctx.epoch)

    def observe(self, ratios: dict[str, float], epoch: int) -> None:
        """One normal step's ratios: accumulate A, then (from ``start_epoch``) decide the next mode."""
        st = self.state
        st.normal_steps += 1
        for name, r in ratios.items():
            st.acc[name] = st.acc.get(name, 0.0) + r
        if self.hp.mode != "guided" or epoch < self.hp.start_epoch:
            return
        s = speeds(st.acc, self._mods)
        st.last_d = max(s) - min(s)
        c = caring_branch(s, self.hp.epsilon)
        if c is not None:
            st.caring, st.remaining = c, self.hp.window

    @torch.no_grad()
    def predict(self, ctx: StepContext, batch: dict[str, torch.Tensor], absent: tuple[str, ...] = ()) -> torch.Tensor:
        """mean_m ŷ_m with every branch gated normally (re-balancing is a training-time mode)."""
        ctx.raw_model.set_rebalance(None)
        return ctx.forward(batch, absent).logits

    # ---------------------------------------------------------------- state and logs
    def state_dict(self) -> dict[str, Any]:
        return {"greedy": dict(self.state.__dict__, acc=dict(self.state.acc))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "greedy" in state:
            self.state = GreedyState(**state["greedy"])

    def metrics(self) -> dict[str, float]:
        s = speeds(self.state.acc, self._mods) if self._mods else []
        out = {f"speed_{m}": v for m, v in zip(self._mods, s)}
        out["speed_range_last_decision"] = self.state.last_d
        out["rebalance_steps"] = float(self.state.rebalance_steps)
        return out
