"""compressed-tensors checkpoints, written by the library itself, served through the op surface.

Reference for every layer: the library's own dequantization (`ModelCompressor.decompress_model`)
applied to the original input; static activations go through the library's `fake_quantize` with the
checkpoint's input scale. Dynamic per-token activations have no stored convention: the NPU's
(absmax / 127, round half-even) is emulated for the tight check.

Layers run in bf16 / fp16 (the NPU kernels have no fp32 activations). Two references:
- the kernel's (`kernel=True`), tight (TIGHT units of one bf16 rounding, helpers.linear.tight_error):
  the library's math with the precision the NPU kernels are given, i.e. weight scales rounded to the
  activation dtype (npu_weight_quant_batchmatmul takes them so: WNA16, W4A8), static activations
  quantized as x * r + z with r = 1 / input_scale in the activation dtype (npu_quantize, div_mode=False),
  FP8 weights dequantized in the activation dtype (what the weight-only FP8 layer computes);
- the library's own (`kernel=False`), norm-relative TOL_LIBRARY: what those roundings cost.
W4A8 layers run weight-only on the NPU (schemes/ct_w4a8.py): their reference has no activation
quantization.
"""

import json
import logging
import os

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from safetensors.torch import load_file

from helpers.ct import (FORMATS, QWEN3_BF16, SCHEMES, Qwen3LayerLinears, quantize_with_library, write_checkpoint,
                        write_qwen3_ct_checkpoint)
from helpers.common import rel_err
from helpers.linear import round_half_away, tight_error
from sgl_ascend.layers.registry import check_served, linear_scheme
from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.linear import ParallelLinear, QKVSizes, load_linear
from sgl_ascend.ops.int4 import pack_int4_to_int32, unpack_int32_to_int4
from sgl_ascend.quant import compressed_tensors as ct
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 128, 256, 4, 2, 32
P = "model.layers.0"
LAYERS = {  # fused layer -> (parallel, shards, input size, output sizes)
    "self_attn.qkv_proj": ("column", {s: f"{P}.self_attn.{s}_proj" for s in "qkv"}, HIDDEN, None),
    "self_attn.o_proj": ("row", {None: f"{P}.self_attn.o_proj"}, HEADS * HEAD_DIM, [HIDDEN]),
    "mlp.gate_up_proj": ("column", {0: f"{P}.mlp.gate_proj", 1: f"{P}.mlp.up_proj"}, HIDDEN, [INTER, INTER]),
    "mlp.down_proj": ("row", {None: f"{P}.mlp.down_proj"}, INTER, [HIDDEN]),
}
EXPECTED_KIND = {"w8a8_static": ct.W8A8_STATIC, "w8a8_static_asym": ct.W8A8_STATIC,
                 "w8a8_dynamic": ct.W8A8_DYNAMIC, "w8a8_dynamic_tensor": ct.W8A8_DYNAMIC, "w4a16_group": ct.WNA16, "w4a16_group_asym": ct.WNA16,
                 "w8a16_channel": ct.WNA16, "w8a16_channel_unpacked": ct.WNA16, "w4a8": ct.W4A8, "w4a8_channel": ct.W4A8, "fp8_dynamic": ct.FP8_W8A16,
                 "fp8_static": ct.FP8_W8A16}
TOKENS = 8


