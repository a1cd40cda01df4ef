"""``python -m mmbalance.launch [ACCELERATE OPTIONS] -- [RUN OPTIONS]``: ``accelerate launch -m mmbalance.run``
with mmbalance's exit codes.

``accelerate launch`` turns every non-zero exit of its child into exit 1 with its own traceback, so a clean
"bad input" (exit 2) or "run failed" (exit 3) of ``mmbalance.run`` reads like a crash. This wrapper runs the same
launcher in-process (Accelerate's own argument parser and ``launch_command``; nothing re-implemented) and exits
with the code of the run itself — when several processes failed, the earliest failure's, and among failures
recorded together the rank with one of mmbalance's own codes (2, 3, 4, 130, 143) rather than a rank that only
crashed (1) or was killed as a consequence — printing only mmbalance's message.

    python -m mmbalance.launch --multi_gpu --num_processes 4 -- --method cggm --dataset food101 --data-dir /data
"""
from __future__ import annotations

import subprocess
import sys

#: Exit codes mmbalance.run chooses on purpose (docs/cli.md); 1 and deaths by signal are often only the fallout
#: of another rank's failure (its peers' collectives break, the launcher terminates them).
DELIBERATE_CODES = {2, 3, 4, 130, 143}


def _child_exit_code(exc: BaseException) -> int | None:
    if isinstance(exc, subprocess.CalledProcessError):
        return int(exc.returncode)
    failures = getattr(exc, "failures", None)  # torch.distributed.elastic ChildFailedError: {rank: ProcessFailure}
    if isinstance(failures, dict) and failures:
        def key(item):  # the earliest failure; among those recorded together, a deliberate code over a fallout
            rank, failure = item
            code = getattr(failure, "exitcode", None)
            return (getattr(failure, "timestamp", 0) or 0, code not in DELIBERATE_CODES, rank)

        _, failure = min(failures.items(), key=key)
        code = getattr(failure, "exitcode", None)
        return int(code) if code is not None else None
    return None


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        acc_args, run_args = argv[:i], argv[i + 1:]
    else:
        acc_args, run_args = [], argv
    args = launch_command_parser().parse_args(acc_args + ["-m", "mmbalance.run"] + run_args)
    try:
        launch_command(args)
    except Exception as exc:  # noqa: BLE001 - any launcher failure: report the child's own code
        code = _child_exit_code(exc)
        if code is None:
            raise
        return code if code > 0 else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
