"""Name → factory registries for methods, datasets and models (timm style).

``register_method`` / ``create_method`` / ``list_methods`` and the same for datasets and models.
Registering a taken name raises; an unknown name raises :class:`RegistryError` listing the known ones.
Built-in entries are imported lazily on first lookup so that ``--help`` stays fast.

Plug-ins (methods or datasets that live outside this repository) are found three ways, all loaded on first
lookup like the built-ins: the entry-point groups ``mmbalance.methods`` / ``mmbalance.datasets`` of installed
packages (each entry point names a module to import, whose ``register_*`` decorators run on import), the
``MMBALANCE_PLUGINS`` environment variable, and :func:`load_plugins` (the CLI's ``--plugin``). A plug-in is a
module name (``mypkg.my_method``) or a path to a ``.py`` file. A module that fails to import is recorded as
broken: ``--list`` shows it with its error, and asking for a name it would have provided fails with that error.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import MMBalanceError, RegistryError

PLUGINS_ENV = "MMBALANCE_PLUGINS"


@dataclass
class Entry:
    name: str
    factory: Callable[..., Any]
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)


class Registry:
    """One kind of named factory. ``kind`` is used in error messages ("method", "dataset", ...)."""

    def __init__(self, kind: str, builtin_package: str | None = None, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._builtin_package = builtin_package
        self._entry_point_group = entry_point_group
        self._loaded = builtin_package is None
        #: module (or plug-in) name → the error that stopped its import
        self._broken: dict[str, str] = {}

    def _load_builtins(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self._builtin_package)  # type: ignore[arg-type]
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if not info.name.startswith("_"):
                self._import(f"{self._builtin_package}.{info.name}", info.name)
        if self._entry_point_group:
            from importlib.metadata import entry_points

            for ep in sorted(entry_points(group=self._entry_point_group), key=lambda e: e.name):
                self._import(ep.value.split(":", 1)[0], ep.name)
        for spec in filter(None, os.environ.get(PLUGINS_ENV, "").split(os.pathsep)):
            load_plugin(spec, registry=self)

    def _import(self, module: str, label: str) -> None:
        try:
            importlib.import_module(module)
        except Exception as exc:  # e.g. an optional dependency missing: the others stay usable
            self._broken[label] = f"{type(exc).__name__}: {exc}"

    @property
    def broken(self) -> dict[str, str]:
        """Modules that failed to import, with their errors (shown by ``--list``)."""
        self._load_builtins()
        return dict(self._broken)

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
            pass
        for module, err in self._broken.items():  # methods/foo.py provides "foo" (and "foo_*" presets)
            stem = module.rsplit(".", 1)[-1].removesuffix(".py").rsplit("/", 1)[-1]
            if name == stem or name.startswith(stem + "_"):
                raise RegistryError(f"{self.kind} {name!r} is broken: module {module!r} failed to import: {err}")
        known = sorted(self._entries)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        broken = "".join(f"; module {m!r} failed to import ({e})" for m, e in self._broken.items())
        raise RegistryError(f"unknown {self.kind} {name!r}{hint}; known {self.kind}s: "
                            f"{', '.join(known) or '(none)'}{broken}") from None

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._entries)

    def describe(self) -> dict[str, str]:
        self._load_builtins()
        return {n: self._entries[n].description for n in sorted(self._entries)}

    def __contains__(self, name: str) -> bool:
        self._load_builtins()
        return name in self._entries


METHODS = Registry("method", "mmbalance.methods", "mmbalance.methods")
DATASETS = Registry("dataset", "mmbalance.datasets", "mmbalance.datasets")
MODELS = Registry("model", "mmbalance.models", "mmbalance.models")


def load_plugin(spec: str, registry: Registry | None = None) -> None:
    """Import a plug-in module so its ``register_*`` decorators run: a module name (``mypkg.method``) or
    the path of a ``.py`` file. A failure is recorded as broken (see :attr:`Registry.broken`) and re-raised
    as a :class:`RegistryError` naming the plug-in."""
    try:
        if spec.endswith(".py") or os.sep in spec:
            path = os.path.abspath(spec)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no such file: {path}")
            name = "mmbalance_plugin_" + os.path.splitext(os.path.basename(path))[0]
            if name in sys.modules:
                return
            mspec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(mspec)  # type: ignore[arg-type]
            sys.modules[name] = module
            try:
                mspec.loader.exec_module(module)  # type: ignore[union-attr]
            except BaseException:
                del sys.modules[name]
                raise
        else:
            importlib.import_module(spec)
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}"
        for reg in (registry,) if registry is not None else (METHODS, DATASETS, MODELS):
            reg._broken[spec] = msg
        if registry is None:
            raise RegistryError(f"plug-in {spec!r} failed to import: {msg}") from None


def load_plugins(specs: list[str]) -> None:
    """Load the built-ins first (so a plug-in may build on them), then each plug-in in order."""
    for reg in (METHODS, DATASETS, MODELS):
        reg._load_builtins()
    for spec in specs:
        load_plugin(spec)


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


#: Datasets a warm leaderboard worker loaded before forking its runs (:func:`preload_dataset`), by request key.
_PRELOADED: dict[str, Any] = {}


def _dataset_key(name: str, data_dir: Any, options: dict[str, Any]) -> str:
    import json

    return json.dumps([name, None if data_dir is None else str(data_dir), options], sort_keys=True, default=str)


def preload_dataset(name: str, data_dir: Any = None, **options: Any) -> bool:
    """Load a dataset once in this process for the processes it forks later (a warm worker): they share its
    tensors copy-on-write, and :func:`create_dataset` with the same request returns it instead of loading
    again. Only datasets held in memory whole (every split a ``TensorSplit``) are kept; a dataset read from
    disk through a DataLoader (open files do not cross a fork safely) or one that fails to load is left
    to each run, which then loads it (or reports the error) itself. Returns whether it is kept."""
    from .data import TensorSplit

    key = _dataset_key(name, data_dir, options)
    if key in _PRELOADED:
        return _PRELOADED[key] is not None
    _PRELOADED[key] = None
    try:
        data = create_dataset(name, data_dir, **options)
    except Exception:  # the run will meet (and report) the same error
        return False
    if all(isinstance(getattr(data, s, None), TensorSplit) for s in ("train", "val", "test")):
        _PRELOADED[key] = data
    return _PRELOADED[key] is not None


def create_dataset(name: str, data_dir: Any = None, **options: Any):
    """Load a registered dataset: preset defaults ◄ ``options`` (or the copy a warm worker preloaded)."""
    from .config import build_hparams
    from .errors import ConfigError, DatasetFormatError

    if _PRELOADED:
        data = _PRELOADED.get(_dataset_key(name, data_dir, options))
        if data is not None:
            return data

    entry = DATASETS.get(name)
    if not hasattr(entry.factory, "options_cls"):
        raise ConfigError(f"dataset {name!r}: its loader {getattr(entry.factory, '__qualname__', entry.factory)!r} "
                          f"(module {getattr(entry.factory, '__module__', '?')}) has no `options_cls` attribute; set "
                          "it to the dataclass of its options (or None when it takes none) before registering it")
    opts = build_hparams(entry.factory.options_cls, {**entry.defaults, **options}, where=f"dataset {name!r}")
    try:
        data = entry.factory(opts, data_dir)
    except MMBalanceError:
        raise
    except (OSError, EOFError, ValueError, KeyError, TypeError, IndexError) as exc:
        # a loader met a file it could not parse (truncated, wrong type): exit 2 with the reason, not a traceback
        where = _raised_in(exc, entry.factory)
        if where:  # raised by the loader's own code, not while reading a file: say where
            raise DatasetFormatError(f"dataset {name!r}: its loader raised {type(exc).__name__}: {exc} at {where} "
                                     "(a bug in the loader's code, or a file that does not hold what it expects); "
                                     f"data dir {data_dir!r}, options {options or '{}'}") from exc
        raise DatasetFormatError(f"dataset {name!r}: its files could not be read ({type(exc).__name__}: {exc}); "
                                 f"data dir {data_dir!r}, options {options or '{}'}") from exc
    from .data import MultimodalData

    if not isinstance(data, MultimodalData):
        raise DatasetFormatError(f"dataset {name!r}: its loader returned {type(data).__name__}, expected a "
                                 "mmbalance.data.MultimodalData")
    data.name = name
    data.check_modalities()
    return data


def _raised_in(exc: BaseException, factory: Any) -> str:
    """``FILE:LINE (in FUNCTION)`` when ``exc`` was raised by a line of ``factory``'s own module, else ``""``
    (raised inside a library while reading a file)."""
    import inspect

    try:
        own = os.path.realpath(inspect.getsourcefile(factory) or "")
    except TypeError:
        return ""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or os.path.realpath(tb.tb_frame.f_code.co_filename) != own:
        return ""
    return f"{own}:{tb.tb_lineno} (in {tb.tb_frame.f_code.co_name})"


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
