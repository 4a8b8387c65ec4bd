"""The plugin's registration in-process (no server): CLI choice, quantization registry, overrides,
and the CPU compatibility layer's stand-ins."""

import json

import pytest

from conftest import msmodelslim_fixture

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
