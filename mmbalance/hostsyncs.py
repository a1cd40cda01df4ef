"""Counting host syncs in training (``benchmarks/host_syncs.py``, ``tests/test_host_syncs.py``).

On a GPU every read of a device tensor's value on the host (``item``, ``float()``, ``tolist`` ...) and every
blocking copy between host and device stalls the pipeline. This machine has no GPU, so two counters run
together during a CPU run:

- **all reads**: every conversion of a tensor to a Python value (``item``, ``float``/``int``/``bool``,
  ``tolist``, ``numpy``, ``__index__``), whatever the tensor is — ``torch.Tensor`` methods patched;
- **the device model**: a ``TorchFunctionMode`` tags every tensor that would live on the accelerator
  on a GPU, and classifies each read by its tensor's tag. A tensor is on the "device" when it is a
  parameter or buffer of the model or of a method's module, a batch the method is given, a tensor
  created with ``device=`` the accelerator's device (``ctx.device``, ``x.device`` of a device tensor:
  the mode hands out the accelerator's own device object, and another one for ``x.device`` of a host
  tensor, so identity tells them apart; ``"cpu"`` is the host; any other CPU device object, e.g. one
  made inside torch, leaves the placement unchanged), moved there with ``.to(...)``, or computed from
  any device tensor. Everything else is a
  host tensor by design (``ctx.generator`` draws, bookkeeping built from Python numbers, the dataset's
  CPU copies).

Per kind it counts:

- ``device``: reads of device tensors, plus device→host copies (``.cpu()``, ``.to("cpu")``; on the CPU
  a ``.cpu()`` of a device tensor returns an untagged alias, so the read that follows is not counted
  twice), plus in-place writes of device values into host tensors (``host[i] = dev_scalar``), plus
  the ops that sync without a conversion: boolean-mask indexing ``x[mask]``, ``nonzero``, ``unique``,
  ``masked_select``, ``bincount``, one-argument ``torch.where``, ``torch.equal`` (kinds named after the
  op); each is a sync on a GPU;
- ``host``: reads of host tensors (free on a GPU, cheap here);
- ``h2d``: host→device copies (``torch.tensor(list, device=dev)``, ``host_tensor.to(dev)``,
  ``dev.new_tensor(...)``, ``dev.copy_(host)``); blocking by default on a GPU.

Reads inside backward hooks are counted as reads but not classified (the mode is off while autograd
runs; no method registers backward hooks). Counting is on only while ``Trainer._train_epoch`` runs
(epoch start/end hooks included), and separately while ``Trainer._train_steps`` runs (the steps only).
"""
from __future__ import annotations

import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

READS = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy", "__index__")
_DATA_FACTORIES = {"tensor", "as_tensor", "asarray"}
# ops whose output size or Python result depends on device values: a sync on a GPU without a conversion
_HIDDEN_SYNCS = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount", "equal",
                 "allclose", "is_nonzero", "__contains__", "__format__", "__repr__"}
_INPLACE_DUNDER = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ior__", "__iand__"}
_REPO = str(Path(__file__).resolve().parents[1])
_HERE = str(Path(__file__).resolve())


@dataclass
class Counts:
    """Counts of one window (the whole training epochs, or the steps only) by kind."""

    reads: Counter[str] = field(default_factory=Counter)
    device: Counter[str] = field(default_factory=Counter)
    host: Counter[str] = field(default_factory=Counter)
    h2d: Counter[str] = field(default_factory=Counter)
    where: Counter[str] = field(default_factory=Counter)

    def total(self, what: str = "reads") -> int:
        return sum(getattr(self, what).values())


