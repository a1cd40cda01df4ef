"""The method interface: :class:`BalancingMethod` and what the engine hands it.

A method never writes a training loop. Per step the engine calls, in order:
``training_step`` → ``accelerator.backward`` → unscale (fp16) → ``after_backward`` (gradient edits)
→ clip → optimizer steps → scheduler → ``after_step``. Per epoch: ``on_epoch_start`` → steps →
``on_epoch_end`` → validation (``predict``) → checkpoint selection. ``phases()`` lists the training
phases (one ``joint`` phase by default).

Two optional capabilities change what one "step" and one "epoch" are:

- **Sub-steps** (``training_substeps``): a generator yielding several :class:`StepOutput` per batch;
  each one gets its own backward → unscale → ``after_backward`` → clip → optimizer step → zero grads
  (``ctx.substep`` counts them), and the next one is produced only after that step, so it sees the
  updated parameters. A sub-step may run a forward restricted to some encoders
  (``ctx.forward(batch, only=(m,))``); under DDP declare ``find_unused_parameters = True``, since each
  sub-step then arms the reducer with its own forward. ``after_step`` and the lr schedule advance once
  per batch. Gradients between sub-steps are set to None, or zero-filled with
  ``substep_set_to_none = False`` (torch < 2 ``zero_grad()``); after the last sub-step always None.
- **Epoch plan** (``epoch_plan``): after ``on_epoch_start`` a method may return an ordered list of
  :class:`BatchGroup` (indices into the training split, the modalities present); the engine then trains
  the groups in that order instead of the shuffled loader — shuffled inside each group with a seeded
  permutation identical on every rank, sharded across ranks with wrap-around padding (equal step counts),
  last partial batch kept — and sets ``ctx.present`` for every batch. Per-sample tags of a group (e.g.
  originals and single-modality copies mixed in one batch) travel with their rows as
  ``batch["plan_tag"]``. The plan is rebuilt every epoch
  from the method's state, so a resumed run replays it. Per-iteration lr schedules keep the default
  loader's steps per epoch (a longer epoch holds the last step's lr).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .errors import MethodNotApplicable
from .models.base import ModelOutput
from .sam import Perturbation, Perturbations, frozen_norm_stats, synced_grads

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .config import TrainConfig
    from .data import ModelSpec, MultimodalData
    from .tasks import Task

__all__ = ["BalancingMethod", "BatchGroup", "StepContext", "StepOutput", "ModelOutput", "Phase", "NoHParams",
           "MethodNotApplicable", "ALL_TASKS"]

ALL_TASKS = frozenset({"classification", "regression", "segmentation"})


@dataclass
class NoHParams:
    """Methods without hyperparameters."""


@dataclass
class StepOutput:
    """What ``training_step`` returns: the loss to backpropagate, the model output (for methods that
    read it in ``after_backward``) and scalar components to log (aggregated per epoch)."""

    loss: torch.Tensor
    output: ModelOutput | None = None
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)


@dataclass
class Phase:
    """One training phase. ``epochs=None`` means the run's ``epochs``. ``evaluate``: validate after each
    epoch and let this phase's checkpoints compete in model selection."""

    name: str = "joint"
    epochs: int | None = None
    evaluate: bool = True


@dataclass
class BatchGroup:
    """One group of an epoch plan (:meth:`BalancingMethod.epoch_plan`): ``indices`` are positions in the
    training split (``batch["idx"]`` values; repeats allowed, e.g. a sample and its copies); ``present``
    the modalities the method should train with (None = all; the engine passes it on as ``ctx.present``,
    the method does the masking); ``shuffle=False`` keeps the given order. ``tags``: optional per-sample
    integers (one per index, meaning is the method's, e.g. SMV's "keep only modality k"); they are
    permuted, padded and sharded with their indices and delivered per row as ``batch["plan_tag"]``."""

    indices: torch.Tensor
    present: tuple[str, ...] | None = None
    shuffle: bool = True
    tags: torch.Tensor | None = None


@dataclass
class ExtraModule:
    """A method-owned module registered through :meth:`StepContext.add_module`."""

    module: nn.Module
    trainable: bool = True
    lr: float | None = None
    own_optimizer: bool = True
    optimizer: torch.optim.Optimizer | None = None


