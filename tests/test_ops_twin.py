"""The CPU twins compute what the NPU ops compute (sgl_ascend/ops/twin.py), and the int4 / int64-scale
encodings agree with independent producers: compressed-tensors' own int32 packing and the int4
pairs that the real msmodelslim tool wrote into tests/fixtures/msmodelslim/qwen3-tiny-w4a8-dynamic.
"""

import os

import pytest
import torch
from compressed_tensors.compressors import pack_to_int32, unpack_from_int32
from safetensors.torch import load_file

from helpers.common import msmodelslim_fixture
from sgl_ascend.ops import twin
from sgl_ascend.ops.int4 import (pack_int4_to_int32, pack_int8_pairs, unpack_int8_pairs,
                                 unpack_int32_to_int4)
from sgl_ascend.ops.scales import decode_int64_scale, encode_fp32_as_int64


def _int8(gen, *shape, low=-128, high=128):
    return torch.randint(low, high, shape, generator=gen, dtype=torch.int8)


# -- npu_dynamic_quant -------------------------------------------------------------------------

def test_dynamic_quant_int8_scale_is_absmax_over_127_fp32(gen):
    x = torch.randn(2, 5, 64, generator=gen).to(torch.bfloat16)
    q, scale = twin.npu_dynamic_quant(x)
    xf = x.float()
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (2, 5)
    torch.testing.assert_close(scale, xf.abs().amax(-1) / 127, rtol=0, atol=0)
    assert torch.equal(q, torch.round(xf / scale.unsqueeze(-1)).to(torch.int8))
    # the absmax element lands on +-127 exactly, so nothing is clipped
    assert torch.equal(q.abs().amax(-1), torch.full((2, 5), 127, dtype=torch.int8))


def test_dynamic_quant_zero_row_gives_zero_values():
    q, scale = twin.npu_dynamic_quant(torch.zeros(1, 16, dtype=torch.bfloat16))
    assert scale.item() == 0 and not q.any()


def test_dynamic_quant_rounds_ties_to_even():
    # ASSUMPTION in twin.py: ties go to even. absmax 127 -> scale 1; 2.5 -> 2, 3.5 -> 4, -2.5 -> -2
    x = torch.tensor([[127.0, 2.5, 3.5, -2.5]], dtype=torch.bfloat16)
    q, scale = twin.npu_dynamic_quant(x)
    assert scale.item() == 1.0 and q.tolist() == [[127, 2, 4, -2]]


def test_dynamic_quant_int4_scale_over_7_packed_eight_per_int32(gen):
    x = torch.randn(6, 64, generator=gen).to(torch.bfloat16)
    packed, scale = twin.npu_dynamic_quant(x, dst_type=torch.quint4x2)
    assert packed.dtype == torch.int32 and packed.shape == (6, 8)
    torch.testing.assert_close(scale, x.float().abs().amax(-1) / 7, rtol=0, atol=0)
    values = unpack_int32_to_int4(packed)
    assert torch.equal(values, torch.round(x.float() / scale[:, None]).to(torch.int8))
    assert values.abs().max() == 7


# -- npu_quantize --------------------------------------------------------------------------------

def test_quantize_div_mode_both_ways_and_saturation():
    x = torch.tensor([[0.3, -0.3, 1.0, 100.0, -100.0, 0.0]], dtype=torch.bfloat16)
    scale, zp = torch.tensor([0.25], dtype=torch.bfloat16), torch.tensor([3.0], dtype=torch.bfloat16)
    divided = twin.npu_quantize(x, scale, zp, torch.qint8, -1, True)
    multiplied = twin.npu_quantize(x, 1 / scale, zp, torch.qint8, -1, False)
    # x / 0.25 + 3 = [4.2, 1.8, 7, 403, -397, 3] (x in bf16): rounded, then saturated to int8
    assert divided.dtype == torch.int8 and divided.tolist() == [[4, 2, 7, 127, -128, 3]]
    assert torch.equal(divided, multiplied)
    assert twin.npu_quantize(x, scale, None, torch.qint8, -1, True).tolist() == [[1, -1, 4, 127, -128, 0]]


def test_quantize_per_channel_scales_repeated_over_k(gen):
    # upstream passes 1/input_scale repeated to length K; our one-element form must agree with it
    x = torch.randn(3, 32, generator=gen).to(torch.bfloat16)
    s, zp = torch.tensor([50.0], dtype=torch.bfloat16), torch.tensor([-4.0], dtype=torch.bfloat16)
    assert torch.equal(twin.npu_quantize(x, s, zp, torch.qint8, -1, False),
                       twin.npu_quantize(x, s.repeat(32), zp.repeat(32), torch.qint8, -1, False))


