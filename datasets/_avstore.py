"""Shared machinery of the audio-visual datasets (CREMA-D, Kinetics-Sounds, AVE): media decoding, the
frame index rule, the cached store (converter side and loader side), frame sampling and augmentation.

One job per section:

* **decoding** (optional extra ``pip install -e ".[av]"``: PyAV, soundfile, soxr — wheels that bundle
  their codecs): :func:`read_wav`, :func:`decode_video_frames`, :func:`decode_audio_stream`;
* **the frame index rule** of OGM-GE's ``video_preprocessing.py`` (:func:`keep_frame`);
* **the store**: a folder of memory-mapped ``.npy`` arrays — ``audio.npy`` float16 [N, F, T],
  ``frames.npy`` uint8 [ΣF, S, S, 3], ``frame_offsets.npy`` int64 [N+1], ``frame_src_index.npy`` int32,
  ``frame_times.npy`` float32 — plus ``index.json`` (one entry per clip), ``meta.json`` and ``_COMPLETE``.
  :func:`build_store` decodes every clip once into per-clip parts (resumable: a killed conversion
  continues where it stopped), lists every clip it could not read, and assembles the arrays in a
  temporary folder that is renamed into place only when complete;
* **the loader side**: :class:`AVStore` (opens and checks a store, exit 2 naming the file and the
  converter command when it is missing or malformed) and :class:`AVClipDataset` (map-style split:
  frame picks, RandomResizedCrop + flip in training, ImageNet normalisation).

Nothing here imports torchvision, librosa or torchaudio.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mmbalance.errors import (
    CacheFormatError,
    ConfigError,
    DatasetFormatError,
    DatasetNotFoundError,
    InsufficientDiskError,
)

STORE_VERSION = "1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOG_EPS = 1e-7
LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"
AV_EXTRA = 'pip install -e ".[av]"  (PyAV, soundfile, soxr, Pillow)'


def require(module: str) -> Any:
    """Import an optional decoding dependency, or fail with the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"decoding audio-visual media needs the optional package {module!r} ({exc}); "
                          f"install it with: {AV_EXTRA}") from None


