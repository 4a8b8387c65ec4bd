"""The scheme registry: a scheme is one class with a decorator; resolvers, messages and the CLI follow.

A toy scheme registered in this file (the decorator only, nothing else edited) is resolved from a
description, built, listed by `sgl-ascend schemes` and named in the registry-built error for an unknown
type string. It is removed again after each test.
"""

import dataclasses

import pytest
import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.moe import W8A8DynamicExperts, moe_method_for_modelslim
from sgl_ascend.layers.kv_cache import StaticInt8KVCache
from sgl_ascend.layers.registry import (check_served, create, kv_cache_scheme, linear_scheme, register_scheme, served_names,
                                        served_table, unregister_scheme)
from sgl_ascend.layers.schemes import LinearScheme, UnquantizedLinear, W8A8DynamicLinear
from sgl_ascend.quant.modelslim import ModelSlimConfig, parse_description
from sgl_ascend.quant.scheme_key import EXPERTS, KV_CACHE, LINEAR, MSMODELSLIM, SchemeKey
from sgl_ascend.tools.cli import main

SOURCE = "/ckpt/quant_model_description.json"
P = "model.layers.0.mlp.down_proj"


@pytest.fixture
def toy():
    @register_scheme(LINEAR, MSMODELSLIM, "W8A8_TOY")
    class ToyLinear(LinearScheme):
        def __init__(self, group_size: int = 0):
            self.group_size = group_size

        @classmethod
        def from_key(cls, key, **context):
            return cls(key.param("group_size", 0))

        def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                           output_size, params_dtype, **extra):
            layer.weight = torch.nn.Parameter(torch.empty(sum(output_partition_sizes), input_size_per_partition,
                                                          dtype=params_dtype), requires_grad=False)

        def process_weights_after_loading(self, layer):
            pass

        def apply_weights(self, layer, x, bias=None):
            return torch.nn.functional.linear(x, layer.weight, bias)

        def theoretical_bytes(self, input_size_per_partition, output_size_per_partition):
            return 2 * input_size_per_partition * output_size_per_partition

    yield ToyLinear
    unregister_scheme(LINEAR, MSMODELSLIM, "W8A8_TOY")


def _config(kind: str, **top) -> ModelSlimConfig:
    return ModelSlimConfig(parse_description({"version": "1.0.0", **top, f"{P}.weight": kind,
                                              f"{P}.weight_scale": kind}), SOURCE)


def test_a_registered_toy_scheme_is_resolved_built_and_listed(toy, capsys):
    config = check_served(_config("W8A8_TOY", group_size=64))
    assert config.linear_key(P) == SchemeKey.make(LINEAR, MSMODELSLIM, "W8A8_TOY", group_size=64, legacy=False)
    scheme = linear_scheme(config, P)
    assert isinstance(scheme, toy) and scheme.group_size == 64
    assert "W8A8_TOY" in served_names(LINEAR, MSMODELSLIM)
    assert (MSMODELSLIM, LINEAR, "W8A8_TOY", "ToyLinear") in served_table()
    assert main(["schemes"]) == 0
    assert any(line.split() == [MSMODELSLIM, LINEAR, "W8A8_TOY", "ToyLinear"]
               for line in capsys.readouterr().out.splitlines())
    # the registry-built message of an unknown type string lists the toy too
    with pytest.raises(CheckpointError, match="unknown scheme 'W9A9'.*W8A8_TOY") as info:
        check_served(_config("W9A9"))
    assert info.value.file == SOURCE and info.value.tensor == f"{P}.weight"


def test_after_unregistering_the_toy_is_unknown():
    assert "W8A8_TOY" not in served_names(LINEAR, MSMODELSLIM)
    with pytest.raises(CheckpointError, match="unknown scheme 'W8A8_TOY'"):
        check_served(_config("W8A8_TOY"))
    with pytest.raises(CheckpointError, match=f"layer {P} is W8A8_TOY.*not serve for linear layers") as info:
        linear_scheme(_config("W8A8_TOY"), P)
    assert info.value.file == SOURCE and info.value.tensor == f"{P}.weight"


