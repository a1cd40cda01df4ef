"""A value a method derives from the model once (parameter lists, per-module flags) instead of every step."""
from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from torch import nn

T = TypeVar("T")


class PerModel(Generic[T]):
    """``build(model)``, computed on the first call and again only when a different model object is passed
    (a rebuilt or re-wrapped model): walking the modules every step costs tens of microseconds per step."""

    def __init__(self, build: Callable[[nn.Module], T]) -> None:
        self.build = build
        self._model: nn.Module | None = None
        self._value: T | None = None

    def __call__(self, model: nn.Module) -> T:
        if self._model is not model:
            self._value = self.build(model)
            self._model = model
        return self._value  # type: ignore[return-value]
