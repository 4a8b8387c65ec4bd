"""After processing, a layer holds each weight once, in the kernel layout: its resident bytes (every
tensor's storage, shared storage counted once) are within 2% of the scheme's theoretical size, and
no float copy of a quantized weight survives (no floating tensor with N*K elements).

Layers are 512 x 1024 so that the 2% is far below one weight copy (a float copy would add 100-400%).
"""

import pytest
import torch

from helpers.linear import build_layer, layer_reference, quantize_linear, tight_error, write_modelslim
from sgl_ascend.ops.scales import encode_fp32_as_int64

N, K = 512, 1024
SCHEMES = [("FLOAT", False), ("W8A8", False), ("W8A8_DYNAMIC", False), ("W8A16", False), ("W8A16", True),
           ("W4A4_DYNAMIC", False)]


def _layer_tensors(module):
    tensors = list(module.parameters()) + list(module.buffers())
    tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
    tensors += [v for v in vars(module.scheme).values() if isinstance(v, torch.Tensor)]
    return tensors


def resident_bytes(module) -> int:
    storages = {}
    for t in _layer_tensors(module):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _checkpoint(folder, kind, asymmetric, parallel, params_dtype):
    gen = torch.Generator().manual_seed(5)
    name = "model.layers.0.mlp.down_proj" if parallel == "row" else "model.layers.0.mlp.gate_proj"
    tensors = quantize_linear(torch.randn(N, K, generator=gen) / K**0.5, kind, gen, asymmetric)
    if kind == "W8A8" and params_dtype == torch.float16:  # fp16 models carry deq_scale as int64 bits
        tensors["deq_scale"] = encode_fp32_as_int64(tensors["deq_scale"])
    if kind == "FLOAT":
        tensors["weight"] = tensors["weight"].to(params_dtype)
    return write_modelslim(folder, {f"{name}.{s}": t for s, t in tensors.items()},
                           {f"{name}.{s}": kind for s in tensors})


def _build(tmp_path, kind, asymmetric=False, parallel="column", tp_rank=0, tp_size=1,
           params_dtype=torch.bfloat16):
    folder = _checkpoint(str(tmp_path), kind, asymmetric, parallel, params_dtype)
    # column: gate_proj [inter=N, hidden=K]; row: down_proj [hidden=N, inter=K]
    dims = dict(hidden=K, inter=N) if parallel == "column" else dict(hidden=N, inter=K)
    layer = build_layer(folder, "column" if parallel == "column" else "down_proj", tp_rank=tp_rank,
                        tp_size=tp_size, params_dtype=params_dtype, **dims)
    return folder, dims, layer


def _check_memory(layer):
    n, k = sum(layer.output_partition_sizes), layer.input_size_per_partition
    theoretical = layer.scheme.theoretical_bytes(k, n)
    resident = resident_bytes(layer)
    assert abs(resident - theoretical) <= 0.02 * theoretical, (resident, theoretical)
    if type(layer.scheme).__name__ != "UnquantizedLinear":
        copies = [t for t in _layer_tensors(layer) if t.is_floating_point() and t.numel() == n * k]
        assert not copies, [(t.dtype, tuple(t.shape)) for t in copies]
    return resident, theoretical


@pytest.mark.parametrize("kind,asymmetric", SCHEMES)
def test_column_layer_memory(tmp_path, kind, asymmetric):
    _, _, layer = _build(tmp_path, kind, asymmetric)
    resident, theoretical = _check_memory(layer)
    assert resident < N * K * 2.1  # at most one bf16 weight, whatever the scheme


@pytest.mark.parametrize("kind,asymmetric", SCHEMES)
def test_row_layer_rank_memory(tmp_path, kind, asymmetric):
    _, _, layer = _build(tmp_path, kind, asymmetric, parallel="row", tp_rank=1, tp_size=2)
    _check_memory(layer)


def test_int4_weight_is_half_a_byte_per_value(tmp_path):
    _, _, layer = _build(tmp_path, "W4A4_DYNAMIC")
    assert layer.weight.dtype == torch.int32 and layer.weight.untyped_storage().nbytes() == N * K // 2
    assert not hasattr(layer, "weight_offset")  # zero offsets are checked, then dropped


def test_w8a8_static_scalars_are_not_repeated_over_k(tmp_path):
    # npu_quantize's reciprocal scale and offset: one bf16 element each (upstream repeats them over K)
    _, _, layer = _build(tmp_path, "W8A8")
    assert not hasattr(layer, "input_scale")
    for t in (layer.input_scale_reciprocal, layer.input_offset):
        assert t.dtype == torch.bfloat16 and t.shape == (1,) and t.untyped_storage().nbytes() == 2


def test_w8a8_static_deq_scale_takes_the_serving_dtype_encoding(tmp_path, gen):
    """npu_quant_matmul takes an fp32 deq_scale with bf16 output, an int64 (fp32 bits) one with fp16
    output: a checkpoint written for the other dtype is converted as it loads (one copy)."""
    for written, serving, want in ((torch.float16, torch.bfloat16, torch.float32),
                                   (torch.bfloat16, torch.float16, torch.int64)):
        folder = _checkpoint(str(tmp_path / str(serving)), "W8A8", False, "column", written)
        layer = build_layer(folder, "column", params_dtype=serving, hidden=K, inter=N)
        assert layer.deq_scale.dtype == want
        _check_memory(layer)
        x = (torch.randn(4, K, generator=gen) * 0.02 * 40).to(serving)
        ref = layer_reference(folder, "column", x, npu_reciprocal=True, hidden=K, inter=N)
        assert tight_error(layer(x), ref) <= 1.1


def test_fp16_w8a8_static_keeps_int64_deq_scale_and_matches(tmp_path, gen):
    folder, dims, layer = _build(tmp_path, "W8A8", params_dtype=torch.float16)
    assert layer.deq_scale.dtype == torch.int64
    _check_memory(layer)
    x = (torch.randn(4, K, generator=gen) * 0.02 * 40).to(torch.float16)
    assert tight_error(layer(x), layer_reference(folder, "column", x, npu_reciprocal=True, **dims)) <= 1.1


def test_memory_check_notices_a_kept_copy(tmp_path):
    _, _, layer = _build(tmp_path, "W8A8_DYNAMIC")
    layer.weight_fp = layer.weight.data.t().to(torch.bfloat16)  # what a careless scheme might keep
    with pytest.raises(AssertionError):
        _check_memory(layer)
    del layer.weight_fp
    layer.weight_scale_fp32 = layer.weight_scale.data.clone()  # a duplicated scale: +4N bytes, < 2%
    resident, theoretical = _check_memory(layer)
    assert resident - theoretical == 4 * N
