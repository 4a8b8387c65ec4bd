"""Expert schemes register themselves with the decorator on their class, like linears: a toy expert
scheme in this file (nothing else edited) is resolved from a description, built by `from_key` with
role and params_dtype, and listed; the built-in ones come from their own files."""

import inspect

import pytest
import torch

from sgl_ascend.layers import registry
from sgl_ascend.layers.moe import (ExpertScheme, UnquantizedExperts, W4A4DynamicExperts, W4A8DynamicExperts,
                                   W8A8DynamicExperts, moe_method_for_modelslim)
from sgl_ascend.layers.registry import register_scheme, served_names, served_table, unregister_scheme
from sgl_ascend.quant.modelslim import ModelSlimConfig, parse_description
from sgl_ascend.quant.scheme_key import COMPRESSED_TENSORS, EXPERTS, MSMODELSLIM, SchemeKey

SOURCE = "/ckpt/quant_model_description.json"
MOE = "model.layers.0.mlp"


@pytest.fixture
def toy():
    @register_scheme(EXPERTS, MSMODELSLIM, "W8A8_TOY")
    class ToyExperts(ExpertScheme):
        @classmethod
        def from_key(cls, key, *, role, params_dtype=torch.bfloat16, **context):
            scheme = super().from_key(key, role=role, params_dtype=params_dtype, **context)
            scheme.group_size = key.param("group_size", 0)
            return scheme

        def checkpoint_tensors(self, n, k, tp_size):
            return {}

        def create_weights(self, layer, num_experts, n, k, tp_size, **attrs):
            pass

        def process_weights_after_loading(self, layer):
            pass

        def apply(self, layer, x, token_scale, group_list, group_list_type, output_dtype):
            return x

        def theoretical_bytes(self, num_experts, n, k):
            return 0

    yield ToyExperts
    unregister_scheme(EXPERTS, MSMODELSLIM, "W8A8_TOY")


def _config(kind: str) -> ModelSlimConfig:
    entries = {f"{MOE}.experts.0.{proj}.weight": kind for proj in ("gate_proj", "up_proj", "down_proj")}
    return ModelSlimConfig(parse_description({"version": "1.0.0", "group_size": 64, **entries}), SOURCE)


def test_a_toy_expert_scheme_is_built_from_its_key_with_role_and_dtype(toy):
    method = moe_method_for_modelslim(_config("W8A8_TOY"), MOE, params_dtype=torch.float16)
    for scheme, role in ((method.w13, "w13"), (method.w2, "w2")):
        assert isinstance(scheme, toy)
        assert (scheme.role, scheme.params_dtype, scheme.group_size) == (role, torch.float16, 64)
    assert "W8A8_TOY" in served_names(EXPERTS, MSMODELSLIM)
    assert ("msmodelslim", EXPERTS, "W8A8_TOY", "ToyExperts") in served_table()


def test_built_in_expert_schemes_register_in_their_own_files():
    expected = {(MSMODELSLIM, "FLOAT"): UnquantizedExperts, (COMPRESSED_TENSORS, "FLOAT"): UnquantizedExperts,
                (MSMODELSLIM, "W8A8_DYNAMIC"): W8A8DynamicExperts, (MSMODELSLIM, "W4A4_DYNAMIC"): W4A4DynamicExperts,
                (MSMODELSLIM, "W4A8_DYNAMIC"): W4A8DynamicExperts, (COMPRESSED_TENSORS, "W4A8"): W4A8DynamicExperts}
    for (fmt, name), cls in expected.items():
        assert registry.scheme_class(SchemeKey(EXPERTS, fmt, name)) is cls
    assert "register_scheme" not in inspect.getsource(__import__("sgl_ascend.layers.moe.config", fromlist=["x"]))
    assert "factory" not in inspect.signature(register_scheme).parameters


def test_from_key_reads_params_dtype_and_the_format():
    w8 = registry.create(SchemeKey(EXPERTS, MSMODELSLIM, "W8A8_DYNAMIC"), role="w2", params_dtype=torch.float16)
    assert w8.scale_dtype == torch.float32 and w8.role == "w2"
    legacy = registry.create(SchemeKey.make(EXPERTS, MSMODELSLIM, "W4A8_DYNAMIC", group_size=0, legacy=True),
                             role="w13")
    assert legacy.fmt == "modelslim_legacy"
    ct = registry.create(SchemeKey.make(EXPERTS, COMPRESSED_TENSORS, "W4A8", packed=True, strategy="group",
                                        group_size=32), role="w13", module="m")
    assert (ct.fmt, ct.group_size) == ("compressed_tensors", 32)


def test_only_w4a8_dynamic_reads_the_description_group_size():
    readers = {(f, k, name) for f, k, name, _ in served_table()
               if registry.scheme_class(SchemeKey(k, f, name)).reads_group_size}
    assert readers == {(MSMODELSLIM, "linear", "W4A8_DYNAMIC"), (MSMODELSLIM, EXPERTS, "W4A8_DYNAMIC"),
                       (COMPRESSED_TENSORS, EXPERTS, "W4A8")}