class StepContext:
    """Everything a method may use. Built by the engine; attributes are updated as training goes on.

    - ``accelerator``, ``model`` (prepared, possibly DDP-wrapped), ``raw_model`` (unwrapped),
      ``modules`` (method-owned, prepared), ``optimizer`` (main), ``extra_optimizers``;
    - ``data`` (:class:`MultimodalData`; methods must only read ``train`` and ``heldout``),
      ``heldout`` (the train-carved split when the method declares ``needs_heldout``), ``task``;
    - ``phase``, ``epoch`` (0-based within the phase), ``step`` (within the epoch), ``global_step``;
      ``substep`` (index of the current sub-step of the batch, 0 without sub-steps); ``present`` (the
      modalities of the current epoch-plan group; every modality without a plan);
    - ``generator``: a torch.Generator seeded identically on every rank (method randomness);
      ``device_generator``: the same on ``device`` (``generator`` itself on the CPU);
    - ``reduce_mean`` / ``reduce_sum``: cross-process reductions for statistics that set coefficients;
    - ``synced_grads`` / ``perturb`` / ``frozen_norm_stats``: sharpness-aware (perturb, recompute, restore)
      steps (``mmbalance/sam.py``). Modules that join during training: ``mmbalance/pool.py``.
    """

    def __init__(self, *, accelerator: Accelerator, model: nn.Module, data: MultimodalData, task: Task,
                 config: Any, seed: int) -> None:
        self.accelerator = accelerator
        self.model = model
        self.data = data
        self.task = task
        self.config = config
        self.seed = seed
        self.modules: dict[str, nn.Module] = {}
        self.extra: dict[str, ExtraModule] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.heldout: Any = None
        self.phase: str = "joint"
        self.phase_index = 0
        self.epoch = 0
        self.epochs_in_phase = 0
        self.step = 0
        self.global_step = 0
        self.steps_per_epoch = 0
        self.substep = 0
        self.present: tuple[str, ...] = ()
        self.generator = torch.Generator().manual_seed(seed * 7919 + 17)
        self._device_generator: torch.Generator | None = None
        self.train_batches: Callable[..., Iterator[dict[str, torch.Tensor]]] | None = None
        self._logs: dict[str, list[float | torch.Tensor]] = {}
        self._vec_logs: dict[tuple[str, ...], list[torch.Tensor]] = {}  # log_many: one vector per call
        self.perturbations = Perturbations()  # SAM-like methods' active perturbations (mmbalance/sam.py)

    # ---------------------------------------------------------------- conveniences
    @property
    def raw_model(self) -> nn.Module:
        """The unwrapped model (cached: unwrapping is not free and methods call this every step)."""
        if getattr(self, "_raw_for", None) is not self.model:
            self._raw_for = self.model
            self._raw = self.accelerator.unwrap_model(self.model)
        return self._raw

    def raw_module(self, name: str) -> nn.Module:
        """The unwrapped method module ``modules[name]`` (without a DDP or compile wrapper), cached per
        wrapper like :attr:`raw_model`: ``accelerator.unwrap_model`` asks importlib whether DeepSpeed is
        installed on every call (a file-system lookup, ≈ 0.1–0.2 ms), which methods paid every step."""
        mod = self.modules[name]
        cache = self.__dict__.setdefault("_raw_modules", {})
        hit = cache.get(name)
        if hit is None or hit[0] is not mod:
            hit = cache[name] = (mod, self.accelerator.unwrap_model(mod))
        return hit[1]

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def device_generator(self) -> torch.Generator:
        """A generator on ``device``, seeded identically on every rank, for per-step draws used on the
        device (drawing on the CPU and copying costs a blocking copy per draw on a GPU). On the CPU it
        IS ``generator`` (the same numbers as before); on an accelerator its own stream, checkpointed
        by the engine."""
        if self.device.type == "cpu":
            return self.generator
        if self._device_generator is None:
            self._device_generator = torch.Generator(device=self.device).manual_seed(self.seed * 7919 + 29)
        return self._device_generator

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def modalities(self) -> list[str]:
        return list(self.raw_model.modalities)

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: batch[m] for m in self.raw_model.modalities}

    def forward(self, batch: dict[str, torch.Tensor], absent: tuple[str, ...] | set[str] = (),
                only: tuple[str, ...] | None = None) -> ModelOutput:
        """The (wrapped) model's forward. ``absent``: those modalities get their neutral input.
        ``only``: run only these encoders; ``features``/``pooled`` hold only them and fusion receives
        only them (for methods that replace the fusion, e.g. MLA's shared head on one modality)."""
        if only is None:
            return self.model(self.inputs(batch), absent=tuple(absent))
        return self.model({m: batch[m] for m in only}, absent=tuple(absent), only=tuple(only))

    def add_module(self, name: str, module: nn.Module, *, trainable: bool = True, lr: float | None = None,
                   own_optimizer: bool = True) -> nn.Module:
        """Register a method-owned module (heads, classifiers, teachers). Call in ``setup``.

        ``trainable=False``: frozen (eval mode, no gradients, not DDP-wrapped, not optimised, e.g. teachers).
        ``own_optimizer=True``: optimised by its own optimizer (main optimizer type, ``lr`` or the main lr;
        no scheduler, no clipping). ``own_optimizer=False``: its parameters join the main optimizer.
        """
        if name in self.extra:
            raise ValueError(f"module {name!r} is already registered")
        self.extra[name] = ExtraModule(module, trainable, lr, own_optimizer)
        self.modules[name] = module
        return module

    # ---------------------------------------------------------------- SAM-like steps (mmbalance/sam.py)
    def synced_grads(self, loss: torch.Tensor, params, *, retain_graph: bool = False
                     ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """∇_params loss (float32, unscaled under fp16, averaged over processes: autograd.grad bypasses
        DDP's reducer) and a finiteness flag identical on every rank. See :func:`mmbalance.sam.synced_grads`."""
        return synced_grads(self.accelerator, loss, params, retain_graph=retain_graph)

    def perturb(self, params, deltas) -> Perturbation:
        """θ ← θ + δ in place; ``handle.restore()`` (in ``after_backward``) puts θ back bit-exactly. The
        engine raises before an optimizer step while a handle is active."""
        return self.perturbations.perturb(params, deltas)

    def frozen_norm_stats(self):
        """Context manager: the model's normalisation running statistics are restored on exit (a second
        forward at perturbed weights does not update them)."""
        return frozen_norm_stats(self.raw_model)

    def reduce_sum(self, x: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(x, dtype=torch.float64, device=self.device).clone()
        if self.world_size > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return t

    def reduce_mean(self, x: torch.Tensor | float) -> torch.Tensor:
        """Mean over processes of a per-process statistic (equal weights). For ratios, reduce the
        numerator and denominator with ``reduce_sum`` before dividing (README distributed rule 1)."""
        return self.reduce_sum(x) / self.world_size

    def log(self, key: str, value: float | torch.Tensor) -> None:
        """Record a scalar; the engine logs its per-epoch mean to ``metrics.jsonl``. A tensor is kept
        (detached) until the epoch ends, so logging in the hot path costs no host sync."""
        self._logs.setdefault(key, []).append(value.detach() if isinstance(value, torch.Tensor) else float(value))

    def log_many(self, keys: tuple[str, ...] | list[str], values: torch.Tensor) -> None:
        """Record ``len(keys)`` scalars at once: ``values[k]`` under ``keys[k]`` (a vector, e.g. one value
        per modality). One detach per call instead of one per key, no host sync; each key's epoch mean
        is the same as when every value is logged with :meth:`log`."""
        self._vec_logs.setdefault(tuple(keys), []).append(values.detach().reshape(len(keys)))

    def pop_logs(self) -> dict[str, float]:
        """The epoch means of the logged values, then a fresh log. A key's tensor values are summed on
        their device (float64); the sums of every key are read to the host together: one
        device-to-host transfer per device and epoch, however many keys are logged."""
        out: dict[str, float] = {}
        sums: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
        for k, v in self._logs.items():
            if not v:
                continue
            dev = next((x.device for x in v if isinstance(x, torch.Tensor)), None)
            if dev is None:
                out[k] = sum(v) / len(v)
            else:
                out[k] = math.nan  # placeholder: keeps the keys in logging order
                if all(isinstance(x, torch.Tensor) and x.dim() == 0 and x.dtype == v[0].dtype and x.device == dev
                       for x in v):  # the usual case: one stack (the same float64 values as below)
                    vals = torch.stack(v).to(torch.float64)
                else:
                    vals = torch.stack([x.reshape(()).to(dev, torch.float64) if isinstance(x, torch.Tensor) else
                                        torch.tensor(x, dtype=torch.float64, device=dev) for x in v])
                sums.setdefault(dev, []).append((k, vals.sum()))
        for pairs in sums.values():
            for (k, _), total in zip(pairs, torch.stack([t for _, t in pairs]).tolist()):
                out[k] = total / len(self._logs[k])
        grouped: dict[str, tuple[float, int]] = {}
        for keys, vs in self._vec_logs.items():  # log_many: one device-to-host transfer per group and epoch
            for k, total in zip(keys, torch.stack(vs).to(torch.float64).sum(0).tolist()):
                t0, n0 = grouped.get(k, (0.0, 0))
                grouped[k] = (t0 + total, n0 + len(vs))
        for k, (total, n) in grouped.items():  # merged with the same key's log() values, if any
            n_old = len(self._logs.get(k, ()))
            out[k] = (out[k] * n_old + total) / (n_old + n) if n_old else total / n
        self._logs = {}
        self._vec_logs = {}
        return out


class BalancingMethod:
    """Base class of every method. All hooks default to plain joint training (the baseline).

    Class attributes:
      ``hparams_cls``: dataclass of hyperparameters (defaults with a cited source);
      ``supported_tasks``, ``min_modalities``, ``max_modalities``: enforced by the engine;
      ``needs_heldout``: the engine carves ``heldout_fraction`` of TRAIN into ``ctx.heldout``
      (excluded from training); ``find_unused_parameters``: some parameters get no gradient in some
      steps (DDP must know).
    """

    name: ClassVar[str] = "baseline"
    hparams_cls: ClassVar[type] = NoHParams
    supported_tasks: ClassVar[frozenset[str]] = ALL_TASKS
    unsupported_reason: ClassVar[dict[str, str]] = {}
    min_modalities: ClassVar[int] = 1
    max_modalities: ClassVar[int | None] = None
    needs_heldout: ClassVar[bool] = False
    heldout_fraction: ClassVar[float] = 0.08
    find_unused_parameters: ClassVar[bool] = False
    accepts_name_argument: ClassVar[bool] = False
    name_argument: ClassVar[str] = ""

    def __init__(self, hparams: Any = None) -> None:
        self.hp = hparams if hparams is not None else self.hparams_cls()

    # ---------------------------------------------------------------- applicability and model
    def check_applicable(self, data: MultimodalData, modalities: list[str]) -> None:
        """Raise :class:`MethodNotApplicable` with the reason when this method cannot run."""
        label = getattr(self, "registered_name", self.name)
        if data.task not in self.supported_tasks:
            reason = self.unsupported_reason.get(data.task, "")
            raise MethodNotApplicable(
                f"method {label!r} does not support {data.task} (dataset {data.name!r}); supported tasks: "
                f"{', '.join(sorted(self.supported_tasks))}" + (f". Reason: {reason}" if reason else ""))
        n = len(modalities)
        if n < self.min_modalities:
            raise MethodNotApplicable(f"method {label!r} needs at least {self.min_modalities} modalities; "
                                      f"dataset {data.name!r} gives {n} ({', '.join(modalities)})")
        if self.max_modalities is not None and n > self.max_modalities:
            raise MethodNotApplicable(f"method {label!r} supports at most {self.max_modalities} modalities; "
                                      f"dataset {data.name!r} gives {n}")

    def train_config(self, cfg: TrainConfig) -> TrainConfig:
        """The training settings the main optimizer and the lr schedule are built from (default: the
        dataset's, unchanged). A preset that prescribes its own optimizer returns a modified copy
        (``reconboost_official_schedule``: SGD 0.01/0.9/5e-4); ``config.json`` records what was used."""
        return cfg

    def configure_model(self, spec: ModelSpec, data: MultimodalData) -> ModelSpec:
        """Change the model spec before it is built (modality subset, model variant)."""
        return spec

    # ---------------------------------------------------------------- set-up
    def setup(self, ctx: StepContext) -> None:
        """Create method-owned modules (``ctx.add_module``), state, and check the model's capabilities."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]] | None:
        """Parameter groups for the main optimizer (each may carry ``name`` and ``lr_mult``); None = one
        group with every model parameter."""
        return None

    def phases(self) -> list[Phase]:
        return [Phase("joint")]

    # ---------------------------------------------------------------- training hooks
    def on_phase_start(self, ctx: StepContext) -> None: ...

    def on_phase_end(self, ctx: StepContext) -> None: ...

    def on_epoch_start(self, ctx: StepContext) -> None: ...

    def on_epoch_end(self, ctx: StepContext) -> None: ...

    def training_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
        """Forward + loss. Default: the task loss on the fused output."""
        out = ctx.forward(batch)
        return StepOutput(ctx.task.loss(out.logits, batch["label"]), out)

    def training_substeps(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> Iterator[StepOutput] | None:
        """Several optimizer updates per batch: return a generator yielding one :class:`StepOutput` per
        sub-step (each is backpropagated, unscaled, passed to ``after_backward`` with ``ctx.substep`` set,
        clipped and stepped before the next is requested). None (default) = one ``training_step``."""
        return None

    def epoch_plan(self, ctx: StepContext) -> list[BatchGroup] | None:
        """This epoch's ordered training groups (called after ``on_epoch_start``); None = the default
        shuffled loader over the whole training split."""
        return None

    def after_backward(self, ctx: StepContext) -> None:
        """Gradient edits on unscaled, all-reduced gradients (before clipping)."""

    def after_step(self, ctx: StepContext) -> None: ...

    # ---------------------------------------------------------------- inference and state
    @torch.no_grad()
    def predict(self, ctx: StepContext, batch: dict[str, torch.Tensor],
                absent: tuple[str, ...] = ()) -> torch.Tensor:
        """Model output used for evaluation (default: fused logits). ``absent`` is used for the
        per-modality evaluation (the other modalities replaced by their neutral input)."""
        return ctx.forward(batch, absent).logits

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def metrics(self) -> dict[str, float]:
        """Per-epoch coefficients to log (e.g. B_i, ε_i)."""
        return {}
