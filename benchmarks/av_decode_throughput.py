"""Audio-visual input pipeline throughput: the cached store against decoding every item from raw files.

Three ways to produce one CREMA-D training item (audio [1, 257, 188] + one 224² frame, training augmentation):

* ``official``: what OGM-GE's loader does per item, from files it extracted beforehand — read the WAV
  (soundfile), resample to 22,050 Hz (soxr), STFT, open one 1-fps JPEG frame (Pillow), RandomResizedCrop to
  224², flip, normalise;
* ``raw``: decode the item from the original media (PyAV decodes the FLV, soundfile/soxr/STFT the WAV) —
  what the converter does once;
* ``store``: mmbalance's memory-mapped store through the real DataLoader (the dataset class the engine uses,
  training transform, batch 64), at each worker count of ``--workers``.

Without ``--raw``/``--store`` the media are synthetic clips of CREMA-D's shape, made here: 480×360 noise
video at 30 fps (FLV1, 2.5 s) and 16-kHz WAV, JPEG frames at 1 fps (quality 95). Every figure is items per
second with min/median/max over ``--repeats``; ``official`` and the store at 0 workers are also timed as an
interleaved pair (``_paired.py``). The GPU side is not measured here (no GPU on the CI machine): the rate a
ResNet-18 pair needs is derived from published throughput (see ``docs/datasets/cremad.md`` "Speed").

    PYTHONPATH=. python benchmarks/av_decode_throughput.py [--n 64] [--workers 0,1,2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _paired import paired_ratio  # noqa: E402

#: one A100 80GB, mixed precision, ResNet-50 v1.5 training at 224² (NVIDIA DeepLearningExamples,
#: PyTorch ConvNets resnet50v1.5 README, pytorch-21.03 container): 2,470 img/s
A100_RESNET50_AMP_IMG_S = 2470
#: forward FLOPs at 224² (He et al., CVPR 2016, Table 1): ResNet-18 1.8e9, ResNet-50 3.8e9
RESNET18_OVER_50 = 3.8 / 1.8


def required_items_per_s(frames: int = 1, audio_pixels: int = 257 * 188) -> float:
    """Items/s an A100 (AMP) would consume training the ResNet-18 pair, scaling the published ResNet-50 rate by
    the FLOP ratio (an upper bound: small convs are less efficient) and counting an item as T frames plus a
    spectrogram of ``audio_pixels`` (one 224² image = 50,176 pixels; its 1-channel stem is cheaper, ignored)."""
    images_per_item = frames + audio_pixels / (224 * 224)
    return A100_RESNET50_AMP_IMG_S * RESNET18_OVER_50 / images_per_item


def make_media(root: Path, n: int, seconds: float = 2.5, size=(480, 360)) -> list[str]:
    """n CREMA-D-shaped clips: AudioWAV/<id>.wav, VideoFlash/<id>.flv (noise frames), frames/<id>/*.jpg (1 fps)."""
    import av
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(0)
    emotions = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
    ids = [f"{1001 + k % 91}_DFA_{emotions[k % 6]}_XX" if k < 91 * 6 else f"{1001 + k % 91}_ITS_{emotions[k % 6]}_XX"
           for k in range(n)]
    for d in ("AudioWAV", "VideoFlash", "frames"):
        (root / d).mkdir(parents=True, exist_ok=True)
    w, h = size
    for clip in ids:
        sf.write(str(root / "AudioWAV" / f"{clip}.wav"), 0.1 * rng.standard_normal(int(16_000 * seconds)), 16_000,
                 subtype="PCM_16")
        (root / "frames" / clip).mkdir(exist_ok=True)
        with av.open(str(root / "VideoFlash" / f"{clip}.flv"), "w") as out:
            vs = out.add_stream("flv", rate=30)
            vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
            for k in range(int(30 * seconds)):
                img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                if k % 30 == 0:
                    Image.fromarray(img).save(root / "frames" / clip / f"frame_{k // 30:05d}.jpg", quality=95)
                for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(p)
            for p in vs.encode():
                out.mux(p)
    return ids


def official_item(root: Path, clip: str, rng: np.random.Generator):
    """OGM-GE-style per-item loading from pre-extracted files (no decoding of video)."""
    import torch
    from mmbalance.datasets import _avstore as S
    from mmbalance.datasets import cremad as C
    from PIL import Image

    spec, _ = C.clip_audio(root / "AudioWAV" / f"{clip}.wav")
    frames = sorted((root / "frames" / clip).glob("*.jpg"))
    img = Image.open(frames[int(rng.integers(len(frames)))]).convert("RGB")
    top, left, ch, cw = S.random_resized_crop(img.height, img.width, rng)
    img = img.resize((224, 224), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(img, np.float32)).permute(2, 0, 1)
    mean = torch.tensor(S.IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(S.IMAGENET_STD).view(3, 1, 1) * 255
    return torch.from_numpy(spec).unsqueeze(0), (x - mean) / std


def raw_item(root: Path, clip: str):
    from mmbalance.datasets import _avstore as S
    from mmbalance.datasets import cremad as C

    spec, _ = C.clip_audio(root / "AudioWAV" / f"{clip}.wav")
    return spec, S.decode_video_frames(root / "VideoFlash" / f"{clip}.flv", 1, 224)


def time_official(root: Path, ids: list[str]) -> float:
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    for clip in ids:
        official_item(root, clip, rng)
    return time.perf_counter() - t0


def time_raw(root: Path, ids: list[str]) -> float:
    t0 = time.perf_counter()
    for clip in ids:
        raw_item(root, clip)
    return time.perf_counter() - t0


def store_dataset(store: Path):
    from mmbalance.datasets import _avstore as S
    from mmbalance.datasets import cremad as C

    st = S.AVStore(store, "cremad", C.CONVERT_CMD)
    labels = [e["label"] for e in st.index]
    return S.AVClipDataset(st, list(range(len(st))), labels, frames=1, frame_fps=1, sampling="segment", train=True)


def time_store(ds, workers: int, batch: int = 64) -> float:
    import torch

    from mmbalance.data.batching import make_loader

    torch.manual_seed(0)
    ds.set_epoch(0)
    loader = make_loader(ds, batch, shuffle=True, seed=0, num_workers=workers)
    t0 = time.perf_counter()
    n = sum(len(b["label"]) for b in loader)
    dt = time.perf_counter() - t0
    assert n == len(ds)
    return dt


def summary(n: int, seconds: list[float]) -> str:
    rates = sorted(n / s for s in seconds)
    return f"{statistics.median(rates):8.1f} items/s (min {rates[0]:.1f}, max {rates[-1]:.1f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64, help="clips (synthetic media)")
    p.add_argument("--raw", help="a CREMA-D clone (AudioWAV/, VideoFlash/) instead of synthetic media")
    p.add_argument("--store", help="its converted store (needs --raw)")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    workers = [int(w) for w in a.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="av-bench-") as tmp:
        root = Path(a.raw) if a.raw else Path(tmp) / "raw"
        if a.raw:
            ids = sorted(p.stem for p in (root / "AudioWAV").glob("*.wav"))[:a.n]
            if not (root / "frames").is_dir():
                print("no frames/<clip>/*.jpg under --raw: the 'official' path is skipped")
        else:
            t0 = time.perf_counter()
            ids = make_media(root, a.n)
            print(f"made {a.n} synthetic clips in {time.perf_counter() - t0:.1f} s")
        store = Path(a.store) if a.store else Path(tmp) / "store"
        if not a.store:
            from mmbalance.datasets import cremad as C

            t0 = time.perf_counter()
            C.convert(root, store, frame_size=224, log=lambda s: None)
            print(f"converted once in {time.perf_counter() - t0:.1f} s ({a.n / (time.perf_counter() - t0):.1f} clips/s, "
                  "one process)")
        ds = store_dataset(store)
        n = len(ds)
        have_official = (root / "frames").is_dir()
        raw_s = [time_raw(root, ids) for _ in range(a.repeats)]
        rows = [("raw: decode FLV + WAV per item (PyAV, soundfile, soxr, STFT)", summary(len(ids), raw_s))]
        if have_official:
            ratio, off_s, st0_s = paired_ratio(lambda: time_official(root, ids) / len(ids),
                                               lambda: time_store(ds, 0) / n, a.repeats)
            rows.append(("official: WAV + STFT + 1 JPEG + crop per item (OGM-GE style)",
                         summary(1, off_s)))
            rows.append(("store, DataLoader, 0 workers (paired with official)", summary(1, st0_s)))
            speedup = f"store (0 workers) vs official per item: {ratio.median:.2f}x faster " \
                      f"(paired ratio of seconds per item, official/store: {ratio})"
        else:
            speedup = ""
        for w in workers:
            if w == 0 and have_official:
                continue
            rows.append((f"store, DataLoader, {w} worker(s)", summary(n, [time_store(ds, w) for _ in range(a.repeats)])))
        need = {"CREMA-D (T=1)": required_items_per_s(1), "CREMA-D 3 frames": required_items_per_s(3),
                "Kinetics-Sounds (T=3, 1024x128)": required_items_per_s(3, 1024 * 128),
                "AVE (T=4, 257x1004)": required_items_per_s(4, 257 * 1004)}
    cpu = platform.processor() or platform.machine()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nCPU: {cpu}, {os.cpu_count()} cores, load average {load:.1f}; torch threads 1; {n} clips; "
          f"{a.repeats} repeats")
    for name, val in rows:
        print(f"  {name:68s} {val}")
    if speedup:
        print("  " + speedup)
    print("\nItems/s an A100 (mixed precision) consumes training the ResNet-18 pair (published ResNet-50 rate "
          f"{A100_RESNET50_AMP_IMG_S} img/s x FLOP ratio {RESNET18_OVER_50:.2f}):")
    for k, v in need.items():
        print(f"  {k:34s} {v:7.0f} items/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
