"""AVE, the Audio-Visual Event dataset, as clip-level classification (``docs/datasets/ave.md``).

Y. Tian et al., "Audio-Visual Event Localization in Unconstrained Videos", ECCV 2018: 4,143 annotated
10-s YouTube videos of 28 event categories, each with one event segment at 1-s resolution. The balancing
literature (PMR, ReconBoost) classifies each video from its event segment; this module follows PMR's
"SE" (event-segment) pipeline, which ReconBoost reuses. mmbalance ships only the 28 category names, the
split files' hashes and the rules; the user downloads ``AVE_Dataset`` and converts it once::

    python -m mmbalance.datasets.ave --raw <AVE_Dataset folder: AVE/*.mp4 + the text files> --out <store>

Registry names: ``ave`` (the official train/validation/test files, as published) and ``ave_clean`` (the
same, minus the training videos that also occur in validation or test). Modalities (this order
everywhere): ``audio`` (per-clip standardised log spectrogram [1, 257, 1004] of the event, repeated to
10 s) and ``visual`` (T = 4 frames of the event's 1-fps frames).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mmbalance.data import ModelSpec, MultimodalData
from mmbalance.errors import ConfigError, DatasetFormatError, DatasetNotFoundError
from mmbalance.registry import register_dataset

from ._avstore import (
    AVClipDataset,
    AVStore,
    ClipJob,
    ClipResult,
    build_store,
    converter_main,
    decode_audio_native,
    decode_video_frames,
    repeat_to,
    resample,
    resolve_store,
)

NAME = "ave"
#: PMR/ReconBoost order: first appearance in testSet.txt (also the order of Annotations.txt)
CLASS_NAMES = (
    "Church bell", "Male speech, man speaking", "Bark", "Fixed-wing aircraft, airplane", "Race car, auto racing",
    "Female speech, woman speaking", "Helicopter", "Violin, fiddle", "Flute", "Ukulele", "Frying (food)", "Truck",
    "Shofar", "Motorcycle", "Acoustic guitar", "Train horn", "Clock", "Banjo", "Goat", "Baby cry, infant cry", "Bus",
    "Chainsaw", "Cat", "Horse", "Toilet flush", "Rodents, rats, mice", "Accordion", "Mandolin")
MODALITIES = ("audio", "visual")
SPLIT_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
#: SHA-256 of PMR's copies, normalised rows (header and CR removed, '\n'-joined, final '\n')
SPLIT_SHA256 = {"trainSet.txt": "4f6c37aff56d4a3407f8beff47ca59dcefb8e94b3e02bbc34b0c89b5cdad6945",
                "valSet.txt": "76c3c51b67aacbbacd5708e17aab491638a5e9032f786adad1a13be55d9cb3ca",
                "testSet.txt": "e73c25a509bb38a691c1e08064af66d0512554f2fbc883cddd6d2a51ede8449d"}
SAMPLE_RATE, SECONDS, NPERSEG, NOVERLAP = 16_000, 10, 512, 353
AUDIO_SHAPE = (NPERSEG // 2 + 1, (SAMPLE_RATE * SECONDS - NOVERLAP) // (NPERSEG - NOVERLAP))  # (257, 1004)
MIN_FRAMES = 10
CONVERT_CMD = "python -m mmbalance.datasets.ave --raw <AVE_Dataset folder with AVE/*.mp4 and the split files> --out <store>"
TRAIN_DEFAULTS: dict[str, Any] = {  # the CREMA-D / Kinetics-Sounds (OGM-GE code) setting, one family for the three
    "optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64, "epochs": 100,
    "scheduler": "step", "step_size": 70, "gamma": 0.1, "eval_batch_size": 128, "num_workers": 8,
}
#: hparam_source=pmr: PMR's AVE scripts (Adam 1e-3, betas (0.9, 0.99), no scheduler)
TRAIN_DEFAULTS_PMR: dict[str, Any] = {"optimizer": "adam", "lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.0,
                                      "scheduler": "none"}


@dataclass
class AveOptions:
    """``path``: the store (default ``<data-dir>/ave``); ``duplicates``: a video listed twice in one split
    file (45 videos carry two labels) — ``first`` (PMR, ReconBoost), ``last`` (OGM-GE's generic loader)
    or ``drop`` (remove every such video); ``clean``: drop training videos that also occur in validation
    or test (``ave_clean``); ``frames``: T (4, PMR's AVE scripts); ``frame_sampling``; ``aug_per_frame``;
    ``hparam_source``: ogm_ge | pmr."""

    path: str | None = None
    duplicates: Literal["first", "last", "drop"] = "first"
    clean: bool = False
    frames: int = 4
    frame_sampling: Literal["segment", "segment_int", "fixed"] = "segment"
    aug_per_frame: bool = True
    hparam_source: Literal["ogm_ge", "pmr"] = "ogm_ge"

    def validate(self) -> None:
        if self.frames < 1:
            raise ConfigError(f"ave: frames must be >= 1, got {self.frames}")


# --------------------------------------------------------------------------- annotation files
def read_rows(path: Path) -> tuple[list[dict[str, Any]], str]:
    """Rows ``Category&VideoID&Quality&StartTime&EndTime`` (a first line whose StartTime is not an integer is a
    header and dropped) and the normalised-row SHA-256."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"ave: {path} is unreadable ({exc})") from None
    lines = [x.replace("\r", "") for x in text.split("\n")]
    lines = [x for x in lines if x.strip()]
    if lines and (len(lines[0].split("&")) != 5 or not lines[0].split("&")[3].strip().isdigit()):
        lines = lines[1:]
    rows = []
    for k, line in enumerate(lines, 1):
        f = line.split("&")
        if len(f) != 5 or not f[3].strip().isdigit() or not f[4].strip().isdigit():
            raise DatasetFormatError(f"ave: {path}:{k}: expected 'Category&VideoID&Quality&Start&End', got {line!r}")
        if f[0] not in CLASS_NAMES:
            raise DatasetFormatError(f"ave: {path}:{k}: unknown category {f[0]!r} (not one of the 28 AVE categories)")
        start, end = int(f[3]), int(f[4])
        if not 0 <= start <= end <= SECONDS:
            raise DatasetFormatError(f"ave: {path}:{k}: event [{start}, {end}] is not inside [0, 10]")
        rows.append({"video": f[1], "label": CLASS_NAMES.index(f[0]), "start": start, "end": end})
    digest = hashlib.sha256(("\n".join(lines) + "\n").encode()).hexdigest()
    return rows, digest


def read_splits(raw: Path, unverified: bool = False) -> tuple[dict[str, list[dict[str, Any]]], bool]:
    out, verified = {}, True
    for part, name in SPLIT_FILES.items():
        path = raw / name
        if not path.is_file():
            raise DatasetNotFoundError(f"ave: {path} does not exist; --raw must be the AVE_Dataset folder with "
                                       "AVE/*.mp4, trainSet.txt, valSet.txt, testSet.txt")
        rows, digest = read_rows(path)
        if digest != SPLIT_SHA256[name]:
            if not unverified:
                raise DatasetFormatError(f"ave: {path} has normalised SHA-256 {digest}, expected PMR's "
                                         f"{SPLIT_SHA256[name]}; pass --split-unverified to use it anyway")
            verified = False
        out[part] = rows
    return out, verified


def split_ids(rows: list[dict[str, Any]], duplicates: str) -> list[tuple[str, int]]:
    """(video, label) per distinct video of one split file: ``first``/``last`` row, or ``drop`` every
    video listed with more than one label."""
    order: list[str] = []
    labels: dict[str, list[int]] = {}
    for r in rows:
        if r["video"] not in labels:
            order.append(r["video"])
            labels[r["video"]] = []
        labels[r["video"]].append(r["label"])
    if duplicates == "drop":
        return [(v, labels[v][0]) for v in order if len(labels[v]) == 1]
    k = 0 if duplicates == "first" else -1
    return [(v, labels[v][k]) for v in order]


# --------------------------------------------------------------------------- preprocessing
def event_window(start: int, end: int) -> tuple[int, int]:
    """An event shorter than 1 s is widened to [start, start + 1) (PMR's code gets an empty array there)."""
    return (start, end) if end - start >= 1 else (start, start + 1)


def event_audio(x: np.ndarray, sr: int, start: int, end: int, segment: str = "event") -> np.ndarray:
    """PMR's SE audio: channels averaged, 16 kHz (soxr HQ), samples [16000·start, 16000·end), repeated to 10 s,
    clipped; ``scipy.signal.spectrogram(nperseg=512, noverlap=353)`` (Tukey 0.25, PSD); log(S + 1e-7);
    (S − mean) / (std + 1e-9) over the clip → float32 [257, 1004]."""
    from scipy.signal import spectrogram

    y = resample(x.mean(axis=0) if x.ndim == 2 else x, sr, SAMPLE_RATE)
    if segment == "event":
        a, b = event_window(start, end)
        y = y[SAMPLE_RATE * a:SAMPLE_RATE * b]
        if len(y) == 0:
            raise DatasetFormatError(f"the audio is shorter than the event start ({a} s)")
    y = repeat_to(y, SAMPLE_RATE * SECONDS)
    _, _, s = spectrogram(y, fs=SAMPLE_RATE, nperseg=NPERSEG, noverlap=NOVERLAP)
    s = np.log(s + 1e-7)
    return ((s - s.mean()) / (s.std() + 1e-9)).astype(np.float32)


def event_frame_indices(r: int, start: int, end: int) -> list[int]:
    """The fill rule (fewer than 10 one-fps frames in the event): the 10 native indices
    floor(r·(start + (j + ½)·L/10)), j = 0…9, L = end − start (deterministic; PMR adds random indices)."""
    a, b = event_window(start, end)
    return [int(np.floor(r * (a + (j + 0.5) * (b - a) / MIN_FRAMES))) for j in range(MIN_FRAMES)]


def decode_clip(job: ClipJob, *, frame_size: int, segment: str) -> ClipResult:
    start, end = (job.extra["start"], job.extra["end"]) if segment == "event" else (0, SECONDS)
    x, sr = decode_audio_native(job.files["video"])
    audio = event_audio(x, sr, start, end, segment)
    fill: set[int] = set()

    def keep(n: int, r: int, _t: float) -> bool:  # 1-fps frames k = n // r with start ≤ k ≤ end, or the fill set
        if not fill:
            fill.update(event_frame_indices(r, start, end))
        return (n % r == 0 and start <= n // r <= end) or n in fill

    video = decode_video_frames(job.files["video"], 1, frame_size, keep=keep)
    r = video.native_fps
    ones = [i for i, n in enumerate(video.src_index.tolist()) if n % r == 0 and start <= n // r <= end]
    chosen = ones if len(ones) >= MIN_FRAMES else [i for i, n in enumerate(video.src_index.tolist()) if n in fill]
    if not chosen:
        raise DatasetFormatError(f"{job.files['video']}: no frame inside the event [{start}, {end}]")
    video.frames, video.src_index, video.times = video.frames[chosen], video.src_index[chosen], video.times[chosen]
    info = {"native_w": video.native_w, "native_h": video.native_h, "native_fps": r,
            "audio_seconds": round(x.shape[1] / sr, 4), "video_seconds": round(video.video_seconds, 4),
            "frame_rule": "1fps" if len(ones) >= MIN_FRAMES else "fill10"}
    return ClipResult(audio.astype(np.float16), video, info)


def convert(raw: str | Path, out: str | Path, *, segment: str = "event", split_unverified: bool = False,
            frame_size: int = 224, frame_codec: str = "raw", workers: int = 0, skip_bad: bool = False, force: bool = False,
            strict_hash: bool = False, log=print, decode_counter: list[int] | None = None) -> dict[str, Any]:
    """One store entry per distinct video of the three split files."""
    raw, out = Path(raw).expanduser(), Path(out).expanduser()
    if not raw.is_dir():
        raise DatasetNotFoundError(f"ave converter: raw folder {raw} does not exist")
    if segment not in ("event", "full"):
        raise ConfigError(f"ave converter: segment must be event|full, got {segment!r}")
    lists, verified = read_splits(raw, split_unverified)
    vdir = raw / "AVE"
    first_row: dict[str, dict[str, Any]] = {}
    for part in ("train", "val", "test"):
        for r in lists[part]:
            first_row.setdefault(r["video"], r)
    missing = sorted(v for v in first_row if not (vdir / f"{v}.mp4").is_file())
    if missing and not skip_bad:
        raise DatasetFormatError(f"ave converter: {len(missing)} listed video(s) are not under {vdir}: "
                                 + ", ".join(missing[:30]) + (" …" if len(missing) > 30 else "")
                                 + "; pass --skip-bad to exclude (and count) them")
    # a class left without validation or test videos is an error even with --skip-bad
    for part in ("val", "test"):
        have = {r["label"] for r in lists[part] if r["video"] not in missing}
        lost = [CLASS_NAMES[c] for c in sorted({r["label"] for r in lists[part]}) if c not in have]
        if lost:
            raise DatasetFormatError(f"ave converter: no {part} video left for class(es) {', '.join(lost)}")
    jobs = [ClipJob(v, r["label"], {"video": vdir / f"{v}.mp4"}, {"start": r["start"], "end": r["end"]})
            for v, r in first_row.items() if v not in missing]
    per_video = {v: [{"split": p, "label": r["label"], "start": r["start"], "end": r["end"]}
                     for p in ("train", "val", "test") for r in lists[p] if r["video"] == v] for v in first_row}
    for j in jobs:
        j.extra["rows"] = per_video[j.key]
    params = {"segment": segment, "cache_fps": 1, "frame_size": frame_size, "sample_rate": SAMPLE_RATE}
    decode = functools.partial(decode_clip, frame_size=frame_size, segment=segment)
    train_ids = {r["video"] for r in lists["train"]}
    cross = sorted(train_ids & ({r["video"] for r in lists["val"]} | {r["video"] for r in lists["test"]}))
    dup = {p: sorted(v for v, c in Counter(r["video"] for r in lists[p]).items() if c > 1) for p in lists}
    lost_missing = Counter(CLASS_NAMES[first_row[v]["label"]] for v in missing)
    meta = build_store(out, jobs, decode, params=params, frame_codec=frame_codec, dataset=NAME, raw_root=raw, class_names=CLASS_NAMES,
                       workers=workers, skip_bad=skip_bad, force=force, strict_hash=strict_hash, log=log,
                       decode_counter=decode_counter,
                       extra_meta={"split_verified": verified, "missing_videos": missing,
                                   "missing_per_class": dict(lost_missing), "cross_split_videos": cross,
                                   "duplicate_videos": dup,
                                   "widened_events": sorted(v for v, r in first_row.items() if r["end"] == r["start"])})
    tmp = out / "split_lists.json.tmp"
    tmp.write_text(json.dumps({"lists": lists, "verified": verified}))
    os.replace(tmp, out / "split_lists.json")
    for name, n in lost_missing.items():
        log(f"ave: class {name!r}: {n} listed video(s) missing")
    return meta


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m mmbalance.datasets.ave",
                                description="Decode the AVE videos once into mmbalance's cached store.")
    p.add_argument("--raw", required=True, help="AVE_Dataset folder: AVE/*.mp4, trainSet.txt, valSet.txt, testSet.txt")
    p.add_argument("--out", required=True)
    p.add_argument("--segment", default="event", choices=["event", "full"])
    p.add_argument("--split-unverified", action="store_true")
    p.add_argument("--frame-size", type=int, default=224)
    p.add_argument("--frame-codec", default="raw", choices=["raw", "jpeg"],
                   help="raw uint8 frames (fastest to read) or JPEG quality 95 (about 10x smaller, decoded per item)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--strict-hash", action="store_true")
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    return converter_main(lambda: convert(a.raw, a.out, segment=a.segment, split_unverified=a.split_unverified,
                                          frame_size=a.frame_size, frame_codec=a.frame_codec, workers=a.workers, skip_bad=a.skip_bad,
                                          force=a.force, strict_hash=a.strict_hash))


# --------------------------------------------------------------------------- loader
def build(options: AveOptions, data_dir: str | Path | None = None) -> MultimodalData:
    o = options
    store = AVStore(resolve_store(o.path, data_dir, NAME, CONVERT_CMD), NAME, CONVERT_CMD)
    path = store.root / "split_lists.json"
    if not path.is_file():
        raise DatasetFormatError(f"ave: {path} is missing from the store; {CONVERT_CMD}")
    lists = json.loads(path.read_text())["lists"]
    pos = {e["key"]: i for i, e in enumerate(store.index)}
    ids = {p: split_ids(lists[p], o.duplicates) for p in ("train", "val", "test")}
    removed: list[str] = []
    if o.clean:
        other = {v for v, _ in ids["val"]} | {v for v, _ in ids["test"]}
        removed = [v for v, _ in ids["train"] if v in other]
        ids["train"] = [(v, y) for v, y in ids["train"] if v not in other]
    absent = sorted({v for p in ids.values() for v, _ in p if v not in pos})
    if absent:
        warnings.warn(f"ave: {len(absent)} listed video(s) are not in the store (missing or excluded by the "
                      f"converter), e.g. {absent[0]}", stacklevel=2)
    sets, sizes = {}, {}
    for p, pairs in ids.items():
        pairs = [(v, y) for v, y in pairs if v in pos]
        if not pairs:
            raise DatasetFormatError(f"ave: the {p} split has no video in {store.root}")
        sizes[p] = len(pairs)
        sets[p] = AVClipDataset(store, [pos[v] for v, _ in pairs], [y for _, y in pairs], frames=o.frames,
                                frame_fps=None, sampling=o.frame_sampling if p == "train" else
                                ("segment_int" if o.frame_sampling == "segment_int" else "segment"),
                                train=p == "train", aug_per_frame=o.aug_per_frame)
    defaults = {**TRAIN_DEFAULTS, **(TRAIN_DEFAULTS_PMR if o.hparam_source == "pmr" else {})}
    s = store.frame_size
    return MultimodalData(
        modalities=list(MODALITIES), task="classification", task_kwargs={"num_classes": len(CLASS_NAMES)},
        train=sets["train"], val=sets["val"], test=sets["test"],
        input_shapes={"audio": (1, *AUDIO_SHAPE), "visual": (3, o.frames, s, s)}, out_dim=len(CLASS_NAMES),
        model=ModelSpec("av_resnet18", {}), train_defaults=defaults,
        info={"root": str(store.root), "split_sizes": sizes, "duplicates": o.duplicates, "clean": o.clean,
              "removed_cross_split": removed, "absent": absent, "class_names": list(CLASS_NAMES),
              "split": "verified" if store.meta.get("split_verified") else "unverified",
              "segment": store.meta["params"]["segment"], "store_fingerprint": store.meta["fingerprint"]},
    )


build.options_cls = AveOptions  # type: ignore[attr-defined]
register_dataset(NAME, "AVE (28 events) clip classification from the event segment, ResNet-18 pair")(build)
register_dataset("ave_clean", "AVE minus training videos that reappear in validation or test", clean=True)(build)


if __name__ == "__main__":
    raise SystemExit(main())
