"""Dataset containers, seeded splits and the fast in-memory batcher.

The vendored data files (``mfeat.npz``) live in this package folder as package data.
"""
from .batching import TensorBatcher, eval_index_shards, make_loader
from .containers import ModelSpec, MultimodalData, TensorSplit
from .splits import carve_heldout, stratified_split

__all__ = [
    "ModelSpec", "MultimodalData", "TensorSplit", "TensorBatcher", "eval_index_shards", "make_loader",
    "carve_heldout", "stratified_split",
]
