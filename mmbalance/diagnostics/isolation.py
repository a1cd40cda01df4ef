"""Run diagnostic forwards without touching training: RNG streams forked, model buffers restored."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def isolated(*models: nn.Module, train_mode: bool) -> Iterator[None]:
    """Fork the CPU (and current CUDA device) RNG, snapshot every buffer of ``models`` (BatchNorm
    statistics, gate averages) and their train/eval flags; restore all of them on exit."""
    buffers = [b for model in models for b in model.buffers()]
    saved = [b.detach().clone() for b in buffers]
    modes = [(mod, mod.training) for model in models for mod in model.modules()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            for model in models:
                model.train(train_mode)
            yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
        for mod, mode in modes:
            mod.training = mode
