"""Frozen-backbone feature extraction, cached once to Arrow with Hugging Face ``datasets``
(docs/datasets/food101.md §3).

Pipeline: records (id, image_path, text, label) per split → frozen text model (``transformers``
AutoModel/AutoTokenizer) and frozen image model (``transformers`` ViT or ``timm``) → ``Dataset.map``
under ``torch.inference_mode()`` with an explicit fingerprint → ``save_to_disk`` +
``meta.json`` + ``_COMPLETE`` marker under ``<cache_root>/<name>/<fp>/``.

The fingerprint (§3.4) is the SHA-256 of the canonical JSON of the schema version, both backbones'
identities (Hub commit hash when known, otherwise the SHA-256 of the weight files), the image backend,
feature mode/dtype, ``max_length``, tokenizer and image-processor settings, the caller's layout
description and a checksum of the parsed records, so a changed backbone or option re-extracts and
identical inputs reuse the cache without any backbone call. Hidden sizes are read from the backbones
(``config.hidden_size`` / timm ``num_features``); no size is assumed.

Heavy libraries (``transformers``, ``timm``, ``datasets``) are imported inside functions.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .errors import (
    BackboneNotFoundError,
    CacheFormatError,
    ConfigError,
    DatasetFormatError,
    InsufficientDiskError,
)

SCHEMA_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".h5", ".msgpack")
# Number of frozen-backbone forward calls per kind ("text", "image") in this process (tests prove
# that a cache hit performs none).
BACKBONE_CALLS: Counter[str] = Counter()


@dataclass(frozen=True)
class Record:
    """One parsed sample: ``image_path`` absolute; ``label`` index in the caller's class list."""

    id: str
    image_path: str
    text: str
    label: int


@dataclass
class ExtractionConfig:
    """Options of §3.1 (defaults as specified there)."""

    text_backbone: str = "bert-base-uncased"
    image_backbone: str = "google/vit-base-patch16-224"
    image_backend: Literal["transformers", "timm"] = "transformers"
    timm_model: str | None = None  # architecture name when ``image_backbone`` is a bare checkpoint file
    feature_mode: Literal["sequence", "cls", "mean"] = "sequence"
    feature_dtype: Literal["float16", "float32"] = "float16"
    max_length: int = 50
    image_normalize: Literal["processor", "none"] = "processor"
    allow_download: bool = False
    cache_root: str | None = None
    extract_batch_size: int = 64
    extract_device: str | None = None
    strict_hash: bool = False

    def validate(self) -> None:
        if self.feature_mode not in ("sequence", "cls", "mean"):
            raise ConfigError(f"feature_mode must be sequence, cls or mean, got {self.feature_mode!r}")
        if self.feature_dtype not in ("float16", "float32"):
            raise ConfigError(f"feature_dtype must be float16 or float32, got {self.feature_dtype!r}")
        if self.image_backend not in ("transformers", "timm"):
            raise ConfigError(f"image_backend must be transformers or timm, got {self.image_backend!r}")
        if self.image_normalize not in ("processor", "none"):
            raise ConfigError(f"image_normalize must be processor or none, got {self.image_normalize!r}")
        if self.max_length < 2 or self.extract_batch_size < 1:
            raise ConfigError("max_length must be >= 2 and extract_batch_size >= 1")


def default_cache_root(cfg: ExtractionConfig) -> Path:
    root = cfg.cache_root or os.environ.get("MMBALANCE_CACHE") or "~/.cache/mmbalance"
    return Path(root).expanduser()


# ---------------------------------------------------------------------------- backbone resolution
_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASH_MEMO[key] = h.hexdigest()
    return _HASH_MEMO[key]


