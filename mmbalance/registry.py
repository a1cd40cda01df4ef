"""Name → factory registries for methods, datasets and models (timm style).

``register_method`` / ``create_method`` / ``list_methods`` and the same for datasets and models.
Registering a taken name raises; an unknown name raises :class:`RegistryError` listing the known ones.
Built-in entries are imported lazily on first lookup so that ``--help`` stays fast.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import MMBalanceError, RegistryError


@dataclass
class Entry:
    name: str
    factory: Callable[..., Any]
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)


class Registry:
    """One kind of named factory. ``kind`` is used in error messages ("method", "dataset", ...)."""

    def __init__(self, kind: str, builtin_package: str | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._builtin_package = builtin_package
        self._loaded = builtin_package is None
        self._broken: dict[str, str] = {}

    def _load_builtins(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self._builtin_package)  # type: ignore[arg-type]
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if not info.name.startswith("_"):
                try:
                    importlib.import_module(f"{self._builtin_package}.{info.name}")
                except Exception as exc:  # e.g. an optional dependency missing: the others stay usable
                    self._broken[info.name] = f"{type(exc).__name__}: {exc}"

    def register(self, name: str, factory: Callable[..., Any], description: str = "",
                 **defaults: Any) -> Callable[..., Any]:
        if not isinstance(name, str) or not name or name != name.lower():
            raise RegistryError(f"{self.kind} name must be a non-empty lower-case string, got {name!r}")
        if name in self._entries:
            raise RegistryError(f"{self.kind} {name!r} is already registered "
                                f"(by {self._entries[name].factory!r})")
        if not description:
            doc = (getattr(factory, "__doc__", None) or "").strip()
            description = doc.splitlines()[0] if doc else ""
        self._entries[name] = Entry(name, factory, description, dict(defaults))
        return factory

    def get(self, name: str) -> Entry:
        self._load_builtins()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            broken = "".join(f"; module {m!r} failed to import ({e})" for m, e in self._broken.items())
            raise RegistryError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}{broken}") from None

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._entries)

    def describe(self) -> dict[str, str]:
        self._load_builtins()
        return {n: self._entries[n].description for n in sorted(self._entries)}

    def __contains__(self, name: str) -> bool:
        self._load_builtins()
        return name in self._entries


METHODS = Registry("method", "mmbalance.methods")
DATASETS = Registry("dataset", "mmbalance.datasets")
MODELS = Registry("model", "mmbalance.models")


def _decorator(registry: Registry, name: str, description: str, defaults: dict[str, Any]):
    def wrap(factory: Callable[..., Any]) -> Callable[..., Any]:
        registry.register(name, factory, description, **defaults)
        return factory

    return wrap


# ---------------------------------------------------------------- methods
def register_method(name: str, description: str = "", **defaults: Any):
    """Decorator: register a :class:`BalancingMethod` subclass under ``name``.

    ``defaults`` bind other hyperparameter defaults (this is how presets such as ``cggm_paper`` are
    made: the same class registered again under another name with other defaults).
    """
    return _decorator(METHODS, name, description, defaults)


def method_entry(name: str) -> Entry:
    """Registry entry for ``name``; ``unimodal:<m>`` resolves to ``unimodal`` with modality m."""
    base = name.split(":", 1)[0] if ":" in name else name
    entry = METHODS.get(base)
    if ":" in name:
        if not getattr(entry.factory, "accepts_name_argument", False):
            raise RegistryError(f"method {base!r} takes no ':<argument>' suffix (got {name!r})")
        return Entry(name, entry.factory, entry.description,
                     {**entry.defaults, entry.factory.name_argument: name.split(":", 1)[1]})
    return entry


def create_method(name: str, **hparams: Any):
    """Instantiate a registered method: registered defaults ◄ ``hparams``."""
    from .config import build_hparams

    entry = method_entry(name)
    hp = build_hparams(entry.factory.hparams_cls, {**entry.defaults, **hparams}, where=f"method {name!r}")
    return entry.factory(hp)


def list_methods() -> list[str]:
    return METHODS.names()


# ---------------------------------------------------------------- datasets
def register_dataset(name: str, description: str = "", **defaults: Any):
    """Decorator: register a dataset loader ``fn(options, data_dir) -> MultimodalData``.

    The loader function must carry an ``options_cls`` attribute (a dataclass of its options);
    ``defaults`` bind preset values (``mfeat-hard`` = mfeat loader with other views).
    """
    return _decorator(DATASETS, name, description, defaults)


def create_dataset(name: str, data_dir: Any = None, **options: Any):
    """Load a registered dataset: preset defaults ◄ ``options``."""
    from .config import build_hparams

    entry = DATASETS.get(name)
    opts = build_hparams(entry.factory.options_cls, {**entry.defaults, **options}, where=f"dataset {name!r}")
    try:
        data = entry.factory(opts, data_dir)
    except MMBalanceError:
        raise
    except (OSError, EOFError, ValueError, KeyError, TypeError, IndexError) as exc:
        # a loader met a file it could not parse (truncated, wrong type): exit 2 with the reason, not a traceback
        from .errors import DatasetFormatError

        raise DatasetFormatError(f"dataset {name!r}: its files could not be read ({type(exc).__name__}: {exc}); "
                                 f"data dir {data_dir!r}, options {options or '{}'}") from exc
    data.name = name
    return data


def list_datasets() -> list[str]:
    return DATASETS.names()


# ---------------------------------------------------------------- models
def register_model(name: str, description: str = ""):
    """Decorator: register a model builder ``fn(*, modalities, input_shapes, out_dim, **kw)``."""
    return _decorator(MODELS, name, description, {})


def create_model(name: str, **kwargs: Any):
    return MODELS.get(name).factory(**kwargs)


def list_models() -> list[str]:
    return MODELS.names()
