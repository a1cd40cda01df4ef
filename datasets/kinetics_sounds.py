"""Kinetics-Sounds, OGM-GE's 31-class version (audio + video action classification), from a cached store
(``docs/datasets/kinetics_sounds.md``).

A subset of Kinetics-400 (Kay et al., 2017) restricted to classes that can be heard (Arandjelović &
Zisserman, ICCV 2017). The clip lists are OGM-GE's ``data/KineticSound/my_train.txt`` (14,799 clips) and
``my_test.txt`` (2,597), ``<clip id>,10,<label>``; the 31 class names (:data:`CLASS_NAMES`) are those of
GeWu-Lab's ``KS.json``, whose labels agree with the lists. mmbalance ships only the names, the lists'
hashes and the rules; the user supplies the split files and the videos::

    python -m mmbalance.datasets.kinetics_sounds --raw <videos> --split-dir <OGM-GE data/KineticSound> --out <store>

Modalities (this order everywhere): ``audio`` (OGM-GE's ``process_audio.py`` Kaldi filterbank, [1, 1024,
128]) and ``visual`` (T = 3 frames of the 1-fps frames). Kinetics videos disappear from YouTube: the
converter reports, per list and class, how many clips were found, and the run records carry the count.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mmbalance.data import ModelSpec, MultimodalData
from mmbalance.data.splits import stratified_split
from mmbalance.errors import ConfigError, DatasetFormatError, DatasetNotFoundError
from mmbalance.registry import register_dataset

from ._avstore import (
    AVClipDataset,
    AVStore,
    ClipJob,
    ClipResult,
    build_store,
    converter_main,
    decode_audio_stream,
    decode_video_frames,
    resolve_store,
)

NAME = "kinetics_sounds"
CLASS_NAMES = (
    "blowing_nose", "blowing_out_candles", "bowling", "chopping_wood", "dribbling_basketball", "laughing",
    "mowing_lawn", "playing_accordion", "playing_bagpipes", "playing_bass_guitar", "playing_clarinet",
    "playing_drums", "playing_guitar", "playing_harmonica", "playing_keyboard", "playing_organ", "playing_piano",
    "playing_saxophone", "playing_trombone", "playing_trumpet", "playing_violin", "playing_xylophone",
    "ripping_paper", "shoveling_snow", "shuffling_cards", "singing", "stomping_grapes", "tap_dancing",
    "tapping_guitar", "tapping_pen", "tickling")
MODALITIES = ("audio", "visual")
#: SHA-256 of OGM-GE's split files, normalised rows (CR stripped, '\n'-joined, final '\n')
SPLIT_SHA256 = {"my_train.txt": "6c0d11f5977ecceb2005c5bdb356ced52cae7c39f9f9eb4137479a4c2e874780",
                "my_test.txt": "6dec6750836d9b9db1b2ded6fca3348de7766c78513ac55e2ba4a668f7b451bd"}
VIDEO_EXT = (".mp4", ".mkv", ".webm", ".avi")
SAMPLE_RATE, FBANK_ROWS, N_MELS = 16_000, 1024, 128
#: process_audio.py's fixed normalisation (x − mean) / (2·std) of the AudioSet filterbanks
FBANK_MEAN, FBANK_STD = -4.503877, 5.141276
FLT_EPS = float(np.finfo(np.float32).eps)
CONVERT_CMD = ("python -m mmbalance.datasets.kinetics_sounds --raw <videos> --split-dir <folder with my_train.txt, "
               "my_test.txt> --out <store>")
TRAIN_DEFAULTS: dict[str, Any] = {  # OGM-GE main.py, KineticSound branch
    "optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64, "epochs": 100,
    "scheduler": "step", "step_size": 70, "gamma": 0.1, "eval_batch_size": 128, "num_workers": 8,
}
TRAIN_DEFAULTS_BB: dict[str, Any] = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01, "batch_size": 32,
                                     "epochs": 30, "scheduler": "step", "step_size": 10, "gamma": 0.1}


@dataclass
class KineticsSoundsOptions:
    """``path``: the store (default ``<data-dir>/kinetics_sounds``); ``split_seed``: the stratified 10 %
    validation carve of the FULL training list (membership does not depend on which clips were found);
    ``val_fraction``; ``frames``: T (3); ``frame_sampling``: segment | segment_int | fixed | ogm_fixed;
    ``aug_per_frame``; ``hparam_source``: ogm_ge | balancebenchmark."""

    path: str | None = None
    split_seed: int = 0
    val_fraction: float = 0.1
    frames: int = 3
    frame_sampling: Literal["segment", "segment_int", "fixed", "ogm_fixed"] = "segment"
    aug_per_frame: bool = True
    hparam_source: Literal["ogm_ge", "balancebenchmark"] = "ogm_ge"

    def validate(self) -> None:
        if self.frames < 1:
            raise ConfigError(f"kinetics_sounds: frames must be >= 1, got {self.frames}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"kinetics_sounds: val_fraction must be in (0, 1), got {self.val_fraction}")


# --------------------------------------------------------------------------- split files and ids
def parse_id(clip: str) -> tuple[str, int, int | None]:
    """``<ytid>_<start:06d>_<end:06d>`` (training lists, file names) or ``<ytid>_<start>`` (test list) →
    (ytid, start, end or None). The YouTube id is the first 11 characters (it may contain '_')."""
    ytid, rest = clip[:11], clip[11:]
    if len(clip) < 13 or not rest.startswith("_"):
        raise ValueError(f"clip id {clip!r} is not <11-character YouTube id>_<start>[_<end>]")
    fields = rest[1:].split("_")
    if len(fields) not in (1, 2) or not all(f.isdigit() for f in fields):
        raise ValueError(f"clip id {clip!r} is not <11-character YouTube id>_<start>[_<end>]")
    return ytid, int(fields[0]), int(fields[1]) if len(fields) == 2 else None


def read_split_file(path: Path, n_classes: int = len(CLASS_NAMES)) -> tuple[list[tuple[str, int]], str]:
    """Rows (clip id, label) of ``<clip id>,10,<label>`` lines and the normalised-row SHA-256."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"kinetics_sounds: {path} is unreadable ({exc})") from None
    lines = [x.replace("\r", "") for x in text.split("\n")]
    rows, out = [x for x in lines if x.strip()], []
    for k, line in enumerate(rows, 1):
        f = line.split(",")
        if len(f) != 3 or not f[2].strip().isdigit():
            raise DatasetFormatError(f"kinetics_sounds: {path}:{k}: expected '<clip id>,10,<label>', got {line!r}")
        label = int(f[2])
        if not 0 <= label < n_classes:
            raise DatasetFormatError(f"kinetics_sounds: {path}:{k}: label {label} outside 0–{n_classes - 1}")
        try:
            parse_id(f[0])
        except ValueError as exc:
            raise DatasetFormatError(f"kinetics_sounds: {path}:{k}: {exc}") from None
        out.append((f[0], label))
    digest = hashlib.sha256(("\n".join(rows) + "\n").encode()).hexdigest()
    return out, digest