def test_quantize_multiply_mode_rounds_half_away_from_zero():
    # div_mode=False runs aclnnAscendQuantV3 with round mode "round" (half away from zero)
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 3.5]], dtype=torch.bfloat16)
    one, zero = torch.ones(1, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.bfloat16)
    assert twin.npu_quantize(x, one, zero, torch.qint8, -1, False).tolist() == [[1, 2, 3, -1, -3, 4]]


# -- npu_quant_matmul ----------------------------------------------------------------------------

def test_quant_matmul_accumulates_exactly_in_int32(gen):
    # |sums| reach ~6e7 > 2^24: a float accumulator would round, int32 does not
    k = 4096
    a = torch.where(torch.rand(4, k, generator=gen) < 0.9, -128, 127).to(torch.int8)
    b = torch.where(torch.rand(k, 5, generator=gen) < 0.9, -128, 127).to(torch.int8)
    exact = a.long() @ b.long()
    assert exact.abs().max() > 2**24
    assert torch.equal(twin._int_matmul(a, b).long(), exact)


def test_quant_matmul_int32_bias_before_scale_and_scale_encodings(gen):
    a, b = _int8(gen, 3, 64, low=-8, high=8), _int8(gen, 64, 8, low=-8, high=8)
    bias = torch.randint(-5000, 5000, (8,), generator=gen, dtype=torch.int32)
    scale = torch.tensor([2.0**-e for e in range(8)])  # exact in fp32, bf16 and as int64 bits
    exact = (a.long() @ b.long() + bias.long()).double() * scale.double()  # exact in fp32: one rounding
    # the documented combinations: fp32 / int64 scale -> fp16 output, bf16 scale -> bf16 output
    for encoded, out_dtype in ((scale, torch.float16), (encode_fp32_as_int64(scale), torch.float16),
                               (scale.to(torch.bfloat16), torch.bfloat16)):
        out = twin.npu_quant_matmul(a, b, encoded, bias=bias, output_dtype=out_dtype)
        assert torch.equal(out, exact.to(out_dtype)), encoded.dtype


def test_quant_matmul_per_token_scale_and_output_dtype(gen):
    a, b = _int8(gen, 4, 32), _int8(gen, 32, 6)
    scale, token = torch.rand(6, generator=gen) / 100, torch.rand(4, generator=gen)
    out = twin.npu_quant_matmul(a, b, scale, pertoken_scale=token, output_dtype=torch.bfloat16)
    expected = (a.double() @ b.double()) * scale.double() * token.double()[:, None]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=2**-8, atol=0)


def test_quant_matmul_int4_packed_operands(gen):
    a, b = _int8(gen, 5, 32, low=-8, high=8), _int8(gen, 32, 16, low=-8, high=8)
    out = twin.npu_quant_matmul(pack_int4_to_int32(a), pack_int4_to_int32(b), torch.ones(16),
                                output_dtype=torch.float16)  # int4 without per-token scale: fp16 output
    assert torch.equal(out, (a.long() @ b.long()).to(torch.float16))  # |sums| <= 2048: exact in fp16


# -- npu_weight_quant_batchmatmul ------------------------------------------------------------------

def test_weight_quant_bmm_per_channel_and_offset(gen):
    n, k = 24, 64
    w_nk = _int8(gen, n, k)
    scale = (torch.rand(n, generator=gen) / 50).to(torch.bfloat16)
    offset = torch.randint(-9, 9, (n,), generator=gen).to(torch.bfloat16)
    x = torch.randn(5, k, generator=gen).to(torch.bfloat16)
    expected = x.double() @ ((w_nk.double() + offset.double()[:, None]) * scale.double()[:, None]).t()
    out = twin.npu_weight_quant_batchmatmul(x, w_nk.t(), scale, offset)
    assert out.dtype == torch.bfloat16  # exact product, one bf16 rounding
    torch.testing.assert_close(out.double(), expected, rtol=2**-8, atol=2**-8 * expected.abs().mean().item())


