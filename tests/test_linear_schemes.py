"""Every msModelSlim linear scheme, loaded from the real msmodelslim checkpoints, computes what the
checkpoint's own dequantization convention gives (see tests/helpers/linear.py for the reference).

Tolerances, per output element: the twins end in one bf16 rounding, so |out - ref| must stay within
TIGHT units of 2^-8 |ref| (bf16's unit roundoff), with 1% of the output rms as floor for elements
near zero. W8A16 allows two: the weight-only kernel takes its scale in bf16 (one more rounding).
Measured: at most 0.99 units (1.0 for W8A16), i.e. the output is the reference rounded to bf16.
The looser check against the original bf16 model bounds the quantization error itself.

W8A8 static: the NPU quantizes activations as x * r + o with r = 1 / input_scale rounded to bf16
(npu_quantize, div_mode=False, as SGLang / vllm-ascend call it), not x / s + o. The tight reference
does the same (`npu_reciprocal`); against the checkpoint's own x / s + o the r rounding (relative
<= 2^-9) moves elements near a rounding boundary one step: RECIPROCAL_REL bounds that (norm-relative,
measured <= 0.008 on the fixtures).
W4A4 with a layer bias: the bias is added after the int4 matmul (the op's int4 row takes no float
bias): two bf16 roundings, TIGHT_ADDED_BIAS.
"""

import pytest
import torch

from helpers.common import msmodelslim_fixture
from helpers.linear import (KINDS, build_layer, calibrated_input, fixture_layer, layer_reference,
                            original_reference, rel_err, synthetic_qwen3, tight_error)
from sgl_ascend.ops.int4 import pack_int4_to_int32, unpack_int32_to_int4

TIGHT = {"W8A8StaticLinear": 1.1, "W8A8DynamicLinear": 1.1, "W4A4DynamicLinear": 1.1, "W8A16Linear": 2.1,
         "UnquantizedLinear": 1.1}
# relative (norm) error vs the bf16 model on these inputs; measured 0.045 / 0.011 / 0.008 / 0.17
VS_ORIGINAL = {"W8A8StaticLinear": 0.08, "W8A8DynamicLinear": 0.02, "W8A16Linear": 0.015,
               "W4A4DynamicLinear": 0.25}

RECIPROCAL_REL = 0.012
TIGHT_ADDED_BIAS = {"W4A4DynamicLinear": 2.1}

FIXTURES = ["qwen3-tiny-w8a8", "qwen3-tiny-w8a8-dynamic", "qwen3-tiny-w8a16", "qwen3-tiny-w4a4-dynamic"]


def _input(layer, gen, rows=9):
    # static activations are calibrated: keep the input inside the calibrated range (mostly)
    return calibrated_input(layer, gen, rows)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fixture", FIXTURES)
def test_fixture_layer_matches_its_own_convention(fixture, kind, gen):
    for index in (0, 1):
        layer = fixture_layer(fixture, kind, layer=index)
        x = _input(layer, gen)
        out = layer(x)
        assert out.shape == (9, sum(layer.output_partition_sizes)) and out.dtype == torch.bfloat16
        scheme = type(layer.scheme).__name__
        path = msmodelslim_fixture(fixture)
        assert tight_error(out, layer_reference(path, kind, x, layer=index, npu_reciprocal=True)) <= TIGHT[scheme]
        assert rel_err(out, layer_reference(path, kind, x, layer=index)) <= (
            RECIPROCAL_REL if scheme == "W8A8StaticLinear" else 0.004)
        assert rel_err(out, original_reference(kind, x, layer=index)) <= VS_ORIGINAL[scheme]


def test_fixture_schemes_are_the_expected_ones():
    names = {f: {k: type(fixture_layer(f, k).scheme).__name__ for k in KINDS} for f in FIXTURES}
    assert set(names["qwen3-tiny-w8a8"].values()) == {"W8A8StaticLinear"}
    assert set(names["qwen3-tiny-w8a8-dynamic"].values()) == {"W8A8DynamicLinear"}
    assert set(names["qwen3-tiny-w8a16"].values()) == {"W8A16Linear"}
    assert names["qwen3-tiny-w4a4-dynamic"] == {"qkv_proj": "W8A8DynamicLinear", "gate_up_proj": "W4A4DynamicLinear",
                                                "o_proj": "W8A8DynamicLinear", "down_proj": "W8A8DynamicLinear"}


