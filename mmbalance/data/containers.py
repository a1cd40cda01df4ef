"""What a dataset loader returns: splits, modality names, task and the default model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from ..errors import DatasetFormatError


@dataclass
class TensorSplit:
    """An in-memory split: one tensor per modality plus labels, indexed directly (no DataLoader)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor

    def __post_init__(self) -> None:
        n = len(self.labels)
        for m, x in self.inputs.items():
            if len(x) != n:
                raise DatasetFormatError(f"modality {m!r} has {len(x)} rows but there are {n} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        # index_select: the cheapest row gather (advanced indexing costs several times more per call)
        out = {m: torch.index_select(x, 0, idx) for m, x in self.inputs.items()}
        out["label"] = torch.index_select(self.labels, 0, idx)
        out["idx"] = idx
        return out

    def subset(self, idx: torch.Tensor) -> TensorSplit:
        return TensorSplit({m: x[idx] for m, x in self.inputs.items()}, self.labels[idx])

    def stratify_keys(self) -> torch.Tensor:
        return self.labels


class PositionSubset(Subset):
    """A part of a map-style split whose items carry their position in the PART as ``idx`` (as
    :meth:`TensorSplit.subset` does), so per-sample buffers indexed by ``idx`` address the part."""

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.dataset[self.indices[i]])
        item["idx"] = i
        return item

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        return [self[i] for i in indices]


@dataclass
class ModelSpec:
    """Name of a registered model builder and its keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    modalities: list[str] | None = None  # None = all of the dataset's modalities


@dataclass
class MultimodalData:
    """A loaded dataset preset.

    ``train``/``val``/``test`` are :class:`TensorSplit` (in-memory features) or any map-style
    ``torch.utils.data.Dataset`` returning dict samples (images/volumes; DataLoader path).
    ``train_defaults`` are the dataset-level training settings (:class:`TrainConfig` keys);
    ``method_defaults`` maps a method name to dataset-specific hyperparameter defaults
    (e.g. CGGM's ρ, λ from the paper's Table 7).
    """

    modalities: list[str]
    task: str
    task_kwargs: dict[str, Any]
    train: TensorSplit | Dataset
    val: TensorSplit | Dataset
    test: TensorSplit | Dataset
    input_shapes: dict[str, tuple[int, ...]]
    out_dim: int
    model: ModelSpec
    train_defaults: dict[str, Any] = field(default_factory=dict)
    method_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    synthetic: bool = False

    def __post_init__(self) -> None:
        for split_name in ("train", "val", "test"):
            if len(getattr(self, split_name)) == 0:
                raise DatasetFormatError(f"dataset {self.name or '?'}: the {split_name} split is empty")

    def check_modalities(self) -> None:
        """The modality names must agree everywhere: ``modalities``, ``input_shapes`` and each split's inputs,
        with the per-sample shapes that ``input_shapes`` declares (in-memory splits entirely, map-style splits
        on their first item, which must also carry ``label`` and ``idx``)."""
        where = f"dataset {self.name or '?'}"
        mods = list(self.modalities)
        if set(self.input_shapes) != set(mods):
            raise DatasetFormatError(f"{where}: modalities {mods} do not match the names of input_shapes "
                                     f"{sorted(self.input_shapes)}; the loader must use the same names in both")
        for split_name in ("train", "val", "test"):
            split = getattr(self, split_name)
            if not isinstance(split, TensorSplit):
                self._check_map_style_item(split_name, split)
                continue
            missing = [m for m in mods if m not in split.inputs]
            if missing:
                raise DatasetFormatError(f"{where}: the {split_name} split has no inputs for modalities {missing} "
                                         f"(it has {sorted(split.inputs)})")
            for m in mods:
                shape = tuple(split.inputs[m].shape[1:])
                if shape != tuple(self.input_shapes[m]):
                    raise DatasetFormatError(f"{where}: modality {m!r} of the {split_name} split has per-sample "
                                             f"shape {shape} but input_shapes[{m!r}] = {tuple(self.input_shapes[m])}")

    def _check_map_style_item(self, split_name: str, split: Dataset) -> None:
        where = f"dataset {self.name or '?'}"
        item = split[0]
        if not isinstance(item, dict):
            raise DatasetFormatError(f"{where}: the {split_name} split returns {type(item).__name__} items; a map-style "
                                     "split must return a dict {modality: tensor, ..., 'label': ..., 'idx': position}")
        absent = [k for k in (*self.modalities, "label", "idx") if k not in item]
        if absent:
            raise DatasetFormatError(f"{where}: items of the {split_name} split lack key(s) {absent} (found "
                                     f"{sorted(item)}; expected the modalities {list(self.modalities)}, 'label', 'idx')")
        for m in self.modalities:
            shape = tuple(torch.as_tensor(item[m]).shape)
            if shape != tuple(self.input_shapes[m]):
                raise DatasetFormatError(f"{where}: modality {m!r} of the {split_name} split has per-sample shape "
                                         f"{shape} but input_shapes[{m!r}] = {tuple(self.input_shapes[m])}")

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, TensorSplit)
