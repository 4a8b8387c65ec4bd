"""The plugin's registration in-process (no server): CLI choice, quantization registry, overrides,
and the CPU compatibility layer's stand-ins."""

import json

import pytest

from helpers.common import msmodelslim_fixture

pytestmark = pytest.mark.sglang


@pytest.fixture(scope="module")
def registered():
    from sgl_ascend.sglang_plugin import register

    register()
    from sglang.srt.layers import quantization

    return quantization


def _description(fixture):
    with open(f"{msmodelslim_fixture(fixture)}/quant_model_description.json") as f:
        cfg = json.load(f)
    cfg["quant_method"] = "modelslim"  # what SGLang's ModelConfig adds when it finds the file
    return cfg


def test_registry_and_cli_choice(registered):
    from sglang.srt.arg_groups.choices import QUANTIZATION_CHOICES

    from sgl_ascend.sglang.ct_config import AscendCompressedTensorsConfig
    from sgl_ascend.sglang.modelslim_config import AscendModelSlimConfig, W4A4Int4Config

    assert QUANTIZATION_CHOICES.count("w4a4_int4") == 1
    methods = registered.QUANTIZATION_METHODS
    assert methods["w4a4_int4"] is W4A4Int4Config
    # This CPU host is neither CUDA nor ROCm: our configs serve the checkpoint formats.
    assert methods["modelslim"] is AscendModelSlimConfig
    assert methods["compressed-tensors"] is AscendCompressedTensorsConfig


def test_overrides_pick_our_configs_and_refuse_mismatched_flag(registered):
    from sgl_ascend.sglang.ct_config import AscendCompressedTensorsConfig
    from sgl_ascend.sglang.modelslim_config import AscendModelSlimConfig, W4A4Int4Config

    w8a8, w4a4 = _description("qwen3-tiny-w8a8"), _description("qwen3-tiny-w4a4-dynamic")
    assert AscendModelSlimConfig.override_quantization_method(w8a8, None) == "modelslim"
    assert AscendModelSlimConfig.override_quantization_method(w4a4, "w4a4_int4") is None
    assert W4A4Int4Config.override_quantization_method(w4a4, "w4a4_int4") == "w4a4_int4"
    with pytest.raises(ValueError, match="needs a W4A4_DYNAMIC checkpoint.*model_quant_type='W8A8'"):
        W4A4Int4Config.override_quantization_method(w8a8, "w4a4_int4")
    with pytest.raises(ValueError, match="serves msModelSlim W4A4_DYNAMIC checkpoints"):
        W4A4Int4Config.override_quantization_method({"quant_method": "compressed-tensors"}, "w4a4_int4")
    ct = {"quant_method": "compressed-tensors", "config_groups": {}}
    assert AscendCompressedTensorsConfig.override_quantization_method(ct, None) == "compressed-tensors"
    assert AscendModelSlimConfig.override_quantization_method(ct, None) is None


def test_cpu_compat_stand_ins_raise_when_called(registered):
    from sgl_ascend.sglang import cpu_compat

    assert cpu_compat.is_active()  # this host: no CUDA, no NPU, CUDA-only sgl_kernel wheel
    import sgl_kernel

    assert sgl_kernel.SGL_ASCEND_CPU_COMPAT
    with pytest.raises(cpu_compat.CpuCompatError, match="sgl_kernel.copy_all_layer_kv_cache_cpu was called"):
        sgl_kernel.copy_all_layer_kv_cache_cpu()


def test_cuda_hosts_keep_upstream_configs(registered, monkeypatch):
    import sglang.srt.utils

    from sgl_ascend import sglang_plugin
    from sgl_ascend.sglang.modelslim_config import W4A4Int4Config

    upstream = dict(registered.BASE_QUANTIZATION_METHODS)  # SGLang's own classes, never touched by us
    monkeypatch.setattr(registered, "QUANTIZATION_METHODS", dict(upstream))
    monkeypatch.setattr(registered, "CPU_QUANTIZATION_METHODS", {})
    monkeypatch.setattr(sglang.srt.utils, "is_cuda_alike", lambda: True)
    sglang_plugin._register_quantization_methods()
    assert registered.QUANTIZATION_METHODS["modelslim"] is upstream["modelslim"]
    assert registered.QUANTIZATION_METHODS["compressed-tensors"] is upstream["compressed-tensors"]
    assert registered.QUANTIZATION_METHODS["w4a4_int4"] is W4A4Int4Config


