"""Hyperparameter search spaces, declared where the hyperparameters are.

A method's searchable strengths are marked on its hparams dataclass with field metadata::

    alpha: float = field(default=0.1, metadata={"search": LogUniform(0.03, 1.0)})

:func:`search_space` reads them. Only numeric strengths are searched; switches (``Literal`` modes,
booleans, fidelity flags) never are — a leaderboard row *is* its preset. The shared training space
(:func:`training_space`) is applied to every row alike (baseline and unimodal rows included): the
learning rate within ×/÷ 4 and the weight decay within ×/÷ 10 of the dataset's defaults.

Distributions are frozen, JSON-serialisable and sample from a caller-supplied
``numpy.random.RandomState``, so a trial's values depend only on the seed it is given.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ConfigError

__all__ = ["Uniform", "LogUniform", "IntUniform", "Choice", "Distribution", "search_space", "training_space",
           "distribution_from_json", "seed_hash", "space_to_json", "space_hash"]


def seed_hash(*parts: Any) -> int:
    """A seed derived from ``parts`` that is stable across processes and Python versions (never ``hash``)."""
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


@dataclass(frozen=True)
class Uniform:
    lo: float
    hi: float
    kind: typing.ClassVar[str] = "uniform"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi):
            raise ValueError(f"Uniform needs finite lo < hi, got ({self.lo}, {self.hi})")

    def sample(self, rs) -> float:
        return float(rs.uniform(self.lo, self.hi))

    def contains(self, v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and self.lo <= v <= self.hi

    def to_json(self) -> list[Any]:
        return [self.kind, self.lo, self.hi]


@dataclass(frozen=True)
class LogUniform(Uniform):
    kind: typing.ClassVar[str] = "log"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lo <= 0:
            raise ValueError(f"LogUniform needs lo > 0, got {self.lo}")

    def sample(self, rs) -> float:
        return float(math.exp(rs.uniform(math.log(self.lo), math.log(self.hi))))

    def contains(self, v: Any) -> bool:  # exp(log(x)) may round a hair outside the bounds
        return super().contains(v) or (isinstance(v, float) and self.lo * (1 - 1e-12) <= v <= self.hi * (1 + 1e-12))


@dataclass(frozen=True)
class IntUniform:
    """Integers ``lo..hi`` inclusive."""

    lo: int
    hi: int
    kind: typing.ClassVar[str] = "int"

    def __post_init__(self) -> None:
        if not (isinstance(self.lo, int) and isinstance(self.hi, int) and self.lo < self.hi):
            raise ValueError(f"IntUniform needs integers lo < hi, got ({self.lo}, {self.hi})")

    def sample(self, rs) -> int:
        return int(rs.randint(self.lo, self.hi + 1))

    def contains(self, v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and self.lo <= v <= self.hi

    def to_json(self) -> list[Any]:
        return [self.kind, self.lo, self.hi]


@dataclass(frozen=True)
class Choice:
    values: tuple[Any, ...]
    kind: typing.ClassVar[str] = "choice"

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", tuple(self.values))
        if len(self.values) < 2:
            raise ValueError(f"Choice needs at least two values, got {self.values!r}")

    def sample(self, rs) -> Any:
        return self.values[int(rs.randint(len(self.values)))]

    def contains(self, v: Any) -> bool:
        return v in self.values

    def to_json(self) -> list[Any]:
        return [self.kind, list(self.values)]


Distribution = Uniform | LogUniform | IntUniform | Choice
_KINDS = {"uniform": Uniform, "log": LogUniform, "int": IntUniform}


def distribution_from_json(raw: Any, where: str = "space") -> Distribution:
    """Inverse of ``to_json``: ``["log", lo, hi]``, ``["uniform", lo, hi]``, ``["int", lo, hi]``,
    ``["choice", [v, ...]]``."""
    try:
        kind = raw[0]
        if kind == "choice":
            return Choice(tuple(raw[1]))
        cls = _KINDS[kind]
        lo, hi = raw[1], raw[2]
        if len(raw) != 3:
            raise ValueError("expected [kind, lo, hi]")
        return cls(lo, hi)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: expected [\"log\"|\"uniform\"|\"int\", lo, hi] or [\"choice\", [values]], "
                          f"got {raw!r} ({exc})") from None



def _numeric_type(tp: Any) -> type | None:
    """int/float for a field annotated ``int``, ``float`` or ``X | None``; None otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _numeric_type(args[0]) if len(args) == 1 else None
    if tp is bool or origin is Literal:
        return None
    return tp if tp in (int, float) else None


def search_space(cls: type | None) -> dict[str, Distribution]:
    """``{field name: distribution}`` of the fields of dataclass ``cls`` that carry ``metadata["search"]``.

    Raises :class:`ConfigError` (naming the class and field) when a space is declared on a field that is
    not numeric (a boolean, a ``Literal`` switch, a string) or is not a distribution.
    """
    if cls is None or not dataclasses.is_dataclass(cls):
        return {}
    hints = typing.get_type_hints(cls)
    out: dict[str, Distribution] = {}
    for f in dataclasses.fields(cls):
        dist = f.metadata.get("search") if f.metadata else None
        if dist is None:
            continue
        where = f"{cls.__name__}.{f.name}"
        if not isinstance(dist, (Uniform, IntUniform, Choice)):
            raise ConfigError(f"{where}: search metadata must be Uniform, LogUniform, IntUniform or Choice, "
                              f"got {dist!r}")
        num = _numeric_type(hints[f.name])
        if num is None:
            raise ConfigError(f"{where}: a search space is declared on a non-numeric field "
                              f"({hints[f.name]!r}); only numeric strengths are searched, switches never")
        if num is int and not isinstance(dist, (IntUniform, Choice)):
            raise ConfigError(f"{where}: integer field needs IntUniform or Choice, got {type(dist).__name__}")
        out[f.name] = dist
    return out


def training_space(lr: float, weight_decay: float) -> dict[str, Distribution]:
    """The shared training space around a dataset's defaults: ``train.lr`` LogUniform(lr/4, 4·lr),
    ``train.weight_decay`` LogUniform(wd/10, 10·wd) (fixed when the default weight decay is 0)."""
    space: dict[str, Distribution] = {"train.lr": LogUniform(lr / 4, lr * 4)}
    if weight_decay > 0:
        space["train.weight_decay"] = LogUniform(weight_decay / 10, weight_decay * 10)
    return space


def space_to_json(space: dict[str, Distribution]) -> dict[str, Any]:
    return {k: space[k].to_json() for k in sorted(space)}


def space_hash(space: dict[str, Distribution]) -> str:
    blob = json.dumps(space_to_json(space), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def method_search_space(method: str) -> dict[str, Distribution]:
    """The searched hyperparameters of a registered method or preset: its class's space, except fields that
    the preset binds to a value outside that space (e.g. ``greedy_vanilla``'s ``epsilon = inf``, which turns
    the re-balancing off): such a binding is the preset's identity and stays fixed."""
    from .registry import method_entry

    entry = method_entry(method)
    space = search_space(entry.factory.hparams_cls)
    return {k: d for k, d in space.items() if k not in entry.defaults or d.contains(entry.defaults[k])}
