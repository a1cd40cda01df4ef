"""The leaderboard: ``python -m mmbalance.leaderboard run|build|plan SUITE``.

One job per module, imports pointing one way (``cli`` → ``execute`` / ``report`` → ``plan`` → ``suite``):

* :mod:`.suite` reads and validates a suite file (datasets × method rows × seeds, budget, ``--set`` values);
* :mod:`.plan` turns a suite into one :class:`~.plan.RunSpec` per (dataset, row, seed) and reads a planned
  run's state from its folder;
* :mod:`.execute` runs planned runs (parallel local workers or SLURM through submitit);
* :mod:`.report` aggregates finished run files into ``README.md``, ``results.csv`` and figures;
* :mod:`.site` renders the same report as a static website (``site/``);
* :mod:`.cli` is the command line.
"""
from __future__ import annotations

from .cli import main

__all__ = ["main"]
