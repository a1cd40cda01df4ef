"""Child processes that never outlive their parent (Linux ``prctl(PR_SET_PDEATHSIG)``).

``python -m mmbalance.procs PARENT_PID SIGNAL -- CMD ...`` asks the kernel to send SIGNAL to this
process when its parent dies, checks that the parent (PARENT_PID) is still alive, and ``exec``s CMD (the
setting survives exec). The leaderboard starts every run through it, so killing a sweep with any signal,
SIGKILL included, stops its runs (SIGTERM: they checkpoint at the next epoch end); ranks started by
``accelerate launch`` call :func:`die_with_parent` themselves, so killing the launcher stops them.
Elsewhere than Linux it only execs.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int, expected_parent: int | None = None) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies; if the parent is already
    gone (re-parented), send it now. Returns False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid() if expected_parent is None else expected_parent
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)
    return True


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: python -m mmbalance.procs PARENT_PID SIGNAL -- CMD [ARGS...]", file=sys.stderr)
        return 2
    die_with_parent(signal.Signals[argv[1]].value if not argv[1].isdigit() else int(argv[1]), int(argv[0]))
    try:
        os.execvp(argv[3], argv[3:])
    except OSError as exc:
        print(f"error: cannot start {argv[3]!r}: {exc}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
