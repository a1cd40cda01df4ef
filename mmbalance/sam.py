"""Perturb, recompute, restore: the engine's support for sharpness-aware (SAM-like) methods.

A SAM-like step needs a clean gradient, a parameter perturbation built from it, a second forward at the
perturbed point, and an exact restore before the optimizer step. It stays ONE engine step per batch
(one backward by the engine, one unscale, one clip, one optimizer step, one loss-scale update):

- ``training_step``: forward 1 → loss → :func:`synced_grads` (the last call without ``retain_graph``)
  → build the deltas → :meth:`Perturbations.perturb` → inside :func:`frozen_norm_stats`, forward 2 →
  return L(θ + ε). The engine backpropagates it (DDP-synchronised), unscales under fp16, then calls
- ``after_backward``: ``handle.restore()`` (bit-exact copy back), then any gradient substitution.
  Clipping and the optimizer step follow. The engine refuses to step while a handle is still active.

Used through :class:`~mmbalance.interface.StepContext` (``ctx.synced_grads``, ``ctx.perturb``,
``ctx.frozen_norm_stats``); docs/methods/README.md "Engine capabilities".
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["Perturbation", "Perturbations", "PerturbationActiveError", "synced_grads", "frozen_norm_stats"]


class PerturbationActiveError(RuntimeError):
    """An optimizer step was about to be taken at perturbed weights (a method did not restore)."""


def synced_grads(accelerator, loss: torch.Tensor, params: Sequence[torch.Tensor], *,
                 retain_graph: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """∇_params loss as float32 tensors shaped like ``params``, averaged over processes, and a finiteness
    flag identical on every rank (a 0-dim bool tensor; no host sync; checked under fp16 only, else True).

    - ``torch.autograd.grad`` with ``allow_unused`` (an unused parameter gets zeros). It bypasses DDP's
      reducer (which fires on ``.grad`` accumulation), so the result is all-reduced here: one flat
      float32 buffer, SUM / world size — the gradient of the global-batch mean loss, as DDP's own.
    - fp16 (a GradScaler): the gradient of scale·loss divided by the scale (the scale read as a device
      tensor), so an overflow shows as a non-finite flag instead of a silent underflow.
    - Gradient accumulation (``accelerator.gradient_accumulation_steps`` k > 1): divided by k, as
      ``accelerator.backward`` divides the loss.
    """
    params = list(params)
    scaler = accelerator.scaler
    scale = scaler.scale(torch.ones((), device=loss.device)) if scaler is not None else None
    target = loss * scale if scale is not None else loss
    grads = torch.autograd.grad(target, params, retain_graph=retain_graph, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)])
    if scale is not None:
        flat = flat / scale.float()
    k = int(getattr(accelerator, "gradient_accumulation_steps", 1) or 1)
    if k > 1:
        flat = flat / k
    if accelerator.num_processes > 1:
        flat = accelerator.reduce(flat, reduction="sum") / accelerator.num_processes
    # after the all-reduce, so a NaN anywhere reaches every rank; only under fp16 (a float32 non-finite
    # gradient comes with a non-finite loss, which fails the run anyway): no full pass over the gradient
    finite = torch.isfinite(flat).all() if scale is not None else torch.ones((), dtype=torch.bool, device=flat.device)
    return [t.view_as(p) for t, p in zip(flat.split([p.numel() for p in params]), params)], finite


class Perturbation:
    """One active perturbation: exact copies of the touched parameters, restored by :meth:`restore`."""

    def __init__(self, owner: Perturbations, params: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
        self._owner = owner
        self.params = params
        self.saved = saved

    @property
    def active(self) -> bool:
        return self in self._owner.active

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved values back (bit-exact; subtracting ε would not be) and retire the handle."""
        if not self.active:
            return
        torch._foreach_copy_(self.params, self.saved)
        self._owner.active.remove(self)


class Perturbations:
    """The engine's registry of active perturbations (one per :class:`StepContext`)."""

    def __init__(self) -> None:
        self.active: list[Perturbation] = []

    @torch.no_grad()
    def perturb(self, params: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor]) -> Perturbation:
        """θ ← θ + δ in place for every parameter (``deltas`` may be float32 for a lower-precision
        parameter); returns the handle whose ``restore()`` puts θ back exactly. Perturb only after the
        last use of the clean graph: in-place changes invalidate tensors saved for its backward."""
        params = list(params)
        if len(params) != len(deltas):
            raise ValueError(f"perturb: {len(params)} parameters but {len(deltas)} deltas")
        saved = [p.detach().clone() for p in params]
        torch._foreach_add_(params, [d.to(p.dtype) for d, p in zip(deltas, params)])
        handle = Perturbation(self, params, saved)
        self.active.append(handle)
        return handle

    def check_restored(self) -> None:
        """Raise before an optimizer step taken at perturbed weights."""
        if self.active:
            n = sum(len(h.params) for h in self.active)
            self.active.clear()
            raise PerturbationActiveError(
                f"{n} parameter(s) are still perturbed at the optimizer step: a method called ctx.perturb(...) "
                "and did not call restore() on the handle (do it first thing in after_backward)")


_NORM_TYPES = (nn.modules.batchnorm._NormBase,)


@contextmanager
def frozen_norm_stats(model: nn.Module) -> Iterator[None]:
    """Every normalisation layer's running statistics (running mean, running variance,
    ``num_batches_tracked``) are left as they were: a second forward at perturbed weights trains with
    batch statistics as usual but does not update the running estimates.

    The buffers are swapped for copies during the forward and the original tensors put back on exit
    (never written in place: BatchNorm saves its running buffers for its backward, so an in-place
    restore before the engine's backward would fail autograd's version check). The official MASAM code
    sets the BatchNorm momentum to 0 instead, which leaves ``num_batches_tracked`` incrementing."""
    names = ("running_mean", "running_var", "num_batches_tracked")
    swapped = []
    for mod in model.modules():
        if isinstance(mod, _NORM_TYPES):
            for n in names:
                b = getattr(mod, n, None)
                if b is not None:
                    swapped.append((mod, n, b))
                    setattr(mod, n, b.clone())
    try:
        yield
    finally:
        for mod, n, b in swapped:
            setattr(mod, n, b)
