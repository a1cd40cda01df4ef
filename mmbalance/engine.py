"""The one training loop, built on ``accelerate.Accelerator``.

Per step: ``method.training_step`` → ``accelerator.backward`` → unscale every optimizer once (fp16) →
``method.after_backward`` → clip (main model) → lr = scheduled × ``lr_mult`` → optimizer steps →
zero grads → ``method.after_step``. Per epoch: ``on_epoch_start`` → steps → ``on_epoch_end`` →
validation (+ per-modality validation) → selection → checkpoint. At the end: load the best
checkpoint and evaluate the test split once.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import preempt, runfiles
from .config import RunConfig, TrainConfig, config_hash, to_jsonable
from .data import TensorBatcher, TensorSplit, carve_heldout, eval_index_shards, make_loader
from .data.batching import collate_dicts
from .data.splits import quantile_bins
from .diagnostics import Diagnostics, total_seconds
from .errors import ConfigError, NonFiniteLossError, RunInterrupted
from .interface import BalancingMethod, BatchGroup, Phase, StepContext
from .registry import create_model
from .tasks import Task, create_task


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """The dataset's optimizer type over ``groups`` (each keeps ``base_lr`` and ``lr_mult``)."""
    lr = cfg.lr if lr is None else lr
    for g in groups:
        g.setdefault("lr", lr)
        g["base_lr"] = g["lr"]
        g.setdefault("lr_mult", 1.0)
    kw = _fused_kwargs(groups, cfg.optimizer)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **kw)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **kw)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **kw)


