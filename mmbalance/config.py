"""Run configuration: typed dataclasses, value coercion, config files and ``--set`` overrides.

Precedence (docs/cli.md): dataset preset ◄ method defaults ◄ ``--config`` file ◄ CLI flags.
Booleans are parsed strictly ("true"/"false"/"1"/"0"/"yes"/"no"), never with ``bool(str)``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with the YAML 1.2 core-schema scalars: only ``true``/``false`` are booleans, so
    ``no``/``yes``/``on``/``off`` stay strings (``train.mixed_precision=no`` is the string ``'no'``;
    boolean keys still accept them, see :func:`_coerce`); integers are decimal (``007`` stays
    text, ``1:30`` is not sexagesimal 90) and ``1e-3`` is a float."""


_Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int",
                                                  "tag:yaml.org,2002:float"}]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _tag, _rx, _first in (
        ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
        ("tag:yaml.org,2002:int", r"^[-+]?(?:0|[1-9][0-9]*)$", "-+0123456789"),
        ("tag:yaml.org,2002:float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9]+[eE][-+]?[0-9]+"
                                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+.0123456789")):
    _Yaml12Loader.add_implicit_resolver(_tag, re.compile(_rx), list(_first))


def load_yaml(text: str) -> Any:
    """Parse YAML text (config files, ``--set`` values) with :class:`_Yaml12Loader`."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in {"none", "null"}):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: cannot interpret {value!r}")
    if origin is Literal:
        if isinstance(value, str) and all(isinstance(a, bool) for a in args):
            value = _coerce(value, bool, where)
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{where}: expected a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # a decimal integer is the text it was read from (``dataset.variant=2021``)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r} (quote it to pass text)")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]()").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args and args[-1] is not Ellipsis and origin is tuple and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        inner = args[0] if args else Any
        out = [_coerce(v, inner, where) for v in value]
        return tuple(out) if (origin is tuple or tp is tuple) else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def build_hparams(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values`` with type coercion; unknown keys raise."""
    if cls is None:
        if values:
            raise ConfigError(f"{where} takes no options; got {', '.join(sorted(values))}")
        return None
    hints = typing.get_type_hints(cls)
    valid = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(map(repr, unknown))}; "
                          f"valid options: {', '.join(sorted(valid)) or '(none)'}")
    kwargs = {k: _coerce(v, hints[k], f"{where} option {k!r}") for k, v in values.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except (TypeError, ValueError, AssertionError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return obj


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


@dataclass
class TrainConfig:
    """Dataset-level training settings, shared by every method on a dataset (fair comparison)."""

    epochs: int = 50
    batch_size: int = 64
    eval_batch_size: int = 512
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["none", "step", "cosine", "plateau"] = "none"
    step_size: int = 10
    gamma: float = 0.1
    warmup_epochs: int = 0
    min_lr: float = 0.0
    warmup_start_lr: float = 0.0  # cosine warm-up starts here (0 = ramp from 0); brats2021.md §6: 4e-4
    plateau_patience: int = 10
    plateau_factor: float = 0.1
    grad_clip: float | None = None
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    num_workers: int = 0
    max_steps_per_epoch: int | None = None
    modality_eval: Literal["epoch", "final", "none"] = "epoch"
    #: global: batch_size is the batch of one optimizer step, split over the processes (same meaning on
    #: 1 and N GPUs); per_process: every process takes batch_size samples (N× the global batch).
    batch_semantics: Literal["global", "per_process"] = "global"
    #: False for hyperparameter-tuning trials: the test split is never evaluated (result.json "test": null)
    evaluate_test: bool = True
    # imbalance diagnostics (mmbalance/diagnostics, docs/diagnostics.md); never change training
    diagnostics: Literal["default", "none", "full"] = "default"
    diag_permutations: int = 5
    diag_cos_per_epoch: int = 1
    diag_subset: int = 256
    diag_probe_max: int = 20_000
    diag_mc_permutations: int = 64
    diag_probe_pixels: int = 256
    diag_probe_every: int = 5
    diag_shapley_empty: Literal["prior", "all_absent"] = "prior"
    # how the run executes, not what it computes (see RUNTIME_SETTINGS): checkpoints and GPU speed settings
    #: seconds of wall time between epoch checkpoints (last.pt, best.pt, metrics.jsonl); 0 = every epoch.
    #: They are also written at the end of training and when a SIGTERM/SIGINT stops the run.
    checkpoint_interval: float = 60.0
    #: CUDA only: TF32 matmuls/convolutions (torch.backends.{cuda.matmul,cudnn}.allow_tf32)
    tf32: bool = True
    #: CUDA only: cuDNN autotuning (torch.backends.cudnn.benchmark)
    cudnn_benchmark: bool = True
    #: CUDA only: channels_last memory format for models with 2-D convolutions (and their image inputs)
    channels_last: bool = True
    #: torch.compile the model (opt-in; the first epoch pays the compilation), with this backend
    compile: bool = False
    compile_backend: str = "inductor"

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not math.isfinite(self.checkpoint_interval) or self.checkpoint_interval < 0:
            raise ValueError(f"checkpoint_interval must be a number of seconds >= 0, got {self.checkpoint_interval}")
        for name in ("momentum", "weight_decay", "gamma", "min_lr", "warmup_start_lr", "plateau_factor", "grad_clip"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not all(math.isfinite(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two finite numbers in [0, 1), got {self.betas}")


TRAIN_KEYS = {f.name for f in fields(TrainConfig)}
#: Training settings that never change what a run computes: left out of the config hash.
RUNTIME_SETTINGS = frozenset({"checkpoint_interval"})
#: Settings added after results were recorded that can change numbers on a GPU only (CPU runs are identical):
#: part of the config hash only when set to something other than their default, so the hash (and the default
#: run folder) of every earlier configuration stays what it was.
HASHED_WHEN_CHANGED = frozenset({"tf32", "cudnn_benchmark", "channels_last", "compile", "compile_backend"})


def hashed_train_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The training settings that enter the config hash (``RunConfig.train``): every field except
    :data:`RUNTIME_SETTINGS`, and :data:`HASHED_WHEN_CHANGED` only when they differ from their default.
    ``config.json`` records all of them."""
    out = to_jsonable(cfg)
    defaults = TrainConfig()
    for name in RUNTIME_SETTINGS:
        out.pop(name, None)
    for name in HASHED_WHEN_CHANGED:
        if getattr(cfg, name) == getattr(defaults, name):
            out.pop(name, None)
    return out


@dataclass
class RunConfig:
    """Fully resolved configuration of one run (written to config.json)."""

    method: str = "baseline"
    dataset: str = "mfeat"
    seed: int = 0
    train: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, Any] = field(default_factory=dict)
    dataset_options: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    output_dir: str = "runs"
    run_dir: str | None = None
    data_dir: str | None = None


def config_hash(payload: dict[str, Any]) -> str:
    """SHA-256 (first 16 hex digits) of the canonical JSON of ``payload``."""
    blob = json.dumps(to_jsonable(payload), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


SECTIONS = {"train", "method", "dataset", "model"}
TOP_LEVEL = {"method_name", "dataset_name", "seed", "output_dir", "data_dir"}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML config file into ``{section: {key: value}}``.

    Layout: optional top-level ``seed``/``output_dir``/``data_dir``/``method_name``/``dataset_name``,
    training keys either top level or under ``train``, and ``method``/``dataset``/``model`` tables.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        elif p.suffix.lower() in {".yaml", ".yml", ".json"}:
            raw = load_yaml(text) or {}
        else:
            raise ConfigError(f"config file {str(p)!r}: expected a .yaml, .yml, .json or .toml file")
    except ConfigError:
        raise
    except Exception as exc:  # yaml.YAMLError, tomllib.TOMLDecodeError
        raise ConfigError(f"config file {str(p)!r} is not valid {p.suffix.lstrip('.').upper()}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(p)!r}: expected a mapping at top level, got {type(raw).__name__}")
    out: dict[str, Any] = {"train": {}, "method": {}, "dataset": {}, "model": {}, "top": {}}
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"config file {str(p)!r}: section {key!r} must be a mapping")
            out[key].update(value)
        elif key in TRAIN_KEYS:
            out["train"][key] = value
        elif key in TOP_LEVEL:
            out["top"][key] = value
        else:
            raise ConfigError(f"config file {str(p)!r}: unknown key {key!r}; valid: sections "
                              f"{sorted(SECTIONS)}, training keys {sorted(TRAIN_KEYS)}, {sorted(TOP_LEVEL)}")
    return out


def parse_set_items(items: list[str]) -> dict[str, dict[str, Any]]:
    """Parse ``--set key=value`` items. ``key`` is a method hyperparameter, or ``dataset.key``,
    ``model.key``, ``train.key``. Values are read as YAML scalars/lists (``[a, b]``)."""
    out: dict[str, dict[str, Any]] = {"train": {}, "method": {}, "dataset": {}, "model": {}}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected name=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        section, _, name = key.partition(".") if "." in key else ("method", "", key)
        if section not in out or not name:
            raise ConfigError(f"--set {item!r}: expected 'name', 'dataset.name', 'model.name' or 'train.name'")
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[section][name] = value
    return out
