"""Preemption: SIGTERM (what SLURM and ``kill`` send) and SIGINT (Ctrl-C) stop a run cleanly.

The first signal only sets a flag; the engine checks it at the next safe point (the end of the current
epoch, right after the epoch checkpoint is written), records ``"status": "interrupted"`` in
``result.json`` and stops with :class:`~mmbalance.errors.RunInterrupted`; the CLI exits with 128 +
the signal number (130 for SIGINT, 143 for SIGTERM), and ``--resume`` continues to the same final
numbers. A second signal stops at once (KeyboardInterrupt); the previous epoch checkpoint stays valid.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested: int | None = None


def requested() -> int | None:
    """The number of the first stop signal received while :func:`handling` is active, else None."""
    return _requested


def _handler(signum: int, frame: object) -> None:
    global _requested
    if _requested is not None:
        raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
    _requested = signum
    print(f"received {signal.Signals(signum).name}: finishing the current epoch, saving a checkpoint, then "
          "stopping (send it again to stop at once)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Install the handlers for the block (main thread only; elsewhere a no-op), restore them after."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested = None
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _requested = None
