"""The engine's one entry point: :class:`Diagnostics`, a small hook object the training loop calls
(``before_step``, ``after_backward``, ``after_edit``, ``end_epoch``, ``final``). Methods implement
nothing. With ``train.diagnostics=none`` every hook returns at once. Nothing here changes training:
RNG streams are forked, buffers restored, ``.grad`` never written."""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from .dynamics import GradNormMeter, Outputs, gradient_alignment, ratio_to_others, true_class_confidence
from .final import all_absent_value, final_diagnostics, oriented, prior_metrics, run_probes
from .isolation import isolated
from .seeds import fingerprint, seed_hash, stratified_subset
from .shapley import exact_shapley, subset_key
from .splits import batches, split_labels, stratify_keys, subset

LEVELS = ("default", "none", "full")


class Diagnostics:
    """Per-run diagnostics recorder (see docs/diagnostics.md for every definition)."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.cfg = trainer.cfg
        self.level = self.cfg.diagnostics
        self.enabled = self.level != "none"
        self.step_seconds = 0.0
        self.epoch_seconds_total = 0.0
        if not self.enabled:
            return
        ctx = trainer.ctx
        raw = ctx.raw_model
        self.mods = list(ctx.modalities)
        self.split_seed = int(trainer.data.info.get("split_seed", 0))
        groups = {m: [p for p in raw.encoder_parameters(m)] for m in self.mods}
        try:
            groups["head"] = list(raw.final_layer().parameters())
        except Exception:  # a model without a final layer (e.g. an ensemble) has no head group
            pass
        self.norms = GradNormMeter(groups, trainer.accelerator.device)
        self.outputs = Outputs(trainer)
        self.cos: list[torch.Tensor] = []
        self._probe_steps: set[int] = set()
        self._subset = None
        self._tau = None
        self._val_prior: float | None = None

    # ------------------------------------------------------------------ per step (hot path)
    def start_epoch(self) -> None:
        if not self.enabled:
            return
        self.norms.reset()
        self.outputs.refresh()
        self.cos = []
        s, k = max(1, self.trainer.ctx.steps_per_epoch), self.cfg.diag_cos_per_epoch
        self._probe_steps = {(j * s) // k for j in range(k)} if k > 0 else set()
        self.step_seconds = 0.0

    def before_step(self, step: int, batch: dict[str, torch.Tensor]) -> None:
        """Gradient alignment on this batch at the epoch's probe steps, before the method's forward."""
        if not self.enabled or step not in self._probe_steps:
            return
        t = time.perf_counter()
        self.cos.append(gradient_alignment(self.outputs, self.trainer.task, batch, self.mods))
        self.step_seconds += time.perf_counter() - t

    def after_backward(self) -> None:
        """Raw gradient norms (after backward and the fp16 unscale, before the method's edits)."""
        if self.enabled:
            t = time.perf_counter()
            self.norms.observe_raw()
            self.step_seconds += time.perf_counter() - t

    def after_edit(self, unchanged: bool = False) -> None:
        """Gradient norms after ``after_backward`` (the method's edits), before clipping; ``unchanged``: the
        method has no ``after_backward``, so they are the raw norms of this step."""
        if self.enabled:
            t = time.perf_counter()
            self.norms.observe_edited(unchanged)
            self.step_seconds += time.perf_counter() - t

    def pop_step_seconds(self) -> float:
        """Seconds spent inside the training steps this epoch (subtracted from train_seconds)."""
        s, self.step_seconds = self.step_seconds, 0.0
        return s if self.enabled else 0.0

    # ------------------------------------------------------------------ per epoch
    def end_epoch(self, row: dict[str, Any], step_seconds: float) -> None:
        """Adds ``row["diag"]``: gradient norms, confidences, alignment, val Shapley (M ≤ 3), probes
        (``full``). Collective in DDP (every rank calls it)."""
        if not self.enabled:
            return
        t = time.perf_counter()
        acc = self.trainer.accelerator
        d: dict[str, Any] = self.norms.summary()
        conf = self._confidence()
        d["conf"] = conf
        d["conf_ratio"] = ratio_to_others(conf)
        d.update(self._alignment_summary(acc))
        # validation φ per epoch: free for M = 2 (the epoch's passes are every coalition); M = 3 needs three
        # more validation passes per epoch, so only with `full`
        max_m = 3 if self.level == "full" else 2
        if "val_per_modality" in row and "val" in row and 1 < len(self.mods) <= max_m:
            d["shapley_val"] = self._shapley_val(row["val"], row["val_per_modality"])
        elif "val" in row and len(self.mods) == 1:
            d["shapley_val"] = {self.mods[0]: oriented(self.trainer.task, row["val"]) - self._prior_val()}
        ctx = self.trainer.ctx
        last = ctx.epoch + 1 >= ctx.epochs_in_phase
        if self.level == "full" and "val" in row and ((ctx.epoch + 1) % self.cfg.diag_probe_every == 0 or last):
            with torch.random.fork_rng(devices=self._devices()):
                p = run_probes(self.trainer, self.split_seed, {"val": self.trainer.data.val}) \
                    if acc.is_main_process else None
            if p is not None:
                d["probe_val"] = p["val"]
        d["seconds"] = step_seconds + time.perf_counter() - t
        self.epoch_seconds_total += d["seconds"]
        row["diag"] = d

    def _devices(self) -> list[int]:
        return [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []

    def _alignment_summary(self, acc) -> dict[str, dict[str, float]]:
        k = len(self.mods)
        dev = acc.device
        if self.cos:
            c = torch.stack(self.cos).to(torch.float64)  # [probes, M]
            finite = torch.isfinite(c)
            stats = torch.stack([torch.where(finite, c, 0).sum(0), finite.sum(0).double(),
                                 (finite & (c < 0)).sum(0).double()])
        else:
            stats = torch.zeros(3, k, dtype=torch.float64, device=dev)
        if acc.num_processes > 1:  # logging only: the mean over ranks of rank-local batches
            stats = acc.reduce(stats.to(dev), reduction="sum")
        s, n, neg = stats.cpu().tolist()
        return {"cos_uni_fused": {m: (s[i] / n[i] if n[i] > 0 else math.nan) for i, m in enumerate(self.mods)},
                "conflict_rate": {m: (neg[i] / n[i] if n[i] > 0 else math.nan) for i, m in enumerate(self.mods)}}

    def _diag_subset(self):
        if self._subset is None:
            data, task = self.trainer.data, self.trainer.task
            y = split_labels(data.train)
            idx = stratified_subset(stratify_keys(y, task.name), self.cfg.diag_subset, seed_hash(self.split_seed, "subset"))
            self._subset = (subset(data.train, idx), fingerprint(idx))
            if task.name == "regression":
                yy = y.double().reshape(-1)
                self._tau = float((yy - yy.median()).abs().mean())
        return self._subset[0]

    @torch.no_grad()
    def _confidence(self) -> dict[str, float]:
        """conf[m] = mean over the diagnostic subset D of the unimodal output's confidence in the truth."""
        trainer = self.trainer
        sums = {m: torch.zeros((), dtype=torch.float64) for m in self.mods}
        count = 0.0
        with isolated(*self.outputs.modules, train_mode=False):
            for b in batches(self._diag_subset(), trainer.cfg.eval_batch_size, trainer.accelerator.device):
                _, uni = self.outputs(b, self.mods)
                for m in self.mods:
                    s, n = true_class_confidence(trainer.task, uni[m], b["label"], self._tau or 1.0)
                    sums[m] += s.cpu()
                count += float(n)
        return {m: float(sums[m]) / max(count, 1.0) for m in self.mods}

    def _prior_val(self) -> float:
        if self._val_prior is None:
            self._val_prior = oriented(self.trainer.task, prior_metrics(self.trainer, self.trainer.data.val))
        return self._val_prior

    def _shapley_val(self, val: dict[str, float], val_pm: dict[str, dict[str, float]]) -> dict[str, float]:
        """Per-epoch validation φ (M ≤ 3), reusing the epoch's full and per-modality passes."""
        trainer, task = self.trainer, self.trainer.task
        values = {"+".join(self.mods): oriented(task, val)}
        values.update({m: oriented(task, r) for m, r in val_pm.items()})
        absent_all = all_absent_value(trainer, trainer.data.val) if self.cfg.diag_shapley_empty == "all_absent" else None
        values["none"] = absent_all if absent_all is not None else self._prior_val()

        def value(s: tuple[str, ...]) -> float:
            key = subset_key(s, self.mods)
            if key not in values:
                values[key] = oriented(task, trainer.evaluate(trainer.data.val, tuple(m for m in self.mods if m not in s)))
            return values[key]

        with torch.random.fork_rng(devices=self._devices()):
            return exact_shapley(value, self.mods)

    # ------------------------------------------------------------------ end of run
    def final(self, *, test, val, test_pm, val_pm, history: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The result.json ``diagnostics`` block, or None with ``none``."""
        if not self.enabled:
            return None
        out = final_diagnostics(self.trainer, test=test, val=val, test_pm=test_pm, val_pm=val_pm, level=self.level)
        rows = [r for r in history if "diag" in r]
        out["seconds"]["dynamics"] = float(sum(r["diag"].get("seconds", 0.0) for r in rows))
        if rows:
            last = rows[-1]["diag"]
            out["dynamics_final"] = {k: last.get(k, {}) for k in ("conf_ratio", "grad_ratio", "cos_uni_fused")}
        self._diag_subset()
        out["fingerprints"] = {"subset": self._subset[1], "probe": (out.get("probe") or {}).get("fit_fingerprint"),
                               "permutation": (out["permutation"]["test"] or {}).get("fingerprint")}
        return out


def total_seconds(block: dict[str, Any] | None) -> float:
    """timings.diagnostics_seconds: the sum of the block's component seconds."""
    if not block:
        return 0.0
    return float(sum(v for v in block.get("seconds", {}).values() if isinstance(v, (int, float)) and np.isfinite(v)))
