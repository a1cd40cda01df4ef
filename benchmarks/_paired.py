"""Paired, interleaved timing: the only comparison these benchmarks make.

Each repeat runs A and B back to back, alternating which goes first (ABBA...), and yields the ratio of that
pair, so slow drifts of the machine (another job, thermal state) hit both sides of a pair alike. We report the
median ratio with its min and max over the pairs — never a best-of-N of one side against a best-of-N of the
other.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")


@dataclass
class Ratio:
    median: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.median:.3f} ({self.low:.3f}–{self.high:.3f}, n={self.n})"


def interleaved(a: Callable[[], T], b: Callable[[], U], repeats: int) -> tuple[list[T], list[U]]:
    """``repeats`` pairs of measurements a(), b(), alternating which goes first (ABBA...); the two lists are
    paired by index."""
    xs: list[T] = []
    ys: list[U] = []
    for r in range(repeats):
        if r % 2 == 0:
            xs.append(a())
            ys.append(b())
        else:
            ys.append(b())
            xs.append(a())
    return xs, ys


def paired_ratio(a: Callable[[], float], b: Callable[[], float], repeats: int) -> tuple[Ratio, list[float], list[float]]:
    """Ratio a()/b() of two measurements (e.g. seconds), paired and interleaved over ``repeats`` pairs."""
    xs, ys = interleaved(a, b, repeats)
    ratios = [x / y for x, y in zip(xs, ys)]
    return Ratio(statistics.median(ratios), min(ratios), max(ratios), len(ratios)), xs, ys


def median_range(xs: list[float], digits: int = 2) -> str:
    """``median (min–max)`` of ``xs`` with ``digits`` decimals."""
    return f"{statistics.median(xs):.{digits}f} ({min(xs):.{digits}f}–{max(xs):.{digits}f})"


def time_train_epochs(trainer, on_enter: Callable[[], None] | None = None,
                      on_leave: Callable[[], None] | None = None) -> list[float]:
    """Wrap ``trainer._train_epoch`` so the CPU seconds (``time.process_time``) spent inside training
    epochs accumulate in the returned one-element list; ``on_enter``/``on_leave`` run around each epoch
    (e.g. to switch a finer clock on only while training)."""
    epoch = trainer._train_epoch
    total = [0.0]

    def timed_epoch(*a, **k):
        if on_enter is not None:
            on_enter()
        t0 = time.process_time()
        try:
            return epoch(*a, **k)
        finally:
            total[0] += time.process_time() - t0
            if on_leave is not None:
                on_leave()

    trainer._train_epoch = timed_epoch
    return total
