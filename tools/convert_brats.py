"""Convert the raw BraTS 2021 NIfTI release to mmbalance's prepared layout (docs/datasets/brats2021.md §2).

Usage: python tools/convert_brats.py --raw <dir with BraTS2021_<id>/ folders> --out <prepared dir> [--split-seed 0]
(the same as ``python -m mmbalance.datasets.brats2021``; the converter lives in datasets/brats2021.py).
"""
from __future__ import annotations

from mmbalance.datasets.brats2021 import main

if __name__ == "__main__":
    raise SystemExit(main())