def test_3d_input_keeps_its_leading_dims(gen):
    layer = fixture_layer("qwen3-tiny-w8a8-dynamic", "gate_up_proj")
    x = torch.randn(2, 3, 128, generator=gen).to(torch.bfloat16)
    torch.testing.assert_close(layer(x), layer(x.reshape(6, 128)).reshape(2, 3, -1), rtol=0, atol=0)


# -- the tests above notice a wrong scale, offset sign or packing order ------------------------------

def _error_after(fixture, kind, gen, corrupt):
    layer = fixture_layer(fixture, kind)
    x = _input(layer, gen)
    ref = layer_reference(msmodelslim_fixture(fixture), kind, x, npu_reciprocal=True)
    assert tight_error(layer(x), ref) <= TIGHT[type(layer.scheme).__name__]
    corrupt(layer)
    return tight_error(layer(x), ref) / TIGHT[type(layer.scheme).__name__]


def test_a_wrong_scale_fails(gen):
    def one_channel_2_percent_off(layer):
        layer.weight_scale.data[5] *= 1.02

    def deq_scale_of_one_channel(layer):
        layer.deq_scale.data[7] *= 1.02

    assert _error_after("qwen3-tiny-w8a8-dynamic", "gate_up_proj", gen, one_channel_2_percent_off) > 2
    assert _error_after("qwen3-tiny-w8a8", "qkv_proj", gen, deq_scale_of_one_channel) > 2


def test_a_wrong_activation_offset_sign_fails(gen):
    def flip(layer):
        layer.input_offset.data.neg_()

    assert _error_after("qwen3-tiny-w8a8", "down_proj", gen, flip) > 2


def test_a_wrong_int4_packing_order_fails(gen):
    def reverse_nibbles(layer):  # element 7 - j where element j belongs
        values = unpack_int32_to_int4(layer.weight.data)
        layer.weight.data = pack_int4_to_int32(values.unflatten(-1, (-1, 8)).flip(-1).flatten(-2))

    assert _error_after("qwen3-tiny-w4a4-dynamic", "gate_up_proj", gen, reverse_nibbles) > 2


# -- W8A16 with a non-zero weight offset (the fixtures' offsets are all zero) -------------------------

@pytest.fixture(scope="module")
def asymmetric_w8a16(tmp_path_factory):
    gen = torch.Generator().manual_seed(1)
    return synthetic_qwen3(str(tmp_path_factory.mktemp("w8a16_asym")), "W8A16", gen, asymmetric=True)


@pytest.mark.parametrize("kind", KINDS)
def test_asymmetric_w8a16_pins_the_offset_sign(asymmetric_w8a16, kind, gen):
    layer = build_layer(asymmetric_w8a16, kind)
    # msModelSlim dequantizes (q - offset) * scale; the kernel computes (q + offset') * scale,
    # so the layer must hold offset' = -offset
    assert hasattr(layer, "weight_offset")
    x = _input(layer, gen)
    ref = layer_reference(asymmetric_w8a16, kind, x)
    assert tight_error(layer(x), ref) <= TIGHT["W8A16Linear"]
    layer.weight_offset.data.neg_()  # the other sign convention
    assert tight_error(layer(x), ref) > 10 * TIGHT["W8A16Linear"]


def test_asymmetric_w8a16_offset_really_is_asymmetric(asymmetric_w8a16):
    layer = build_layer(asymmetric_w8a16, "gate_up_proj", process=False)
    assert torch.count_nonzero(layer.weight_offset.data) > 0.9 * layer.weight_offset.numel()


@pytest.mark.parametrize("scheme", ["W8A8", "W8A8_DYNAMIC", "W8A16", "W4A4_DYNAMIC", "FLOAT"])
def test_float_bias_is_applied_once(tmp_path, scheme, gen):
    # anti-outlier smoothing gives projections a FLOAT bias; the reference adds it to the float math.
    # (W8A8 carries it folded into quant_bias, rounded to one accumulator step: below bf16 rounding.)
    folder = synthetic_qwen3(str(tmp_path), scheme, torch.Generator().manual_seed(8), float_bias=True)
    for kind in KINDS:
        layer = build_layer(folder, kind)
        x = _input(layer, gen)
        ref = layer_reference(folder, kind, x, npu_reciprocal=True)
        without = layer_reference(folder, kind, x, bias=False, npu_reciprocal=True)
        magnitude = without.abs() + (ref - without).abs()
        name = type(layer.scheme).__name__
        assert tight_error(layer(x), ref, magnitude) <= TIGHT_ADDED_BIAS.get(name, TIGHT[name]), kind
        assert tight_error(without, ref, magnitude) > 20
