"""``python -m mmbalance.leaderboard``."""
import sys

from .cli import main

sys.exit(main())