def _fused_kwargs(groups: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Adam/AdamW: ``fused=True`` (one kernel over all parameters; same update to float rounding);
    SGD: ``foreach=True`` (torch 2.14's fused SGD fails when a parameter first gets a gradient after
    its momentum buffers were created, e.g. MLA's per-modality sub-steps). Only when every parameter
    is a dense floating-point tensor on one CPU/CUDA device; ``MMBALANCE_FUSED_OPTIMIZER=0`` restores
    the per-parameter loop."""
    if os.environ.get("MMBALANCE_FUSED_OPTIMIZER", "1") == "0":
        return {}
    for g in groups:  # materialise generators once (torch does the same) before looking at them
        g["params"] = [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])
    params = [p for g in groups for p in g["params"]]
    if not params or len({p.device for p in params}) != 1 or params[0].device.type not in ("cpu", "cuda"):
        return {}
    if any(p.is_sparse or not p.is_floating_point() for p in params):
        return {}
    return {"foreach": True} if kind == "sgd" else {"fused": True}


class LossWatch:
    """Per-epoch training-loss bookkeeping kept on the device (no host sync per step): each step's loss is
    kept detached (one cheap op per step, stacked into float64 chunks every ``CHUNK`` steps so the number
    of live tensors stays bounded) and read to the host once, at the end of the epoch. The epoch mean is
    the sequential float64 sum of the losses (bit-identical to summing their Python floats); the first
    step whose loss was not finite is reported with that loss."""

    NONE = 2**62
    CHUNK = 512

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pending: list[torch.Tensor] = []  # detached losses since the last chunk
        self._chunks: list[torch.Tensor] = []  # float64 [k] stacks of earlier losses
        self._steps: list[int] = []  # the batch step of every loss, in order
        self._values: list[float] | None = None  # the host copy, read once

    def add(self, loss: torch.Tensor, step: int) -> None:
        self._pending.append(loss.detach())
        self._steps.append(step)
        self._values = None
        if len(self._pending) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            k = len(self._pending)  # reshape: a loss must be a scalar (one value per step)
            self._chunks.append(torch.stack(self._pending).reshape(k).to(torch.float64))
            self._pending = []

    def values(self) -> list[float]:
        """Every loss of the epoch as Python floats: one device-to-host read, cached."""
        if self._values is None:
            self._flush()
            self._values = torch.cat(self._chunks).tolist() if self._chunks else []
        return self._values

    def mean(self, n_steps: int) -> float:
        total = 0.0
        for v in self.values():  # sequential, as the per-step float64 sum it replaces
            total += v
        return total / max(1, n_steps)

    def first_bad(self, acc, collective: bool = True) -> tuple[int | None, float]:
        """(first bad step over all ranks, its loss; NaN when another rank saw it) or (None, 0.0); one
        all-reduce under DDP when ``collective`` (every rank must stop together)."""
        vals = self.values()
        own = next((i for i, v in enumerate(vals) if not math.isfinite(v)), None)
        step = self.NONE if own is None else self._steps[own]
        if collective and acc.num_processes > 1:
            step = int(_all_min(torch.tensor(step, dtype=torch.long, device=acc.device)))
        if step == self.NONE:
            return None, 0.0
        return step, vals[own] if own is not None and self._steps[own] == step else float("nan")


def overrides_hook(method: BalancingMethod, name: str) -> bool:
    """Whether ``method`` replaces the base class's no-op hook ``name`` (in its class or on the instance);
    the loop skips calling a hook that is the base class's own (decided once per epoch)."""
    return name in getattr(method, "__dict__", ()) or getattr(type(method), name) is not getattr(BalancingMethod, name)


def _all_min(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return t


def _host_copy(obj: Any) -> Any:
    """A detached host copy of a (nested) state dict: tensors copied to the CPU, everything else deep-copied,
    so that later training steps cannot change it (what ``torch.save`` would have written at this point)."""
    import copy

    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if type(obj) in (dict, OrderedDict):
        return type(obj)((k, _host_copy(v)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_host_copy(v) for v in obj)
    return copy.deepcopy(obj)


#: The clock of the checkpoint interval (a test replaces it).
_clock = time.monotonic


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """A one-sample tensor [1, ...] repeated to ``n`` samples (a view)."""
    return t.expand(n, *t.shape[1:])


def _env_epochs(name: str, done: int) -> bool:
    """Test hooks: whether the environment variable ``name`` asks to stop after ``done`` epochs."""
    value = os.environ.get(name)
    return bool(value) and done >= int(value)


@dataclass
class LRSchedule:
    """Learning-rate factor (scheduled lr / base lr): step, cosine with linear warm-up, or plateau."""

    cfg: TrainConfig
    epochs: int
    steps_per_epoch: int
    plateau_factor: float = 1.0
    plateau_best: float = math.inf
    plateau_bad: int = 0

    def factor(self, epoch: int, step: int) -> float:
        c = self.cfg
        if c.scheduler == "step":
            return c.gamma ** (epoch // max(1, c.step_size))
        if c.scheduler == "plateau":
            return self.plateau_factor
        if c.scheduler == "cosine":
            t = epoch * self.steps_per_epoch + step
            warm = c.warmup_epochs * self.steps_per_epoch
            total = max(1, self.epochs * self.steps_per_epoch)
            if t < warm:
                if c.warmup_start_lr > 0:  # linear from the start lr at t = 0 (brats2021.md §6)
                    start = c.warmup_start_lr / c.lr
                    return start + (1 - start) * t / warm
                return (t + 1) / warm
            progress = (t - warm) / max(1, total - warm)
            floor = c.min_lr / c.lr
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    def observe_val_loss(self, loss: float) -> None:
        """ReduceLROnPlateau (mode min, threshold 0) on the validation loss."""
        if self.cfg.scheduler != "plateau":
            return
        if loss < self.plateau_best:
            self.plateau_best, self.plateau_bad = loss, 0
        else:
            self.plateau_bad += 1
            if self.plateau_bad > self.cfg.plateau_patience:
                self.plateau_factor *= self.cfg.plateau_factor
                self.plateau_bad = 0

    def state_dict(self) -> dict[str, float]:
        return {"plateau_factor": self.plateau_factor, "plateau_best": self.plateau_best,
                "plateau_bad": self.plateau_bad}

    def load_state_dict(self, s: dict[str, float]) -> None:
        self.plateau_factor, self.plateau_best, self.plateau_bad = s["plateau_factor"], s["plateau_best"], int(s["plateau_bad"])


@dataclass
class Position:
    phase_index: int = 0
    epoch: int = 0  # next epoch to run in the phase
    global_step: int = 0
    best: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0


def make_accelerator(mixed_precision: str, find_unused_parameters: bool, log_with: list[str] | None = None,
                     project_dir: str | Path | None = None):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs

    kwargs = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # Several runs in one single-process Python session (tests, notebooks, the leaderboard): the
        # Accelerator state is a process-wide singleton, so start each run from a clean one.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    try:
        # non_blocking: prepared DataLoaders copy their (pinned, on CUDA) batches to the device asynchronously
        acc = Accelerator(mixed_precision=mixed_precision, kwargs_handlers=[kwargs], log_with=log_with or None,
                          dataloader_config=DataLoaderConfiguration(non_blocking=True),
                          project_dir=str(project_dir) if project_dir is not None else None)
    except ValueError as exc:
        raise ConfigError(f"mixed_precision={mixed_precision!r} is not available here ({exc}); "
                          "use 'bf16' on CPU or 'no'") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if acc.num_processes != world:
        raise RuntimeError(f"accelerate started {acc.num_processes} process(es) but WORLD_SIZE={world}")
    return acc


class Trainer:
    """Runs one method on one dataset with one seed and writes the three run files to ``run_dir``."""

    def __init__(self, config: RunConfig, train_cfg: TrainConfig, data, method: BalancingMethod,
                 run_dir: Path, *, resume: bool = False, accelerator=None, quiet: bool = False,
                 log_with: list[str] | None = None) -> None:
        self.config = config
        self.cfg = method.train_config(train_cfg)  # a preset's own optimizer settings (default: unchanged)
        self.data = data
        self.method = method
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.quiet = quiet
        self.log_with = list(log_with or [])
        self._progress_bar = None
        self._plain_backward: bool | None = None  # decided on the first step (see _backward)
        self.task: Task = create_task(data.task, **data.task_kwargs)
        self.accelerator = accelerator or make_accelerator(train_cfg.mixed_precision, method.find_unused_parameters,
                                                           self.log_with, self.run_dir / "trackers")
        # the hash identifies what is computed, not where files go
        self.hash = config_hash({k: v for k, v in to_jsonable(config).items()
                                 if k not in {"run_dir", "output_dir", "data_dir"}})
        self._build()

    # ------------------------------------------------------------------ construction
    def _model_spec(self):
        spec = self.method.configure_model(self.data.model, self.data)
        overrides = dict(self.config.model)
        name = overrides.pop("name", spec.name)
        kwargs = {**spec.kwargs, **overrides}
        modalities = list(spec.modalities or self.data.modalities)
        return name, kwargs, modalities

    def _build(self) -> None:
        from accelerate.utils import set_seed

        seed = self.config.seed
        acc = self.accelerator
        name, kwargs, modalities = self._model_spec()
        self.method.check_applicable(self.data, modalities)
        set_seed(seed)
        try:
            model = create_model(name, modalities=modalities, input_shapes=self.data.input_shapes,
                                 out_dim=self.data.out_dim, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"model {name!r}: bad option ({exc}); check the 'model.*' settings") from None
        self.model_description = {"name": name, "kwargs": kwargs, "modalities": modalities}
        self.acceleration = self._configure_device(model)
        ctx = StepContext(accelerator=acc, model=model, data=self.data, task=self.task, config=self.config, seed=seed)
        self.ctx = ctx
        self.train_split = self.data.train
        if self.method.needs_heldout:
            self.train_split, ctx.heldout = self._carve_heldout(self.data.train)
        ctx.train_batches = self._train_batch_iterator
        # Method-owned modules come from their own seed stream so the main model's initial weights are
        # identical across methods for a given seed.
        torch.manual_seed(seed + 1_000_003)
        self.method.setup(ctx)
        groups = self.method.param_groups(model)
        if groups is None:
            groups = [{"params": [p for p in model.parameters() if p.requires_grad], "name": "model"}]
        for ex_name, ex in ctx.extra.items():
            if ex.trainable and not ex.own_optimizer:
                groups.append({"params": list(ex.module.parameters()), "name": ex_name})
        optimizer = build_optimizer(groups, self.cfg)
        model, optimizer = acc.prepare(model, optimizer)
        if self.cfg.compile:  # in place: same module object, state_dict keys and submodules
            model.compile(backend=self.cfg.compile_backend)
        ctx.model, ctx.optimizer = model, optimizer
        for ex_name, ex in ctx.extra.items():
            if not ex.trainable:
                ex.module.to(acc.device).eval().requires_grad_(False)
                continue
            ex.module = acc.prepare(ex.module)
            ctx.modules[ex_name] = ex.module
            if ex.own_optimizer:
                opt = build_optimizer([{"params": list(ex.module.parameters())}], self.cfg, ex.lr)
                ex.optimizer = acc.prepare(opt)
        self.loader_train = self._make_train_iterable(self.train_split, self.cfg.batch_size)
        self.diag = Diagnostics(self)  # imbalance diagnostics (train.diagnostics); never changes training
        torch.manual_seed(seed + 2)  # the training RNG stream (dropout) is the same for every method

    def _configure_device(self, model: torch.nn.Module) -> dict[str, Any]:
        """CUDA speed settings (``train.tf32``, ``train.cudnn_benchmark``, ``train.channels_last``; none of them
        applies on the CPU, where runs stay bit-reproducible) and ``train.compile``. Returns what was applied
        (recorded in config.json as ``acceleration``)."""
        cfg = self.cfg
        cuda = self.accelerator.device.type == "cuda"
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
            torch.backends.cudnn.allow_tf32 = cfg.tf32
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        convs = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        channels_last = cuda and cfg.channels_last and convs
        if channels_last:  # 4-D parameters in NHWC; convolutions then return NHWC activations (cuDNN's fast path)
            model.to(memory_format=torch.channels_last)
        return {"device": self.accelerator.device.type, "tf32": cuda and cfg.tf32,
                "cudnn_benchmark": cuda and cfg.cudnn_benchmark, "channels_last": channels_last,
                "compile": cfg.compile and cfg.compile_backend}

    def _carve_heldout(self, split):
        """Held-out part of TRAIN, seeded by the dataset's resolved split seed (same for every method)."""
        seed = int(self.data.info.get("split_seed", 0))
        if not isinstance(split, TensorSplit):
            from .data.containers import PositionSubset  # items numbered within their part, as TensorSplit

            if callable(getattr(split, "carve_heldout", None)):  # the dataset's own rule (CREMA-D: whole actors)
                rest, held = split.carve_heldout(self.method.heldout_fraction, seed)
                return PositionSubset(split, list(rest)), PositionSubset(split, list(held))
            n = len(split)
            g = np.random.RandomState(seed + 12345)
            perm = g.permutation(n)
            k = max(1, int(round(self.method.heldout_fraction * n)))
            return PositionSubset(split, sorted(perm[k:].tolist())), PositionSubset(split, sorted(perm[:k].tolist()))
        labels = split.labels.numpy()
        keys = labels if self.data.task == "classification" else quantile_bins(labels)
        rest, held = carve_heldout(keys, self.method.heldout_fraction, seed)
        return split.subset(torch.as_tensor(rest)), split.subset(torch.as_tensor(held))

    def _per_process_batch(self, batch_size: int) -> int:
        """``train.batch_semantics``: ``global`` (default) splits ``batch_size`` over the processes, so one
        optimizer step sees the same number of samples on 1 and N processes; ``per_process`` is the
        batch of each process (N× the global batch)."""
        world = self.accelerator.num_processes
        if world == 1 or self.cfg.batch_semantics == "per_process":
            return batch_size
        if batch_size % world:
            raise ConfigError(f"batch_size={batch_size} is the global batch (train.batch_semantics=global) and must "
                              f"be divisible by the {world} processes; choose a multiple of {world}, or set "
                              "train.batch_semantics=per_process")
        return batch_size // world

    def _make_train_iterable(self, split, batch_size: int, shuffle: bool = True, seed: int | None = None):
        acc = self.accelerator
        seed = self.config.seed if seed is None else seed
        batch_size = self._per_process_batch(batch_size)
        if isinstance(split, TensorSplit):  # the split's device copy is made once per run (extra passes reuse it)
            return TensorBatcher(self._on_device(split), batch_size, shuffle=shuffle, seed=seed, rank=acc.process_index,
                                 world_size=acc.num_processes, device=acc.device)
        return acc.prepare_data_loader(make_loader(split, batch_size, shuffle=shuffle, seed=seed,
                                                   num_workers=self.cfg.num_workers,
                                                   pin_memory=acc.device.type == "cuda"))

    def _train_batch_iterator(self, split: str = "train", batch_size: int | None = None, shuffle: bool = False,
                              key: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Extra passes over TRAIN (or the train-carved held-out) for methods (PMR prototypes,
        G-Blending estimates). Validation and test are not reachable from here."""
        if split not in {"train", "heldout"}:
            raise ValueError(f"methods may only iterate 'train' or 'heldout', not {split!r}")
        data = self.train_split if split == "train" else self.ctx.heldout
        if data is None:
            raise ValueError("this method did not declare needs_heldout, so there is no held-out split")
        seed = self.config.seed + 7
        if isinstance(data, TensorSplit):
            it = self._make_train_iterable(data, batch_size or self.cfg.batch_size, shuffle, seed)
            it.set_epoch(key)
        else:  # a DataLoader's order comes from its generator's seed: fold the key in (as TensorBatcher does)
            it = self._make_train_iterable(data, batch_size or self.cfg.batch_size, shuffle, seed * 1_000_003 + key)
        return iter(it)

    # ------------------------------------------------------------------ evaluation
    def _eval_batches(self, split) -> Iterator[tuple[dict[str, torch.Tensor], Any]]:
        """Every sample of ``split`` once, in a fixed order, as ``(batch, keep)``: ``keep(preds)`` gathers the
        predictions and labels of all ranks and drops the padding of the last shard. A DataLoader split's
        loader is built once per split and run (its workers persist across evaluations)."""
        acc = self.accelerator
        if isinstance(split, TensorSplit):
            n, seen = len(split), 0
            dev_split = self._on_device(split)
            for idx in eval_index_shards(n, self.cfg.eval_batch_size, acc.process_index, acc.num_processes):
                batch = dev_split.batch(idx.to(acc.device))

                def keep(preds, batch=batch, start=seen):
                    preds, labels = acc.gather((preds.contiguous(), batch["label"].contiguous()))
                    k = max(0, min(len(labels), n - start))
                    return preds[:k], labels[:k]

                yield batch, keep
                seen = min(n, seen + len(idx) * acc.num_processes)
            return
        for batch in self._eval_loader(split):
            yield batch, lambda preds, batch=batch: acc.gather_for_metrics((preds.contiguous(), batch["label"].contiguous()))

    def _eval_loader(self, split):
        """The evaluation DataLoader of ``split``: for the dataset's own splits built (and prepared) once per
        run, so that its workers persist across the evaluations; for other splits (the diagnostics'
        permuted copies) one per call."""
        def build():
            return self.accelerator.prepare_data_loader(make_loader(
                split, self.cfg.eval_batch_size, shuffle=False, seed=0, num_workers=self.cfg.num_workers,
                pin_memory=self.accelerator.device.type == "cuda"))

        if not any(split is getattr(self.data, s, None) for s in ("train", "val", "test")):
            return build()
        loaders = self.__dict__.setdefault("_eval_loaders", {})
        if id(split) not in loaders:
            loaders[id(split)] = build()
        return loaders[id(split)]

    def _eval_mode(self, on: bool) -> None:
        ctx = self.ctx
        if on:
            ctx.model.eval()
            for ex in ctx.extra.values():
                ex.module.eval()
            return
        ctx.model.train()
        for ex in ctx.extra.values():
            if ex.trainable:
                ex.module.train()

    @torch.no_grad()
    def evaluate(self, split, absent: tuple[str, ...] = ()) -> dict[str, float]:
        """Evaluate every sample of ``split`` once (fixed order, nothing dropped, gathered across ranks)."""
        ctx = self.ctx
        self._eval_mode(True)
        meter = self.task.new_meter()
        for batch, keep in self._eval_batches(split):
            preds, labels = keep(self.method.predict(ctx, batch, absent))
            if len(labels):
                meter.update(preds.float(), labels)
        self._eval_mode(False)
        return meter.compute()

    def _shares_encoders(self) -> bool:
        """Whether the per-modality evaluation may reuse the full pass's encoder outputs: the method predicts
        with the model's fused logits (base ``predict``) and the model is the plain encoders → fusion → head
        contract (its own ``forward``/``encode``/``neutral_input``), whose encoders see one modality each."""
        from .models.base import MultimodalModel

        raw = self.ctx.raw_model
        cls = type(raw)
        return (type(self.method).predict is BalancingMethod.predict and isinstance(raw, MultimodalModel)
                and all(getattr(cls, f) is getattr(MultimodalModel, f) for f in ("forward", "encode", "neutral_input")))

    @torch.no_grad()
    def evaluate_with_modalities(self, split, full: bool = True
                                 ) -> tuple[dict[str, float] | None, dict[str, dict[str, float]]]:
        """(the full model's metrics, each modality alone) on ``split``: :meth:`evaluate` and
        :meth:`evaluate_per_modality` in one pass when the encoders can be shared (:meth:`_shares_encoders`):
        each encoder runs once per batch on its real input (M encoder passes, not M(M+1)); a modality's
        *absent* features — its encoder on the neutral input, which is the same for every sample — are
        computed once per call on one neutral sample and broadcast, and fusion and head run once per
        modality. ``full=False`` skips the full model's metrics (returns None for them)."""
        mods = list(self.ctx.modalities)
        if len(mods) < 2 or not self._shares_encoders():
            return (self.evaluate(split) if full else None), self.evaluate_per_modality(split)
        ctx, raw = self.ctx, self.ctx.raw_model
        self._eval_mode(True)
        meters = {m: self.task.new_meter() for m in mods}
        meter_full = self.task.new_meter()
        neutral: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for batch, keep in self._eval_batches(split):
            out = ctx.forward(batch)  # the (wrapped) model, as predict: under DDP its buffers are synced here
            preds, labels = keep(out.logits)
            if len(labels):
                meter_full.update(preds.float(), labels)
            with self.accelerator.autocast():  # the wrapped forward's precision, for the unwrapped parts
                if not neutral:
                    for m in mods:
                        z = raw.encoders[m](raw.neutral_input(m, batch[m][:1]))
                        neutral[m] = (z, raw.pool(m, z))
                b = out.logits.shape[0]
                for m in mods:
                    feats = {o: out.features[o] if o == m else _rows(neutral[o][0], b) for o in mods}
                    pooled = {o: out.pooled[o] if o == m else _rows(neutral[o][1], b) for o in mods}
                    preds, labels = keep(raw.fuse_and_head(feats, pooled)[1])
                    if len(labels):
                        meters[m].update(preds.float(), labels)
        self._eval_mode(False)
        return (meter_full.compute() if full else None), {m: meters[m].compute() for m in mods}

    def _on_device(self, split: TensorSplit) -> TensorSplit:
        """The split's tensors on the accelerator device, copied once per run (validation is evaluated
        every epoch, M + 1 times with the per-modality passes)."""
        if self.accelerator.device.type == "cpu":
            return split
        cache = self.__dict__.setdefault("_device_splits", {})
        if id(split) not in cache:
            cache[id(split)] = TensorSplit({m: x.to(self.accelerator.device) for m, x in split.inputs.items()},
                                           split.labels.to(self.accelerator.device))
        return cache[id(split)]

    def evaluate_per_modality(self, split) -> dict[str, dict[str, float]]:
        """Each modality alone: the model evaluated with every other modality ``absent`` (one pass per
        modality; :meth:`evaluate_with_modalities` shares the encoders where it can)."""
        mods = self.ctx.modalities
        if len(mods) < 2:
            return {}
        return {m: self.evaluate(split, tuple(o for o in mods if o != m)) for m in mods}

    def _is_better(self, val: dict[str, float], best: dict[str, Any] | None) -> bool:
        if best is None:
            return True
        key = self.task.primary_metric
        cmp = self.task.compare(val[key], best["val"][key])
        if cmp != 0:
            return cmp > 0
        return val.get("loss", math.inf) < best["val"].get("loss", math.inf)

    # ------------------------------------------------------------------ checkpoints
    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / runfiles.CHECKPOINT_DIR

    def _weights(self) -> dict[str, Any]:
        acc = self.accelerator
        return {"model": acc.unwrap_model(self.ctx.model).state_dict(),
                "extra": {k: acc.unwrap_model(ex.module).state_dict() for k, ex in self.ctx.extra.items()},
                "method": self.method.state_dict()}

    def _load_weights(self, w: dict[str, Any]) -> None:
        acc = self.accelerator
        acc.unwrap_model(self.ctx.model).load_state_dict(w["model"])
        for k, ex in self.ctx.extra.items():
            acc.unwrap_model(ex.module).load_state_dict(w["extra"][k])
        self.method.load_state_dict(w["method"])

    def _save(self, name: str, payload: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            runfiles.atomic_torch_save(payload, self.ckpt_dir / name)
        self.accelerator.wait_for_everyone()

    def _save_last(self, pos: Position, schedule: LRSchedule) -> None:
        ctx = self.ctx
        payload = {
            "weights": self._weights(),
            "optimizer": ctx.optimizer.state_dict(),
            "extra_optimizers": {k: ex.optimizer.state_dict() for k, ex in ctx.extra.items() if ex.optimizer},
            "param_group_lr_mult": [g.get("lr_mult", 1.0) for g in ctx.optimizer.param_groups],
            "schedule": schedule.state_dict(),
            "position": pos.__dict__,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "method": ctx.generator.get_state(),
                    "method_device": None if ctx._device_generator is None else ctx._device_generator.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "config_hash": self.hash,
        }
        self._save("last.pt", payload)

    def _load_last(self, schedule: LRSchedule) -> Position | None:
        path = self.ckpt_dir / "last.pt"
        if not path.is_file():
            return None
        payload = self._read_checkpoint(path, "--resume: ")
        if payload.get("config_hash") != self.hash:
            from .runfolder import identity, setting_differences

            try:
                old = runfiles.read_json(self.run_dir / runfiles.CONFIG_FILE)
            except (OSError, ValueError):
                old = {}
            diffs = setting_differences(old, identity(self.config)) if old.get("config_hash") == payload.get("config_hash") else []
            raise ConfigError(f"--resume: checkpoint {path} was written for another configuration (hash "
                              f"{payload.get('config_hash')} != {self.hash})"
                              + (": " + "; ".join(diffs) if diffs else "") + "; resume it with its own settings or "
                              "run these settings in another --run-dir")
        ctx = self.ctx
        self._load_weights(payload["weights"])
        ctx.optimizer.load_state_dict(payload["optimizer"])
        for k, st in payload["extra_optimizers"].items():
            ctx.extra[k].optimizer.load_state_dict(st)
        for g, mult in zip(ctx.optimizer.param_groups, payload["param_group_lr_mult"]):
            g["lr_mult"] = mult
        schedule.load_state_dict(payload["schedule"])
        rng = payload["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        ctx.generator.set_state(rng["method"])
        if rng.get("method_device") is not None and ctx.device.type != "cpu":
            ctx.device_generator.set_state(rng["method_device"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return Position(**payload["position"])

    @staticmethod
    def _read_checkpoint(path: Path, prefix: str = "") -> dict[str, Any]:
        """A checkpoint written by :meth:`_save`, or a clear error (exit 2) naming the file."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # truncated/empty/garbage file: zipfile, pickle, EOF, runtime errors
            raise ConfigError(f"{prefix}checkpoint {str(path)!r} is unreadable ({type(exc).__name__}: {exc}); it was not "
                              "written by a finished checkpoint step (the run was killed while copying it?). "
                              "Delete it, or re-run with --overwrite to start the run again") from None
        if not isinstance(payload, dict):
            raise ConfigError(f"checkpoint {str(path)!r} does not hold a mmbalance checkpoint (got {type(payload).__name__})")
        return payload

    def _check_finite_eval(self, pos: Position, metrics: dict[str, float], what: str) -> None:
        """Validation/test outputs must be finite: a model that diverged on the last step evaluates to
        NaN while every training loss was finite; such a run is failed, never ok."""
        bad = [k for k in ("loss", self.task.primary_metric)
               if isinstance(metrics.get(k), float) and not math.isfinite(metrics[k])]
        if bad:
            self._fail(pos, f"non-finite {what} ({', '.join(f'{k}={metrics[k]}' for k in bad)}): the model "
                            "diverged (or the split holds non-finite inputs); the run is marked failed")

    def _end_of_epoch(self, pos: Position, schedule: LRSchedule, force: bool = False) -> int:
        """The safe point after an epoch: write the checkpoint (best.pt when the best changed, last.pt,
        metrics.jsonl) when ``train.checkpoint_interval`` seconds have passed since the last one, when
        ``force`` (the end of training), or when SIGTERM/SIGINT arrived; returns that signal (0: none).
        Every rank decides alike: under DDP one all-reduce (max) of (signal, checkpoint due) per epoch."""
        acc = self.accelerator
        signum = preempt.requested() or 0
        due = force or _clock() - self._last_checkpoint >= self.cfg.checkpoint_interval
        if acc.num_processes > 1:
            flags = acc.reduce(torch.tensor([signum, int(due)], device=acc.device), reduction="max").tolist()
            signum, due = int(flags[0]), bool(flags[1])
        if due or signum:
            self._checkpoint(pos, schedule)
        return signum

    def _checkpoint(self, pos: Position, schedule: LRSchedule) -> None:
        """best.pt (when the best changed since the last checkpoint), then last.pt, then metrics.jsonl, each
        atomic. A kill between them leaves a last.pt no newer than best.pt and metrics.jsonl; resuming from
        that last.pt re-trains the same epochs and reaches the same best again (training is deterministic)."""
        if self._best_weights is not None:
            self._save("best.pt", self._best_weights)
            self._best_weights = None
        self._save_last(pos, schedule)
        self._write_metrics(pos)
        self._last_checkpoint = _clock()
        self._checkpointed = len(pos.history)

    def _interrupted(self, pos: Position, signum: int) -> None:
        """After the checkpoint of a stopped run: result.json says interrupted (resumable); raises."""
        acc = self.accelerator
        import signal

        name = signal.Signals(signum).name
        msg = (f"interrupted by {name} after {len(pos.history)} epoch(s); the checkpoint is saved, continue with "
               "--resume (same command)")
        if acc.is_main_process:
            runfiles.atomic_write_json(self.run_dir / runfiles.RESULT_FILE, {
                "status": "interrupted", "resumable": True, "signal": name, "message": msg,
                "epochs_done": len(pos.history), "method": self.config.method, "dataset": self.config.dataset,
                "seed": self.config.seed, "config_hash": self.hash})
        acc.wait_for_everyone()
        raise RunInterrupted(signum, msg)

    # ------------------------------------------------------------------ the loop
    def _write_metrics(self, pos: Position) -> None:
        if self.accelerator.is_main_process:
            runfiles.write_metrics_lines(self.run_dir / runfiles.METRICS_FILE, pos.history)

    def _fail(self, pos: Position, message: str) -> None:
        if self.accelerator.is_main_process:
            self._write_metrics(pos)
            runfiles.atomic_write_json(self.run_dir / runfiles.RESULT_FILE, {
                "status": "failed", "error": message, "method": self.config.method, "dataset": self.config.dataset,
                "seed": self.config.seed, "config_hash": self.hash, "versions": runfiles.package_versions()})
        raise NonFiniteLossError(message)

    def _fast_optimizer(self, opt):
        """The plain torch optimizer under Accelerate's wrapper. The wrapper only adds accumulation
        handling (the loop never accumulates) and, under fp16, a ``scaler.step`` + ``scaler.update``
        inside every ``step()``; with several optimizers that update resets the scaler's per-optimizer
        state after the first one, so every later optimizer was unscaled a second time (its update
        1/scale too small). The loop drives the scaler itself (:meth:`_unscale`, :meth:`_step_optimizers`)."""
        while hasattr(opt, "optimizer") and isinstance(opt, torch.optim.Optimizer):
            opt = opt.optimizer
        return opt

    def _unscale(self, opts: list[torch.optim.Optimizer]) -> None:
        """fp16: divide every optimizer's gradients by the loss scale, exactly once per step, so that
        ``after_backward`` and clipping see true gradients (no-op without a scaler)."""
        scaler = self.accelerator.scaler
        if scaler is not None:
            for opt in opts:
                scaler.unscale_(opt)

    def _step_optimizers(self, opts: list[torch.optim.Optimizer]) -> bool | None:
        """Step every optimizer; under fp16 skip them ALL when any gradient overflowed (the model and
        the method's heads move together or not at all) and update the loss scale once. Returns
        whether the step was taken (None: decided on the device, not known to the host)."""
        scaler = self.accelerator.scaler
        if scaler is None:
            for opt in opts:
                opt.step()
            return True
        # GradScaler records each optimizer's inf/NaN check in unscale_ (torch.amp.GradScaler internals,
        # stable since torch 1.6).
        found = [v for opt in opts for v in scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values()]
        if found and all(getattr(opt, "_step_supports_amp_scaling", False) for opt in opts):
            # fused Adam/AdamW: the kernels take the combined flag and skip the update (and undo their step
            # count) on the device, so no host read per step. grad_scale None: gradients are unscaled already.
            inf = (sum(f.to(found[0].device) for f in found).reshape(()) > 0).to(torch.float32)
            for opt in opts:
                opt.grad_scale, opt.found_inf = None, inf
                try:
                    opt.step()
                finally:
                    del opt.grad_scale, opt.found_inf
            scaler.update()
            return None
        # other optimizers (SGD): one host read per step for the combined flag, fp16 only
        ok = not found or not bool(sum(f.to(found[0].device) for f in found).item())
        if ok:
            for opt in opts:
                opt.step()
        scaler.update()  # once per step, backs off when any optimizer saw inf
        return ok

    def record_crash(self, exc: BaseException) -> None:
        """A crash (a bug in a method or the engine, not bad input): result.json says ``failed`` with the error
        and traceback, so neither a user nor the leaderboard mistakes the folder for a finished run."""
        import traceback

        if self.accelerator.is_main_process and self.run_dir.is_dir():
            runfiles.atomic_write_json(self.run_dir / runfiles.RESULT_FILE, {
                "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                "traceback": "".join(traceback.format_exception(exc)), "method": self.config.method,
                "dataset": self.config.dataset, "seed": self.config.seed, "config_hash": self.hash,
                "versions": runfiles.package_versions(), "code": runfiles.code_provenance()})

    def _backward(self, loss: torch.Tensor) -> None:
        """``accelerator.backward`` without its per-step ``loss / gradient_accumulation_steps`` (an extra
        op and autograd node per step; a division by 1 here, so the gradients are bit-identical) when
        nothing else in it applies: no gradient accumulation, no DeepSpeed/Megatron-LM engine, no LOMO
        optimizer. fp16 keeps the loss scaling (``scaler.scale(loss).backward()``, as accelerate does)."""
        acc = self.accelerator
        if self._plain_backward is None:
            from accelerate.utils import DistributedType

            self._plain_backward = (acc.gradient_accumulation_steps == 1 and not getattr(acc, "has_lomo_optimizer", False)
                                    and acc.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM))
        if not self._plain_backward:
            acc.backward(loss)
            return
        scaler = acc.scaler  # read every step: a test may inject one after construction
        (loss if scaler is None else scaler.scale(loss)).backward()

    def _set_lrs(self, factor: float) -> None:
        for g in self.ctx.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor * g.get("lr_mult", 1.0)

    def _train_epoch(self, pos: Position, phase: Phase, schedule: LRSchedule) -> dict[str, float]:
        acc, ctx, method = self.accelerator, self.ctx, self.method
        model = ctx.model
        model.train()
        loader = self.loader_train
        if hasattr(loader, "set_epoch"):  # TensorBatcher or a prepared DataLoader: order per (phase, epoch)
            loader.set_epoch(pos.phase_index * 100_003 + pos.epoch)
        method.on_epoch_start(ctx)
        plan = method.epoch_plan(ctx)
        if plan is not None:  # the method's per-epoch training plan replaces the loader for this epoch
            loader = self._plan_batches(plan, pos.phase_index * 100_003 + pos.epoch)
        self.diag.start_epoch()
        extra_opts = [self._fast_optimizer(ex.optimizer) for ex in ctx.extra.values() if ex.optimizer is not None]
        main_opt = self._fast_optimizer(ctx.optimizer)
        all_opts = [main_opt, *extra_opts]
        to_none = bool(getattr(method, "substep_set_to_none", True))
        watch = LossWatch(acc.device)
        n_steps = 0
        # Clipped together (one norm): everything the main optimizer trains — the model and the method's
        # modules that joined it (G-Blending/QMF/multitask heads, MRD tokens, UMT projectors), as the
        # official codes clip model.parameters() with their heads inside. Modules with their own
        # optimizer (CGGM classifiers, OGM-GE/MSLR probes) are not clipped (their specs: "no clipping").
        params = [p for g in main_opt.param_groups for p in g["params"]]
        try:
            n_steps = self._train_steps(pos, loader, plan, watch, params, all_opts, main_opt, extra_opts,
                                        to_none, schedule)
        except Exception:
            self._check_finite(pos, phase, watch, collective=False)  # a crash caused by a NaN loss reports it
            raise
        self._check_finite(pos, phase, watch)  # once per epoch: one host read (+ one all-reduce under DDP)
        method.on_epoch_end(ctx)
        logs = {"train_loss": watch.mean(n_steps)}
        logs.update(ctx.pop_logs())
        return logs

    def _check_finite(self, pos: Position, phase: Phase, watch: LossWatch, collective: bool = True) -> None:
        """Fail the run (every rank together) with the first step whose training loss was not finite."""
        first, value = watch.first_bad(self.accelerator, collective)
        if first is not None:
            split = self.train_split
            data = {**getattr(split, "inputs", {}), "label": getattr(split, "labels", None)}
            self._fail(pos, f"non-finite training loss ({value}) at phase {phase.name!r}, epoch {pos.epoch}, "
                            f"step {first}; the run is marked failed ({self._nan_hint(data)})")

    def _train_steps(self, pos, loader, plan, watch, params, all_opts, main_opt, extra_opts, to_none,
                     schedule) -> int:
        """The steps of one epoch (see :meth:`_train_epoch`); returns the number of batches taken."""
        ctx, method, cfg = self.ctx, self.method, self.cfg
        all_present = tuple(ctx.modalities)
        n_steps = 0
        # Decided once per epoch (per-step Python overhead): hooks left as the base class's no-ops and the
        # diagnostics hooks when train.diagnostics=none are not called at all.
        diag = self.diag if self.diag.enabled else None
        substeps = method.training_substeps if overrides_hook(method, "training_substeps") else None
        after_backward = method.after_backward if overrides_hook(method, "after_backward") else None
        after_step = method.after_step if overrides_hook(method, "after_step") else None
        for step, batch in enumerate(loader):
            if cfg.max_steps_per_epoch is not None and step >= cfg.max_steps_per_epoch:
                break
            ctx.step = step
            if plan is not None:
                batch, ctx.present = batch
            else:
                ctx.present = all_present
            if diag is not None:
                diag.before_step(step, batch)
            subs = None if substeps is None else substeps(ctx, batch)
            if subs is None:
                subs = (method.training_step(ctx, batch),)
            for sub, out in enumerate(subs):  # one update per StepOutput (MLA: one per modality)
                ctx.substep = sub
                loss = out.loss
                watch.add(loss, step)  # on the device: no host sync, no all-reduce per step
                self._backward(loss)
                if self.accelerator.scaler is not None:  # read every step: a test may inject one
                    self._unscale(all_opts)  # every sub-step is a real step: unscaled once, stepped, scale updated
                if diag is not None:
                    diag.after_backward()
                if after_backward is not None:
                    after_backward(ctx)
                if diag is not None:
                    diag.after_edit(unchanged=after_backward is None)
                if ctx.perturbations.active:  # a SAM-like method left θ perturbed (mmbalance/sam.py)
                    ctx.perturbations.check_restored()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                self._set_lrs(schedule.factor(pos.epoch, min(step, max(0, ctx.steps_per_epoch - 1))))
                self._step_optimizers(all_opts)
                main_opt.zero_grad(set_to_none=to_none)
                for opt in extra_opts:
                    opt.zero_grad(set_to_none=to_none)
                if out.logs:
                    for k, v in out.logs.items():
                        ctx.log(k, v)
            if not to_none:  # sub-steps kept zero-filled gradients; the batch ends with none
                main_opt.zero_grad(set_to_none=True)
                for opt in extra_opts:
                    opt.zero_grad(set_to_none=True)
            ctx.substep = 0
            if after_step is not None:
                after_step(ctx)
            if self._progress_bar is not None:
                self._progress_bar.step()
            n_steps += 1
            pos.global_step += 1
            ctx.global_step = pos.global_step
        return n_steps

    @staticmethod
    def _nan_hint(batch: dict[str, Any]) -> str:
        """Blame the data when the batch itself holds the non-finite value, else the optimisation."""
        bad = [k for k, v in batch.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            return f"the batch's own values are non-finite in {', '.join(bad)}: fix the data, not the lr"
        return "try a lower lr or mixed_precision=no"

    def _plan_batches(self, plan: list[BatchGroup], key: int) -> Iterator[tuple[dict[str, torch.Tensor], tuple[str, ...]]]:
        """Batches of a method's epoch plan (interface ``epoch_plan``): the groups in order; inside a
        group one permutation seeded by (run seed, epoch key, group number), identical on every rank,
        padded by wrap-around to a multiple of the world size, rank r taking positions r, r+W, …, then
        consecutive batches with the last partial one kept. Every rank takes the same number of steps.
        A group's per-sample ``tags`` go through the same permutation, padding and sharding as its indices
        and arrive as ``batch["plan_tag"]``, so each row keeps its own tag.
        Yields ``(batch, present)``; ``batch["idx"]`` holds positions in the training split."""
        acc, cfg = self.accelerator, self.cfg
        split = self.train_split
        n = len(split)
        mods = set(self.ctx.modalities)
        shards: list[tuple[torch.Tensor, torch.Tensor | None, tuple[str, ...]]] = []
        for gi, group in enumerate(plan):  # validate the whole plan before the first step
            idx = torch.as_tensor(group.indices, dtype=torch.long).reshape(-1)
            tags = None if group.tags is None else torch.as_tensor(group.tags, dtype=torch.long).reshape(-1)
            present = tuple(group.present) if group.present is not None else tuple(self.ctx.modalities)
            unknown = set(present) - mods
            if unknown or not present:
                raise ValueError(f"epoch_plan group {gi}: present={present!r} must be a non-empty subset of "
                                 f"the model's modalities {sorted(mods)}")
            if tags is not None and len(tags) != len(idx):
                raise ValueError(f"epoch_plan group {gi}: tags must have one entry per index ({len(idx)}), "
                                 f"got {len(tags)}")
            if len(idx) == 0:
                continue
            if int(idx.min()) < 0 or int(idx.max()) >= n:
                raise ValueError(f"epoch_plan group {gi}: indices must lie in [0, {n}) (the training split), "
                                 f"got [{int(idx.min())}, {int(idx.max())}]")
            rows = idx if tags is None else torch.stack([idx, tags])  # tags travel with their indices
            if group.shuffle:
                g = torch.Generator().manual_seed((self.config.seed * 1_000_003 + key) * 1_009 + gi)
                rows = rows[..., torch.randperm(len(idx), generator=g)]
            if acc.num_processes > 1:
                total = -(-len(idx) // acc.num_processes) * acc.num_processes
                rows = rows.repeat(*([1] * (rows.dim() - 1)), -(-total // len(idx)))[..., :total]
                rows = rows[..., acc.process_index::acc.num_processes]
            shards.append((rows, None, present) if tags is None else (rows[0], rows[1], present))
        bsz = self._per_process_batch(cfg.batch_size)
        for idx, tags, present in shards:
            for start in range(0, len(idx), bsz):
                chunk = idx[start:start + bsz]
                if isinstance(split, TensorSplit):
                    batch = split.batch(chunk)
                    if tags is not None:
                        batch["plan_tag"] = tags[start:start + bsz]
                    if acc.device.type != "cpu":
                        batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
                else:
                    from accelerate.utils import send_to_device

                    batch = collate_dicts([split[int(i)] for i in chunk])
                    batch["idx"] = chunk
                    if tags is not None:
                        batch["plan_tag"] = tags[start:start + bsz]
                    if acc.device.type == "cuda":  # pinned, so that the copy below does not block
                        batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
                    batch = send_to_device(batch, acc.device, non_blocking=True)
                yield batch, present

    def fit(self) -> dict[str, Any]:
        ctx, method = self.ctx, self.method
        phases = method.phases()
        steps_per_epoch = len(self.loader_train) if hasattr(self.loader_train, "__len__") else 1
        if self.cfg.max_steps_per_epoch is not None:
            steps_per_epoch = min(steps_per_epoch, self.cfg.max_steps_per_epoch)
        ctx.steps_per_epoch = steps_per_epoch
        pos: Position | None = None
        schedule = LRSchedule(self.cfg, self._phase_epochs(phases[0]), steps_per_epoch)
        if self.resume:
            pos = self._load_last(schedule)
        if pos is None:
            pos = Position()
            self._clear_previous()
        self._write_config()
        self._best_weights: dict[str, Any] | None = None  # a new best not yet written to best.pt
        self._last_checkpoint = _clock()
        self._checkpointed = len(pos.history)  # epochs in the newest last.pt
        t_start = time.perf_counter()
        progress = self._progress_bar = self._progress(phases, pos, steps_per_epoch)
        self._init_trackers()
        while pos.phase_index < len(phases):
            phase = phases[pos.phase_index]
            n_epochs = self._phase_epochs(phase)
            schedule.epochs = n_epochs
            ctx.phase, ctx.phase_index, ctx.epochs_in_phase = phase.name, pos.phase_index, n_epochs
            ctx.epoch = pos.epoch
            method.on_phase_start(ctx)  # also when a resumed run re-enters a phase mid-way
            while pos.epoch < n_epochs:
                ctx.epoch = pos.epoch
                t0 = time.perf_counter()
                logs = self._train_epoch(pos, phase, schedule)
                diag_step_seconds = self.diag.pop_step_seconds()
                epoch_seconds = time.perf_counter() - t0 - diag_step_seconds
                pos.train_seconds += epoch_seconds
                row: dict[str, Any] = {"phase": phase.name, "epoch": pos.epoch, "global_step": pos.global_step,
                                       "epoch_seconds": epoch_seconds, **logs}
                row["lr"] = ctx.optimizer.param_groups[0]["lr"]
                row.update({f"method/{k}": v for k, v in method.metrics().items()})
                if phase.evaluate:
                    if self.cfg.modality_eval == "epoch":
                        val, val_pm = self.evaluate_with_modalities(self.data.val)
                    else:
                        val, val_pm = self.evaluate(self.data.val), None
                    row["val"] = val
                    if not all(math.isfinite(val.get(k, 0.0)) for k in ("loss", self.task.primary_metric)):
                        pos.history.append(row)
                        self._check_finite_eval(pos, val, f"validation metrics at phase {phase.name!r}, epoch {pos.epoch}")
                    if val_pm is not None:
                        row["val_per_modality"] = val_pm
                    schedule.observe_val_loss(val.get("loss", math.inf))
                    if self._is_better(val, pos.best):
                        pos.best = {"phase": phase.name, "phase_index": pos.phase_index, "epoch": pos.epoch, "val": val}
                        self._best_weights = _host_copy(self._weights())  # written with the next checkpoint
                self.diag.end_epoch(row, diag_step_seconds)
                pos.history.append(row)
                pos.epoch += 1
                # test hooks: MMBALANCE_STOP_AFTER_EPOCHS simulates a kill right after that epoch's checkpoint,
                # MMBALANCE_KILL_AFTER_EPOCHS a kill between checkpoints (nothing written for that epoch)
                stop_after = _env_epochs("MMBALANCE_STOP_AFTER_EPOCHS", len(pos.history))
                signum = self._end_of_epoch(pos, schedule, force=pos.epoch >= n_epochs or stop_after)
                if stop_after or _env_epochs("MMBALANCE_KILL_AFTER_EPOCHS", len(pos.history)):
                    raise KeyboardInterrupt(f"stopped after {len(pos.history)} epochs (test hook)")
                if signum:
                    self._interrupted(pos, signum)
                if progress is not None:
                    progress.epoch_done(row, self.task.primary_metric)
                self._track(row, len(pos.history))
            method.on_phase_end(ctx)
            pos.phase_index += 1
            pos.epoch = 0
        if self._checkpointed != len(pos.history) or self._best_weights is not None:
            self._checkpoint(pos, schedule)  # (only after trailing phases without epochs) nothing left unwritten
        if progress is not None:
            progress.close()
        self._progress_bar = None
        self._dump_final_parameters()
        return self._finish(pos, time.perf_counter() - t_start)

    def _final_method_metrics(self, pos: Position) -> dict[str, Any]:
        """The method's metrics at the end of training: the live values, completed by the last epoch's
        row (a run resumed in its finish stage has trained no epoch in this process)."""
        last = pos.history[-1] if pos.history else {}
        recorded = {k[len("method/"):]: v for k, v in last.items() if k.startswith("method/")}
        return {**recorded, **self.method.metrics()}

    def _dump_final_parameters(self) -> None:
        """Test hook: with MMBALANCE_DUMP_PARAMS_DIR set, each rank saves its final (last-epoch, not
        best-checkpoint) parameters to rank<k>.pt, so a test can check DDP replicas stayed identical;
        also the method's state and last-epoch metrics, so a test can compare per-rank statistics."""
        dump_dir = os.environ.get("MMBALANCE_DUMP_PARAMS_DIR")
        if dump_dir:
            Path(dump_dir).mkdir(parents=True, exist_ok=True)
            state = {"model": self.accelerator.unwrap_model(self.ctx.model).state_dict(),
                     "extra": {k: self.accelerator.unwrap_model(ex.module).state_dict() for k, ex in self.ctx.extra.items()},
                     "method_state": self.method.state_dict(), "method_metrics": self.method.metrics()}
            torch.save(state, Path(dump_dir) / f"rank{self.accelerator.process_index}.pt")

    def _phase_epochs(self, phase: Phase) -> int:
        return phase.epochs if phase.epochs is not None else self.cfg.epochs

    def _progress(self, phases: list[Phase], pos: Position, steps_per_epoch: int):
        if self.quiet or not self.accelerator.is_local_main_process or os.environ.get("MMBALANCE_NO_PROGRESS"):
            return None
        from .progress import Progress

        total = sum(self._phase_epochs(p) for p in phases)
        done = sum(self._phase_epochs(p) for p in phases[:pos.phase_index]) + pos.epoch
        return Progress(f"{self.config.method} on {self.config.dataset}", total, done, steps_per_epoch,
                        stream=sys.stderr)

    # ------------------------------------------------------------------ experiment trackers
    def _init_trackers(self) -> None:
        """Accelerate's trackers (``--log-with tensorboard|wandb|...``), logging under RUN_DIR/trackers/."""
        if self.log_with:
            from .trackers import init_trackers

            init_trackers(self.accelerator, self.config, self.hash, self.cfg)

    def _track(self, row: dict[str, Any], step: int) -> None:
        """The epoch's metrics.jsonl values as tracker scalars (same names, ``/``-joined)."""
        if self.log_with:
            from .trackers import flatten_scalars

            self.accelerator.log(flatten_scalars(row), step=step)

    def _clear_previous(self) -> None:
        if self.accelerator.is_main_process:
            for name in (runfiles.RESULT_FILE, runfiles.METRICS_FILE):
                (self.run_dir / name).unlink(missing_ok=True)
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _write_config(self) -> None:
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            payload = {**to_jsonable(self.config), "train": to_jsonable(self.cfg),
                       "method_hparams": to_jsonable(self.method.hp), "model_resolved": self.model_description,
                       "dataset_info": to_jsonable(self.data.info), "synthetic": self.data.synthetic,
                       "config_hash": self.hash, "world_size": self.accelerator.num_processes,
                       "acceleration": self.acceleration}
            runfiles.atomic_write_json(self.run_dir / runfiles.CONFIG_FILE, payload)

    def _finish(self, pos: Position, wall: float) -> dict[str, Any]:
        if pos.best is None:
            raise RuntimeError("no phase evaluated on validation; nothing to select")
        best = self._read_checkpoint(self.ckpt_dir / "best.pt")
        self._load_weights(best)
        test, test_pm = None, None  # tuning trials: the test split is never touched
        if self.cfg.evaluate_test:
            if self.cfg.modality_eval != "none":
                test, test_pm = self.evaluate_with_modalities(self.data.test)
            else:
                test, test_pm = self.evaluate(self.data.test), {}
            self._check_finite_eval(pos, test, "test metrics of the selected model")
        val_pm = self.evaluate_with_modalities(self.data.val, full=False)[1] if self.cfg.modality_eval != "none" else {}
        diagnostics = self.diag.final(test=test, val=pos.best["val"], test_pm=test_pm, val_pm=val_pm,
                                      history=pos.history)
        n_epochs = max(1, len(pos.history))
        result = {
            "status": "ok", "method": self.config.method, "dataset": self.config.dataset, "seed": self.config.seed,
            "config_hash": self.hash, "task": self.task.name, "primary_metric": self.task.primary_metric,
            "higher_is_better": self.task.higher_is_better, "modalities": self.ctx.modalities,
            "selected": {k: pos.best[k] for k in ("phase", "epoch")},
            "val": pos.best["val"], "test": test, "val_per_modality": val_pm, "test_per_modality": test_pm,
            "method_metrics": self._final_method_metrics(pos), "synthetic": self.data.synthetic,
            "timings": {"train_seconds": pos.train_seconds, "seconds_per_epoch": pos.train_seconds / n_epochs,
                        "wall_seconds_this_process": wall, "epochs": len(pos.history),
                        "diagnostics_seconds": total_seconds(diagnostics)},
            "num_train_samples": len(self.train_split), "world_size": self.accelerator.num_processes,
            "peak_memory_mb": runfiles.peak_memory_mb(), "versions": runfiles.package_versions(),
            "hardware": runfiles.hardware_summary(), "parameters": self._parameter_counts(),
            "code": runfiles.code_provenance(),
        }
        if diagnostics is not None:
            result["diagnostics"] = diagnostics
        if self.accelerator.is_main_process:
            runfiles.atomic_write_json(self.run_dir / runfiles.RESULT_FILE, result)
        if self.log_with:
            self.accelerator.end_training()
        self.accelerator.wait_for_everyone()
        return result

    def _parameter_counts(self) -> dict[str, int]:
        """Parameters of the model and of the method's own modules (heads, classifiers, teachers)."""
        acc = self.accelerator
        model = acc.unwrap_model(self.ctx.model)
        extra = [acc.unwrap_model(ex.module) for ex in self.ctx.extra.values()]
        return {"model": sum(p.numel() for p in model.parameters()),
                "method_modules": sum(p.numel() for m in extra for p in m.parameters()),
                "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)
                + sum(p.numel() for ex, m in zip(self.ctx.extra.values(), extra) if ex.trainable
                      for p in m.parameters())}
