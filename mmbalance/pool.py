"""Modules that join a run while it trains (AUG's growing classifier ensemble), without rebuilding the
optimizer, the DDP wrapper or the checkpoint layout.

A :class:`ModulePool` pre-allocates ``capacity`` members in ``setup`` (so every member is in the main
optimizer's parameter groups, in the DDP wrapper's parameter list and in every checkpoint from the
first one) and activates them one by one. Inactive members are never called, so their gradients stay
None: torch optimizers skip them (no momentum, no weight decay, no state), and DDP with
``find_unused_parameters=True`` leaves them alone. The number of active members is a buffer, so it is
saved and restored with the module's ``state_dict`` (a killed and resumed run continues with the same
members, the optimizer state of the active ones included), and a Python mirror of it keeps the hot
path free of host reads.

Adding a ``nn.Linear(...)`` to a model after the optimizer was built (the AUG release's ``add_layer``)
instead gives a module whose gradients are never applied, that DDP does not reduce and that a
checkpoint does not hold: docs/methods/README.md "Engine capabilities".
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["ModulePool", "PoolFullError"]


class PoolFullError(RuntimeError):
    """``activate`` asked for more members than the pool was built with."""


class ModulePool(nn.Module):
    """``capacity`` members made by ``make(k)``; the first ``initial`` are active from the start."""

    def __init__(self, make: Callable[[int], nn.Module], capacity: int, initial: int = 0) -> None:
        super().__init__()
        if not 0 <= initial <= capacity:
            raise ValueError(f"ModulePool: initial={initial} must lie in [0, capacity={capacity}]")
        self.members = nn.ModuleList([make(k) for k in range(capacity)])
        self.register_buffer("n_active_", torch.tensor(initial, dtype=torch.long))
        self._n = initial

    @property
    def capacity(self) -> int:
        return len(self.members)

    @property
    def n_active(self) -> int:
        """Active members (a Python int: no host read)."""
        return self._n

    def active(self) -> list[nn.Module]:
        return list(self.members[:self._n])

    def activate(self, n: int = 1) -> None:
        """Make the next ``n`` members active (they are trained from the next forward on)."""
        if self._n + n > self.capacity:
            raise PoolFullError(f"ModulePool: {self._n} of {self.capacity} members active, cannot add {n}; "
                                "build the pool with a larger capacity")
        self._n += n
        self.n_active_.fill_(self._n)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._n = int(self.n_active_)  # once per checkpoint load