def library_versions() -> dict[str, str]:
    out = {"numpy": np.__version__}
    for mod in ("av", "soundfile", "soxr", "PIL", "scipy"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except ImportError:
            pass
    try:
        import av

        out["ffmpeg"] = ".".join(map(str, av.library_versions.get("libavcodec", ())))
        import soundfile

        out["libsndfile"] = soundfile.__libsndfile_version__
    except (ImportError, AttributeError):
        pass
    return out


# ============================================================================ decoding
def check_not_lfs_pointer(path: Path) -> None:
    """A git-lfs pointer stub (what a zip download of the CREMA-D repository holds) is not media."""
    with open(path, "rb") as f:
        head = f.read(len(LFS_MAGIC))
    if head == LFS_MAGIC:
        raise DatasetFormatError(f"{path}: git-lfs pointer, not media; run `git lfs pull` in the clone")


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(mono float32 samples, sample rate) of a WAV file (channels averaged)."""
    sf = require("soundfile")
    check_not_lfs_pointer(path)
    if path.stat().st_size == 0:
        raise DatasetFormatError(f"{path}: empty file (0 bytes)")
    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile.LibsndfileError and friends
        raise DatasetFormatError(f"{path}: unreadable audio ({type(exc).__name__}: {exc})") from None
    if len(x) == 0:
        raise DatasetFormatError(f"{path}: no audio samples")
    return x.mean(axis=1).astype(np.float32), int(sr)


def resample(x: np.ndarray, sr: int, target: int) -> np.ndarray:
    """soxr "HQ" resampling (what ``librosa.load(p, sr=target)`` does with librosa ≥ 0.10)."""
    if sr == target:
        return x.astype(np.float32)
    soxr = require("soxr")
    return np.asarray(soxr.resample(x, sr, target, quality="HQ"), dtype=np.float32)


def repeat_to(x: np.ndarray, n: int) -> np.ndarray:
    """Tile ``x`` until it has ≥ n samples, cut to n, clip to [−1, 1] (OGM-GE tiles exactly ×3 instead,
    which fails below 1 s at 22,050 Hz; tiling to the length is the fix)."""
    if len(x) == 0:
        raise ValueError("cannot repeat an empty signal")
    reps = -(-n // len(x))
    return np.clip(np.tile(x, reps)[:n], -1.0, 1.0).astype(np.float32)


def log_stft(x: np.ndarray, n_fft: int = 512, hop: int = 353, pad: str = "constant") -> np.ndarray:
    """log(|STFT| + 1e-7) as [n_fft/2 + 1, frames] (``librosa.stft(x, n_fft, hop)`` ≥ 0.10 semantics):
    periodic Hann window of n_fft, signal centred with n_fft/2 samples of padding each side
    (zeros, or ``reflect``), 1 + len(x) // hop frames."""
    half = n_fft // 2
    xp = np.pad(x.astype(np.float64), half, mode="constant" if pad == "constant" else "reflect")
    n_frames = 1 + (len(xp) - n_fft) // hop
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    idx = np.arange(n_fft)[None, :] + hop * np.arange(n_frames)[:, None]
    spec = np.abs(np.fft.rfft(xp[idx] * window, axis=1))
    return np.log(spec + LOG_EPS).T.astype(np.float32)


def _int_rate(stream: Any) -> int:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if rate is None or float(rate) <= 0:
        raise DatasetFormatError("video stream has no frame rate")
    return max(1, int(float(rate)))  # truncated, as OpenCV's int(CAP_PROP_FPS)


def keep_frame(n: int, r: int, fps: int) -> bool:
    """OGM-GE ``video_preprocessing.py``: with r = int(frame rate) and step = r // fps, frame n is kept
    when (n mod r) < step·fps and (n mod r) is a multiple of step (r = 30: fps 1 keeps 0, 30, …; fps 3
    keeps 0, 10, 20, …; the 1-fps frames are a subset of the 3-fps frames)."""
    step = max(1, r // fps)
    k = n % r
    return k < step * fps and k % step == 0


def resize_square(frame: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 [H, W, 3] → [size, size, 3], Pillow bilinear (OGM-GE's evaluation ``Resize((224, 224))``)."""
    Image = require("PIL.Image")
    if frame.shape[0] == size and frame.shape[1] == size:
        return np.ascontiguousarray(frame)
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.BILINEAR), dtype=np.uint8)


@dataclass
class VideoFrames:
    frames: np.ndarray      # uint8 [F, S, S, 3]
    src_index: np.ndarray   # int32 [F] decoded-frame index n
    times: np.ndarray       # float32 [F] seconds
    native_w: int
    native_h: int
    native_fps: int         # r = int(average rate)
    video_seconds: float


def decode_video_frames(path: Path, fps: int, size: int, *, max_seconds: float | None = None,
                        keep: Callable[[int, int, float], bool] | None = None) -> VideoFrames:
    """Decode the first video stream in order; keep frames by :func:`keep_frame` (or ``keep(n, r, t)``),
    convert to RGB and resize each kept frame once to ``size``²."""
    av = require("av")
    check_not_lfs_pointer(path)
    if path.stat().st_size == 0:
        raise DatasetFormatError(f"{path}: empty file (0 bytes)")
    frames, src, times = [], [], []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DatasetFormatError(f"{path}: no video stream")
            stream = container.streams.video[0]
            r = _int_rate(stream)
            w = h = 0
            n = -1
            last_t = 0.0
            for n, frame in enumerate(container.decode(stream)):
                t = float(frame.time) if frame.time is not None else n / r
                last_t = t
                if max_seconds is not None and t >= max_seconds:
                    break
                if (keep(n, r, t) if keep is not None else keep_frame(n, r, fps)):
                    rgb = frame.to_ndarray(format="rgb24")
                    h, w = rgb.shape[:2]
                    frames.append(resize_square(rgb, size))
                    src.append(n)
                    times.append(t)
            if n < 0:
                raise DatasetFormatError(f"{path}: the video stream has no decodable frame")
            w = w or stream.codec_context.width
            h = h or stream.codec_context.height
            seconds = float(stream.duration * stream.time_base) if stream.duration else last_t + 1.0 / r
    except DatasetFormatError:
        raise
    except Exception as exc:  # av.error.InvalidDataError etc.
        raise DatasetFormatError(f"{path}: unreadable video ({type(exc).__name__}: {exc})") from None
    if not frames:
        raise DatasetFormatError(f"{path}: no frame kept (the video is shorter than one frame period)")
    return VideoFrames(np.stack(frames), np.asarray(src, np.int32), np.asarray(times, np.float32), int(w), int(h),
                       r, seconds)


def decode_audio_stream(path: Path, rate: int | None) -> tuple[np.ndarray, float]:
    """First audio stream of a media file as float planar samples keeping the channels, resampled by
    libswresample to ``rate`` (None: the native rate), as (float32 [C, n], seconds); and with ``rate``
    None the native rate is ``x.shape[1] / seconds``: use :func:`decode_audio_native` for it."""
    x, _, seconds = _decode_audio(path, rate)
    return x, seconds


def decode_audio_native(path: Path) -> tuple[np.ndarray, int]:
    """(float32 [C, n] at the native rate, the native rate)."""
    x, sr, _ = _decode_audio(path, None)
    return x, sr


def _decode_audio(path: Path, rate: int | None) -> tuple[np.ndarray, int, float]:
    av = require("av")
    check_not_lfs_pointer(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise DatasetFormatError(f"{path}: no audio stream")
            stream = container.streams.audio[0]
            sr = int(rate or stream.rate or stream.codec_context.sample_rate)
            resampler = av.AudioResampler(format="fltp", rate=sr)
            chunks = []
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
    except DatasetFormatError:
        raise
    except Exception as exc:
        raise DatasetFormatError(f"{path}: unreadable audio stream ({type(exc).__name__}: {exc})") from None
    if not chunks:
        raise DatasetFormatError(f"{path}: the audio stream has no samples")
    x = np.concatenate(chunks, axis=1).astype(np.float32)
    return x, sr, x.shape[1] / sr


# ============================================================================ converter: the store
@dataclass
class ClipJob:
    """One clip to decode: its key (stable id), label (for loss reports) and the files it reads."""

    key: str
    label: int
    files: dict[str, Path]
    extra: dict[str, Any]


@dataclass
class ClipResult:
    audio: np.ndarray         # float16 [F, T]
    video: VideoFrames
    info: dict[str, Any]


def fingerprint(params: dict[str, Any], jobs: Sequence[ClipJob], root: Path, strict: bool = False) -> str:
    """SHA-256 of the store version, the parameters and every input's (relative path, size, mtime)
    (``strict``: contents instead of mtime)."""
    h = hashlib.sha256()
    h.update(json.dumps({"store": STORE_VERSION, **params}, sort_keys=True, default=str).encode())
    files = sorted({p for j in jobs for p in j.files.values()})
    for p in files:
        st = p.stat()
        try:
            rel = p.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            rel = p.as_posix()
        h.update(f"{rel}\0{st.st_size}\0".encode())
        if strict:
            h.update(hashlib.sha256(p.read_bytes()).digest())
        else:
            h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()


def _decode_one(args: tuple[Callable[[ClipJob], ClipResult], ClipJob, Path]) -> tuple[str, str | None]:
    decode, job, part = args
    try:
        res = decode(job)
    except DatasetFormatError as exc:
        return job.key, str(exc)
    except Exception as exc:  # noqa: BLE001 - a decoder failure is a bad clip, listed with its reason
        return job.key, f"{next(iter(job.files.values()))}: {type(exc).__name__}: {exc}"
    tmp = part.with_suffix(".tmp.npz")
    with open(tmp, "wb") as f:
        np.savez(f, audio=res.audio, frames=res.video.frames, src=res.video.src_index, times=res.video.times,
                 info=np.frombuffer(json.dumps(res.info).encode(), dtype=np.uint8))
    os.replace(tmp, part)
    return job.key, None


class JpegWriter:
    """``writer[lo:hi] = uint8 [n, S, S, 3]`` appends JPEG bytes (Pillow, 4:4:4 chroma) in frame order."""

    def __init__(self, path: Path, n: int, quality: int) -> None:
        self.f = open(path, "wb")  # noqa: SIM115 - closed by flush()
        self.offsets = np.zeros(n + 1, np.int64)
        self.quality, self.pos = quality, 0

    def __setitem__(self, rows: slice, frames: np.ndarray) -> None:
        import io

        Image = require("PIL.Image")
        for k, fr in zip(range(rows.start, rows.stop), frames):
            if k != self.pos:
                raise ValueError("JPEG frames must be written in order")
            buf = io.BytesIO()
            Image.fromarray(fr).save(buf, format="JPEG", quality=self.quality, subsampling=0)
            self.f.write(buf.getbuffer())
            self.offsets[k + 1] = self.offsets[k] + buf.getbuffer().nbytes
            self.pos += 1

    def flush(self) -> None:
        self.f.close()


def decode_jpeg(data: np.ndarray) -> np.ndarray:
    import io

    Image = require("PIL.Image")
    return np.asarray(Image.open(io.BytesIO(data.tobytes())).convert("RGB"), dtype=np.uint8)


def build_store(out: Path, jobs: Sequence[ClipJob], decode: Callable[[ClipJob], ClipResult], *,
                params: dict[str, Any], dataset: str, raw_root: Path, class_names: Sequence[str],
                workers: int = 0, skip_bad: bool = False, force: bool = False, strict_hash: bool = False,
                extra_meta: dict[str, Any] | None = None, log: Callable[[str], None] = print,
                decode_counter: list[int] | None = None, frame_codec: str = "raw",
                jpeg_quality: int = 95) -> dict[str, Any]:
    """Decode every job once into ``out`` (see the module docstring). Returns meta.json's content.

    Resumable: decoded clips are kept as parts in ``<out>.parts-<fingerprint>/`` until the store is
    complete, so a re-run with the same inputs decodes only what is left. A complete store with the
    same fingerprint is reused (``force`` rebuilds). Clips that cannot be decoded are all listed; without
    ``skip_bad`` the conversion stops with :class:`DatasetFormatError` and nothing under ``out``; with it
    they are excluded, written to ``bad.txt`` and counted per class in meta.json."""
    out = Path(out).expanduser()
    if frame_codec not in ("raw", "jpeg"):
        raise ConfigError(f"{dataset} converter: --frame-codec must be raw or jpeg, got {frame_codec!r}")
    params = {**params, "frame_codec": frame_codec, **({"jpeg_quality": jpeg_quality} if frame_codec == "jpeg" else {})}
    fp = fingerprint(params, jobs, raw_root, strict_hash)
    if (out / "_COMPLETE").is_file() and not force:
        meta = json.loads((out / "meta.json").read_text())
        if meta.get("store_version") != STORE_VERSION:
            raise CacheFormatError(f"{out}: store version {meta.get('store_version')!r}, this mmbalance writes "
                                   f"{STORE_VERSION!r}; rebuild with --force")
        if meta.get("fingerprint") == fp:
            log(f"{dataset}: {out} is complete and up to date (fingerprint {fp[:12]}); nothing to decode")
            return meta
        if not force:
            raise CacheFormatError(f"{out} holds a complete store built from other inputs or parameters "
                                   f"(fingerprint {meta.get('fingerprint', '?')[:12]} vs {fp[:12]}); pass --force "
                                   "to rebuild it or choose another --out")
    if out.exists() and any(out.iterdir()) and not (out / "_COMPLETE").is_file() and not force:
        if not (out / "meta.json").is_file() and not (out / "index.json").is_file():
            raise ConfigError(f"{dataset} converter: output folder {out} exists, is not empty and is not a store")
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = out.parent / f".{out.name}.parts-{fp[:16]}"
    parts.mkdir(exist_ok=True)
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise DatasetFormatError(f"{dataset} converter: duplicate clip keys")
    part_of = {j.key: parts / f"{k:07d}.npz" for k, j in enumerate(jobs)}
    todo = [j for j in jobs if not part_of[j.key].is_file()]
    if len(todo) < len(jobs):
        log(f"{dataset}: resuming: {len(jobs) - len(todo)} of {len(jobs)} clips already decoded")
    bad: dict[str, str] = {}
    args = [(decode, j, part_of[j.key]) for j in todo]
    if decode_counter is not None:
        decode_counter[0] += len(todo)
    if workers and workers > 1 and len(todo) > 1:
        # Fresh interpreters, not forks: a process that has already decoded (FFmpeg's frame-threading and
        # swscale pools are live in it) forks children that deadlock in their first decode or rescale (seen
        # with av 18.1.1). Spawned workers start clean; they only cost one import each.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_decode_one, args, chunksize=max(1, len(args) // (4 * workers))))
    else:
        results = [_decode_one(a) for a in args]
    for key, err in results:
        if err is not None:
            bad[key] = err
    if bad and not skip_bad:
        shown = "; ".join(f"{k}: {bad[k]}" for k in sorted(bad)[:20])
        more = f"; … ({len(bad)} in all)" if len(bad) > 20 else ""
        raise DatasetFormatError(f"{dataset} converter: {len(bad)} clip(s) could not be decoded: {shown}{more}. "
                                 "Fix or remove them, or pass --skip-bad to exclude and list them")
    good = [j for j in jobs if j.key not in bad]
    if not good:
        raise DatasetFormatError(f"{dataset} converter: no clip could be decoded")
    # ------------------------------------------------------------------ assemble (temp folder, then rename)
    need = sum(part_of[j.key].stat().st_size for j in good)  # parts are uncompressed: ≈ the store's size
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise InsufficientDiskError(f"{dataset} converter: the store needs about {need / 1e9:.2f} GB under "
                                    f"{out.parent}, {free / 1e9:.2f} GB are free; free space or choose another --out "
                                    f"(the decoded parts in {parts} are kept, so a re-run resumes)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        loaded = []
        total_frames = 0
        audio_shape = None
        frame_shape = None
        for j in good:
            with np.load(part_of[j.key]) as z:
                a_shape, f_shape, n_f = z["audio"].shape, z["frames"].shape[1:], len(z["frames"])
            if audio_shape is None:
                audio_shape, frame_shape = a_shape, f_shape
            if a_shape != audio_shape or f_shape != frame_shape:
                raise DatasetFormatError(f"{dataset} converter: clip {j.key} decoded to audio {a_shape}, frames "
                                         f"{f_shape}; other clips have {audio_shape}, {frame_shape}")
            loaded.append(n_f)
            total_frames += n_f
        n = len(good)
        audio = np.lib.format.open_memmap(tmp / "audio.npy", "w+", np.float16, (n, *audio_shape))
        if frame_codec == "raw":
            frames = np.lib.format.open_memmap(tmp / "frames.npy", "w+", np.uint8, (total_frames, *frame_shape))
        else:  # JPEG bytes of every frame, concatenated, with byte offsets (decoded per item by the loader)
            frames = JpegWriter(tmp / "frames.bin", total_frames, jpeg_quality)
        offsets = np.zeros(n + 1, np.int64)
        offsets[1:] = np.cumsum(loaded)
        src = np.zeros(total_frames, np.int32)
        times = np.zeros(total_frames, np.float32)
        index = []
        for k, j in enumerate(good):
            with np.load(part_of[j.key]) as z:
                audio[k] = z["audio"]
                lo, hi = offsets[k], offsets[k + 1]
                frames[lo:hi] = z["frames"]
                src[lo:hi], times[lo:hi] = z["src"], z["times"]
                info = json.loads(bytes(z["info"]).decode())
            index.append({"key": j.key, "label": j.label, **j.extra, **info, "n_frames": int(hi - lo)})
        audio.flush()
        frames.flush()
        if frame_codec == "jpeg":
            np.save(tmp / "frame_byte_offsets.npy", frames.offsets)
        del audio, frames
        np.save(tmp / "frame_offsets.npy", offsets)
        np.save(tmp / "frame_src_index.npy", src)
        np.save(tmp / "frame_times.npy", times)
        lost = class_losses([j.label for j in jobs], [j.label for j in good], class_names)
        (tmp / "bad.txt").write_text("".join(f"{k}\t{bad[k]}\n" for k in sorted(bad)))
        meta = {"dataset": dataset, "store_version": STORE_VERSION, "fingerprint": fp, "params": params,
                "libraries": library_versions(), "n_clips": n, "n_frames": int(total_frames),
                "audio_shape": list(audio_shape), "frame_shape": list(frame_shape), "class_names": list(class_names),
                "bad": dict(sorted(bad.items())), "class_losses": lost,
                "native_sizes": sorted({f"{e['native_w']}x{e['native_h']}" for e in index}),
                "native_fps": sorted({int(e["native_fps"]) for e in index}),
                # audio and video durations differ by more than 1 s (reported, never dropped)
                "suspicious": sorted(e["key"] for e in index if abs(float(e.get("audio_seconds", 0))
                                                                    - float(e.get("video_seconds", 0))) > 1.0),
                **(extra_meta or {})}
        (tmp / "index.json").write_text(json.dumps(index))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        (tmp / "_COMPLETE").write_text(fp + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(parts, ignore_errors=True)
    for k in sorted(bad):
        log(f"{dataset}: excluded {k}: {bad[k]}")
    for name, d in lost.items():
        log(f"{dataset}: class {name!r} lost {d['lost']} of {d['expected']} clip(s)")
    log(f"{dataset}: wrote {n} clips, {total_frames} frames to {out}")
    return meta


def class_losses(expected: Sequence[int], kept: Sequence[int], names: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per class that lost clips: expected and lost counts."""
    e = np.bincount(np.asarray(expected, int), minlength=len(names))
    k = np.bincount(np.asarray(kept, int), minlength=len(names))
    return {names[c]: {"expected": int(e[c]), "lost": int(e[c] - k[c])} for c in range(len(names)) if e[c] > k[c]}


def converter_main(run: Callable[[], dict[str, Any]]) -> int:
    """Run a converter: an :class:`MMBalanceError` is ``error: …`` on stderr and exit code 2."""
    from mmbalance.errors import MMBalanceError

    try:
        run()
    except MMBalanceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


# ============================================================================ loader: the store
class AVStore:
    """A complete store opened read-only (arrays memory-mapped). Every check names the file at fault and
    how to build the store (``convert_cmd``). Frames are read with :meth:`get_frames` (raw uint8 rows of
    ``frames.npy``, or JPEG bytes of ``frames.bin`` decoded per item with ``--frame-codec jpeg``)."""

    COMMON = ("audio.npy", "frame_offsets.npy", "frame_src_index.npy", "frame_times.npy")
    CODEC_FILES = {"raw": ("frames.npy",), "jpeg": ("frames.bin", "frame_byte_offsets.npy")}

    def __init__(self, root: Path, dataset: str, convert_cmd: str) -> None:
        self.root, self.dataset = Path(root), dataset
        self.howto = howto = f"build it with: {convert_cmd}"
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"{dataset}: store folder {self.root} does not exist; {howto}")
        if not (self.root / "_COMPLETE").is_file():
            present = (self.root / "meta.json").is_file() or any(self.root.glob(".*.parts-*"))
            what = "an incomplete store (no _COMPLETE: the conversion did not finish)" if present else \
                "no store (no _COMPLETE, meta.json, index.json)"
            raise DatasetNotFoundError(f"{dataset}: {self.root / '_COMPLETE'} is missing: {self.root} holds {what}; "
                                       f"{howto}")
        for name in ("meta.json", "index.json"):
            if not (self.root / name).is_file():
                raise DatasetFormatError(f"{dataset}: {self.root / name} is missing from the store; {howto}")
        try:
            self.meta = json.loads((self.root / "meta.json").read_text())
            self.index = json.loads((self.root / "index.json").read_text())
        except ValueError as exc:
            raise DatasetFormatError(f"{dataset}: {self.root}/meta.json or index.json is not valid JSON ({exc}); "
                                     f"{howto}") from None
        if self.meta.get("dataset") != dataset:
            raise DatasetFormatError(f"{dataset}: {self.root / 'meta.json'} says dataset "
                                     f"{self.meta.get('dataset')!r}, expected {dataset!r}; {howto}")
        if self.meta.get("store_version") != STORE_VERSION:
            raise CacheFormatError(f"{dataset}: {self.root / 'meta.json'} has store version "
                                   f"{self.meta.get('store_version')!r}, expected {STORE_VERSION!r}; rebuild with "
                                   f"--force: {convert_cmd}")
        self.codec = str(self.meta.get("params", {}).get("frame_codec", "raw"))
        if self.codec not in self.CODEC_FILES:
            raise DatasetFormatError(f"{dataset}: {self.root / 'meta.json'} names frame codec {self.codec!r}, "
                                     f"expected raw or jpeg; {howto}")
        for name in self.COMMON + self.CODEC_FILES[self.codec]:
            if not (self.root / name).is_file():
                raise DatasetFormatError(f"{dataset}: {self.root / name} is missing from the store; {howto}")
        self._open_arrays()
        n, n_frames = len(self.index), len(self.src_index)
        shape = tuple(self.meta.get("frame_shape", ()))
        checks = [(len(self.audio) == n, "audio.npy", f"{len(self.audio)} rows for {n} clips in index.json"),
                  (len(self.offsets) == n + 1, "frame_offsets.npy", f"{len(self.offsets)} entries, expected {n + 1}"),
                  (n_frames == int(self.offsets[-1]) if n else True, "frame_src_index.npy",
                   f"{n_frames} frames, frame_offsets.npy ends at {int(self.offsets[-1]) if n else 0}"),
                  (len(shape) == 3 and shape[2] == 3 and shape[0] == shape[1], "meta.json",
                   f"frame_shape {list(shape)}, expected [S, S, 3]"),
                  (bool(np.all(np.diff(self.offsets) >= 1)), "frame_offsets.npy", "a clip has no frame")]
        if self.codec == "raw":
            checks.append((tuple(self.frames.shape) == (n_frames, *shape), "frames.npy",
                           f"shape {tuple(self.frames.shape)}, expected {(n_frames, *shape)}"))
        else:
            checks.append((len(self.byte_offsets) == n_frames + 1 and int(self.byte_offsets[-1]) == len(self.jpeg),
                           "frame_byte_offsets.npy", f"{len(self.byte_offsets)} entries for {n_frames} frames, or "
                           "the last offset is not the size of frames.bin"))
        for ok, name, what in checks:
            if not ok:
                raise DatasetFormatError(f"{dataset}: {self.root / name} is malformed ({what}); {howto}")

    _ARRAYS = {"audio": ("audio.npy", np.float16, 3), "offsets": ("frame_offsets.npy", np.int64, 1),
               "src_index": ("frame_src_index.npy", np.int32, 1), "times": ("frame_times.npy", np.float32, 1)}

    def _open_arrays(self) -> None:
        for attr, (name, dtype, ndim) in self._ARRAYS.items():
            setattr(self, attr, self._load(name, dtype, ndim))
        if self.codec == "raw":
            self.frames = self._load("frames.npy", np.uint8, 4)
        else:
            self.jpeg = np.memmap(self.root / "frames.bin", dtype=np.uint8, mode="r") \
                if (self.root / "frames.bin").stat().st_size else np.zeros(0, np.uint8)
            self.byte_offsets = self._load("frame_byte_offsets.npy", np.int64, 1)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the arrays (a memory map would be pickled as a full in-memory copy, e.g. when
        DataLoader workers are spawned): they are memory-mapped again on the other side."""
        drop = set(self._ARRAYS) | {"frames", "jpeg", "byte_offsets"}
        return {k: v for k, v in self.__dict__.items() if k not in drop}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open_arrays()

    def _load(self, name: str, dtype: Any, ndim: int) -> np.ndarray:
        path = self.root / name
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as exc:
            raise DatasetFormatError(f"{self.dataset}: {path} is not a readable .npy array ({exc})") from None
        if arr.dtype != dtype or arr.ndim != ndim:
            raise DatasetFormatError(f"{self.dataset}: {path} has dtype {arr.dtype} and {arr.ndim} axes, expected "
                                     f"{np.dtype(dtype)} with {ndim}")
        return arr

    def get_frames(self, rows: Sequence[int] | np.ndarray | slice) -> np.ndarray:
        """uint8 [len(rows), S, S, 3] of the given global frame rows."""
        if self.codec == "raw":
            return np.asarray(self.frames[rows])
        idx = np.arange(len(self.src_index))[rows] if isinstance(rows, slice) else np.asarray(rows, np.int64)
        out = np.empty((len(idx), *self.meta["frame_shape"]), np.uint8)
        for k, r in enumerate(idx.tolist()):
            out[k] = decode_jpeg(self.jpeg[int(self.byte_offsets[r]):int(self.byte_offsets[r + 1])])
        return out

    def __len__(self) -> int:
        return len(self.index)

    @property
    def frame_size(self) -> int:
        return int(self.meta["frame_shape"][0])

    def clip_frames(self, pos: int, fps: int | None = None) -> np.ndarray:
        """Global frame rows of clip ``pos``; ``fps`` below the cached rate keeps the frames the index rule
        keeps at that rate (the lower-rate frames are a subset of the cached ones)."""
        lo, hi = int(self.offsets[pos]), int(self.offsets[pos + 1])
        rows = np.arange(lo, hi)
        cached = int(self.meta["params"].get("cache_fps", fps or 1))
        if fps is None or fps >= cached:
            return rows
        r = int(self.index[pos]["native_fps"])
        keep = [row for row in rows if keep_frame(int(self.src_index[row]), r, fps)]
        return np.asarray(keep or rows[:1], np.int64)


def resolve_store(path: str | None, data_dir: str | Path | None, name: str, convert_cmd: str) -> Path:
    if path:
        return Path(path).expanduser()
    if not data_dir:
        raise DatasetNotFoundError(f"{name}: no data location given; pass --data-dir <dir> (holding {name}/), set "
                                   f"$MMBALANCE_DATA, or --set dataset.path=<store>; build the store with: "
                                   f"{convert_cmd}")
    base = Path(data_dir).expanduser()
    return base / name if (base / name).is_dir() else base


# ============================================================================ loader: sampling, augmentation
def pick_frames(n: int, t: int, mode: str, train: bool, rng: np.random.Generator | None) -> list[int]:
    """Positions of T frames among a clip's n frames.

    ``segment`` (mmbalance default): n ≥ T: training floor((i + u_i)·n/T), u_i ~ U[0, 1); evaluation
    floor((i + 0.5)·n/T); n < T: floor(i·n/T) (repetition) in both. ``segment_int`` (BalanceBenchmark):
    seg = n // T, training i·seg + randint(seg), evaluation i·seg + seg // 2. ``fixed``: the evaluation
    rule of ``segment`` in training too. ``ogm_fixed``: i·(n // T) (OGM-GE's 1-based ``seg·i + 1`` files)."""
    if n < t:
        return [int(math.floor(i * n / t)) for i in range(t)]
    if mode == "ogm_fixed":
        return [i * (n // t) for i in range(t)]
    if mode == "segment_int":
        seg = n // t
        if train and rng is not None:
            return [i * seg + int(rng.integers(seg)) for i in range(t)]
        return [i * seg + seg // 2 for i in range(t)]
    if train and mode == "segment" and rng is not None:
        u = rng.random(t)
        return [min(n - 1, int(math.floor((i + u[i]) * n / t))) for i in range(t)]
    return [int(math.floor((i + 0.5) * n / t)) for i in range(t)]


def random_resized_crop(h: int, w: int, rng: np.random.Generator, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params (top, left, height, width): 10 attempts at area
    U(scale)·h·w and log-uniform aspect ratio, then the centre crop fallback."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_r))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


_NORM_SCALE = 1.0 / (torch.tensor(IMAGENET_STD).view(3, 1, 1, 1) * 255.0)
_NORM_SHIFT = -torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1) / torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)


def frame_tensor(frames: np.ndarray, train: bool, rng: np.random.Generator | None, aspect: float,
                 per_frame: bool = True) -> torch.Tensor:
    """uint8 [T, S, S, 3] → normalised float32 [3, T, S, S]. Training: per frame (or one draw per clip)
    RandomResizedCrop with the ratio range × ``aspect`` (native h / w, so crops are distributed as on the
    native frame), bilinear resize back to S² (antialiased, as Pillow), horizontal flip with p 0.5; the crop
    is cut from the uint8 frame before the conversion to float. Then ImageNet mean/std."""
    u8 = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # [T, 3, S, S] uint8 view
    if train and rng is not None:
        s = u8.shape[-1]
        out = []
        draw = None
        for k in range(len(u8)):
            if draw is None or per_frame:
                draw = (random_resized_crop(s, s, rng, ratio=(3 / 4 * aspect, 4 / 3 * aspect)), rng.random() < 0.5)
            (top, left, ch, cw), flip = draw
            crop = u8[k:k + 1, :, top:top + ch, left:left + cw].float()
            if (ch, cw) != (s, s):
                crop = F.interpolate(crop, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            out.append(crop.flip(-1) if flip else crop)
        x = torch.cat(out)
    else:
        x = u8.float()
    x = x.permute(1, 0, 2, 3)  # [3, T, S, S]
    return (x * _NORM_SCALE + _NORM_SHIFT).contiguous()


class AVClipDataset(Dataset):
    """A split of a store: item ``i`` is clip ``positions[i]`` → {audio [1, F, T] float32, visual
    [3, T, S, S] float32, label, idx}. Per-item randomness from ``default_rng([run seed, epoch, i])``
    (``set_epoch``, as BraTS): the same for any worker count or rank."""

    def __init__(self, store: AVStore, positions: Sequence[int], labels: Sequence[int], *, frames: int,
                 frame_fps: int | None, sampling: str, train: bool, aug_per_frame: bool = True) -> None:
        self.store = store
        self.positions = np.asarray(positions, np.int64)
        self.labels = np.asarray(labels, np.int64)
        self.t, self.fps, self.sampling, self.train = frames, frame_fps, sampling, train
        self.aug_per_frame = aug_per_frame
        self._rows = [store.clip_frames(int(p), frame_fps) for p in self.positions]
        self._aspect = [float(store.index[int(p)]["native_h"]) / max(1.0, float(store.index[int(p)]["native_w"]))
                        for p in self.positions]
        self._state = torch.zeros(2, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._state[0] = int(epoch)
        self._state[1] = torch.initial_seed() % (2 ** 62)

    def __len__(self) -> int:
        return len(self.positions)

    def frame_rows(self, i: int, rng: np.random.Generator | None) -> np.ndarray:
        rows = self._rows[i]
        return rows[pick_frames(len(rows), self.t, self.sampling, self.train, rng)]

    def stratify_keys(self) -> np.ndarray:
        return self.labels

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = None
        if self.train:
            epoch, seed = (int(v) for v in self._state.tolist())
            rng = np.random.default_rng([seed, epoch, int(i)])
        pos = int(self.positions[i])
        audio = torch.from_numpy(np.asarray(self.store.audio[pos], dtype=np.float32)).unsqueeze(0)
        rows = self.frame_rows(i, rng)
        visual = frame_tensor(self.store.get_frames(rows), self.train, rng, self._aspect[i], self.aug_per_frame)
        return {"audio": audio, "visual": visual, "label": int(self.labels[i]), "idx": int(i)}

    #: groups the held-out carve keeps together (CREMA-D: actors); None = stratified by label
    carve_keys: np.ndarray | None = None

    def carve_heldout(self, fraction: float, seed: int) -> tuple[list[int], list[int]]:
        """Held-out part of this TRAIN split for G-Blending/MSLR (item positions, seeded ``seed + 12345``):
        whole groups (``carve_keys``, e.g. CREMA-D actors: round(fraction · groups), at least one) when
        set, else stratified by label (:func:`mmbalance.data.splits.carve_heldout`)."""
        from mmbalance.data.splits import carve_heldout

        if self.carve_keys is None or len(np.unique(self.carve_keys)) < 2:  # one group cannot be split by group
            rest, held = carve_heldout(self.labels, fraction, seed)
            return rest.tolist(), held.tolist()
        groups = np.unique(self.carve_keys)
        perm = np.random.RandomState(seed + 12345).permutation(len(groups))
        k = min(len(groups) - 1, max(1, int(round(fraction * len(groups)))))  # ≥ 1 group held out, ≥ 1 kept
        held_groups = set(groups[perm[:k]].tolist())
        held = [i for i, g in enumerate(self.carve_keys.tolist()) if g in held_groups]
        held_set = set(held)
        return [i for i in range(len(self)) if i not in held_set], held
