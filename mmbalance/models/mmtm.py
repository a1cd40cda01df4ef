"""MMTM mid-fusion blocks generalised to M branches and the ``mmtm`` variant of the canonical models
(docs/methods/greedy.md §2.1, §3.1; MMTM of Joze et al. as used by Wu et al., ICML 2022).

Each modality is a branch of stages with its own head; branches exchange information only through
MMTM blocks placed after chosen stages. Registered builders: ``mlp_mmtm`` (mfeat / vector synthetic:
MMTM after the hidden and the output layer of the MLP), ``seq_mmtm`` (sequence transformer encoders:
MMTM after the last three encoder layers, or all when fewer), ``conv_mmtm`` (conv segmentation
encoders: MMTM after each conv block). Prediction = mean of branch outputs (greedy.md §2.2).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..registry import register_model
from .base import ModelOutput, MultimodalModel, pool_feature
from .encoders import MLPEncoder, SequenceTransformerEncoder
from .heads import LinearHead, ResidualHead


def _squeeze(f: torch.Tensor, kind: str) -> torch.Tensor:
    """q_m: global average over every non-channel axis (greedy.md §2.1 step 1)."""
    if kind == "vector":
        return f
    if kind == "sequence":  # [B, L, c]
        return f.mean(dim=1)
    return f.flatten(2).mean(-1)  # [B, c, H, W]


def _gate_shape(g: torch.Tensor, f: torch.Tensor, kind: str) -> torch.Tensor:
    """Broadcast a [B, c] (or [c]) gate over the non-channel axes of f."""
    if g.dim() == 1:
        g = g.unsqueeze(0)
    if kind == "sequence":
        return g.unsqueeze(1)
    if kind == "map":
        return g.reshape(g.shape[0], g.shape[1], *([1] * (f.dim() - 2)))
    return g


class MMTMBlock(nn.Module):
    """e = ReLU(W_sq·[q_1; …; q_M] + b_sq), g_m = σ(W_m·e + b_m), F_m ← F_m ⊙ g_m (greedy.md §2.1).

    ``caring`` (None or a branch index): re-balancing mode — g_caring is replaced by sg(ḡ_caring)
    (step 6). Training forwards record the per-branch gate sums and the batch size
    (``last_gate_sum``, ``last_count``); the running averages ``gate_avg_<m>`` (buffers, checkpointed)
    are updated from them by :meth:`update_running_average` (the method all-reduces first), never
    from evaluation forwards (greedy.md §7 bug 2) and each from its own branch (§7 bug 1).
    """

    def __init__(self, dims: list[int], kinds: list[str], ratio: int = 4) -> None:
        super().__init__()
        self.dims, self.kinds = list(dims), list(kinds)
        hidden = max(1, sum(dims) // ratio)
        self.squeeze = nn.Linear(sum(dims), hidden)
        self.excite = nn.ModuleList(nn.Linear(hidden, c) for c in dims)
        for k, c in enumerate(dims):
            self.register_buffer(f"gate_avg_{k}", torch.zeros(c))
        self.register_buffer("gate_updates", torch.zeros((), dtype=torch.long))
        self.caring: int | None = None
        self.last_gate_sum: list[torch.Tensor] | None = None
        self.last_count = 0

    def gate_avg(self, k: int) -> torch.Tensor:
        return getattr(self, f"gate_avg_{k}")

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        q = torch.cat([_squeeze(f, kind) for f, kind in zip(feats, self.kinds)], dim=-1)
        e = torch.relu(self.squeeze(q))
        out, sums = [], []
        for k, (f, kind) in enumerate(zip(feats, self.kinds)):
            if self.caring == k:
                g_live = None
                with torch.no_grad():  # ḡ is still computed from this branch's own gate
                    g_rec = torch.sigmoid(self.excite[k](e))
                g = self.gate_avg(k).detach().clone().to(f.dtype)
            else:
                g_live = torch.sigmoid(self.excite[k](e))
                g_rec = g_live.detach()
                g = g_live
            sums.append(g_rec.float().sum(dim=0))
            out.append(f * _gate_shape(g, f, kind))
        if self.training:
            self.last_gate_sum, self.last_count = sums, q.shape[0]
        return out

    @torch.no_grad()
    def update_running_average(self, gate_sums: list[torch.Tensor], count: float | torch.Tensor,
                               mode: str = "cumulative", ema_beta: float = 0.99) -> None:
        """ḡ_m ← cumulative mean (or EMA) of the batch-mean gates ``gate_sums[m]/count`` (greedy.md §2.1 step 5).
        On the device: the update count n stays a buffer (the EMA's first update, n = 0, is the mean,
        chosen by ``torch.where``), so no host read per step."""
        n = self.gate_updates
        for k, s in enumerate(gate_sums):
            mean = (s / count).to(self.gate_avg(k).dtype)
            avg = self.gate_avg(k)
            cumulative = avg + (mean - avg) / (n + 1)
            if mode == "ema":
                avg.copy_(torch.where(n > 0, avg * ema_beta + (1 - ema_beta) * mean, cumulative))
            else:
                avg.copy_(cumulative)
        self.gate_updates += 1


class MMTMModel(MultimodalModel):
    """Branches ``encoders[m]`` (an ``nn.ModuleList`` of stages), MMTM blocks after the stages listed in
    ``positions``, per-branch heads ``heads[m]``. ``fused`` = branch outputs stacked on axis 1,
    ``logits`` = their mean (greedy.md §2.2)."""

    def __init__(self, branches: dict[str, nn.ModuleList], heads: dict[str, nn.Module], positions: list[int],
                 stage_dims: dict[str, list[int]], *, feature_kinds: dict[str, str], feature_dims: dict[str, int],
                 out_dim: int, ratio: int = 4) -> None:
        mods = list(branches)
        kinds = [feature_kinds[m] for m in mods]
        blocks = nn.ModuleList(MMTMBlock([stage_dims[m][p] for m in mods], kinds, ratio) for p in positions)
        super().__init__(dict(branches), blocks, nn.ModuleDict(heads), feature_kinds=feature_kinds,
                         feature_dims=feature_dims, out_dim=out_dim, fusion_input="features")
        self.positions = list(positions)
        self.variant = "mmtm"

    @property
    def mmtm_blocks(self) -> nn.ModuleList:
        return self.fusion  # type: ignore[return-value]

    @property
    def heads(self) -> nn.ModuleDict:
        return self.head  # type: ignore[return-value]

    def set_rebalance(self, caring: int | None) -> None:
        """Re-balancing flag of every MMTM block: None = normal, k = branch k cares (greedy.md §3)."""
        for b in self.mmtm_blocks:
            b.caring = caring

    def encode(self, inputs: dict[str, torch.Tensor], absent: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        absent = set(absent)
        h = {m: self.neutral_input(m, inputs[m]) if m in absent else inputs[m] for m in self.modalities}
        n_stages = len(self.encoders[self.modalities[0]])
        blocks = iter(self.mmtm_blocks)
        for s in range(n_stages):
            h = {m: self.encoders[m][s](h[m]) for m in self.modalities}
            if s in self.positions:
                gated = next(blocks)([h[m] for m in self.modalities])
                h = dict(zip(self.modalities, gated))
        return h

    def forward(self, inputs: dict[str, torch.Tensor], absent: Iterable[str] = ()) -> ModelOutput:
        features = self.encode(inputs, absent)
        pooled = {m: self.pool(m, z) for m, z in features.items()}
        outs = torch.stack([self.heads[m](features[m]) for m in self.modalities], dim=1)
        return ModelOutput(features, pooled, outs, outs.mean(dim=1))

    # ---------------------------------------------------------------- greedy.md §2.3 parameter groups
    def greedy_groups(self) -> dict[str, list[nn.Parameter]]:
        """``main_<m>``: branch m's trunk and head; ``bypass_<m>``: W_m, b_m of every MMTM block plus
        every shared squeeze parameter W_sq, b_sq (shared parameters count in every bypass group)."""
        groups: dict[str, list[nn.Parameter]] = {}
        shared = [p for b in self.mmtm_blocks for p in b.squeeze.parameters()]
        for k, m in enumerate(self.modalities):
            groups[f"main_{m}"] = list(self.encoders[m].parameters()) + list(self.heads[m].parameters())
            groups[f"bypass_{m}"] = [p for b in self.mmtm_blocks for p in b.excite[k].parameters()] + shared
        return groups

    def final_layer(self) -> nn.Module:
        return self.heads[self.modalities[0]]

    def split_head(self) -> None:
        return None

    def encoder_parameters(self, m: str) -> Iterator[nn.Parameter]:
        return self.encoders[m].parameters()


class _SeqInput(nn.Module):
    """Projection + scaled sinusoidal positions + embedding dropout of :class:`SequenceTransformerEncoder`."""

    def __init__(self, enc: SequenceTransformerEncoder) -> None:
        super().__init__()
        self.proj, self.embed_dropout, self.scale = enc.proj, enc.embed_dropout, enc.scale
        self.register_buffer("positions", enc.positions, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x.transpose(1, 2)).transpose(1, 2)
        return self.embed_dropout(self.scale * h + self.positions[: h.shape[1]].to(h.dtype))


class _PosZeroHead(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(pool_feature(z, "sequence"))


class _PooledHead(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)


@register_model("mlp_mmtm", "mmtm variant of mlp_concat: per-view MLP branches, MMTM after both layers, one head per branch")
def mlp_mmtm(*, modalities: list[str], input_shapes: dict[str, tuple[int, ...]], out_dim: int, enc_hidden: int = 128,
             enc_out: int = 64, dropout: float = 0.0, ratio: int = 4, **_ignored: Any) -> MMTMModel:
    """greedy.md §3.1 mfeat row: MLP(d→128→64), MMTM after the 128- and the 64-wide layer, Linear(64, C)."""
    branches, heads, dims = {}, {}, {}
    for m in modalities:
        enc = MLPEncoder(input_shapes[m][-1], enc_hidden, enc_out, dropout)
        layers = list(enc)
        cut = layers.index(next(x for x in layers if isinstance(x, nn.ReLU))) + 1
        branches[m] = nn.ModuleList([nn.Sequential(*layers[:cut]), nn.Sequential(*layers[cut:])])
        heads[m] = _PooledHead(LinearHead(enc_out, out_dim))
        dims[m] = [enc_hidden, enc_out]
    return MMTMModel(branches, heads, [0, 1], dims, feature_kinds={m: "vector" for m in modalities},
                     feature_dims={m: enc_out for m in modalities}, out_dim=out_dim, ratio=ratio)


@register_model("seq_mmtm", "mmtm variant of seq_transformer: MMTM after the last 3 encoder layers, residual head per branch")
def seq_mmtm(*, modalities: list[str], input_shapes: dict[str, tuple[int, ...]], out_dim: int, d_model: int = 40,
             encoder_layers: int = 4, num_heads: int = 8, dropout: float = 0.1, embed_dropout: float = 0.25,
             out_dropout: float = 0.0, max_len: int = 2048, ratio: int = 4, **_ignored: Any) -> MMTMModel:
    """greedy.md §3.1 MOSI/IEMOCAP/Food-101 rows: Conv1d projection + TransformerEncoder per branch,
    MMTM (mean over time) after the last three layers, position 0 → residual head per branch."""
    branches, heads, dims = {}, {}, {}
    for m in modalities:
        enc = SequenceTransformerEncoder(input_shapes[m][-1], d_model, encoder_layers, num_heads, dropout,
                                         embed_dropout, max_len)
        stages: list[nn.Module] = [_SeqInput(enc), *enc.layers.layers]
        branches[m] = nn.ModuleList(stages)
        heads[m] = _PosZeroHead(ResidualHead(d_model, out_dim, out_dropout))
        dims[m] = [d_model] * len(stages)
    positions = list(range(max(1, encoder_layers - 2), encoder_layers + 1))
    return MMTMModel(branches, heads, positions, dims, feature_kinds={m: "sequence" for m in modalities},
                     feature_dims={m: d_model for m in modalities}, out_dim=out_dim, ratio=ratio)


class _ConvBlock(nn.Sequential):
    def __init__(self, in_ch: int, width: int) -> None:
        super().__init__(nn.Conv2d(in_ch, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())


class _ConvHead(nn.Module):
    """3×3 conv block → 1×1 conv to class logits (the conv_seg head, one per branch)."""

    def __init__(self, in_ch: int, out_dim: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(width, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


@register_model("conv_mmtm", "mmtm variant of conv_seg: conv branches, MMTM (spatial squeeze) after each block, decoder per branch")
def conv_mmtm(*, modalities: list[str], input_shapes: dict[str, tuple[int, ...]], out_dim: int, width: int = 16,
              head_width: int = 32, ratio: int = 4, **_ignored: Any) -> MMTMModel:
    """greedy.md §3.1 segmentation row at the scale of ``conv_seg``: two conv blocks per branch with MMTM
    after each, and each branch its own conv head (the prediction averages branch logit maps, §5)."""
    branches = {m: nn.ModuleList([_ConvBlock(input_shapes[m][0], width), _ConvBlock(width, width)]) for m in modalities}
    heads = {m: _ConvHead(width, out_dim, head_width) for m in modalities}
    return MMTMModel(branches, heads, [0, 1], {m: [width, width] for m in modalities},
                     feature_kinds={m: "map" for m in modalities}, feature_dims={m: width for m in modalities},
                     out_dim=out_dim, ratio=ratio)
