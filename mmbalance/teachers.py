"""Unimodal ``<m>-only`` models as a shared, content-addressed artefact (README "Shared artefacts").

UMT (teachers), UME (ensemble members) and ``reconboost_pretrained`` need, for each modality m, the
model that the ``unimodal:<m>`` run trains (``methods/baseline.md``): the canonical model built with
modality m alone, trained with the task loss on the full training split, checkpoint selected on the
VALIDATION split (``umt.md`` §7 bug 4). Training it is the same work as the "m only" row, so it is done
through the same engine (a nested :class:`~mmbalance.engine.Trainer` with method ``unimodal:<m>``, on
the parent's accelerator, hence in the same distributed loop) and cached by a content hash of
(dataset name and options, modality, model spec, train config, seed) under
``<output_dir>/_teachers/<hash>/`` (``umt.md`` §6: content-addressed, never "newest directory").

The cached ``teacher.pt`` holds the selected state dict and the teacher run's timings; the teacher
cost is charged to every run that uses it (:attr:`TeacherInfo.train_seconds`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import runfiles, runfolder
from .config import RunConfig, TrainConfig, build_hparams, config_hash, to_jsonable
from .registry import create_model

TEACHER_DIR = "_teachers"
TEACHER_FILE = "teacher.pt"
CACHE_VERSION = 1


@dataclass
class TeacherInfo:
    """Where a unimodal model came from: cache key and folder, whether this call trained it, and the
    teacher run's training seconds and validation metrics (charged to the using run)."""

    modality: str
    key: str
    path: Path
    trained_now: bool
    train_seconds: float
    val: dict[str, float]


def unimodal_model_spec(data: Any, config: RunConfig, modality: str) -> tuple[str, dict[str, Any], list[str]]:
    """(builder name, kwargs, [m]) exactly as the ``unimodal:<m>`` run resolves them (canonical spec of
    the dataset with modality m only, user ``model.*`` overrides applied)."""
    spec = replace(data.model, modalities=[modality])
    overrides = dict(config.model)
    name = overrides.pop("name", spec.name)
    return name, {**spec.kwargs, **overrides}, [modality]


def teacher_key(data: Any, config: RunConfig, modality: str) -> str:
    """Content hash of everything that determines the ``<m>-only`` model (README "Shared artefacts")."""
    name, kwargs, _ = unimodal_model_spec(data, config, modality)
    payload = {"version": CACHE_VERSION, "dataset": config.dataset, "dataset_name": getattr(data, "name", ""),
               "dataset_options": config.dataset_options, "modality": modality,
               "model": {"name": name, "kwargs": kwargs}, "train": config.train, "seed": config.seed}
    return config_hash(payload)


def build_unimodal_model(data: Any, config: RunConfig, modality: str) -> nn.Module:
    """A fresh (untrained) ``<m>-only`` model."""
    name, kwargs, mods = unimodal_model_spec(data, config, modality)
    return create_model(name, modalities=mods, input_shapes=data.input_shapes, out_dim=data.out_dim, **kwargs)


def teacher_root(config: RunConfig) -> Path:
    return Path(config.output_dir) / TEACHER_DIR


def _all_ranks_true(accelerator: Any, flag: bool) -> bool:
    """Same decision on every rank: true only when every rank sees ``flag``."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() == accelerator.num_processes)


def train_unimodal(ctx: Any, modality: str) -> tuple[nn.Module, TeacherInfo]:
    """The selected ``<m>-only`` model for the run behind ``ctx`` (trained now, or loaded from the
    cache), on CPU, in eval mode. Call from ``setup``; every rank must call it (collective)."""

    config: RunConfig = ctx.config
    data = ctx.data
    acc = ctx.accelerator
    key = teacher_key(data, config, modality)
    folder = teacher_root(config) / key
    file = folder / TEACHER_FILE
    with _cache_lock(folder, acc.is_local_main_process):
        trained_now = _train_if_missing(ctx, modality, key, folder, file)
    payload = torch.load(file, map_location="cpu", weights_only=False)
    model = build_unimodal_model(data, config, modality)
    model.load_state_dict(payload["state_dict"])
    model.eval().requires_grad_(False)
    info = TeacherInfo(modality, key, folder, trained_now, float(payload["train_seconds"]), dict(payload["val"]))
    if acc.is_main_process:
        print(f"{modality}-only teacher {'trained' if trained_now else 'loaded from the cache'}: {folder}",
              file=sys.stderr)
    return model, info


@contextlib.contextmanager
def _cache_lock(folder: Path, take: bool) -> Iterator[None]:
    """Exclusive inter-process lock on one teacher's cache entry, so that parallel runs (leaderboard
    workers: UME and UMT of the same seed) train it once and never write the same files together.
    Only the local main process of a run takes it; its other ranks wait on the run's collectives."""
    if not take:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            # holding the lock, no live writer owns a temporary file here: remove those of killed ones
            for d in (folder, folder / "run"):
                runfolder.clean_temp_files(d)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _train_if_missing(ctx: Any, modality: str, key: str, folder: Path, file: Path) -> bool:
    from .engine import Trainer  # local: engine imports interface, not this module
    from .registry import create_method

    config: RunConfig = ctx.config
    data = ctx.data
    acc = ctx.accelerator
    trained_now = False
    if not _all_ranks_true(acc, file.is_file()):
        train_cfg = build_hparams(TrainConfig, dict(config.train), where="teacher training settings")
        method = create_method(f"unimodal:{modality}")
        method.registered_name = f"unimodal:{modality}"
        sub = RunConfig(method=f"unimodal:{modality}", dataset=config.dataset, seed=config.seed, train=dict(config.train),
                        method_options={"modality": modality}, dataset_options=dict(config.dataset_options),
                        model=dict(config.model), output_dir=str(teacher_root(config)), run_dir=str(folder / "run"),
                        data_dir=config.data_dir)
        # resume=True: an interrupted teacher run continues from its last.pt (same config hash).
        trainer = Trainer(sub, train_cfg, data, method, folder / "run", resume=True, accelerator=acc, quiet=True)
        result = trainer.fit()
        state = {k: v.detach().cpu().clone() for k, v in acc.unwrap_model(trainer.ctx.model).state_dict().items()}
        payload = {"key": key, "modality": modality, "state_dict": state, "val": result["val"],
                   "train_seconds": result["timings"]["train_seconds"], "version": CACHE_VERSION}
        if acc.is_main_process:
            runfiles.atomic_torch_save(payload, file)
            runfiles.atomic_write_text(folder / "key.json", json.dumps(
                {"key": key, "modality": modality, "dataset": config.dataset, "seed": config.seed}, indent=1))
        acc.wait_for_everyone()
        trained_now = True
    return trained_now


def teacher_costs(infos: list[TeacherInfo]) -> dict[str, float]:
    """Run-record entries charging the unimodal phase to the using method (README "Shared artefacts")."""
    return {"teacher_train_seconds": sum(i.train_seconds for i in infos)}


def jsonable_infos(infos: list[TeacherInfo]) -> list[dict[str, Any]]:
    """The teachers as recorded in ``result.json``: what they are, not how this process got them (trained now
    or loaded from the cache, and where the cache lives, differ between an uninterrupted and a resumed run
    of the same configuration; that is reported on stderr instead)."""
    return [to_jsonable({"modality": i.modality, "key": i.key, "train_seconds": i.train_seconds, "val": i.val})
            for i in infos]
