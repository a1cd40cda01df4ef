"""End-of-run diagnostics on the selected checkpoint: linear probes (a), Shapley values (b) and the
permutation contribution (c). Works on a constructed :class:`~mmbalance.engine.Trainer` whose model
holds the selected weights (the engine's ``_finish`` and ``diagnose --recompute`` both call it)."""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data import TensorSplit
from . import probes as P
from .isolation import isolated
from .seeds import fingerprint, seed_hash, stratified_subset
from .shapley import shapley, share_and_index, subset_key
from .splits import batches, permuted, split_labels, stratify_keys, subset


def oriented(task, metrics: dict[str, float]) -> float:
    """v = primary metric if higher is better, else −metric."""
    x = float(metrics[task.primary_metric])
    return x if task.higher_is_better else -x


# ----------------------------------------------------------------------------- prior predictor
def prior_metrics(trainer, split) -> dict[str, float]:
    """Metrics of the constant prior predictor on ``split`` (no model pass): classification = log
    training class frequencies (argmax = majority class, ties → lowest index); regression = the
    training-target median; segmentation = background everywhere."""
    task, data = trainer.task, trainer.data
    meter = task.new_meter()
    const: torch.Tensor | None = None
    if task.name == "classification":
        y = split_labels(data.train).long()
        freq = torch.bincount(y, minlength=task.num_classes).double() / len(y)
        const = freq.clamp_min(1e-12).log().float()
    elif task.name == "regression":
        const = split_labels(data.train).float().reshape(-1).median().reshape(1)
    for b in batches(split, trainer.cfg.eval_batch_size, torch.device("cpu")):
        y = b["label"]
        if task.name == "segmentation":
            logits = torch.zeros((y.shape[0], task.num_classes, *y.shape[1:]))
            logits[:, 0] = 1.0
        else:
            logits = const.expand(y.shape[0], -1).clone()
        meter.update(logits, y)
    return meter.compute()


# ----------------------------------------------------------------------------- features
@torch.no_grad()
def extract_features(trainer, split) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """Frozen features of every modality from a normal forward (all modalities present), eval mode:
    ``pooled[m]`` [N, d] for vectors/sequences, ``features[m]`` [N, C, h, w] for maps (segmentation)."""
    model = trainer.ctx.raw_model
    mods = trainer.ctx.modalities
    device = trainer.accelerator.device
    feats: dict[str, list[np.ndarray]] = {m: [] for m in mods}
    labels = []
    with isolated(model, train_mode=False):
        for b in batches(split, trainer.cfg.eval_batch_size, device):
            out = model({m: b[m] for m in mods})
            for m in mods:
                z = out.features[m] if model.feature_kinds.get(m) == "map" else out.pooled[m]
                feats[m].append(z.detach().to("cpu", torch.float64).numpy())
            labels.append(b["label"].cpu())
    return {m: np.concatenate(v) for m, v in feats.items()}, torch.cat(labels)