def _inputs(dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(1)
    return {HIDDEN: torch.randn(TOKENS, HIDDEN, generator=gen).to(dtype),
            INTER: torch.randn(TOKENS, INTER, generator=gen).to(dtype)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """scheme -> (checkpoint dir, library-dequantized weights, quantization_config)."""
    out, x = {}, _inputs(torch.float32)
    for name, scheme in SCHEMES.items():
        model = Qwen3LayerLinears(HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, vocab=64,
                                  generator=torch.Generator().manual_seed(0))
        calib = {n: x[m.in_features] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        tensors, qconfig, deq = quantize_with_library(model, scheme, fmt=FORMATS.get(name), calib=calib)
        path = write_checkpoint(str(tmp_path_factory.mktemp(name)), tensors, qconfig)
        out[name] = (path, deq, qconfig, tensors)
    return out


def build(path, fused, tp_rank=0, tp_size=1, dtype=torch.bfloat16, config=None, prefix_layer=0):
    config = config or ct.CompressedTensorsConfig.from_dir(path)
    parallel, shards, k, sizes = LAYERS[fused]
    if prefix_layer:
        shards = {i: s.replace(P, f"model.layers.{prefix_layer}") for i, s in shards.items()}
    qkv = QKVSizes(HEADS, KV_HEADS, HEAD_DIM, tp_size) if fused.endswith("qkv_proj") else None
    sizes = qkv.full_sizes if qkv else sizes
    prefix = f"model.layers.{prefix_layer}.{fused}"
    layer = ParallelLinear(k, sizes, linear_scheme(config, prefix), parallel=parallel, prefix=prefix,
                           tp_rank=tp_rank, tp_size=tp_size, params_dtype=dtype, qkv=qkv)
    load_linear(layer, SafetensorsCheckpoint(path), shards)
    return layer


def _kernel_weight(name, shards, deq, tensors, dtype):
    """The library's dequantized weights with the precision the layer's kernel is given (see top)."""
    kind = EXPECTED_KIND[name]
    if kind == ct.FP8_W8A16:  # dequantized per call in the activation dtype
        parts = []
        for prefix in shards.values():
            q, s = tensors[f"{prefix}.weight"], tensors[f"{prefix}.weight_scale"]
            parts.append((q.to(dtype) * s.to(dtype).reshape(-1, 1)).double())
        return torch.cat(parts)
    weight = torch.cat([deq[s] for s in shards.values()]).double()
    if kind in (ct.WNA16, ct.W4A8):  # (q - z) * s -> (q - z) * s rounded to the activation dtype
        scale = torch.cat([tensors[f"{s}.weight_scale"] for s in shards.values()]).float()
        rounded = scale.to(dtype).double() / scale.double()
        weight = weight * rounded.repeat_interleave(weight.shape[1] // scale.shape[1], dim=1)
    return weight


def reference(name, fused, deq, tensors, x, kernel=False):
    """The library's dequantized weights (fused shards concatenated) applied as the checkpoint says, in
    float64; kernel=True: with the kernel's precision (see top)."""
    _, shards, _, _ = LAYERS[fused]
    weight = _kernel_weight(name, shards, deq, tensors, x.dtype) if kernel else \
        torch.cat([deq[s] for s in shards.values()]).double()
    first = next(iter(shards.values()))
    if EXPECTED_KIND[name] == ct.W8A8_STATIC:
        args = QuantizationArgs.model_validate(SCHEMES[name]["input_activations"])
        scale = tensors[f"{first}.input_scale"].float()
        zero_point = tensors.get(f"{first}.input_zero_point", torch.zeros(1, dtype=torch.int8))
        if kernel:
            xq = round_half_away(x.float() * (1.0 / scale.double()).to(x.dtype).float() + zero_point.float())
            x = (xq.clamp(-128, 127) - zero_point.float()) * scale
        else:
            x = fake_quantize(x.float(), scale, zero_point, args)
    elif EXPECTED_KIND[name] == ct.W8A8_DYNAMIC:
        scale = x.float().abs().amax(dim=-1, keepdim=True) / 127  # the NPU's per-token quantization
        x = torch.round(x.float() / scale) * scale
    return x.double() @ weight.t()


def resident_bytes(layer) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in list(layer.parameters()) + list(layer.buffers())}
    return sum(storages.values())


# -- config parsing and the scheme decision ---------------------------------------------------------
def test_library_configs_decide_expected_kind(checkpoints):
    for name, (path, _, qconfig, _) in checkpoints.items():
        config = ct.CompressedTensorsConfig.from_dir(path)
        args = config.scheme_args(f"{P}.self_attn.qkv_proj")
        assert args.kind == EXPECTED_KIND[name], name
        assert args.format == qconfig["format"]
        assert config.scheme_args("lm_head") is None  # ignored -> unquantized


def _config(weights, acts=None, fmt="int-quantized", **extra):
    group = {"targets": ["Linear"], "weights": weights, "input_activations": acts}
    return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"group_0": group}, **extra}


INT4_G = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}
INT8_C = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
TOKEN8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
FP8_C = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
FP8_TOKEN = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}


