"""Preemption: SIGTERM (what SLURM and ``kill`` send) and SIGINT (Ctrl-C) stop a run cleanly.

The first signal sets a flag (and calls the ``on_first`` callback of :func:`handling`, which records the run
as interrupted at once, so a launcher that SIGKILLs its ranks a few seconds later loses nothing); the engine
checks the flag at the next safe point (the end of the current epoch, right after the epoch checkpoint is
written), records ``"status": "interrupted"`` in ``result.json`` and stops with
:class:`~mmbalance.errors.RunInterrupted`; the CLI exits with 128 + the signal number (130 for SIGINT, 143
for SIGTERM), and ``--resume`` continues to the same final numbers.

A second signal stops at once with the same :class:`~mmbalance.errors.RunInterrupted` (same exit code, the
previous epoch checkpoint stays valid). A repeat that arrives within :data:`ECHO_SECONDS` of the first is not
a second request: launchers forward the signal they receive to their ranks (``accelerate launch``, torchrun,
and a terminal's Ctrl-C, which reaches the whole process group), so a rank typically gets every signal twice
within milliseconds.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

from .errors import RunInterrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: A repeat of a stop signal this soon after the first is the launcher's forwarded copy, not a second request.
ECHO_SECONDS = 2.0
_requested: int | None = None
_first_at = 0.0
_on_first: Callable[[int], None] | None = None


def requested() -> int | None:
    """The number of the first stop signal received while :func:`handling` is active, else None."""
    return _requested


def _handler(signum: int, frame: object) -> None:
    global _requested, _first_at
    name = signal.Signals(signum).name
    if _requested is not None:
        if time.monotonic() - _first_at < ECHO_SECONDS:
            return  # the launcher's forwarded copy of the first signal
        raise RunInterrupted(signum, f"second {name}: stopped at once; the checkpoint of the last finished "
                                         "epoch is kept, continue with --resume (same command)")
    _requested, _first_at = signum, time.monotonic()
    print(f"received {name}: finishing the current epoch, saving a checkpoint, then stopping (send it again "
          f"after {ECHO_SECONDS:g} s to stop at once)", file=sys.stderr, flush=True)
    if _on_first is not None:
        _on_first(signum)


@contextlib.contextmanager
def handling(on_first: Callable[[int], None] | None = None) -> Iterator[None]:
    """Install the handlers for the block (main thread only; elsewhere a no-op), restore them after.
    ``on_first(signum)`` runs (in the main thread) when the first stop signal arrives."""
    global _requested, _on_first
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested, _on_first = None, on_first
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _requested, _on_first = None, None
