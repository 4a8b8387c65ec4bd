"""msModelSlim descriptions of both writers, and the older (V0) writer's checkpoint end to end at
layer level: `quant_model_weight_w8a8*` files, bf16 scales, and anti-outlier smoothing tensors
(FLOAT `*norm.bias` and q/k/v `bias`)."""

import os

import pytest
import torch

from helpers.common import msmodelslim_fixture
from helpers.linear import (build_layer, calibrated_input, fixture_layer, layer_reference, open_checkpoint,
                            open_plain_checkpoint, rel_err, shard_reference, synthetic_qwen3, tight_error)
from sgl_ascend.layers.registry import check_served, linear_scheme
from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.linear import ParallelLinear, load_linear
from sgl_ascend.quant.modelslim import ModelSlimConfig, parse_description

V0 = "qwen3moe-tiny-w8a8-v0"
QKV = "model.layers.0.self_attn.qkv_proj"


def test_current_writer_description():
    config = ModelSlimConfig.from_dir(msmodelslim_fixture("qwen3-tiny-w8a8"))
    assert config.description.version == "1.0.0" and not config.description.is_legacy
    assert config.description.model_quant_type == "W8A8" and config.description.group_size == 0
    assert config.types["model.layers.1.mlp.down_proj.deq_scale"] == "W8A8"
    assert config.types["lm_head.weight"] == "FLOAT" and "version" not in config.types
    assert config.weight_type(QKV) == "W8A8" and config.weight_type("model.layers.0.mlp.gate_up_proj") == "W8A8"
    assert not config.has_float_bias(QKV) and config.norm_bias_names() == []


def test_older_description_without_version(tmp_path):
    description = parse_description({"model_quant_type": "W8A8_DYNAMIC", "a.weight": "W8A8_DYNAMIC",
                                     "a.weight_scale": "W8A8_DYNAMIC", "norm.weight": "FLOAT"})
    assert description.version == "0" and description.is_legacy
    assert description.tensor_types == {"a.weight": "W8A8_DYNAMIC", "a.weight_scale": "W8A8_DYNAMIC",
                                         "norm.weight": "FLOAT"}
    # and such a checkpoint's layers load and compute like any other
    folder = synthetic_qwen3(str(tmp_path), "W8A8_DYNAMIC", torch.Generator().manual_seed(6), version=None)
    config, _ = open_checkpoint(folder)
    assert config.description.is_legacy
    layer = build_layer(folder, "gate_up_proj")
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    assert tight_error(layer(x), layer_reference(folder, "gate_up_proj", x)) <= 1.1


def test_mla_fa_quant_is_refused_naming_the_key_and_what_to_do():
    description = {"version": "1.0.0", "fa_quant_type": "FAKQuant", "kv_cache_type": "C8",
                   "model.layers.0.self_attn.fa_k.scale": "FAKQuant"}
    with pytest.raises(CheckpointError, match="quantized as FAQuant \\(fa_quant_type=FAKQuant\\).*quantize without "
                                              "the FA-quant step") as info:
        check_served(ModelSlimConfig(parse_description(description)))
    assert info.value.tensor == "fa_quant_type"


def test_kv_cache_tensors_without_kv_cache_type_are_refused():
    description = {"version": "1.0.0", "model.layers.0.self_attn.k_proj.kv_cache_scale": "C8"}
    with pytest.raises(CheckpointError, match="no kv_cache_type") as info:
        check_served(ModelSlimConfig(parse_description(description)))
    assert info.value.tensor == "model.layers.0.self_attn.k_proj.kv_cache_scale"


# -- the V0 fixture --------------------------------------------------------------------------------