def _pixel_rows(z: np.ndarray, y: np.ndarray, per_slice: int, rs: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``per_slice`` pixels of each slice (half foreground when present): ([n, C], [n])."""
    zs, ys = [], []
    for i in range(len(y)):
        lab = y[i].reshape(-1)
        fg, bg = np.flatnonzero(lab > 0), np.flatnonzero(lab == 0)
        n_fg = min(len(fg), per_slice // 2) if len(fg) else 0
        n_bg = min(len(bg), per_slice - n_fg)
        pick = np.concatenate([rs.choice(fg, n_fg, replace=False) if n_fg else np.zeros(0, int),
                               rs.choice(bg, n_bg, replace=False) if n_bg else np.zeros(0, int)])
        zs.append(z[i].reshape(z.shape[1], -1)[:, pick].T)
        ys.append(lab[pick])
    return np.concatenate(zs), np.concatenate(ys)


def _to_label_size(z: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    if tuple(z.shape[2:]) == tuple(size):
        return z
    return F.interpolate(torch.from_numpy(z), size=size, mode="bilinear", align_corners=False).numpy()


def _score(task, logits: np.ndarray, labels: torch.Tensor) -> dict[str, float]:
    meter = task.new_meter()
    meter.update(torch.from_numpy(np.ascontiguousarray(logits)).float(), labels)
    return meter.compute()


def run_probes(trainer, split_seed: int, splits: dict[str, Any]) -> dict[str, Any]:
    """Linear probe of each frozen encoder: fit on TRAIN (label-stratified cap at ``diag_probe_max``),
    scored on each split of ``splits`` through the task meter."""
    task, cfg, data = trainer.task, trainer.cfg, trainer.data
    y_all = split_labels(data.train)
    fit_idx = stratified_subset(stratify_keys(y_all, task.name), cfg.diag_probe_max, seed_hash(split_seed, "probe"))
    if task.name == "segmentation":  # pixel rows: cap the slices so that rows ≤ diag_probe_max
        n_slices = max(1, cfg.diag_probe_max // max(1, cfg.diag_probe_pixels))
        fit_idx = fit_idx if len(fit_idx) <= n_slices else stratified_subset(
            stratify_keys(y_all, task.name), n_slices, seed_hash(split_seed, "probe"))
    z_fit, y_fit = extract_features(trainer, subset(data.train, fit_idx))
    scored = {name: extract_features(trainer, s) for name, s in splits.items()}
    out: dict[str, Any] = {"solver": P.SOLVER if task.name != "regression" else "ridge", "lambda": P.LAMBDA,
                           "n_fit": int(len(fit_idx)), "fit_fingerprint": fingerprint(fit_idx),
                           "converged": {}, "iterations": {}, **{name: {} for name in splits}}
    for m in trainer.ctx.modalities:
        if task.name == "segmentation":
            size = tuple(y_fit.shape[1:])
            rs = np.random.RandomState(seed_hash(split_seed, "pixels"))
            zx, yx = _pixel_rows(_to_label_size(z_fit[m], size), y_fit.numpy(), cfg.diag_probe_pixels, rs)
            probe = P.fit_logreg(zx, yx, task.num_classes)
        elif task.name == "classification":
            probe = P.fit_logreg(z_fit[m].reshape(len(y_fit), -1), y_fit.numpy(), task.num_classes)
        else:
            probe = P.fit_ridge(z_fit[m].reshape(len(y_fit), -1), y_fit.numpy().reshape(-1))
        out["converged"][m], out["iterations"][m] = probe.converged, probe.iterations
        for name, (zs, ys) in scored.items():
            if task.name == "segmentation":
                zm = _to_label_size(zs[m], tuple(ys.shape[1:]))
                c = zm.shape[1]
                flat = zm.transpose(0, 2, 3, 1).reshape(-1, c)
                logits = probe.logits(flat).reshape(zm.shape[0], zm.shape[2], zm.shape[3], -1).transpose(0, 3, 1, 2)
            else:
                logits = probe.logits(zs[m].reshape(len(ys), -1))
            out[name][m] = _score(task, logits, ys)
    return out


# ----------------------------------------------------------------------------- Shapley
def all_absent_value(trainer, split) -> float | None:
    """v with every modality absent (a constant prediction), or None for a predictor that has no
    output without any modality (QMF's fused output is a sum over present modalities)."""
    try:
        return oriented(trainer.task, trainer.evaluate(split, tuple(trainer.ctx.modalities)))
    except (AttributeError, TypeError, ValueError, RuntimeError, ZeroDivisionError):
        return None


def shapley_on_split(trainer, split, known: dict[str, dict[str, float]], split_seed: int) -> dict[str, Any]:
    """φ from ``absent`` evaluations. ``known`` maps subset keys to metrics already computed (the
    normal pass and the per-modality passes); every other subset is evaluated once."""
    task, cfg = trainer.task, trainer.cfg
    mods = trainer.ctx.modalities
    values: dict[str, float] = {k: oriented(task, v) for k, v in known.items()}
    v_prior = oriented(task, prior_metrics(trainer, split))
    v_all_absent = all_absent_value(trainer, split)
    use_all_absent = cfg.diag_shapley_empty == "all_absent" and v_all_absent is not None
    v_empty = v_all_absent if use_all_absent else v_prior

    def value(s: tuple[str, ...]) -> float:
        key = subset_key(s, mods)
        if key == "none":
            values["none"] = v_empty
            return v_empty
        if key not in values:
            values[key] = oriented(task, trainer.evaluate(split, tuple(m for m in mods if m not in s)))
        return values[key]

    phi, how = shapley(value, mods, n_orderings=cfg.diag_mc_permutations, seed=seed_hash(split_seed, "shapley"))
    share, index = share_and_index(phi)
    order = {subset_key(s, mods): None for s in _subsets_sorted(mods)}
    return {"method": how, "v": {k: values[k] for k in order if k in values}, "phi": phi, "share": share,
            "imbalance_index": index, "v_all_absent": v_all_absent, "v_prior": v_prior,
            "v_empty_rule": "all_absent" if use_all_absent else "train_prior"}


def _subsets_sorted(mods: list[str]) -> list[tuple[str, ...]]:
    from .shapley import all_subsets

    return all_subsets(mods)


# ----------------------------------------------------------------------------- permutation
def permutation_contribution(trainer, split, v_full: float, v_empty: float, split_seed: int) -> dict[str, Any]:
    """drop_m = v(M) − mean_k v(split with modality m's rows permuted by π_k) (whole split)."""
    task, cfg = trainer.task, trainer.cfg
    mods = trainer.ctx.modalities
    n = len(split)
    base = trainer._on_device(split) if isinstance(split, TensorSplit) else split
    out: dict[str, Any] = {"k": cfg.diag_permutations, "drop": {}, "rel_drop": {}, "v_perm": {}}
    digest = []
    for j, m in enumerate(mods):
        vs = []
        for k in range(1, cfg.diag_permutations + 1):
            perm = np.random.RandomState(seed_hash(split_seed, "perm", j, k)).permutation(n)
            digest.append(perm)
            ps = permuted(base, m, perm)
            try:
                vs.append(oriented(task, trainer.evaluate(ps)))
            finally:
                trainer.__dict__.get("_device_splits", {}).pop(id(ps), None)
        out["v_perm"][m] = vs
        drop = v_full - (sum(vs) / len(vs)) if vs else math.nan
        out["drop"][m] = drop
        den = v_full - v_empty
        out["rel_drop"][m] = drop / den if den > 0 and vs else None
    out["fingerprint"] = fingerprint(np.concatenate(digest)) if digest else None
    return out


# ----------------------------------------------------------------------------- all of it
def final_diagnostics(trainer, *, test: dict[str, float], val: dict[str, float],
                      test_pm: dict[str, dict[str, float]], val_pm: dict[str, dict[str, float]],
                      level: str) -> dict[str, Any]:
    """The ``diagnostics`` block of result.json (computed on every rank: the evaluation passes are
    collective; the probes run on the main process only)."""
    task, data = trainer.task, trainer.data
    mods = trainer.ctx.modalities
    split_seed = int(data.info.get("split_seed", 0))
    seconds = {"probe": 0.0, "shapley": 0.0, "permutation": 0.0}
    out: dict[str, Any] = {"version": 1, "level": level}
    t = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        sh: dict[str, Any] = {"metric": task.primary_metric, "oriented": True,
                              "v_empty_rule": "train_prior" if trainer.cfg.diag_shapley_empty == "prior" else "all_absent"}
        for name, split, full, pm in (("test", data.test, test, test_pm), ("val", data.val, val, val_pm)):
            if full is None:  # a tuning trial: the test split is never touched
                continue
            known = {"+".join(mods): full}
            if len(mods) > 1:
                known.update({m: r for m, r in pm.items() if m in mods})
            sh[name] = shapley_on_split(trainer, split, known, split_seed)
        sh["method"] = sh["val"]["method"]
        out["shapley"] = sh
        seconds["shapley"] = time.perf_counter() - t
        t = time.perf_counter()
        out["permutation"] = {"k": trainer.cfg.diag_permutations, "test": None if test is None else
                              permutation_contribution(trainer, data.test, oriented(task, test),
                                                       sh["test"]["v"]["none"], split_seed)}
        seconds["permutation"] = time.perf_counter() - t
        t = time.perf_counter()
        scored = {"val": data.val} if test is None else {"val": data.val, "test": data.test}
        out["probe"] = run_probes(trainer, split_seed, scored) if trainer.accelerator.is_main_process else None
        seconds["probe"] = time.perf_counter() - t
    out["seconds"] = seconds
    return out