def test_cpu_compat_only_on_cpu_only_hosts(monkeypatch):
    import importlib.util

    import torch

    from sgl_ascend.sglang import cpu_compat

    assert cpu_compat._cpu_only_host()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not cpu_compat._cpu_only_host()
    monkeypatch.undo()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "torch_npu" else real_find_spec(name, *a))
    assert not cpu_compat._cpu_only_host()


def test_deepseek_kv_b_proj_float_weight_and_refusal():
    import torch

    from sgl_ascend.errors import CheckpointError
    from sgl_ascend.layers.schemes import W8A8DynamicLinear, W8A8StaticLinear
    from sgl_ascend.models.deepseek import float_kv_b_proj

    proj = torch.nn.Module()
    proj.scheme = W8A8DynamicLinear()
    q = torch.randint(-127, 128, (6, 4), dtype=torch.int8)
    scale = torch.rand(6, 1) + 0.5
    proj.weight, proj.weight_scale = torch.nn.Parameter(q, requires_grad=False), torch.nn.Parameter(scale)
    proj.weight_offset = torch.nn.Parameter(torch.zeros(6, 1))
    torch.testing.assert_close(float_kv_b_proj(proj).float(), (q.float() * scale).bfloat16().float())
    proj.scheme = W8A8StaticLinear()
    del proj.weight_scale
    with pytest.raises(CheckpointError, match="export kv_b_proj as FLOAT, W8A8_DYNAMIC"):
        float_kv_b_proj(proj)


def test_float_bias_the_model_cannot_hold_is_an_error(registered):
    """Anti-outlier FLOAT projection biases: folded into W8A8 quant_bias (fine); beside any other
    scheme, SGLang's bias-less layer would drop them silently, so loading stops instead."""
    import torch

    from sgl_ascend.errors import CheckpointError
    from sgl_ascend.layers.schemes import W8A8DynamicLinear, W8A8StaticLinear
    from sgl_ascend.sglang.linear_method import AscendLinearMethod
    from sgl_ascend.sglang.modelslim_config import AscendModelSlimConfig

    v0 = AscendModelSlimConfig(_description("qwen3moe-tiny-w8a8-v0"))
    assert v0.has_float_bias("model.layers.0.self_attn.qkv_proj")
    assert not v0.has_float_bias("model.layers.0.self_attn.o_proj")

    def processed(scheme):
        layer = torch.nn.Module()
        layer.prefix, layer.checkpoint_float_bias, layer.bias = "model.layers.0.self_attn.qkv_proj", True, None
        method = AscendLinearMethod(scheme)
        method.create_weights(layer, 64, [64], 64, 64, torch.bfloat16, weight_loader=None)
        for param in layer.parameters():
            param.data.zero_()
        method.process_weights_after_loading(layer)

    processed(W8A8StaticLinear())
    with pytest.raises(CheckpointError, match="qkv_proj.bias.*FLOAT bias for this W8A8DynamicLinear"):
        processed(W8A8DynamicLinear())


@pytest.mark.parametrize("fixture, page_size, expected", [
    ("qwen3-tiny-w8a8-dynamic-c8", None, 128),  # int8 KV: a block size the NPU attention op reads
    ("qwen3-tiny-w8a8-dynamic-c8", 48, 128),    # not 32-aligned
    ("qwen3-tiny-w8a8-dynamic-c8", 64, 64),     # the user's choice, 32-aligned: kept
    ("qwen3-tiny-w8a8-dynamic", None, 1),       # bf16 KV: SGLang's CPU default, untouched
])
def test_int8_kv_checkpoints_get_a_32_aligned_page_size(registered, fixture, page_size, expected):
    from sglang.srt.arg_groups.overrides import resolved_view
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(model_path=msmodelslim_fixture(fixture), device="cpu", attention_backend="torch_native",
                      page_size=page_size)
    args.resolve_once()
    assert resolved_view(args).page_size == expected