def weights_sha256(path: Path) -> str:
    """SHA-256 over the weight files of a directory (or of one checkpoint file), names included."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise BackboneNotFoundError(f"backbone directory {path} contains no weight file "
                                    f"({', '.join(WEIGHT_SUFFIXES)})")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + _file_sha256(f).encode())
    return h.hexdigest()


def _hf_cache_dirs() -> list[str]:
    try:
        from huggingface_hub import constants

        return [constants.HF_HUB_CACHE]
    except Exception:  # pragma: no cover - huggingface_hub always ships with transformers
        return [os.path.expanduser("~/.cache/huggingface/hub")]


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1


def resolve_backbone(spec: str, role: str, allow_download: bool) -> tuple[str, dict[str, Any]]:
    """Return (what to pass to ``from_pretrained``, identity dict) or raise BackboneNotFoundError.

    A local directory/file is identified by the SHA-256 of its weight files; a Hub id found in the
    local Hugging Face cache by its snapshot commit hash (§3.4)."""
    p = Path(spec).expanduser()
    if p.exists():
        return str(p), {"source": "local", "weights_sha256": weights_sha256(p)}
    remedies = (f"Remedies: set the {role} option to a local directory holding the model (config.json, weights, "
                f"and the tokenizer or image-processor files), or set allow_download=true to fetch {spec!r} "
                "from the Hugging Face Hub.")
    if _looks_like_path(spec):
        raise BackboneNotFoundError(f"{role} {spec!r}: no such file or directory ({p}). {remedies}")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(spec, local_files_only=True)
        return path, {"source": "hub", "id": spec, "commit": Path(path).name}
    except Exception:
        if allow_download:
            return spec, {"source": "hub", "id": spec, "commit": None}
        raise BackboneNotFoundError(
            f"{role} {spec!r} is not available offline: it is not a local path and is not in the Hugging Face "
            f"cache (searched: {', '.join(_hf_cache_dirs())}). {remedies}") from None


@contextlib.contextmanager
def offline_env(enabled: bool) -> Iterator[None]:
    """Set HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 during extraction (§3.2), then restore."""
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    if enabled:
        for k in keys:
            os.environ[k] = "1"
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------- backbones
@dataclass
class TextBackbone:
    tokenizer: Any
    model: Any | None  # None until needed (a cache hit never loads weights)
    target: str
    identity: dict[str, Any]
    settings: dict[str, Any]
    local_only: bool

    def load(self) -> Any:
        if self.model is None:
            from transformers import AutoModel

            try:
                self.model = AutoModel.from_pretrained(self.target, local_files_only=self.local_only)
            except OSError as exc:
                raise BackboneNotFoundError(f"text backbone {self.target!r} could not be loaded: {exc}") from None
            self.model.eval().requires_grad_(False)
        return self.model

    @property
    def hidden_size(self) -> int:
        return int(self.load().config.hidden_size)

    def encode(self, texts: list[str], max_length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """→ last_hidden_state [B, L, D_t] (float32) and the attention mask [B, L] (bool)."""
        enc = self.tokenizer(texts, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        BACKBONE_CALLS["text"] += 1
        out = self.load()(**enc).last_hidden_state.float()
        return out, enc["attention_mask"].bool()


# The last loaded backbone of each role, reused while its identity is unchanged (one slot each).
_MEMO: dict[str, tuple[str, Any]] = {}


def _memo_key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def load_text_backbone(cfg: ExtractionConfig) -> TextBackbone:
    from transformers import AutoTokenizer

    target, ident = resolve_backbone(cfg.text_backbone, "text_backbone", cfg.allow_download)
    local = not cfg.allow_download
    key = _memo_key(target, ident, local)
    if key == _MEMO.get("text", ("", None))[0]:
        return _MEMO["text"][1]
    try:
        tok = AutoTokenizer.from_pretrained(target, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise BackboneNotFoundError(f"text_backbone {cfg.text_backbone!r}: no usable tokenizer at {target} ({exc})") from None
    settings = {"class": type(tok).__name__, "padding": "max_length", "truncation": True,
                "do_lower_case": getattr(tok, "do_lower_case", None), "vocab_size": getattr(tok, "vocab_size", None)}
    _MEMO["text"] = (key, TextBackbone(tok, None, target, ident, settings, local))
    return _MEMO["text"][1]


def _pil_resize_crop(img: Any, height: int, width: int, crop_pct: float | None) -> Any:
    """Resize (shorter side to size/crop_pct, then centre crop) or plain resize to (H, W), bilinear."""
    from PIL import Image

    if crop_pct is None or crop_pct >= 1.0:
        return img.resize((width, height), Image.BILINEAR)
    scale = max(height, width) / crop_pct
    w, h = img.size
    r = scale / min(w, h)
    img = img.resize((max(width, round(w * r)), max(height, round(h * r))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - width) // 2, (h - height) // 2
    return img.crop((left, top, left + width, top + height))


@dataclass
class ImageBackbone:
    transform: Callable[[list[Any]], torch.Tensor]  # list of RGB PIL images → pixel tensor [B, 3, H, W]
    model_factory: Callable[[], Any]
    target: str
    identity: dict[str, Any]
    settings: dict[str, Any]
    backend: str
    model: Any | None = None

    def load(self) -> Any:
        if self.model is None:
            self.model = self.model_factory()
            self.model.eval().requires_grad_(False)
        return self.model

    @property
    def hidden_size(self) -> int:
        m = self.load()
        return int(m.num_features if self.backend == "timm" else m.config.hidden_size)

    def encode(self, images: list[Any], device: torch.device) -> torch.Tensor:
        """→ token sequence [B, T, D_i] (float32), prefix tokens first."""
        x = self.transform(images).to(device)
        BACKBONE_CALLS["image"] += 1
        m = self.load()
        if self.backend == "timm":
            return m.forward_features(x).float()
        return m(pixel_values=x).last_hidden_state.float()

    def num_prefix_tokens(self, seq_len: int) -> int:
        m = self.load()
        if self.backend == "timm":
            return int(getattr(m, "num_prefix_tokens", 1))
        patches = getattr(getattr(getattr(m, "embeddings", None), "patch_embeddings", None), "num_patches", None)
        return seq_len - int(patches) if patches is not None else 1


def _normalised(pixels: np.ndarray, mean: Any, std: Any, normalize: bool) -> torch.Tensor:
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    if normalize:
        x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return x


def load_image_backbone(cfg: ExtractionConfig) -> ImageBackbone:
    normalize = cfg.image_normalize == "processor"
    if cfg.image_backend == "timm":
        return _load_timm(cfg, normalize)
    from transformers import AutoImageProcessor, AutoModel

    target, ident = resolve_backbone(cfg.image_backbone, "image_backbone", cfg.allow_download)
    local = not cfg.allow_download
    key = _memo_key(target, ident, local, normalize)
    if key == _MEMO.get("image", ("", None))[0]:
        return _MEMO["image"][1]
    try:
        proc = AutoImageProcessor.from_pretrained(target, local_files_only=local, backend="pil")
    except (OSError, ValueError) as exc:
        raise BackboneNotFoundError(f"image_backbone {cfg.image_backbone!r}: no image processor config at {target} "
                                    f"({exc}); save one with ImageProcessor.save_pretrained") from None
    size = dict(proc.size) if getattr(proc, "size", None) is not None else {}
    size = {k: v for k, v in size.items() if v is not None}

    def transform(images: list[Any]) -> torch.Tensor:
        out = proc(images=images, return_tensors="pt", do_normalize=normalize)
        return out["pixel_values"]

    def factory() -> Any:
        try:
            return AutoModel.from_pretrained(target, local_files_only=local, add_pooling_layer=False)
        except TypeError:
            return AutoModel.from_pretrained(target, local_files_only=local)
        except OSError as exc:
            raise BackboneNotFoundError(f"image_backbone {target!r} could not be loaded: {exc}") from None

    settings = {"class": type(proc).__name__, "size": size, "mean": list(map(float, proc.image_mean or [])),
                "std": list(map(float, proc.image_std or [])), "normalize": normalize,
                "resample": int(getattr(proc, "resample", 0) or 0)}
    _MEMO["image"] = (key, ImageBackbone(transform, factory, target, ident, settings, "transformers"))
    return _MEMO["image"][1]


def _load_timm(cfg: ExtractionConfig, normalize: bool) -> ImageBackbone:
    """timm backend: ``image_backbone`` is a timm ``local-dir`` folder (config.json + weights), a
    checkpoint file together with ``timm_model``, or ``random:<timm model name>`` (random weights:
    tests only, never a default)."""
    try:
        import timm
    except Exception as exc:  # timm imports torchvision, which may be broken (README constraints)
        raise ConfigError(f"image_backend='timm' needs the optional timm extra, which failed to import ({exc}); "
                          "use image_backend='transformers'") from None
    spec = cfg.image_backbone
    if spec.startswith("random:"):
        name = spec.split(":", 1)[1]
        target, ident = name, {"source": "random", "name": name, "seed": 0}

        def factory() -> Any:
            torch.manual_seed(0)
            return timm.create_model(name, pretrained=False, num_classes=0)
    else:
        target, ident = resolve_backbone(spec, "image_backbone", cfg.allow_download)
        p = Path(target)
        if p.is_dir():
            def factory() -> Any:
                return timm.create_model(f"local-dir:{p}", pretrained=True, num_classes=0)
        elif p.is_file():
            if not cfg.timm_model:
                raise ConfigError(f"image_backbone {spec!r} is a checkpoint file: set timm_model to its architecture")
            arch = cfg.timm_model
            ident = {**ident, "arch": arch}

            def factory() -> Any:
                return timm.create_model(arch, pretrained=True, num_classes=0,
                                         pretrained_cfg_overlay={"file": str(p)})
        else:
            def factory() -> Any:
                return timm.create_model(f"hf-hub:{spec}", pretrained=True, num_classes=0)
    probe = factory()
    dc = timm.data.resolve_data_config({}, model=probe)
    _, height, width = dc["input_size"]
    crop_pct, mean, std = dc.get("crop_pct"), list(dc["mean"]), list(dc["std"])

    def transform(images: list[Any]) -> torch.Tensor:
        arr = np.stack([np.asarray(_pil_resize_crop(im, height, width, crop_pct), dtype=np.uint8) for im in images])
        return _normalised(arr, mean, std, normalize)

    settings = {"size": [height, width], "crop_pct": crop_pct, "mean": mean, "std": std, "normalize": normalize}
    bb = ImageBackbone(transform, lambda: probe, target, ident, settings, "timm")
    return bb


# ---------------------------------------------------------------------------- fingerprint
def records_checksum(records: dict[str, list[Record]], root: Path | None, strict_hash: bool) -> str:
    """SHA-256 over (split, id, label, text, image path, size and mtime — or image bytes)."""
    h = hashlib.sha256()
    for split in sorted(records):
        h.update(f"[{split}]".encode())
        for r in records[split]:
            p = Path(r.image_path)
            shown = str(p.relative_to(root)) if root is not None and p.is_relative_to(root) else str(p)
            if strict_hash:
                stamp = _file_sha256(p)
            else:
                st = p.stat()
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            h.update(json.dumps([r.id, r.label, r.text, shown, stamp]).encode())
    return h.hexdigest()


def fingerprint(payload: dict[str, Any]) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------- cache
@dataclass
class FeatureCache:
    """A complete cache directory: ``splits[name]`` = memory-mapped torch-format Dataset."""

    directory: Path
    meta: dict[str, Any]
    splits: dict[str, Any] = field(default_factory=dict)
    extracted: bool = False  # True when this call ran the backbones


def _arrow_features(mode: str, dtype: str, L: int, D_t: int, T: int, D_i: int, class_names: list[str]):
    from datasets import Array2D, ClassLabel, Features, Sequence, Value

    base = {"id": Value("string"), "idx": Value("int64"), "label": ClassLabel(names=class_names)}
    if mode == "sequence":
        return Features({**base, "text_feat": Array2D(shape=(L, D_t), dtype=dtype),
                         "text_mask": Sequence(Value("bool"), length=L),
                         "image_feat": Array2D(shape=(T, D_i), dtype=dtype)})
    return Features({**base, "text_feat": Sequence(Value(dtype), length=D_t),
                     "image_feat": Sequence(Value(dtype), length=D_i)})


def _pool(mode: str, text: torch.Tensor, mask: torch.Tensor, image: torch.Tensor, prefix: int):
    if mode == "sequence":
        return text, image
    if mode == "cls":
        return text[:, 0], image[:, 0]
    m = mask.unsqueeze(-1).float()  # mean: text over non-padding tokens, image over patch tokens only
    return (text * m).sum(1) / m.sum(1).clamp_min(1.0), image[:, prefix:].mean(1)


def load_cache(directory: Path, split_names: list[str]) -> FeatureCache:
    """Open a complete cache directory or raise CacheFormatError naming the directory and problem."""
    from datasets import load_from_disk

    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise CacheFormatError(f"feature cache {directory}: meta.json is missing or unreadable ({exc}); "
                               "delete the directory to re-extract") from None
    found = meta.get("schema_version")
    if found != SCHEMA_VERSION:
        raise CacheFormatError(f"feature cache {directory}: schema version {found!r}, this mmbalance reads "
                               f"version {SCHEMA_VERSION}; delete the directory to re-extract")
    cache = FeatureCache(directory, meta)
    for s in split_names:
        try:
            ds = load_from_disk(str(directory / s))
        except Exception as exc:
            raise CacheFormatError(f"feature cache {directory}: split {s!r} cannot be loaded ({exc}); "
                                   "delete the directory to re-extract") from None
        want = meta["counts"].get(s)
        if len(ds) != want or not {"text_feat", "image_feat", "label"} <= set(ds.column_names):
            raise CacheFormatError(f"feature cache {directory}: split {s!r} has {len(ds)} rows and columns "
                                   f"{ds.column_names}; meta.json promises {want} rows with text_feat/image_feat/label")
        cache.splits[s] = ds.with_format("torch")
    return cache


def extract_or_load(records: dict[str, list[Record]], cfg: ExtractionConfig, *, name: str, class_names: list[str],
                    layout: dict[str, Any], root: Path | None = None,
                    log: Callable[[str], None] = logging.getLogger("mmbalance.features").info) -> FeatureCache:
    """Return the cached features of ``records`` (one Arrow dataset per split), extracting first if
    needed. Nothing is written when an error occurs before the final rename; the main process
    extracts while other ranks wait (``main_process_first``)."""
    cfg.validate()
    with offline_env(not cfg.allow_download):
        text_bb = load_text_backbone(cfg)
        image_bb = load_image_backbone(cfg)
        payload = {
            "schema_version": SCHEMA_VERSION, "name": name,
            "text_backbone": text_bb.identity, "image_backbone": image_bb.identity,
            "image_backend": cfg.image_backend, "feature_mode": cfg.feature_mode, "feature_dtype": cfg.feature_dtype,
            "max_length": cfg.max_length, "tokenizer": text_bb.settings, "image_processor": image_bb.settings,
            "layout": layout, "records": records_checksum(records, root, cfg.strict_hash),
        }
        fp = fingerprint(payload)
        directory = default_cache_root(cfg) / name / fp
        with _main_process_first():
            if (directory / "_COMPLETE").is_file():
                cache = load_cache(directory, list(records))
                log(f"{name}: features loaded from cache {directory}")
                return cache
            if directory.exists():  # no marker: an interrupted extraction, redo it
                log(f"{name}: {directory} has no _COMPLETE marker (interrupted extraction); re-extracting")
                shutil.rmtree(directory)
            _extract(records, cfg, text_bb, image_bb, payload, directory, class_names, log)
        cache = load_cache(directory, list(records))
        cache.extracted = True
        return cache


@contextlib.contextmanager
def _main_process_first() -> Iterator[None]:
    try:
        from accelerate import PartialState

        state = PartialState()
        if state.num_processes > 1:
            with state.main_process_first():
                yield
            return
    except Exception:
        pass
    yield


def _device(cfg: ExtractionConfig) -> torch.device:
    if cfg.extract_device:
        return torch.device(cfg.extract_device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _extract(records: dict[str, list[Record]], cfg: ExtractionConfig, text_bb: TextBackbone, image_bb: ImageBackbone,
             payload: dict[str, Any], directory: Path, class_names: list[str], log: Callable[[str], None]) -> None:
    from PIL import Image

    from datasets import Dataset, Features, Value
    from datasets import __version__ as ds_version

    device = _device(cfg)
    text_bb.load().to(device)
    image_bb.load().to(device)
    with torch.inference_mode():  # probe the output shapes with one blank sample
        probe_t, _ = text_bb.encode([""], cfg.max_length, device)
        probe_i = image_bb.encode([Image.new("RGB", (8, 8))], device)
    L, D_t = probe_t.shape[1:]
    T, D_i = probe_i.shape[1:]
    prefix = image_bb.num_prefix_tokens(T)
    itemsize = 2 if cfg.feature_dtype == "float16" else 4
    per_sample = ((L * D_t + T * D_i) * itemsize + L) if cfg.feature_mode == "sequence" else (D_t + D_i) * itemsize
    n_total = sum(len(v) for v in records.values())
    need = 2 * per_sample * n_total + (64 << 20)  # map output + save_to_disk copy
    parent = directory.parent
    probe_dir = next((p for p in [parent, *parent.parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(probe_dir).free
    if need > free:
        raise InsufficientDiskError(f"{payload['name']}: feature extraction needs about {need / 2**30:.2f} GiB under "
                                    f"{parent} ({per_sample} B x {n_total} samples, x2 while writing) but only "
                                    f"{free / 2**30:.2f} GiB are free; set cache_root elsewhere or use feature_mode=cls")
    dtype = cfg.feature_dtype
    np_dtype = np.float16 if dtype == "float16" else np.float32
    features = _arrow_features(cfg.feature_mode, dtype, L, D_t, T, D_i, class_names)
    src_features = Features({"id": Value("string"), "image_path": Value("string"), "text": Value("string"),
                             "label": features["label"], "idx": Value("int64")})

    def extract(batch: dict[str, list]) -> dict[str, Any]:
        images = []
        for p in batch["image_path"]:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        text, mask = text_bb.encode(list(batch["text"]), cfg.max_length, device)
        image = image_bb.encode(images, device)
        t, i = _pool(cfg.feature_mode, text, mask, image, prefix)
        out = {"text_feat": t.cpu().numpy().astype(np_dtype), "image_feat": i.cpu().numpy().astype(np_dtype)}
        if cfg.feature_mode == "sequence":
            out["text_mask"] = mask.cpu().numpy()
        return out

    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    counts = {}
    start = time.time()
    try:
        with torch.inference_mode():
            for split, recs in records.items():
                src = Dataset.from_dict({"id": [r.id for r in recs], "image_path": [r.image_path for r in recs],
                                         "text": [r.text for r in recs], "label": [r.label for r in recs],
                                         "idx": list(range(len(recs)))}, features=src_features)
                out = src.map(extract, batched=True, batch_size=cfg.extract_batch_size, features=features,
                              remove_columns=["image_path", "text"], new_fingerprint=f"{payload['name']}-{split}-"
                              + fingerprint(payload)[:32], cache_file_name=str(tmp / f".work-{split}.arrow"),
                              desc=f"{payload['name']} {split}: extracting features")
                out.save_to_disk(str(tmp / split))
                counts[split] = len(out)
                del out
                for f in tmp.glob(f".work-{split}*"):
                    f.unlink()
        import transformers

        meta = {"schema_version": SCHEMA_VERSION, "fingerprint": directory.name, "fingerprint_inputs": payload,
                "text_dim": int(D_t), "image_dim": int(D_i), "text_len": int(L), "image_tokens": int(T),
                "image_prefix_tokens": int(prefix), "counts": counts, "feature_mode": cfg.feature_mode,
                "feature_dtype": dtype, "seconds": round(time.time() - start, 2),
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "datasets": ds_version}, "config": asdict(cfg)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        (tmp / "_COMPLETE").write_text("")
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"{payload['name']}: extracted {counts} in {time.time() - start:.1f}s into {directory}")


def check_images(records: dict[str, list[Record]], name: str) -> None:
    """All image files must exist: one DatasetFormatError with the count and the first five paths."""
    for split, recs in records.items():
        missing = [r.image_path for r in recs if not os.path.isfile(r.image_path)]
        if missing:
            raise DatasetFormatError(f"{name}: {len(missing)} image file(s) of the {split} split are missing, "
                                     f"e.g. {', '.join(missing[:5])}")
