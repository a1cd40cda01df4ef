from __future__ import annotations

import pytest

from mmbalance.errors import RegistryError
from mmbalance.interface import BalancingMethod
from mmbalance.registry import (
    Registry,
    create_dataset,
    create_method,
    create_model,
    list_datasets,
    list_methods,
    list_models,
    register_method,
)


def test_builtins_are_listed():
    assert {"baseline", "unimodal"} <= set(list_methods())
    assert {"mfeat", "mfeat-hard", "mfeat-all", "mfeat-pix-mor", "synthetic"} <= set(list_datasets())
    assert {"mlp_concat", "seq_transformer", "conv_seg"} <= set(list_models())


def test_unknown_names_list_the_known_ones():
    with pytest.raises(RegistryError, match="unknown method 'nope'.*baseline"):
        create_method("nope")
    with pytest.raises(RegistryError, match="unknown dataset 'nope'.*mfeat"):
        create_dataset("nope")
    with pytest.raises(RegistryError, match="unknown model 'nope'.*mlp_concat"):
        create_model("nope")


def test_duplicate_registration_raises():
    with pytest.raises(RegistryError, match="already registered"):
        register_method("baseline")(BalancingMethod)
    reg = Registry("thing")
    reg.register("a", lambda: 1)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("a", lambda: 2)
    with pytest.raises(RegistryError, match="lower-case"):
        reg.register("Bad", lambda: 2)


def test_unimodal_name_argument():
    m = create_method("unimodal:fac")
    assert m.hp.modality == "fac"
    with pytest.raises(RegistryError, match="takes no"):
        create_method("baseline:fac")
