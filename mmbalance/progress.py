"""Console progress for terminals and for log files.

On a terminal: one tqdm bar counted in training steps (so epochs of minutes still move), with the epoch and the
last validation metric as postfix. When stderr is not a terminal (SLURM logs, ``| tee``, CI): plain lines —
one per epoch, plus a ``step k/n`` line at most every ``interval`` seconds inside long epochs — instead of one
giant carriage-return line. ``--quiet`` (or ``MMBALANCE_NO_PROGRESS``) turns both off; the final result line is
printed by the CLI either way. Nothing here reads a tensor: the hot loop only bumps a counter.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    """Progress of one run. ``step()`` is called once per training step, ``epoch_done`` once per epoch."""

    def __init__(self, desc: str, total_epochs: int, done_epochs: int, steps_per_epoch: int, *,
                 stream: TextIO | None = None, interval: float = 30.0, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.desc = desc
        self.total_epochs = total_epochs
        self.epoch = done_epochs
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.interval = interval
        self.tty = self.stream.isatty() if tty is None else tty
        self._step_in_epoch = 0
        self._last_print = time.monotonic()
        self._bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_epochs * self.steps_per_epoch, initial=done_epochs * self.steps_per_epoch,
                             desc=desc, unit="step", file=self.stream, dynamic_ncols=True, mininterval=0.5)
            self._bar.set_postfix({"epoch": f"{done_epochs}/{total_epochs}"})

    def step(self) -> None:
        self._step_in_epoch += 1
        if self._bar is not None:
            self._bar.update(1)
            return
        if self._step_in_epoch % 16 == 0:  # cheap check; the clock is read every 16 steps only
            now = time.monotonic()
            if now - self._last_print >= self.interval:
                self._last_print = now
                print(f"{self.desc}: epoch {self.epoch + 1}/{self.total_epochs}, step "
                      f"{self._step_in_epoch}/{self.steps_per_epoch}", file=self.stream, flush=True)

    def epoch_done(self, row: dict[str, Any], metric: str) -> None:
        self.epoch += 1
        missing = self.steps_per_epoch - self._step_in_epoch  # epochs cut short (max_steps) keep the bar right
        self._step_in_epoch = 0
        val = row.get("val", {}).get(metric) if isinstance(row.get("val"), dict) else None
        if self._bar is not None:
            if missing > 0:
                self._bar.update(missing)
            post = {"epoch": f"{self.epoch}/{self.total_epochs}"}
            if val is not None:
                post[f"val_{metric}"] = f"{val:.4f}"
            self._bar.set_postfix(post)
            return
        self._last_print = time.monotonic()
        parts = [f"{self.desc}: epoch {self.epoch}/{self.total_epochs}"]
        if "train_loss" in row:
            parts.append(f"train_loss {row['train_loss']:.4f}")
        if val is not None:
            parts.append(f"val_{metric} {val:.4f}")
        if "epoch_seconds" in row:
            parts.append(f"{row['epoch_seconds']:.1f} s")
        print(", ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
