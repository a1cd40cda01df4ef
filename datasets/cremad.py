"""CREMA-D (audio + video, 6 emotions) from a cached store (``docs/datasets/cremad.md``).

H. Cao et al., "CREMA-D: Crowd-sourced Emotional Multimodal Actors Dataset", IEEE Trans. Affective
Computing 5(4), 2014. 7,442 clips of 91 actors (1001–1091). Modalities (this order everywhere):
``audio`` (log-magnitude STFT [1, 257, 188] of 3 s at 22,050 Hz, OGM-GE's pipeline) and ``visual``
(T RGB frames [3, T, S, S] taken at 1 fps by default). mmbalance ships no CREMA-D file, clip list or
feature: the converter of this module decodes the user's copy once::

    python -m mmbalance.datasets.cremad --raw <CREMA-D clone> --out <store> [--legacy-split-dir <dir>]

Registry names: ``cremad`` (actor-disjoint split, validation from training actors; default),
``cremad-legacy`` (OGM-GE's train/test lists: every actor in both; a 10 % stratified validation carve),
``cremad-3f`` (three frames per clip at 3 fps).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
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
    decode_video_frames,
    log_stft,
    read_wav,
    repeat_to,
    resample,
    resolve_store,
)

NAME = "cremad"
ACTORS = tuple(range(1001, 1092))
SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")
#: OGM-GE's label order (NEU 0, HAP 1, SAD 2, FEA 3, DIS 4, ANG 5), from the emotion field only.
EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
CLASS_NAMES = ("neutral", "happy", "sad", "fear", "disgust", "anger")
LEVELS = ("LO", "MD", "HI", "XX")
MODALITIES = ("audio", "visual")
SAMPLE_RATE, SECONDS = 22_050, 3
N_FFT, HOP = 512, 353
AUDIO_SHAPE = (N_FFT // 2 + 1, 1 + SAMPLE_RATE * SECONDS // HOP)  # (257, 188)
#: the CREMA-D README's defective clips (no audio, no duration, one minute long)
KNOWN_BAD = ("1076_MTI_NEU_XX", "1076_MTI_SAD_XX", "1064_TIE_SAD_XX", "1064_IEO_DIS_MD")
#: SHA-256 of OGM-GE's data/CREMAD/{train,test}.csv, normalised rows (CR stripped, BOM stripped, empty
#: lines dropped, '\n'-joined with a final '\n').
LEGACY_SHA256 = {"train": "7b95d291b847eac9c1447bb9fb63b47176d182987ac74fe041e4dd493c6d0abd",
                 "test": "959a667af66a01dc439b12d6ec9dc57b36a88e947f48ad63531a4b91f769394f"}
CONVERT_CMD = "python -m mmbalance.datasets.cremad --raw <CREMA-D clone with AudioWAV/ VideoFlash/> --out <store>"

#: hparam_source=ogm_ge: OGM-GE's main.py (SGD 1e-3, momentum 0.9, wd 1e-4, batch 64, StepLR(70, 0.1), 100 epochs)
TRAIN_DEFAULTS: dict[str, Any] = {
    "optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64, "epochs": 100,
    "scheduler": "step", "step_size": 70, "gamma": 0.1, "eval_batch_size": 128, "num_workers": 8,
}
#: hparam_source=balancebenchmark: its configs (AdamW 1e-3, wd 0.01, batch 32, StepLR(10, 0.1), 30 epochs)
TRAIN_DEFAULTS_BB: dict[str, Any] = {
    "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01, "batch_size": 32, "epochs": 30,
    "scheduler": "step", "step_size": 10, "gamma": 0.1,
}


@dataclass
class CremadOptions:
    """``path``: the store (default ``<data-dir>/cremad`` if it exists, else ``<data-dir>``); ``split``:
    ``actor`` (91 actors permuted by ``split_seed``: ``n_test_actors`` test, ``n_val_actors``
    validation, the rest train) or ``legacy`` (OGM-GE's lists, written into the store by the converter's
    ``--legacy-split-dir``; validation = ``legacy_val_fraction`` of its training list, stratified);
    ``frames``: T frames per clip; ``frame_source_fps``: 1 or 3 (the frames T is picked from);
    ``frame_sampling``: segment | segment_int | fixed; ``aug_per_frame``: independent crop/flip per frame
    (OGM-GE) or one per clip; ``exclude_known_bad``: drop the README's four defective clips (default:
    yes for ``actor``, no for ``legacy``, whose published training used them); ``hparam_source``:
    ogm_ge | balancebenchmark."""

    path: str | None = None
    split: Literal["actor", "legacy"] = "actor"
    split_seed: int = 0
    n_test_actors: int = 18
    n_val_actors: int = 9
    legacy_val_fraction: float = 0.1
    frames: int = 1
    frame_source_fps: int = 1
    frame_sampling: Literal["segment", "segment_int", "fixed"] = "segment"
    aug_per_frame: bool = True
    exclude_known_bad: bool | None = None
    hparam_source: Literal["ogm_ge", "balancebenchmark"] = "ogm_ge"

    def validate(self) -> None:
        if self.frames < 1:
            raise ConfigError(f"cremad: frames must be >= 1, got {self.frames}")
        if self.frame_source_fps not in (1, 3):
            raise ConfigError(f"cremad: frame_source_fps must be 1 or 3, got {self.frame_source_fps}")
        if self.n_test_actors < 1 or self.n_val_actors < 1 or self.n_test_actors + self.n_val_actors >= len(ACTORS):
            raise ConfigError(f"cremad: n_test_actors={self.n_test_actors} and n_val_actors={self.n_val_actors} must "
                              f"be >= 1 and leave training actors (of {len(ACTORS)})")
        if not 0 < self.legacy_val_fraction < 1:
            raise ConfigError(f"cremad: legacy_val_fraction must be in (0, 1), got {self.legacy_val_fraction}")


# --------------------------------------------------------------------------- names and splits
def parse_name(stem: str, where: str | Path | None = None) -> dict[str, Any]:
    """``<ActorID>_<Sentence>_<Emotion>_<Level>`` → {actor, sentence, emotion, level, label}."""
    where = where or stem
    parts = stem.split("_")
    if len(parts) != 4:
        raise DatasetFormatError(f"cremad: {where}: file name {stem!r} does not have the four fields "
                                 "<ActorID>_<Sentence>_<Emotion>_<Level>")
    actor, sentence, emotion, level = parts
    if not actor.isdigit() or int(actor) not in ACTORS:
        raise DatasetFormatError(f"cremad: {where}: actor {actor!r} is outside 1001–1091")
    for value, valid, what in ((sentence, SENTENCES, "sentence"), (emotion, EMOTIONS, "emotion"),
                               (level, LEVELS, "level")):
        if value not in valid:
            raise DatasetFormatError(f"cremad: {where}: unknown {what} code {value!r}; valid: {', '.join(valid)}")
    return {"actor": int(actor), "sentence": sentence, "emotion": emotion, "level": level,
            "label": EMOTIONS.index(emotion)}


def actor_split(seed: int = 0, n_test: int = 18, n_val: int = 9) -> dict[str, list[int]]:
    """Actor-disjoint split of the fixed universe 1001…1091 (not the actors on disk, so a partial copy
    keeps the assignment): ``perm = RandomState(seed).permutation(91)``; the first ``n_test`` actors are
    test, the next ``n_val`` validation, the rest train (each list sorted)."""
    perm = np.random.RandomState(seed).permutation(len(ACTORS))
    actors = np.asarray(ACTORS)[perm]
    return {"test": sorted(actors[:n_test].tolist()), "val": sorted(actors[n_test:n_test + n_val].tolist()),
            "train": sorted(actors[n_test + n_val:].tolist())}


def _normalised_rows(path: Path) -> list[str]:
    text = path.read_bytes().decode("utf-8-sig", errors="strict")
    return [line.replace("\r", "") for line in text.split("\n") if line.replace("\r", "").strip()]


def read_legacy_csv(path: Path) -> tuple[list[tuple[str, str]], str]:
    """Rows ``clip,EMOTION`` of an OGM-GE split file (CRLF, no header, BOM stripped) and the SHA-256 of
    the normalised rows."""
    try:
        rows = _normalised_rows(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"cremad: {path} is unreadable ({exc})") from None
    out = []
    for k, line in enumerate(rows, 1):
        fields = line.split(",")
        if len(fields) != 2:
            raise DatasetFormatError(f"cremad: {path}:{k}: expected 'clip,EMOTION', got {line!r}")
        clip, emo = fields[0].strip(), fields[1].strip()
        if parse_name(clip, f"{path}:{k}")["emotion"] != emo:
            raise DatasetFormatError(f"cremad: {path}:{k}: emotion {emo!r} differs from the clip name {clip!r}")
        out.append((clip, emo))
    digest = hashlib.sha256(("\n".join(rows) + "\n").encode()).hexdigest()
    return out, digest


def read_legacy_split(folder: Path, unverified: bool = False) -> dict[str, Any]:
    """OGM-GE's ``train.csv``/``test.csv`` from ``folder``, accepted when their normalised hashes match
    (``unverified`` accepts others and marks them)."""
    out: dict[str, Any] = {"verified": True}
    for part in ("train", "test"):
        path = Path(folder) / f"{part}.csv"
        if not path.is_file():
            raise DatasetNotFoundError(f"cremad: {path} does not exist (--legacy-split-dir must hold OGM-GE's "
                                       "data/CREMAD/train.csv and test.csv)")
        rows, digest = read_legacy_csv(path)
        if digest != LEGACY_SHA256[part]:
            if not unverified:
                raise DatasetFormatError(f"cremad: {path} has normalised SHA-256 {digest}, expected OGM-GE's "
                                         f"{LEGACY_SHA256[part]}; pass --legacy-split-unverified to use it anyway "
                                         "(runs are then marked legacy_split=unverified)")
            out["verified"] = False
        out[part] = [c for c, _ in rows]
        out[f"{part}_sha256"] = digest
    both = set(out["train"]) & set(out["test"])
    if both:
        raise DatasetFormatError(f"cremad: {len(both)} clip(s) are in both legacy lists (e.g. {sorted(both)[0]})")
    return out


# --------------------------------------------------------------------------- converter
def clip_audio(path: Path, resampler: str = "soxr_hq", stft_pad: str = "constant") -> tuple[np.ndarray, float]:
    """OGM-GE's audio pipeline: mono float32 → 22,050 Hz → repeated to ≥ 3 s, cut to 66,150 samples,
    clipped to [−1, 1] → log(|STFT| + 1e-7), n_fft 512, hop 353 → float32 [257, 188]; and the clip's
    seconds at its native rate."""
    x, sr = read_wav(path)
    seconds = len(x) / sr
    if resampler == "polyphase" and sr != SAMPLE_RATE:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(SAMPLE_RATE, sr)
        y = resample_poly(x, SAMPLE_RATE // g, sr // g).astype(np.float32)
    else:
        y = resample(x, sr, SAMPLE_RATE)
    spec = log_stft(repeat_to(y, SAMPLE_RATE * SECONDS), N_FFT, HOP, stft_pad)
    return spec, seconds


def decode_clip(job: ClipJob, *, cache_fps: int, frame_size: int, max_video_seconds: float, resampler: str,
                stft_pad: str) -> ClipResult:
    spec, audio_seconds = clip_audio(job.files["audio"], resampler, stft_pad)
    video = decode_video_frames(job.files["video"], cache_fps, frame_size, max_seconds=max_video_seconds)
    info = {"native_w": video.native_w, "native_h": video.native_h, "native_fps": video.native_fps,
            "audio_seconds": round(audio_seconds, 4), "video_seconds": round(video.video_seconds, 4)}
    return ClipResult(spec.astype(np.float16), video, info)


def index_raw(raw: Path, video_dir: str = "VideoFlash") -> list[ClipJob]:
    """Pair ``AudioWAV/<clip>.wav`` with ``<video_dir>/<clip>.*`` by stem and parse every name; all
    problems are reported together."""
    adir, vdir = raw / "AudioWAV", raw / video_dir
    for d in (adir, vdir):
        if not d.is_dir():
            raise DatasetNotFoundError(f"cremad converter: {d} does not exist; --raw must be a CREMA-D clone "
                                       f"(git lfs clone) with AudioWAV/ and {video_dir}/")
    wavs = {p.stem: p for p in sorted(adir.glob("*.wav"))}
    vids = {p.stem: p for p in sorted(vdir.iterdir()) if p.is_file() and p.suffix.lower() in (".flv", ".mp4")}
    problems = []
    for stem in sorted(set(wavs) - set(vids)):
        problems.append(f"{wavs[stem]} has no video in {vdir}")
    for stem in sorted(set(vids) - set(wavs)):
        problems.append(f"{vids[stem]} has no audio in {adir}")
    jobs = []
    for stem in sorted(set(wavs) & set(vids)):
        try:
            info = parse_name(stem, wavs[stem])
        except DatasetFormatError as exc:
            problems.append(str(exc).removeprefix("cremad: "))
            continue
        jobs.append(ClipJob(stem, info.pop("label"), {"audio": wavs[stem], "video": vids[stem]}, info))
    if problems:
        raise DatasetFormatError("cremad converter: " + "; ".join(problems))
    if not jobs:
        raise DatasetNotFoundError(f"cremad converter: no clip under {adir} and {vdir}")
    return jobs


def convert(raw: str | Path, out: str | Path, *, legacy_split_dir: str | Path | None = None,
            legacy_split_unverified: bool = False, cache_fps: int = 3, frame_size: int = 224, frame_codec: str = "raw",
            video_dir: str = "VideoFlash", workers: int = 0, skip_bad: bool = False, force: bool = False,
            strict_hash: bool = False, max_video_seconds: float = 10.0, resampler: str = "soxr_hq",
            stft_pad: str = "constant", log=print, decode_counter: list[int] | None = None) -> dict[str, Any]:
    """Decode the raw CREMA-D clone once into the store at ``out`` (see the module docstring)."""
    raw, out = Path(raw).expanduser(), Path(out).expanduser()
    if not raw.is_dir():
        raise DatasetNotFoundError(f"cremad converter: raw folder {raw} does not exist")
    if resampler not in ("soxr_hq", "polyphase") or stft_pad not in ("constant", "reflect"):
        raise ConfigError(f"cremad converter: resampler must be soxr_hq|polyphase and stft_pad constant|reflect, "
                          f"got {resampler!r}, {stft_pad!r}")
    legacy = read_legacy_split(Path(legacy_split_dir), legacy_split_unverified) if legacy_split_dir else None
    jobs = index_raw(raw, video_dir)
    params = {"cache_fps": cache_fps, "frame_size": frame_size, "sample_rate": SAMPLE_RATE, "seconds": SECONDS,
              "n_fft": N_FFT, "hop": HOP, "resampler": resampler, "stft_pad": stft_pad,
              "max_video_seconds": max_video_seconds}
    decode = functools.partial(decode_clip, cache_fps=cache_fps, frame_size=frame_size,
                               max_video_seconds=max_video_seconds, resampler=resampler, stft_pad=stft_pad)
    meta = build_store(out, jobs, decode, params=params, frame_codec=frame_codec, dataset=NAME, raw_root=raw, class_names=CLASS_NAMES,
                       workers=workers, skip_bad=skip_bad, force=force, strict_hash=strict_hash, log=log,
                       decode_counter=decode_counter, extra_meta={"known_bad": list(KNOWN_BAD)})
    if legacy is not None:  # not part of the media fingerprint: (re)written on a complete store
        tmp = out / "legacy_split.json.tmp"
        tmp.write_text(json.dumps(legacy))
        os.replace(tmp, out / "legacy_split.json")
        log(f"cremad: legacy split written ({len(legacy['train'])} train, {len(legacy['test'])} test; "
            f"{'verified' if legacy['verified'] else 'UNVERIFIED'})")
    return meta


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m mmbalance.datasets.cremad",
                                description="Decode a CREMA-D clone once into mmbalance's cached store.")
    p.add_argument("--raw", required=True, help="CREMA-D clone (git lfs clone) with AudioWAV/ and VideoFlash/")
    p.add_argument("--out", required=True, help="store folder (created; a complete up-to-date store is reused)")
    p.add_argument("--legacy-split-dir", help="folder with OGM-GE's train.csv and test.csv (data/CREMAD)")
    p.add_argument("--legacy-split-unverified", action="store_true", help="accept split files with other hashes")
    p.add_argument("--cache-fps", type=int, default=3)
    p.add_argument("--frame-size", type=int, default=224)
    p.add_argument("--frame-codec", default="raw", choices=["raw", "jpeg"],
                   help="raw uint8 frames (fastest to read) or JPEG quality 95 (about 10x smaller, decoded per item)")
    p.add_argument("--video-dir", default="VideoFlash")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--resampler", default="soxr_hq", choices=["soxr_hq", "polyphase"])
    p.add_argument("--stft-pad", default="constant", choices=["constant", "reflect"])
    p.add_argument("--skip-bad", action="store_true", help="exclude (and list) clips that cannot be decoded")
    p.add_argument("--strict-hash", action="store_true", help="fingerprint file contents, not size and mtime")
    p.add_argument("--force", action="store_true", help="rebuild even if a complete store exists")
    a = p.parse_args(argv)
    return converter_main(lambda: convert(
        a.raw, a.out, legacy_split_dir=a.legacy_split_dir, legacy_split_unverified=a.legacy_split_unverified,
        cache_fps=a.cache_fps, frame_size=a.frame_size, frame_codec=a.frame_codec, video_dir=a.video_dir, workers=a.workers,
        skip_bad=a.skip_bad, force=a.force, strict_hash=a.strict_hash, resampler=a.resampler, stft_pad=a.stft_pad))


# --------------------------------------------------------------------------- loader
def _splits(o: CremadOptions, store: AVStore) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    keys = [e["key"] for e in store.index]
    labels = np.asarray([e["label"] for e in store.index])
    exclude = o.exclude_known_bad if o.exclude_known_bad is not None else o.split == "actor"
    dropped = [k for k in KNOWN_BAD if k in keys] if exclude else []
    info: dict[str, Any] = {"known_bad_excluded": dropped, "excluded_by_converter": sorted(store.meta.get("bad", {}))}
    if o.split == "actor":
        actors = actor_split(o.split_seed, o.n_test_actors, o.n_val_actors)
        of = {a: s for s, lst in actors.items() for a in lst}
        parts = {s: np.asarray([i for i, e in enumerate(store.index) if of[e["actor"]] == s and e["key"] not in dropped],
                               np.int64) for s in ("train", "val", "test")}
        info["actors"] = actors
        return parts, info
    path = store.root / "legacy_split.json"
    if not path.is_file():
        raise DatasetFormatError(f"cremad: split=legacy needs {path}; write it with: python -m "
                                 "mmbalance.datasets.cremad --raw <clone> --out <store> --legacy-split-dir "
                                 "<OGM-GE data/CREMAD> (the media are not decoded again)")
    legacy = json.loads(path.read_text())
    pos = {k: i for i, k in enumerate(keys)}
    missing = [c for part in ("train", "test") for c in legacy[part] if c not in pos]
    if missing:
        warnings.warn(f"cremad: {len(missing)} clip(s) of the legacy lists are not in the store (excluded by the "
                      f"converter), e.g. {missing[0]}", stacklevel=2)
    train_all = np.asarray([pos[c] for c in legacy["train"] if c in pos and c not in dropped], np.int64)
    val_idx, tr_idx = stratified_split(labels[train_all], [o.legacy_val_fraction, 1 - o.legacy_val_fraction],
                                       o.split_seed)
    parts = {"train": np.sort(train_all[tr_idx]), "val": np.sort(train_all[val_idx]),
             "test": np.asarray(sorted(pos[c] for c in legacy["test"] if c in pos and c not in dropped), np.int64)}
    info.update(legacy_split="verified" if legacy.get("verified") else "unverified", legacy_missing=missing,
                speaker_dependent=True)
    return parts, info


def build(options: CremadOptions, data_dir: str | Path | None = None) -> MultimodalData:
    """Open the store and return the actor-disjoint (or legacy) splits as map-style datasets."""
    o = options
    store = AVStore(resolve_store(o.path, data_dir, NAME, CONVERT_CMD), NAME, CONVERT_CMD)
    if tuple(store.meta["audio_shape"]) != AUDIO_SHAPE:
        raise DatasetFormatError(f"cremad: {store.root / 'audio.npy'} holds spectrograms of shape "
                                 f"{store.meta['audio_shape']}, expected {list(AUDIO_SHAPE)}")
    if o.frame_source_fps > int(store.meta["params"]["cache_fps"]):
        raise ConfigError(f"cremad: frame_source_fps={o.frame_source_fps} but the store caches "
                          f"{store.meta['params']['cache_fps']} fps; rebuild with --cache-fps 3")
    parts, info = _splits(o, store)
    labels = np.asarray([e["label"] for e in store.index], np.int64)
    empty = [s for s, p in parts.items() if len(p) == 0]
    if empty:
        raise DatasetFormatError(f"cremad: the {', '.join(empty)} split(s) have no clip in {store.root} "
                                 f"(split={o.split}, split_seed={o.split_seed})")
    sets = {s: AVClipDataset(store, p, labels[p], frames=o.frames, frame_fps=o.frame_source_fps,
                             sampling=o.frame_sampling if s == "train" else
                             ("segment_int" if o.frame_sampling == "segment_int" else "segment"),
                             train=s == "train", aug_per_frame=o.aug_per_frame) for s, p in parts.items()}
    if o.split == "actor":
        sets["train"].carve_keys = np.asarray([store.index[int(p)]["actor"] for p in parts["train"]])
    defaults = {**TRAIN_DEFAULTS, **(TRAIN_DEFAULTS_BB if o.hparam_source == "balancebenchmark" else {})}
    s = store.frame_size
    return MultimodalData(
        modalities=list(MODALITIES), task="classification", task_kwargs={"num_classes": len(EMOTIONS)},
        train=sets["train"], val=sets["val"], test=sets["test"],
        input_shapes={"audio": (1, *AUDIO_SHAPE), "visual": (3, o.frames, s, s)}, out_dim=len(EMOTIONS),
        model=ModelSpec("av_resnet18", {}), train_defaults=defaults,
        info={"root": str(store.root), "split": o.split, "split_seed": o.split_seed, "class_names": list(CLASS_NAMES),
              "split_sizes": {k: int(len(v)) for k, v in parts.items()}, "frames": o.frames,
              "frame_source_fps": o.frame_source_fps, "store_fingerprint": store.meta["fingerprint"], **info},
    )


build.options_cls = CremadOptions  # type: ignore[attr-defined]
register_dataset("cremad", "CREMA-D audio+video emotions (6), actor-disjoint split, ResNet-18 pair")(build)
register_dataset("cremad-legacy", "CREMA-D with OGM-GE's train/test lists (speaker-dependent), ResNet-18 pair",
                 split="legacy")(build)
register_dataset("cremad-3f", "CREMA-D actor-disjoint, three frames per clip at 3 fps", frames=3,
                 frame_source_fps=3)(build)


if __name__ == "__main__":
    raise SystemExit(main())