def test_weight_quant_bmm_per_group(gen):
    n, k, g = 8, 96, 32
    w_kn = _int8(gen, k, n)
    scale = (torch.rand(k // g, n, generator=gen) / 50).to(torch.bfloat16)
    offset = torch.randint(-4, 4, (k // g, n), generator=gen).to(torch.bfloat16)
    x = torch.randn(3, k, generator=gen).to(torch.bfloat16)
    w = (w_kn.double() + offset.double().repeat_interleave(g, 0)) * scale.double().repeat_interleave(g, 0)
    out = twin.npu_weight_quant_batchmatmul(x, w_kn, scale, offset, antiquant_group_size=g)
    expected = x.double() @ w
    torch.testing.assert_close(out.double(), expected, rtol=2**-8, atol=2**-8 * expected.abs().mean().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weight_quant_bmm_fast_path_equals_generic_path(gen, dtype):
    n, k = 40, 128
    w_nk = _int8(gen, n, k)
    scale = (torch.rand(n, generator=gen) / 50).to(dtype)
    offset = torch.randint(-9, 9, (n,), generator=gen).to(dtype)
    x = torch.randn(7, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(torch.float32 if dtype == torch.bfloat16 else dtype)
    fast = twin.npu_weight_quant_batchmatmul(x, w_nk.t(), scale, offset, bias=bias)  # [K, N] view of [N, K]
    generic = twin.npu_weight_quant_batchmatmul(x, w_nk.t().contiguous(), scale, offset, bias=bias)
    # same math in fp32, one final rounding: equal up to fp32 summation order (which can flip a
    # half-precision rounding now and then)
    assert (fast != generic).float().mean() < 0.02
    torch.testing.assert_close(fast.float(), generic.float(), rtol=2**-8,
                               atol=2**-8 * generic.float().abs().mean().item())


def test_weight_quant_bmm_bf16_unaligned_k(gen):
    # torch's bf16 int8pack kernel crashes for K % 16 != 0; the twin must not go there
    w_nk, x = _int8(gen, 8, 40), torch.randn(2, 40, generator=gen).to(torch.bfloat16)
    out = twin.npu_weight_quant_batchmatmul(x, w_nk.t(), torch.ones(8, dtype=torch.bfloat16))
    torch.testing.assert_close(out.float(), (x.float() @ w_nk.float().t()), rtol=2**-7, atol=1e-2)


# -- int4 packing ------------------------------------------------------------------------------------

def test_convert_weight_to_int4pack_known_bit_pattern():
    values = torch.tensor([[1, 2, 3, 4, 5, 6, 7, -1]], dtype=torch.int32)
    packed = twin.npu_convert_weight_to_int4pack(values)
    # element j in bits [4j, 4j+4), two's-complement nibbles: 0xF7654321
    assert packed.dtype == torch.int32 and packed.item() == 0xF7654321 - 2**32
    assert unpack_int32_to_int4(packed).tolist() == [[1, 2, 3, 4, 5, 6, 7, -1]]


def test_int4_packing_round_trip_all_values(gen):
    values = _int8(gen, 16, 64, low=-8, high=8)
    assert torch.equal(unpack_int32_to_int4(twin.npu_convert_weight_to_int4pack(values.to(torch.int32))), values)


# compressed-tensors stores q + 8 in each nibble, same little-endian nibble order; a signed nibble v
# and v + 8 differ exactly in the nibble's top bit, so the two packings differ by XOR 0x88888888.
_CT_OFFSET_BITS = 0x88888888 - 2**32


def test_int4_packing_matches_compressed_tensors(gen):
    values = _int8(gen, 12, 64, low=-8, high=8)
    ours = pack_int4_to_int32(values)
    theirs = pack_to_int32(values, 4)
    assert theirs.shape == ours.shape
    assert torch.equal(theirs, ours ^ _CT_OFFSET_BITS)
    assert torch.equal(unpack_from_int32(ours ^ _CT_OFFSET_BITS, 4, values.shape), values)
    assert torch.equal(unpack_int32_to_int4(theirs ^ _CT_OFFSET_BITS), values)


W4A8 = "qwen3-tiny-w4a8-dynamic"


@pytest.fixture(scope="module")
def w4a8_tensors():
    quant = load_file(os.path.join(msmodelslim_fixture(W4A8), "quant_model_weights-00001-of-00001.safetensors"))
    original = load_file(os.path.join(msmodelslim_fixture("qwen3-tiny-bf16"), "model.safetensors"))
    return quant, original


def _w4a8_dequant(quant, prefix, order="low_first"):
    values = unpack_int8_pairs(quant[f"{prefix}.weight"], dim=0)
    if order == "high_first":
        values = values.unflatten(0, (-1, 2)).flip(1).flatten(0, 1)
    return (values.float() - quant[f"{prefix}.weight_offset"].float()) * quant[f"{prefix}.weight_scale"].float()


@pytest.mark.parametrize("proj", ["gate_proj", "up_proj", "down_proj"])
def test_msmodelslim_w4a8_pairs_dequantize_to_the_original(w4a8_tensors, proj):
    quant, original = w4a8_tensors
    for layer in (0, 1):
        prefix = f"model.layers.{layer}.mlp.{proj}"
        deq = _w4a8_dequant(quant, prefix)
        scale = quant[f"{prefix}.weight_scale"].float()
        ref = original[f"{prefix}.weight"].float()
        assert deq.shape == ref.shape
        # minmax symmetric int4: every value within half a step (+3% for the scale's fp rounding)
        assert ((deq - ref).abs() / scale).max() < 0.53
        # the other nibble order is garbage: that is what pins low nibble = element 2j
        wrong = _w4a8_dequant(quant, prefix, order="high_first")
        assert ((wrong - ref).norm() / ref.norm()) > 1.0 > 5 * ((deq - ref).norm() / ref.norm())
        assert torch.equal(pack_int8_pairs(unpack_int8_pairs(quant[f"{prefix}.weight"], 0), 0),
                           quant[f"{prefix}.weight"])


@pytest.mark.parametrize("proj", ["gate_proj", "up_proj", "down_proj"])
def test_msmodelslim_w4a8_scale_bias_is_8_times_row_sums(w4a8_tensors, proj):
    quant, _ = w4a8_tensors
    prefix = f"model.layers.0.mlp.{proj}"
    deq = _w4a8_dequant(quant, prefix)
    scale_bias = quant[f"{prefix}.scale_bias"].float()
    if proj == "down_proj":  # row-parallel: one sum per 16th of K
        assert scale_bias.shape == (deq.shape[0], 16)
        expected = 8 * deq.unflatten(1, (16, -1)).sum(-1)
    else:
        assert scale_bias.shape == (deq.shape[0], 1)
        expected = 8 * deq.sum(1, keepdim=True)
    torch.testing.assert_close(scale_bias, expected, rtol=1e-5, atol=1e-5)


# -- int64 scale encoding ------------------------------------------------------------------------

def test_int64_scale_known_bits_and_round_trip(gen):
    encoded = encode_fp32_as_int64(torch.tensor([1.0, -2.0]))
    assert encoded.dtype == torch.int64 and encoded.tolist() == [0x3F800000, 0xC0000000]
    scale = torch.randn(100, generator=gen)
    assert torch.equal(decode_int64_scale(encode_fp32_as_int64(scale)), scale)
    assert torch.equal(decode_int64_scale(scale.to(torch.bfloat16)), scale.to(torch.bfloat16).float())


# -- npu_grouped_matmul ----------------------------------------------------------------------------

@pytest.mark.parametrize("group_list_type", [0, 1])
def test_grouped_matmul_float_groups(gen, group_list_type):
    x, w = torch.randn(7, 16, generator=gen), torch.randn(3, 16, 5, generator=gen)
    counts = [3, 0, 4]
    group_list = torch.tensor([3, 3, 7] if group_list_type == 0 else counts)
    (out,) = twin.npu_grouped_matmul([x], [w], group_list=group_list, split_item=2, group_type=0,
                                     group_list_type=group_list_type)
    expected = torch.cat([x[:3] @ w[0], x[3:] @ w[2]])
    torch.testing.assert_close(out, expected)


def test_grouped_matmul_int8_scales_per_expert_and_token(gen):
    x, w = _int8(gen, 6, 32), _int8(gen, 2, 32, 4)
    scale, token = torch.rand(2, 4, generator=gen), torch.rand(6, generator=gen)
    # per-token: fp32 scale -> fp16 output (bf16 scale -> bf16 output)
    (out,) = twin.npu_grouped_matmul([x], [w], scale=[scale], per_token_scale=[token],
                                     group_list=torch.tensor([2, 4]), split_item=2, group_type=0, group_list_type=1,
                                     output_dtype=torch.float16)
    expected = torch.cat([(x[:2].double() @ w[0].double()) * scale[0].double(),
                          (x[2:].double() @ w[1].double()) * scale[1].double()]) * token.double()[:, None]
    assert torch.equal(out, expected.float().to(torch.float16))
