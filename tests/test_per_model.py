"""methods/_per_model.PerModel: what AGM and OGM-GE read from the model once instead of every step."""
from __future__ import annotations

from mmbalance.methods._per_model import PerModel
from torch import nn


def test_built_once_per_model_object_and_again_for_another():
    calls = []

    def build(model: nn.Module) -> list[nn.Parameter]:
        calls.append(model)
        return list(model.parameters())

    a, b = nn.Linear(2, 3), nn.Linear(2, 3)
    params = PerModel(build)
    first = params(a)
    assert params(a) is first and calls == [a]  # no rebuild for the same model
    assert [p is q for p, q in zip(params(b), b.parameters(), strict=True)] == [True, True]  # a new model: rebuilt
    assert calls == [a, b]
    assert params(a) is not first and calls == [a, b, a]  # back to the first: rebuilt, not a stale list