@pytest.mark.parametrize("weights,acts,fmt,kind", [
    (INT4_G, None, "pack-quantized", ct.WNA16),
    (INT8_C, None, "pack-quantized", ct.WNA16),
    (INT8_C, {**TOKEN8, "strategy": "tensor", "dynamic": False}, "int-quantized", ct.W8A8_STATIC),
    ({**INT8_C, "strategy": "tensor"}, {**TOKEN8, "strategy": "tensor", "dynamic": False}, "int-quantized",
     ct.W8A8_STATIC),
    (INT8_C, TOKEN8, "int-quantized", ct.W8A8_DYNAMIC),
    (INT4_G, TOKEN8, "int-quantized", ct.W4A8),
    (INT4_G, TOKEN8, "pack-quantized", ct.W4A8),
    ({**INT4_G, "strategy": "channel", "group_size": None}, TOKEN8, "pack-quantized", ct.W4A8),
    (FP8_C, None, "float-quantized", ct.FP8_W8A16),
])
def test_decision_order(weights, acts, fmt, kind):
    config = ct.CompressedTensorsConfig.from_dict(_config(weights, acts, fmt))
    assert config.scheme_args("model.layers.0.mlp.down_proj").kind == kind
    # W4A8 layers have their own scheme (weight-only int4 on the NPU, as vllm-ascend serves dense W4A8)
    scheme = type(linear_scheme(config, "model.layers.0.mlp.down_proj")).__name__
    assert scheme == {ct.WNA16: "CTWNA16Linear", ct.W4A8: "CTW4A8Linear"}.get(kind, scheme)


@pytest.mark.parametrize("weights,acts,fmt,what", [
    (INT4_G, {**TOKEN8, "strategy": "tensor", "dynamic": False}, "int-quantized", "not a scheme"),
    ({**INT8_C, "num_bits": 2}, None, "pack-quantized", "not a scheme"),
    (INT8_C, FP8_TOKEN, "int-quantized", "not a scheme"),
    ({**INT8_C, "symmetric": False}, TOKEN8, "int-quantized", "not a scheme"),
    ({**INT4_G, "symmetric": False}, TOKEN8, "pack-quantized", "not a scheme"),  # W4A8 kernel: symmetric
    (INT4_G, None, "float-quantized", "format 'float-quantized'"),
    (INT4_G, None, "bogus-format", "format 'bogus-format'"),
])
def test_unsupported_combinations_are_checkpoint_errors(weights, acts, fmt, what):
    with pytest.raises(CheckpointError, match=what) as info:
        ct.CompressedTensorsConfig.from_dict(_config(weights, acts, fmt), source="/ckpt/config.json")
    assert "/ckpt/config.json" in str(info.value) and "config_groups.group_0" in str(info.value)


def test_malformed_config_and_unknown_group_format():
    bad = _config(INT4_G, None, "pack-quantized")
    bad["config_groups"]["group_0"]["format"] = "no-such-format"
    with pytest.raises(CheckpointError, match="malformed quantization_config") as info:
        ct.CompressedTensorsConfig.from_dict(bad, source="/ckpt/config.json")
    assert info.value.file == "/ckpt/config.json"
    # An FP8 KV cache resolves to a key no KV-cache scheme serves: refused, saying why and what to do.
    kv = ct.CompressedTensorsConfig.from_dict(_config(INT4_G, None, "pack-quantized",
                                                      kv_cache_scheme={"num_bits": 8, "type": "float"}))
    assert kv.kv_cache_key().kind == "kv_cache" and kv.kv_cache_key().name == "float8"
    with pytest.raises(CheckpointError, match="FP8 attention kernels, which Ascend A2/A3 NPUs lack; re-export "
                                              "with an int8 kv_cache_scheme") as info:
        check_served(kv)
    assert "kv_cache_scheme" in str(info.value) and "served compressed-tensors KV-cache schemes: int8" in str(info.value)
    with pytest.raises(CheckpointError, match="not 'compressed-tensors'"):
        ct.CompressedTensorsConfig.from_dict({**_config(INT4_G), "quant_method": "gptq"})