def read_splits(split_dir: Path, unverified: bool = False) -> tuple[dict[str, list[tuple[str, int]]], bool, list[str]]:
    """OGM-GE's ``my_train.txt``/``my_test.txt`` (and ``classes.txt`` for a custom class list)."""
    classes = list(CLASS_NAMES)
    custom = split_dir / "classes.txt"
    if custom.is_file():
        classes = [x.strip() for x in custom.read_text().splitlines() if x.strip()]
    out, verified = {}, not custom.is_file()
    for name, part in (("my_train.txt", "train"), ("my_test.txt", "test")):
        path = split_dir / name
        if not path.is_file():
            raise DatasetNotFoundError(f"kinetics_sounds: {path} does not exist; --split-dir must hold OGM-GE's "
                                       "data/KineticSound/my_train.txt and my_test.txt")
        rows, digest = read_split_file(path, len(classes))
        if digest != SPLIT_SHA256[name]:
            if not unverified:
                raise DatasetFormatError(f"kinetics_sounds: {path} has normalised SHA-256 {digest}, expected OGM-GE's "
                                         f"{SPLIT_SHA256[name]}; pass --split-unverified to use it anyway (runs are "
                                         "then marked split=unverified)")
            verified = False
        out[part] = rows
    return out, verified, classes