def _call_site() -> str:
    """``file:line`` of the innermost frame in this repository (outside this module)."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(_REPO) and name != _HERE:
            return f"{Path(name).relative_to(_REPO)}:{f.f_lineno}"
        f = f.f_back
    return "?"


class DeviceTracker(TorchFunctionMode):
    """Tags tensors that would be on the accelerator and counts reads and host↔device copies."""

    def __init__(self) -> None:
        super().__init__()
        self.dev: torch.device | None = None  # the accelerator's device object (identity matters)
        self.host = torch.device("cpu")  # what ``.device`` of a host tensor returns (identity matters)
        self.tags: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.windows: list[Counts] = []  # the open counting windows (nested: epoch ⊃ steps)
        self._orig: dict[str, Any] = {}
        self._reading = False

    # ------------------------------------------------------------------ tags
    def on_device(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t in self.tags

    def tag(self, obj: Any) -> None:
        for t in tree_flatten(obj)[0]:
            if isinstance(t, torch.Tensor):
                self.tags[t] = True

    def tag_module(self, module: torch.nn.Module) -> None:
        self.tag([*module.parameters(), *module.buffers()])

    def _is_dev_target(self, d: Any) -> bool | None:
        """True: the accelerator; False: the host; None: no device given."""
        if d is None:
            return None
        if isinstance(d, torch.Tensor):
            return self.on_device(d)
        if isinstance(d, torch.device):
            if d is self.dev or d.type not in ("cpu", "meta"):
                return True
            # ``x.device`` of a host tensor: the host; any other CPU device object (made inside torch, e.g.
            # clip_grad_norm_'s per-device groups, or by hand) is ambiguous here: placement unchanged
            return False if d is self.host else None
        if isinstance(d, (str, int)) and not isinstance(d, bool):
            try:
                return torch.device(d).type != "cpu"
            except (RuntimeError, TypeError):
                return None
        return None

    # ------------------------------------------------------------------ counting
    def _add(self, what: str, kind: str) -> None:
        if not self.windows:
            return
        site = _call_site() if what in ("device", "h2d") else None
        for w in self.windows:
            getattr(w, what)[kind] += 1
            if site is not None:
                w.where[f"{what} {kind} {site}"] += 1

    def _read(self, name: str, t: torch.Tensor) -> None:
        if not self.windows:
            return
        for w in self.windows:
            w.reads[name] += 1
        self._add("device" if self.on_device(t) else "host", name)

    def __enter__(self):
        for name in READS:
            orig = getattr(torch.Tensor, name)
            self._orig[name] = orig

            def wrapper(t, *a, __orig=orig, __name=name, **k):
                if self._reading:  # the mode re-dispatches the conversion to this wrapper: count once
                    return __orig(t, *a, **k)
                self._read(__name, t)
                self._reading = True
                try:
                    return __orig(t, *a, **k)
                finally:
                    self._reading = False

            setattr(torch.Tensor, name, wrapper)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(torch.Tensor, name, orig)
        self._orig = {}
        return super().__exit__(*exc)

    # ------------------------------------------------------------------ the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a Tensor property
            attr = getattr(getattr(func, "__self__", None), "__name__", "")
            src = args[0] if args else None
            if attr == "device" and self.dev is not None and isinstance(src, torch.Tensor):
                return self.dev if self.on_device(src) else self.host
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and self.on_device(src):
                self.tags[out] = True
            return out
        flat = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        any_dev = any(self.on_device(a) for a in flat)
        first = args[0] if args else None
        target = self._target(name, args, kwargs)
        if target is False and self.on_device(first):  # a device→host copy: a sync
            self._add("device", name)
            out = func(*args, **kwargs)
            if out is first and not first.requires_grad:  # CPU no-op: an untagged alias stands for the copy
                out = first.view_as(first)
            return out
        if target is True and isinstance(first, torch.Tensor) and not self.on_device(first) and name in ("to", "cuda"):
            self._add("h2d", name)
        if target is True and name in _DATA_FACTORIES and not self.on_device(first):
            self._add("h2d", name)
        if name == "new_tensor" and self.on_device(first) and not self.on_device(args[1] if len(args) > 1 else None):
            self._add("h2d", name)
        if any_dev and self._hidden_sync(name, args, kwargs):
            self._add("device", name)
        inplace = name in _INPLACE_DUNDER or (name.endswith("_") and not name.startswith("_"))
        if inplace and isinstance(first, torch.Tensor):
            others = [a for a in flat if a is not first]
            if not self.on_device(first) and any(self.on_device(a) for a in others):
                self._add("device", name)  # a device value written into a host tensor
                return func(*args, **kwargs)
            if self.on_device(first) and any(not self.on_device(a) and a.dim() > 0 for a in others):
                self._add("h2d", name)
        out = func(*args, **kwargs)
        if target is True or (target is None and any_dev):
            self.tag(out)
        return out

    @staticmethod
    def _hidden_sync(name: str, args: tuple, kwargs: dict) -> bool:
        """A data-dependent output size or a Python result: boolean-mask indexing (``x[mask]``, and
        ``x[mask] = tensor``), ``nonzero``/``unique``/``masked_select``/``bincount``, one-argument
        ``torch.where``, ``repeat_interleave`` with tensor repeats and no ``output_size``, ``equal``."""
        if name in _HIDDEN_SYNCS:
            return True
        if name == "where":
            return len(args) + len(kwargs) == 1
        if name == "repeat_interleave":
            reps = args[1] if len(args) > 1 else kwargs.get("repeats")
            return isinstance(reps, torch.Tensor) and reps.numel() > 1 and kwargs.get("output_size") is None
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            masked = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
            if name == "__setitem__":  # x[mask] = scalar is a masked fill; a tensor of values needs the count
                return masked and len(args) > 2 and isinstance(args[2], torch.Tensor) and args[2].numel() > 1
            return masked
        return False

    def _target(self, name: str, args: tuple, kwargs: dict) -> bool | None:
        """Where the call puts its result: True device, False host, None unchanged/not a placement."""
        if name == "cpu":
            return False
        if name == "cuda":
            return True
        if name == "to":
            for a in (*args[1:], kwargs.get("device"), kwargs.get("other")):
                r = self._is_dev_target(a)
                if r is not None:
                    return r
            return None
        return self._is_dev_target(kwargs.get("device"))


@dataclass
class SyncReport:
    """What :func:`count_host_syncs` measured; ``epoch`` covers whole training epochs, ``steps`` the steps."""

    steps: int
    epoch: Counts
    in_steps: Counts

    def per_step(self, what: str = "reads", window: str = "epoch") -> float:
        return (self.epoch if window == "epoch" else self.in_steps).total(what) / max(1, self.steps)


def count_host_syncs(method: str, dataset: str = "mfeat", *, epochs: int = 2, sets: dict[str, Any] | None = None,
                     seed: int = 0) -> SyncReport | None:
    """Train ``method`` on ``dataset`` (single process, CPU) under the counters; None when not applicable."""
    from mmbalance import engine
    from mmbalance.errors import MethodNotApplicable
    from mmbalance.testing import build_trainer

    tracker = DeviceTracker()
    epoch_w, steps_w = Counts(), Counts()
    steps = [0]
    real_make, real_epoch, real_steps = engine.make_accelerator, engine.Trainer._train_epoch, engine.Trainer._train_steps

    def make_accelerator(*a, **k):
        acc = real_make(*a, **k)
        tracker.dev = acc.device
        return acc

    measured: list[Any] = [None]  # the trainer being measured (not a nested one, e.g. UMT's teacher training)

    def train_epoch(self, pos, phase, schedule):
        if self is not measured[0]:
            return real_epoch(self, pos, phase, schedule)
        for mod in [self.ctx.model, *(ex.module for ex in self.ctx.extra.values())]:
            tracker.tag_module(mod)
        before = pos.global_step
        tracker.windows.append(epoch_w)
        try:
            return real_epoch(self, pos, phase, schedule)
        finally:
            tracker.windows = [w for w in tracker.windows if w is not epoch_w]
            steps[0] += pos.global_step - before

    def train_steps(self, *a, **k):
        if self is not measured[0]:
            return real_steps(self, *a, **k)
        tracker.windows.append(steps_w)
        try:
            return real_steps(self, *a, **k)
        finally:
            tracker.windows = [w for w in tracker.windows if w is not steps_w]

    def tagging(fn):
        def wrapped(ctx, batch, *a, **k):
            tracker.tag(batch)
            return fn(ctx, batch, *a, **k)
        return wrapped

    engine.make_accelerator, engine.Trainer._train_epoch, engine.Trainer._train_steps = make_accelerator, train_epoch, train_steps
    try:
        with tempfile.TemporaryDirectory() as tmp, tracker:
            try:
                tr = build_trainer(method, dataset, run_dir=Path(tmp) / "run", epochs=epochs, seed=seed,
                                   sets={"train.modality_eval": "none", "train.diagnostics": "none", **(sets or {})},
                                   output_dir=tmp)  # teachers (UMT, G2D) cached in the temporary folder too
            except MethodNotApplicable:
                return None
            measured[0] = tr
            m = tr.method
            m.training_step = tagging(m.training_step)
            m.training_substeps = tagging(m.training_substeps)
            batches = tr.ctx.train_batches

            def train_batches(*a, **k):
                for b in batches(*a, **k):
                    tracker.tag(b)
                    yield b

            tr.ctx.train_batches = train_batches
            tr.fit()
    finally:
        engine.make_accelerator, engine.Trainer._train_epoch, engine.Trainer._train_steps = real_make, real_epoch, real_steps
    return SyncReport(steps[0], epoch_w, steps_w)