def test_v0_lists_anti_outlier_tensors():
    config, checkpoint = open_checkpoint(msmodelslim_fixture(V0))
    assert checkpoint.index_file.endswith("quant_model_weight_w8a8.safetensors.index.json")
    files = {os.path.basename(i.file) for i in checkpoint.infos()}
    assert files == {"quant_model_weight_w8a8-00001-of-00001.safetensors"}
    norms = [f"model.layers.{i}.{n}.bias" for i in (0, 1)
             for n in ("input_layernorm", "post_attention_layernorm", "self_attn.k_norm", "self_attn.q_norm")]
    assert config.norm_bias_names() == sorted(norms + ["model.norm.bias"])
    assert config.has_float_bias(QKV) and not config.has_float_bias("model.layers.0.self_attn.o_proj")
    assert config.weight_type(QKV) == "W8A8"
    assert config.weight_type("model.layers.0.mlp.experts.0.gate_up_proj") == "W8A8_DYNAMIC"


@pytest.mark.parametrize("kind", ["qkv_proj", "o_proj"])
def test_v0_attention_matches_reference_including_bias(kind, gen):
    layer = fixture_layer(V0, kind)  # bf16 input_scale / input_offset are accepted
    # npu_quantize (div_mode=False) takes the reciprocal scale and the offset in the activation dtype
    assert layer.input_scale_reciprocal.dtype == layer.input_offset.dtype == torch.bfloat16
    # the float bias lives in quant_bias (msModelSlim folds it there) and is not kept twice
    assert layer.bias is None
    x = calibrated_input(layer, gen)
    # adds the FLOAT bias to the float math; activations quantized with the bf16 reciprocal, as the NPU
    ref = layer_reference(msmodelslim_fixture(V0), kind, x, npu_reciprocal=True)
    out = layer(x)
    assert tight_error(out, ref) <= 1.1
    if kind == "qkv_proj":
        bias = torch.cat([open_checkpoint(msmodelslim_fixture(V0))[1].get(f"model.layers.0.self_attn.{s}_proj.bias")
                          for s in "qkv"]).double()
        assert bias.abs().max() > 0.1
        assert tight_error(out.double() + bias, ref) > 20  # counting it twice is caught
        assert tight_error(out.double() - bias, ref) > 20  # leaving it out too


def test_v0_bias_is_counted_once_against_the_original_model(gen):
    """Smoothed norm (weight + anti-outlier bias) -> W8A8 q/k projections recovers the bf16 model."""
    _, v0 = open_checkpoint(msmodelslim_fixture(V0))
    original = open_plain_checkpoint(msmodelslim_fixture("qwen3moe-tiny-bf16"))
    hidden = torch.randn(16, 128, generator=gen)
    normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
    norm = "model.layers.0.input_layernorm"
    x_original = normed * original.get(f"{norm}.weight").float()
    x_smoothed = (normed * v0.get(f"{norm}.weight").float() + v0.get(f"{norm}.bias").float()).to(torch.bfloat16)
    out = fixture_layer(V0, "qkv_proj")(x_smoothed)
    for i, name in enumerate("qk"):  # v_proj is smoothed against o_proj as well, so not comparable alone
        ref = x_original.double() @ original.get(f"model.layers.0.self_attn.{name}_proj.weight").double().t()
        got = out[:, [0, 128][i]:[128, 192][i]]
        bias = v0.get(f"model.layers.0.self_attn.{name}_proj.bias").double()
        assert rel_err(got, ref) < 0.1  # measured 0.066: int8 static activations of random input
        assert rel_err(got.double() + bias, ref) > 0.3


def test_v0_expert_linear_with_bf16_scales(gen):
    config, checkpoint = open_checkpoint(msmodelslim_fixture(V0))
    prefix = "model.layers.0.mlp.experts.1.gate_up_proj"
    layer = ParallelLinear(128, [64, 64], linear_scheme(config, prefix), prefix=prefix)
    shards = {0: "model.layers.0.mlp.experts.1.gate_proj", 1: "model.layers.0.mlp.experts.1.up_proj"}
    load_linear(layer, checkpoint, shards)
    assert layer.weight_scale.dtype == torch.float32
    x = torch.randn(5, 128, generator=gen).to(torch.bfloat16)
    ref = torch.cat([shard_reference({s: checkpoint.get(i.name) for s, i in checkpoint.with_prefix(p).items()},
                                     "W8A8_DYNAMIC", x) for p in shards.values()], dim=-1)
    assert tight_error(layer(x), ref) <= 1.1