def index_videos(raw: Path) -> dict[tuple[str, int, int | None], Path]:
    """Recursive scan: (ytid, start, end) → file. A file under a ``replacement*`` folder wins over another
    copy; two other copies of one clip are an error listing both."""
    found: dict[tuple[str, int, int | None], Path] = {}
    dupes = []
    for p in sorted(raw.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in VIDEO_EXT:
            continue
        try:
            key = parse_id(p.stem)
        except ValueError:
            continue
        if key in found:
            old_r = any(part.startswith("replacement") for part in found[key].relative_to(raw).parts[:-1])
            new_r = any(part.startswith("replacement") for part in p.relative_to(raw).parts[:-1])
            if new_r and not old_r:
                found[key] = p
            elif new_r == old_r:
                dupes.append(f"{found[key]} and {p}")
            continue
        found[key] = p
    if dupes:
        raise DatasetFormatError("kinetics_sounds converter: more than one file for a clip: " + "; ".join(dupes))
    return found


def match(clip: str, videos: dict[tuple[str, int, int | None], Path],
          by_start: dict[tuple[str, int], Path]) -> Path | None:
    """A training id matches (ytid, start, end), a test id (ytid, start)."""
    ytid, start, end = parse_id(clip)
    if end is not None:
        return videos.get((ytid, start, end))
    return by_start.get((ytid, start))


# --------------------------------------------------------------------------- audio: Kaldi filterbank
def mel(f: np.ndarray | float) -> np.ndarray | float:
    return 1127.0 * np.log(1.0 + np.asarray(f) / 700.0)


def mel_banks(n_mels: int = N_MELS, n_fft: int = 512, rate: int = SAMPLE_RATE, low: float = 20.0,
              high: float | None = None) -> np.ndarray:
    """Kaldi's triangular mel filters [n_mels, n_fft/2 + 1] (the Nyquist bin has weight 0)."""
    high = rate / 2 if high is None else high
    half = n_fft // 2
    lo_m, hi_m = mel(low), mel(high)
    delta = (hi_m - lo_m) / (n_mels + 1)
    b = np.arange(n_mels)[:, None]
    left, centre, right = lo_m + b * delta, lo_m + (b + 1) * delta, lo_m + (b + 2) * delta
    m = mel(rate / n_fft * np.arange(half))[None, :]
    w = np.maximum(0.0, np.minimum((m - left) / (centre - left), (right - m) / (right - centre)))
    return np.pad(w, ((0, 0), (0, 1)))


def kaldi_fbank(x: np.ndarray, rate: int = SAMPLE_RATE, n_mels: int = N_MELS) -> np.ndarray:
    """``torchaudio.compliance.kaldi.fbank(x, htk_compat=True, use_energy=False, window_type="hanning",
    num_mel_bins=128, dither=0, frame_shift=10)`` semantics: 25-ms frames every 10 ms (edges snipped),
    per-frame DC removal, pre-emphasis 0.97 (first sample against itself), symmetric Hann window,
    zero-padded to 512, power spectrum, mel filters 20 Hz–Nyquist, ln(max(e, float32 eps)) → [frames, n_mels]."""
    length, shift, n_fft = int(rate * 0.025), int(rate * 0.010), 512
    n = 1 + (len(x) - length) // shift
    if n < 1:
        return np.zeros((0, n_mels), np.float32)
    idx = np.arange(length)[None, :] + shift * np.arange(n)[:, None]
    frames = x.astype(np.float64)[idx]
    frames = frames - frames.mean(axis=1, keepdims=True)
    prev = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = frames - 0.97 * prev
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / (length - 1))
    spec = np.abs(np.fft.rfft(frames * window, n=n_fft, axis=1)) ** 2
    energies = spec @ mel_banks(n_mels, n_fft, rate).T
    return np.log(np.maximum(energies, FLT_EPS)).astype(np.float32)


def clip_fbank(x: np.ndarray, mix: str = "first") -> np.ndarray:
    """OGM-GE ``process_audio.py``: waveform − its mean (over all samples and channels), channel 0
    (``mix=first``; torchaudio's fbank reads channel 0 only) or the channel mean (``mix=mean``), filterbank,
    zero rows appended or rows cut to 1,024, then (x − (−4.503877)) / (2·5.141276)."""
    x = x - x.mean()
    mono = x[0] if mix == "first" else x.mean(axis=0)
    fb = kaldi_fbank(mono)
    out = np.zeros((FBANK_ROWS, N_MELS), np.float32)
    out[:min(FBANK_ROWS, len(fb))] = fb[:FBANK_ROWS]
    return ((out - FBANK_MEAN) / (2 * FBANK_STD)).astype(np.float32)


# --------------------------------------------------------------------------- converter
def decode_clip(job: ClipJob, *, frame_size: int, audio_mix: str) -> ClipResult:
    x, seconds = decode_audio_stream(job.files["video"], SAMPLE_RATE)
    audio = clip_fbank(x, audio_mix)
    video = decode_video_frames(job.files["video"], 1, frame_size)
    info = {"native_w": video.native_w, "native_h": video.native_h, "native_fps": video.native_fps,
            "audio_seconds": round(seconds, 4), "video_seconds": round(video.video_seconds, 4)}
    return ClipResult(audio.astype(np.float16), video, info)