def test_built_in_schemes_come_from_the_registry():
    assert isinstance(linear_scheme(check_served(_config("W8A8_DYNAMIC")), P), W8A8DynamicLinear)
    assert served_names(EXPERTS, MSMODELSLIM) == ["FLOAT", "W4A4_DYNAMIC", "W4A8_DYNAMIC", "W8A8_DYNAMIC"]
    expert = create(SchemeKey(EXPERTS, MSMODELSLIM, "W8A8_DYNAMIC"), role="w13", params_dtype=torch.float16)
    assert isinstance(expert, W8A8DynamicExperts)


def test_float_sparse_w16a16s_is_served_as_float():
    # msModelSlim's float_sparse writes the float weight with zeros for a sparse kernel: dense, it is FLOAT
    config = ModelSlimConfig(parse_description({"version": "1.0.0", "model_quant_type": "W16A16S",
                                                f"{P}.weight": "W16A16S"}), SOURCE)
    assert config.linear_key(P).name == "FLOAT"
    assert isinstance(linear_scheme(check_served(config), P), UnquantizedLinear)


def test_a_scheme_served_for_linears_only_is_refused_for_experts():
    prefix = "model.layers.0.mlp"
    types = {f"{prefix}.experts.0.{p}.weight": "W8A16" for p in ("gate_proj", "up_proj", "down_proj")}
    config = ModelSlimConfig(parse_description({"version": "1.0.0", **types}), SOURCE)
    with pytest.raises(CheckpointError, match="is W8A16 .*, which sgl-ascend does not serve for fused-MoE "
                                              "experts; served msModelSlim schemes for fused-MoE experts: FLOAT, ") as info:
        check_served(config)
    assert info.value.tensor == f"{prefix}.experts.0.gate_proj.weight"
    with pytest.raises(CheckpointError, match="does not serve for fused-MoE experts"):
        moe_method_for_modelslim(config, prefix)


def test_a_c8_kv_cache_resolves_to_the_int8_kv_scheme():
    config = check_served(_config("W8A8_DYNAMIC", kv_cache_type="C8", kv_quant_type="C8",
                                  **{"model.layers.0.self_attn.k_proj.kv_cache_scale": "C8",
                                     "model.layers.0.self_attn.v_proj.kv_cache_offset": "C8"}))
    assert config.kv_cache_key() == SchemeKey.make(KV_CACHE, MSMODELSLIM, "C8")
    assert isinstance(kv_cache_scheme(config), StaticInt8KVCache)
    assert (MSMODELSLIM, KV_CACHE, "C8", "StaticInt8KVCache") in served_table()
    assert "kv_quant_type" not in config.types  # a top-level setting, not a tensor


def test_an_unserved_kv_cache_scheme_is_refused_naming_the_entry():
    config = _config("W8A8_DYNAMIC", kv_cache_type="C4")
    with pytest.raises(CheckpointError, match="quantized as C4, a KV-cache scheme sgl-ascend does not serve "
                                              "\\(served msmodelslim KV-cache schemes: C8\\)") as info:
        check_served(config)
    assert info.value.file == SOURCE and info.value.tensor == "kv_cache_type"


def test_keys_are_frozen_data_and_a_name_has_one_class(toy):
    key = SchemeKey.make(LINEAR, MSMODELSLIM, "W8A8_TOY", legacy=True, group_size=0)
    assert key == SchemeKey(LINEAR, MSMODELSLIM, "W8A8_TOY", (("group_size", 0), ("legacy", True)))
    assert hash(key) == hash(SchemeKey.make(LINEAR, MSMODELSLIM, "W8A8_TOY", group_size=0, legacy=True))
    with pytest.raises(dataclasses.FrozenInstanceError):
        key.name = "W8A8"
    with pytest.raises(ValueError, match="served by ToyLinear already"):
        register_scheme(LINEAR, MSMODELSLIM, "W8A8_TOY")(W8A8DynamicLinear)
    with pytest.raises(ValueError, match="kind is one of"):
        register_scheme("attention", MSMODELSLIM, "X")
