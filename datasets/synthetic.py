"""Synthetic multimodal data with a planted, controllable imbalance (labelled synthetic everywhere).

Modality 0 ("fast") carries a strong, easy signal about part of the target; the other modalities
carry complementary information with more noise, so a jointly trained model leans on modality 0
and under-trains the rest — the failure mode balancing methods address. ``imbalance`` scales the
SNR gap. Tasks: classification, regression, segmentation; vector or sequence features.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mmbalance.data import ModelSpec, MultimodalData, TensorSplit, stratified_split
from mmbalance.data.splits import quantile_bins
from mmbalance.errors import ConfigError
from mmbalance.registry import register_dataset


@dataclass
class SyntheticOptions:
    """``n_modalities`` ≥ 1; ``task``; ``n_samples``; ``dim`` per modality; ``feature``: vector or
    sequence (length ``seq_len``); ``imbalance``: SNR ratio of the fast modality to the others;
    ``num_classes`` (classification); ``image_size`` (segmentation); ``seed``: data-generation seed;
    ``split_seed``: the 70/10/20 split; ``noise_modalities``: extra modalities ``n0, n1, …`` of
    label-independent N(0, 1) noise shaped like the others (a planted useless modality, for the
    diagnostics tests; drawn from their own stream so the informative views do not change)."""

    n_modalities: int = 3
    task: Literal["classification", "regression", "segmentation"] = "classification"
    n_samples: int = 600
    dim: int = 16
    feature: Literal["vector", "sequence"] = "vector"
    seq_len: int = 8
    imbalance: float = 4.0
    num_classes: int = 4
    image_size: int = 16
    seed: int = 0
    split_seed: int = 0
    noise_modalities: int = 0

    def validate(self) -> None:
        if self.n_modalities < 1:
            raise ConfigError(f"synthetic: n_modalities must be >= 1, got {self.n_modalities}")
        if self.n_samples < 20:
            raise ConfigError(f"synthetic: n_samples must be >= 20, got {self.n_samples}")
        if self.noise_modalities < 0:
            raise ConfigError(f"synthetic: noise_modalities must be >= 0, got {self.noise_modalities}")
        if self.task == "classification" and self.num_classes < 2:
            raise ConfigError("synthetic: num_classes must be >= 2")


def _vector_views(rs: np.random.RandomState, latent: np.ndarray, o: SyntheticOptions) -> list[np.ndarray]:
    """latent [N, K]: modality 0 sees the first half of the latent factors with high SNR, the others
    see the second half (split among them) with low SNR; every view adds random-projection noise."""
    n, k = latent.shape
    half = max(1, k // 2)
    views = []
    for m in range(o.n_modalities):
        cols = np.arange(half) if m == 0 else np.arange(half, k) if k > half else np.arange(k)
        if m > 0 and o.n_modalities > 2 and len(cols) >= o.n_modalities - 1:
            cols = np.array_split(cols, o.n_modalities - 1)[m - 1]
        snr = o.imbalance if m == 0 else 1.0
        proj = rs.normal(size=(len(cols), o.dim)) / np.sqrt(len(cols))
        x = snr * latent[:, cols] @ proj + rs.normal(size=(n, o.dim))
        if o.feature == "sequence":
            t = rs.normal(size=(n, o.seq_len, o.dim)) * 0.5
            x = x[:, None, :] + t
        views.append(x.astype(np.float32))
    return views


def build(options: SyntheticOptions, data_dir: str | Path | None = None) -> MultimodalData:
    o = options
    rs = np.random.RandomState(o.seed)
    names = [f"m{i}" for i in range(o.n_modalities)]
    n = o.n_samples
    if o.task == "segmentation":
        inputs, labels = _segmentation(rs, o)
        keys = (labels > 0).reshape(n, -1).mean(1)
        keys = quantile_bins(keys, 5)
        task_kwargs = {"num_classes": 4}
        model = ModelSpec("conv_seg", {"width": 8, "head_width": 16})
        shapes = {m: (1, o.image_size, o.image_size) for m in names}
        out_dim = 4
    else:
        k = 4
        latent = rs.normal(size=(n, k))
        if o.task == "classification":
            # class = sign pattern of two fast-visible and two slow-visible factors, folded to num_classes
            code = (latent[:, 0] > 0) * 1 + (latent[:, 2] > 0) * 2 + (latent[:, 1] > 0) * 4 + (latent[:, 3] > 0) * 8
            labels = (code % o.num_classes).astype(np.int64)
            keys = labels
            task_kwargs = {"num_classes": o.num_classes}
            out_dim = o.num_classes
        else:
            labels = (1.5 * latent[:, 0] + 0.5 * latent[:, 1] + 1.0 * latent[:, 2] + 0.8 * latent[:, 3]).astype(np.float32)
            labels = np.clip(labels, -3, 3)
            keys = quantile_bins(labels)
            task_kwargs = {}
            out_dim = 1
        views = _vector_views(rs, latent, o)
        inputs = dict(zip(names, views))
        if o.feature == "sequence":
            model = ModelSpec("seq_transformer", {"d_model": 16, "encoder_layers": 1, "fusion_layers": 1, "num_heads": 2,
                                                  "embed_dropout": 0.0, "dropout": 0.0})
            shapes = {m: (o.seq_len, o.dim) for m in names}
        else:
            model = ModelSpec("mlp_concat", {"enc_hidden": 32, "enc_out": 16})
            shapes = {m: (o.dim,) for m in names}
    if o.noise_modalities:
        noise_rs = np.random.RandomState(o.seed + 7777)
        first = inputs[names[0]]
        for j in range(o.noise_modalities):
            inputs[f"n{j}"] = noise_rs.normal(size=first.shape).astype(np.float32)
            shapes[f"n{j}"] = shapes[names[0]]
        names = names + [f"n{j}" for j in range(o.noise_modalities)]
    tr, va, te = stratified_split(keys, [0.7, 0.1, 0.2], o.split_seed)
    y = torch.as_tensor(labels)
    xs = {m: torch.as_tensor(x) for m, x in inputs.items()}

    def split(idx: np.ndarray) -> TensorSplit:
        t = torch.as_tensor(idx)
        return TensorSplit({m: x[t] for m, x in xs.items()}, y[t])

    return MultimodalData(
        modalities=names, task=o.task, task_kwargs=task_kwargs, train=split(tr), val=split(va), test=split(te),
        input_shapes=shapes, out_dim=out_dim, model=model,
        train_defaults={"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 32,
                        "epochs": 10, "eval_batch_size": 256},
        info={"synthetic": True, "split_seed": o.split_seed, "description": "SYNTHETIC data with planted imbalance (m0 fast)"},
        synthetic=True,
    )


def _segmentation(rs: np.random.RandomState, o: SyntheticOptions) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Phantom tumours: nested discs (WT ⊃ TC ⊃ ET, classes 1..3 after remap); modality 0 shows the
    whole tumour strongly, the others show the inner sub-regions with more noise."""
    n, s = o.n_samples, o.image_size
    yy, xx = np.mgrid[0:s, 0:s]
    labels = np.zeros((n, s, s), dtype=np.int64)
    maps = [np.zeros((n, 1, s, s), dtype=np.float32) for _ in range(o.n_modalities)]
    for i in range(n):
        cy, cx = rs.uniform(s * 0.3, s * 0.7, size=2)
        r = rs.uniform(s * 0.15, s * 0.3)
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        wt, tc, et = d < r, d < 0.65 * r, d < 0.35 * r
        lab = np.zeros((s, s), dtype=np.int64)
        lab[wt] = 2
        lab[tc] = 1
        lab[et] = 3
        labels[i] = lab
        for m in range(o.n_modalities):
            region = wt if m == 0 else (tc if m % 2 else et)
            amp = o.imbalance if m == 0 else 1.0
            maps[m][i, 0] = amp * region + rs.normal(size=(s, s))
    return {f"m{m}": maps[m] for m in range(o.n_modalities)}, labels


build.options_cls = SyntheticOptions  # type: ignore[attr-defined]
register_dataset("synthetic", "SYNTHETIC: M modalities with planted imbalance (classification/regression/segmentation)")(build)
register_dataset("synthetic-regression", "SYNTHETIC: 3-modality regression with planted imbalance",
                 task="regression")(build)
register_dataset("synthetic-seg", "SYNTHETIC: 3-modality phantom segmentation with planted imbalance",
                 task="segmentation", n_samples=120)(build)