def availability(lists: dict[str, list[tuple[str, int]]], found: dict[str, set[str]],
                 classes: list[str]) -> dict[str, Any]:
    """Per list and class: expected / found / missing."""
    out: dict[str, Any] = {}
    for part, rows in lists.items():
        per = {}
        for c, name in enumerate(classes):
            ids = [i for i, y in rows if y == c]
            f = sum(i in found[part] for i in ids)
            per[name] = {"expected": len(ids), "found": f, "missing": len(ids) - f}
        out[part] = {"expected": len(rows), "found": len(found[part]), "missing": len(rows) - len(found[part]),
                     "per_class": per}
    return out


def convert(raw: str | Path, split_dir: str | Path, out: str | Path, *, split_unverified: bool = False,
            frame_size: int = 224, frame_codec: str = "jpeg", audio_mix: str = "first", workers: int = 0, skip_bad: bool = False,
            force: bool = False, strict_hash: bool = False, min_found_fraction: float = 0.5, split_seed: int = 0,
            log=print, decode_counter: list[int] | None = None) -> dict[str, Any]:
    """Decode the found clips of both lists once into the store at ``out``; report availability."""
    raw, split_dir, out = Path(raw).expanduser(), Path(split_dir).expanduser(), Path(out).expanduser()
    if not raw.is_dir():
        raise DatasetNotFoundError(f"kinetics_sounds converter: raw folder {raw} does not exist")
    if audio_mix not in ("first", "mean"):
        raise ConfigError(f"kinetics_sounds converter: audio_mix must be first|mean, got {audio_mix!r}")
    lists, verified, classes = read_splits(split_dir, split_unverified)
    videos = index_videos(raw)
    by_start = {(y, s): p for (y, s, _e), p in videos.items()}
    jobs, found = [], {"train": set(), "test": set()}
    for part in ("train", "test"):
        for clip, label in lists[part]:
            p = match(clip, videos, by_start)
            if p is not None:
                found[part].add(clip)
                jobs.append(ClipJob(clip, label, {"video": p}, {"list": part, "class": classes[label]}))
    avail = availability(lists, found, classes)
    # validation carve of the FULL training list (membership independent of what was found)
    train_labels = np.asarray([y for _, y in lists["train"]])
    val_i, _ = stratified_split(train_labels, [0.1, 0.9], split_seed)
    val_ids = {lists["train"][i][0] for i in val_i}
    problems = []
    for part, ids in (("train", found["train"] - val_ids), ("validation", found["train"] & val_ids),
                      ("test", found["test"])):
        rows = lists["test" if part == "test" else "train"]
        have = {y for i, y in rows if i in ids}
        lost = [classes[c] for c in sorted({y for _, y in rows}) if c not in have]
        if lost:
            problems.append(f"no clip found for class(es) {', '.join(lost)} in {part}")
    if problems:
        raise DatasetFormatError("kinetics_sounds converter: " + "; ".join(problems) + f" (under {raw})")
    for part in ("train", "test"):
        for name, d in avail[part]["per_class"].items():
            if d["expected"] and d["found"] / d["expected"] < min_found_fraction:
                log(f"kinetics_sounds: warning: {part} class {name!r}: only {d['found']} of {d['expected']} clips found")
        log(f"kinetics_sounds: {part}: {avail[part]['found']} of {avail[part]['expected']} clips found")
    params = {"frame_fps": 1, "cache_fps": 1, "frame_size": frame_size, "audio_mix": audio_mix,
              "sample_rate": SAMPLE_RATE, "fbank_rows": FBANK_ROWS}
    decode = functools.partial(decode_clip, frame_size=frame_size, audio_mix=audio_mix)
    found_sha = hashlib.sha256("\n".join(sorted(found["train"] | found["test"])).encode()).hexdigest()
    meta = build_store(out, jobs, decode, params=params, frame_codec=frame_codec, dataset=NAME, raw_root=raw, class_names=classes,
                       workers=workers, skip_bad=skip_bad, force=force, strict_hash=strict_hash, log=log,
                       decode_counter=decode_counter,
                       extra_meta={"split_verified": verified, "availability": avail, "availability_sha256": found_sha})
    for name, payload in (("split_lists.json", {"train": lists["train"], "test": lists["test"], "classes": classes,
                                                "verified": verified}),
                          ("availability.json", avail)):
        tmp = out / f"{name}.tmp"
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, out / name)
    for part in ("train", "test"):
        missing = sorted({i for i, _ in lists[part]} - found[part])
        (out / f"missing_{part}.txt").write_text("".join(f"{i}\n" for i in missing))
    return meta


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m mmbalance.datasets.kinetics_sounds",
                                description="Decode the Kinetics-Sounds videos once into mmbalance's cached store.")
    p.add_argument("--raw", required=True, help="folder searched recursively for <ytid>_<start>_<end>.mp4/.mkv/.webm/.avi")
    p.add_argument("--split-dir", required=True, help="folder with OGM-GE's my_train.txt and my_test.txt")
    p.add_argument("--out", required=True)
    p.add_argument("--split-unverified", action="store_true")
    p.add_argument("--frame-size", type=int, default=224)
    p.add_argument("--frame-codec", default="jpeg", choices=["raw", "jpeg"],
                   help="raw uint8 frames (fastest to read) or JPEG quality 95 (about 10x smaller, decoded per item)")
    p.add_argument("--audio-mix", default="first", choices=["first", "mean"])
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--min-found-fraction", type=float, default=0.5)
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--strict-hash", action="store_true")
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    return converter_main(lambda: convert(
        a.raw, a.split_dir, a.out, split_unverified=a.split_unverified, frame_size=a.frame_size, frame_codec=a.frame_codec,
        audio_mix=a.audio_mix, workers=a.workers, skip_bad=a.skip_bad, force=a.force, strict_hash=a.strict_hash,
        min_found_fraction=a.min_found_fraction))