def test_seed_002_fp8_labelled_w8a16_is_w8a8_fp8(caplog):
    """Vezora/QwQ-32B-Preview-fp8-W8A16: FP8 weights AND dynamic FP8 token activations in config.json."""
    raw = _config({**FP8_C, "strategy": "tensor"}, FP8_TOKEN, "float-quantized", ignore=["lm_head"])
    assert ct.CompressedTensorsConfig.from_dict(raw, fp8_matmul=True).scheme_args("x.q_proj").kind == ct.W8A8_FP8
    with caplog.at_level(logging.WARNING, logger=ct.__name__):
        config = ct.CompressedTensorsConfig.from_dict(raw)  # this device: no FP8 matmul
    assert config.scheme_args("x.q_proj").kind == ct.FP8_W8A16
    assert any("is W8A8-FP8" in r.getMessage() and "weight-only FP8 (W8A16)" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(CheckpointError, match="W8A8_FP8"):
        linear_scheme(ct.CompressedTensorsConfig.from_dict(raw, fp8_matmul=True), "x.q_proj")


# -- targets / ignore -----------------------------------------------------------------------------
def test_targets_and_ignore_resolution():
    raw = {
        "quant_method": "compressed-tensors", "format": "mixed-precision",
        "config_groups": {
            "by_class": {"targets": ["Linear"], "weights": INT8_C, "input_activations": TOKEN8,
                         "format": "int-quantized"},
            "by_regex": {"targets": [r"re:.*mlp\.(gate|up|down)_proj$", r"re:.*experts.*"], "weights": INT4_G,
                         "format": "pack-quantized"},
            "by_name": {"targets": ["model.layers.0.self_attn.o_proj"], "weights": INT4_G,
                        "input_activations": TOKEN8, "format": "int-quantized"},
        },
        "ignore": ["lm_head", r"re:model\.layers\.1\..*"],
    }
    config = ct.CompressedTensorsConfig.from_dict(raw)
    kind = lambda p: (config.scheme_args(p) or ct.CTSchemeArgs("none", "", None, None, "")).kind
    assert kind("model.layers.0.self_attn.qkv_proj") == ct.W8A8_DYNAMIC  # class `Linear`
    assert kind("model.layers.0.mlp.gate_up_proj") == ct.WNA16  # regex beats class
    assert kind("model.layers.0.self_attn.o_proj") == ct.W4A8  # exact name beats all
    assert kind("lm_head") == "none" and kind("model.layers.1.self_attn.qkv_proj") == "none"
    assert config.moe_scheme_args("model.layers.0.mlp.experts", num_experts=4).kind == ct.WNA16
    assert config.moe_scheme_args("model.layers.1.mlp.experts", num_experts=4) is None

    raw["ignore"] = ["model.layers.0.self_attn.k_proj", "model.layers.0.mlp.experts.3.down_proj"]
    config = ct.CompressedTensorsConfig.from_dict(raw)
    with pytest.raises(CheckpointError, match="k_proj=unquantized"):
        config.scheme_args("model.layers.0.self_attn.qkv_proj")
    with pytest.raises(CheckpointError, match="experts"):
        config.moe_scheme_args("model.layers.0.mlp.experts", num_experts=4)


# -- layer outputs ------------------------------------------------------------------------------
# TIGHT: the output is the kernel reference rounded once to the activation dtype (measured <= 1.0).
# TOL_LIBRARY: against the library's own math (fp32 scales, x / s): bf16 scales (2^-9 relative each)
# and, for static activations, elements one step away where x * r and x / s round apart.
TIGHT, TOL_LIBRARY = 1.1, 1.5e-2


@pytest.mark.parametrize("name", list(SCHEMES))
def test_layer_outputs_match_library_dequantization(checkpoints, name):
    path, deq, _, tensors = checkpoints[name]
    for dtype in (torch.bfloat16, torch.float16):
        x = _inputs(dtype)
        for fused, (_, _, k, _) in LAYERS.items():
            out = build(path, fused, dtype=dtype)(x[k])
            assert out.dtype == dtype
            assert tight_error(out, reference(name, fused, deq, tensors, x[k], kernel=True)) <= TIGHT, (fused, dtype)
            assert rel_err(out, reference(name, fused, deq, tensors, x[k])) < TOL_LIBRARY, (fused, dtype)


def test_dynamic_activations_stay_close_to_float(checkpoints):
    path, deq, _, tensors = checkpoints["w8a8_dynamic"]
    x = _inputs()[HIDDEN]
    weight = torch.cat([deq[f"{P}.self_attn.{s}_proj"] for s in "qkv"])
    assert rel_err(build(path, "self_attn.qkv_proj")(x), x.double() @ weight.double().t()) < 1e-2


@pytest.mark.parametrize("name", list(SCHEMES))
def test_tp2_shards_match_whole(checkpoints, name):
    path, _, _, _ = checkpoints[name]
    x = _inputs()
    for fused, (parallel, shards, k, _) in LAYERS.items():
        whole = build(path, fused)(x[k])
        ranks = [build(path, fused, tp_rank=r, tp_size=2) for r in range(2)]
        if parallel == "row":
            parts = [layer(xs).double() for layer, xs in zip(ranks, x[k].chunk(2, dim=-1))]
            if EXPECTED_KIND[name] == ct.W8A8_DYNAMIC:
                # Per-token dynamic quantization sees each rank's slice of K, as it does on the NPU.
                assert rel_err(parts[0] + parts[1], whole) < 1e-2, fused
            else:  # each rank's partial sum carries its own bf16 rounding
                magnitude = parts[0].abs() + parts[1].abs() + whole.abs().double()
                assert tight_error(parts[0] + parts[1], whole, magnitude) <= 2 * TIGHT, fused
        else:
            sizes = [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM] if len(shards) == 3 else [INTER] * 2
            per_rank = [layer(x[k]).split([s // 2 for s in sizes], dim=-1) for layer in ranks]
            joined = torch.cat([torch.cat([per_rank[r][i] for r in range(2)], -1) for i in range(len(sizes))], -1)
            assert tight_error(joined, whole) <= 2 * TIGHT, fused  # within one bf16 ulp


@pytest.mark.parametrize("name", list(SCHEMES))
def test_resident_bytes_match_theory(checkpoints, name):
    path = checkpoints[name][0]
    for fused in LAYERS:
        for dtype in (torch.bfloat16, torch.float16):
            layer = build(path, fused, dtype=dtype)
            theory = layer.scheme.theoretical_bytes(layer.input_size_per_partition,
                                                    sum(layer.output_partition_sizes))
            assert abs(resident_bytes(layer) - theory) <= 0.02 * theory, (fused, dtype)


# -- the tests see broken conventions -------------------------------------------------------------
def test_wrong_group_scale_order_or_zero_point_sign_raises_the_error(checkpoints):
    x = _inputs()[HIDDEN]
    path, deq, _, tensors = checkpoints["w4a16_group_asym"]
    expected = reference("w4a16_group_asym", "mlp.gate_up_proj", deq, tensors, x, kernel=True)
    layer = build(path, "mlp.gate_up_proj")
    assert tight_error(layer(x), expected) <= TIGHT
    layer.weight_scale.data = layer.weight_scale.data.flip(0)  # groups of K in the wrong order
    assert tight_error(layer(x), expected) > 10 * TIGHT
    layer = build(path, "mlp.gate_up_proj")
    layer.weight_zero_point.data = -layer.weight_zero_point.data  # (q + z) instead of (q - z)
    assert tight_error(layer(x), expected) > 10 * TIGHT
    layer = build(path, "mlp.gate_up_proj")
    values = unpack_int32_to_int4(layer.weight.data)  # [K, N]: swap the two nibbles of every byte
    layer.weight.data = pack_int4_to_int32(values.reshape(values.shape[0], -1, 2).flip(-1).flatten(1))
    assert tight_error(layer(x), expected) > 10 * TIGHT

    path, deq, _, tensors = checkpoints["w8a8_static_asym"]
    expected = reference("w8a8_static_asym", "mlp.down_proj", deq, tensors, _inputs()[INTER], kernel=True)
    layer = build(path, "mlp.down_proj")
    assert tight_error(layer(_inputs()[INTER]), expected) <= TIGHT
    del layer.quant_bias  # forget the activation zero point's correction
    assert tight_error(layer(_inputs()[INTER]), expected) > 10 * TIGHT


# -- W4A8: weight-only int4 on the NPU ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["w4a8", "w4a8_channel"])
def test_ct_w4a8_runs_weight_only_int4_per_rank(checkpoints, name, caplog):
    """Row-parallel ranks each multiply their own K slice (no activation quantization: the dense
    single-group W4A8 grouped matmul is not legal on the NPU, schemes/ct_w4a8.py); the int4 weight stays
    packed, the scales are the kernel's [K/g, N] (or [N]) in the activation dtype, nothing else is held."""
    path, deq, _, tensors = checkpoints[name]
    x = _inputs()[INTER]
    weight = _kernel_weight(name, {None: f"{P}.mlp.down_proj"}, deq, tensors, torch.bfloat16)
    group = SCHEMES[name]["weights"].get("group_size") or 0
    parts, expected = [], 0
    with caplog.at_level(logging.DEBUG, logger="sgl_ascend.layers.schemes.w4a8_kernel"):
        for rank, xs in enumerate(x.chunk(2, dim=-1)):
            layer = build(path, "mlp.down_proj", tp_rank=rank, tp_size=2)
            k = INTER // 2
            assert layer.weight.dtype == torch.int32 and layer.weight.shape == (k, HIDDEN // 8)
            assert layer.weight_scale.dtype == torch.bfloat16
            assert layer.weight_scale.shape == ((k // group, HIDDEN) if group else (HIDDEN,))
            assert {n for n, _ in layer.named_parameters()} == {"weight", "weight_scale"}
            assert resident_bytes(layer) == layer.scheme.theoretical_bytes(k, HIDDEN)
            parts.append(layer(xs).double())
            expected = expected + xs.double() @ weight[:, rank * k:(rank + 1) * k].t()
    assert any("weight-only" in r.getMessage() for r in caplog.records)
    magnitude = parts[0].abs() + parts[1].abs()
    assert tight_error(parts[0] + parts[1], expected, magnitude) <= TIGHT


def test_ct_w4a8_break_proof(checkpoints):
    """The tight check sees a wrong group-scale order and one channel's scale 1% off."""
    path, deq, _, tensors = checkpoints["w4a8"]
    xs = _inputs()[INTER].chunk(2, dim=-1)[1]
    weight = _kernel_weight("w4a8", {None: f"{P}.mlp.down_proj"}, deq, tensors, torch.bfloat16)
    expected = xs.double() @ weight[:, INTER // 2:].t()
    layer = build(path, "mlp.down_proj", tp_rank=1, tp_size=2)
    assert tight_error(layer(xs), expected) <= TIGHT
    layer.weight_scale.data = layer.weight_scale.data.flip(0)  # groups of K in the wrong order
    assert tight_error(layer(xs), expected) > 10 * TIGHT
    layer = build(path, "mlp.down_proj", tp_rank=1, tp_size=2)
    layer.weight_scale.data[:, 5] *= 1.01
    assert tight_error(layer(xs), expected) > 2 * TIGHT


def test_ct_w4a8_bad_checkpoints(tmp_path, checkpoints):
    name = f"{P}.mlp.up_proj.weight"  # int-quantized: one int4 value per int8

    def out_of_range(t):
        t[name] = t[name].clone()
        t[name][3, 5] = 9
    with pytest.raises(CheckpointError, match="values span \\[.*, 9\\]") as info:
        build(_edited(tmp_path, checkpoints, "w4a8", out_of_range), "mlp.gate_up_proj")
    assert name in str(info.value) and info.value.file.endswith("model.safetensors")
    with pytest.raises(CheckpointError, match="whole number of groups of 32"):
        build(checkpoints["w4a8"][0], "self_attn.o_proj", tp_rank=0, tp_size=8)
    path = _edited(tmp_path, checkpoints, "w4a8_channel", lambda t: t.pop(f"{P}.mlp.down_proj.weight_scale"))
    with pytest.raises(CheckpointError, match="does not have it") as info:
        build(path, "mlp.down_proj")
    assert f"{P}.mlp.down_proj.weight_scale" in str(info.value)


def test_ct_w4a8_config_logs_no_fallback(checkpoints, caplog):
    """The config serves W4A8 as declared (kind W4A8); the scheme says it runs weight-only (see above)."""
    with caplog.at_level(logging.INFO, logger=ct.__name__):
        config = ct.CompressedTensorsConfig.from_dir(checkpoints["w4a8"][0])
    assert not any("weight-only" in r.getMessage() for r in caplog.records)
    assert config.scheme_args(f"{P}.mlp.down_proj").kind == ct.W4A8


# -- bad checkpoints ----------------------------------------------------------------------------
def _edited(tmp_path, checkpoints, name, edit):
    path, _, qconfig, tensors = checkpoints[name]
    tensors = dict(tensors)
    edit(tensors)
    return write_checkpoint(str(tmp_path / name), tensors, qconfig)


def test_missing_weight_scale_names_file_and_tensor(tmp_path, checkpoints):
    path = _edited(tmp_path, checkpoints, "w4a16_group", lambda t: t.pop(f"{P}.self_attn.k_proj.weight_scale"))
    with pytest.raises(CheckpointError, match="does not have it") as info:
        build(path, "self_attn.qkv_proj")
    assert f"{P}.self_attn.k_proj.weight_scale" in str(info.value) and info.value.file


def test_wrong_weight_shape_names_file_and_tensor(tmp_path, checkpoints):
    name = f"{P}.mlp.up_proj.weight_shape"
    path = _edited(tmp_path, checkpoints, "w4a16_group",
                   lambda t: t.__setitem__(name, torch.tensor([INTER, HIDDEN + 32])))
    with pytest.raises(CheckpointError, match="weight_shape says") as info:
        build(path, "mlp.gate_up_proj")
    assert name in str(info.value) and info.value.file.endswith("model.safetensors")
    path = _edited(tmp_path, checkpoints, "w4a16_group",
                   lambda t: t.__setitem__(name, torch.tensor([INTER + 8, HIDDEN])))
    with pytest.raises(CheckpointError, match="weight_shape says"):
        build(path, "mlp.gate_up_proj")


def test_tp_size_that_splits_a_group_is_refused(checkpoints):
    path = checkpoints["w4a16_group"][0]
    assert build(path, "self_attn.o_proj", tp_rank=3, tp_size=4).weight_scale.shape == (1, HIDDEN)
    with pytest.raises(CheckpointError, match="whole number of groups of 32"):
        build(path, "self_attn.o_proj", tp_rank=0, tp_size=8)


def test_packed_width_mismatch_names_file_and_tensor(tmp_path, checkpoints):
    name = f"{P}.mlp.down_proj.weight_packed"
    path = _edited(tmp_path, checkpoints, "w4a16_group", lambda t: t.__setitem__(name, t[name][:, :-1].clone()))
    with pytest.raises(CheckpointError) as info:
        build(path, "mlp.down_proj", tp_rank=1, tp_size=2)
    assert name in str(info.value) and info.value.file.endswith("model.safetensors")


def test_fp8_weight_stored_as_bf16_is_rejected(tmp_path, checkpoints):
    name = f"{P}.self_attn.o_proj.weight"
    path = _edited(tmp_path, checkpoints, "fp8_dynamic", lambda t: t.__setitem__(name, t[name].bfloat16()))
    with pytest.raises(CheckpointError, match="dtype torch.bfloat16 where torch.float8_e4m3fn") as info:
        build(path, "self_attn.o_proj")
    assert name in str(info.value) and info.value.file.endswith("model.safetensors")


def test_unknown_format_in_config_json(tmp_path, checkpoints):
    path, _, qconfig, tensors = checkpoints["w8a8_dynamic"]
    bad = json.loads(json.dumps(qconfig))
    bad["format"] = bad["config_groups"]["group_0"]["format"] = None
    bad["format"] = "marlin-48"
    with pytest.raises(CheckpointError, match="format 'marlin-48'") as info:
        ct.CompressedTensorsConfig.from_dir(write_checkpoint(str(tmp_path / "bad"), tensors, bad))
    assert info.value.file.endswith("config.json")


# -- the end-to-end checkpoint -----------------------------------------------------------------
def test_full_qwen3_checkpoint_is_hf_loadable(tmp_path):
    path = write_qwen3_ct_checkpoint(str(tmp_path / "qwen3-ct"), "w4a16_group")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    assert "model.layers.1.self_attn.q_proj.weight_packed" in tensors
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" in tensors
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    assert "model.layers.1.self_attn.q_proj.weight" not in tensors  # no float copy beside the packed one
    for name in ("tokenizer.json", "config.json"):
        assert os.path.exists(os.path.join(path, name))
    config = ct.CompressedTensorsConfig.from_dir(path)
    assert config.scheme_args("model.layers.1.mlp.gate_up_proj").kind == ct.WNA16
    assert config.scheme_args("lm_head") is None
    bf16 = load_file(os.path.join(QWEN3_BF16, "model.safetensors"))
    layer = build(path, "mlp.gate_up_proj", dtype=torch.bfloat16, prefix_layer=1, config=config)
    x = _inputs()[HIDDEN].bfloat16()
    weight = torch.cat([bf16[f"model.layers.1.mlp.{s}_proj.weight"] for s in ("gate", "up")]).float()
    # int4 symmetric group-32 weights: about 0.098 relative error against the bf16 source here.
    assert rel_err(layer(x), x.float() @ weight.t()) < 0.12


def test_activation_use_clip_is_read_by_the_linear_and_the_expert_path_alike():
    """W4A8 experts' `activation_use_clip` (not a compressed-tensors field): the config that SGLang and
    `inspect` build accepts it, as the MoE method does (both read the config through split_clip)."""
    raw = _config(INT4_G, TOKEN8, "pack-quantized")
    raw["config_groups"]["group_0"]["activation_use_clip"] = True
    config = ct.CompressedTensorsConfig.from_dict(raw)
    assert config.clip_groups == {"group_0": True} and config.linear_key("x.q_proj").name == ct.W4A8
    assert all(key.param("clip") is True for key in ct.expert_keys(raw, "model.layers.0.mlp"))
    assert "activation_use_clip" in raw["config_groups"]["group_0"]  # the caller's dict is not changed


def test_float_activation_zero_point_is_taken_as_int8_codes():
    """msmodelslim's compressed-tensors writer stores W8A8 static input_zero_point in the model dtype
    (the library writes int8; vLLM / SGLang copy either into an int8 parameter): whole numbers in int8's
    range load as those codes, anything else is refused."""
    from sgl_ascend.layers.schemes.ct_common import float_zero_point_to_int8

    got = float_zero_point_to_int8(torch.tensor([-3.0, 127.0, -128.0], dtype=torch.bfloat16))
    assert got.dtype == torch.int8 and got.tolist() == [-3, 127, -128]
    for bad in ([0.5], [128.0]):
        with pytest.raises(CheckpointError, match="activation zero point must hold int8 codes"):
            float_zero_point_to_int8(torch.tensor(bad, dtype=torch.float32))
