"""Helpers for methods that act on encoder outputs through forward hooks."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def map_tensors(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor of an encoder output (a tensor, or a tuple/list/dict of them, nested);
    anything else is returned unchanged."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return type(out)(map_tensors(o, fn) for o in out)
    if isinstance(out, dict):
        return {k: map_tensors(v, fn) for k, v in out.items()}
    return out


def output_tensors(z: Any) -> list[torch.Tensor]:
    """The tensors one modality contributes to fusion (a tensor, or a tuple/list/dict of tensors; a dict in
    key order)."""
    if isinstance(z, torch.Tensor):
        return [z]
    if isinstance(z, dict):
        return [z[k] for k in sorted(z)]
    return list(z)