# --------------------------------------------------------------------------- loader
def build(options: KineticsSoundsOptions, data_dir: str | Path | None = None) -> MultimodalData:
    o = options
    store = AVStore(resolve_store(o.path, data_dir, NAME, CONVERT_CMD), NAME, CONVERT_CMD)
    lists_path = store.root / "split_lists.json"
    if not lists_path.is_file():
        raise DatasetFormatError(f"kinetics_sounds: {lists_path} is missing from the store; {CONVERT_CMD}")
    lists = json.loads(lists_path.read_text())
    classes = lists["classes"]
    pos = {e["key"]: i for i, e in enumerate(store.index)}
    train_labels = np.asarray([y for _, y in lists["train"]])
    val_i, tr_i = stratified_split(train_labels, [o.val_fraction, 1 - o.val_fraction], o.split_seed)
    parts = {"train": [pos[lists["train"][i][0]] for i in tr_i if lists["train"][i][0] in pos],
             "val": [pos[lists["train"][i][0]] for i in val_i if lists["train"][i][0] in pos],
             "test": sorted(pos[c] for c, _ in lists["test"] if c in pos)}
    labels = np.asarray([e["label"] for e in store.index], np.int64)
    for s, p in parts.items():
        if not p:
            raise DatasetFormatError(f"kinetics_sounds: the {s} split has no clip in {store.root}")
    sets = {s: AVClipDataset(store, p, labels[p], frames=o.frames, frame_fps=None,
                             sampling=o.frame_sampling if s == "train" else
                             ({"segment": "segment", "fixed": "segment"}.get(o.frame_sampling, o.frame_sampling)),
                             train=s == "train", aug_per_frame=o.aug_per_frame) for s, p in parts.items()}
    defaults = {**TRAIN_DEFAULTS, **(TRAIN_DEFAULTS_BB if o.hparam_source == "balancebenchmark" else {})}
    s = store.frame_size
    return MultimodalData(
        modalities=list(MODALITIES), task="classification", task_kwargs={"num_classes": len(classes)},
        train=sets["train"], val=sets["val"], test=sets["test"],
        input_shapes={"audio": (1, FBANK_ROWS, N_MELS), "visual": (3, o.frames, s, s)}, out_dim=len(classes),
        model=ModelSpec("av_resnet18", {}), train_defaults=defaults,
        info={"root": str(store.root), "split_seed": o.split_seed, "class_names": list(classes),
              "class_list_sha256": hashlib.sha256("\n".join(classes).encode()).hexdigest(),
              "split": "verified" if lists.get("verified") else "unverified",
              "split_sizes": {k: len(v) for k, v in parts.items()},
              "found_train": store.meta["availability"]["train"]["found"],
              "found_test": store.meta["availability"]["test"]["found"],
              "availability_sha256": store.meta["availability_sha256"],
              "excluded_by_converter": sorted(store.meta.get("bad", {})),
              "store_fingerprint": store.meta["fingerprint"]},
    )


build.options_cls = KineticsSoundsOptions  # type: ignore[attr-defined]
register_dataset(NAME, "Kinetics-Sounds (31 classes, OGM-GE lists) audio fbank + 3 frames, ResNet-18 pair")(build)


if __name__ == "__main__":
    raise SystemExit(main())
