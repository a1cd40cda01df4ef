"""Joint late-fusion baseline and unimodal ``<m>-only`` runs (docs/methods/baseline.md)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from mmbalance.data import ModelSpec, MultimodalData
from mmbalance.errors import ConfigError
from mmbalance.interface import BalancingMethod
from mmbalance.registry import register_method


@register_method("baseline", "joint training with the task loss on the fused output (no balancing)")
class Baseline(BalancingMethod):
    """The reference loop: every hook at its default (baseline.md §2). Every balancing method must
    reduce to it when its effect is disabled."""

    name = "baseline"


@dataclass
class UnimodalHParams:
    """``modality``: the only modality the model is built with (baseline.md §1, the "X only" rows)."""

    modality: str = ""


@register_method("unimodal", "one modality only: `--method unimodal:<m>` (or --set modality=<m>)")
class Unimodal(BalancingMethod):
    """``<m>-only``: the canonical model instantiated with modality m alone, trained with the task loss.
    Batches still carry the other modalities; the model has no parameters for them and never reads them."""

    name = "unimodal"
    hparams_cls = UnimodalHParams
    accepts_name_argument = True
    name_argument = "modality"

    def configure_model(self, spec: ModelSpec, data: MultimodalData) -> ModelSpec:
        m = self.hp.modality
        if m not in data.modalities:
            raise ConfigError(f"unimodal: modality {m!r} is not in dataset {data.name!r}; "
                              f"choose one of {', '.join(data.modalities)} (e.g. --method unimodal:{data.modalities[0]})")
        return replace(spec, modalities=[m])
