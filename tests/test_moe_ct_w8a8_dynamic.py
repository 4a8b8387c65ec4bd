"""compressed-tensors W8A8 dynamic experts (int8 per-channel weights, per-token int8 activations), on
checkpoints the compressed-tensors library writes itself (IntQuantizationCompressor, int-quantized).

Reference: the library's own decompress() of every expert weight (fp32), per-token int8 fake-quant of the
activations and the layer's bf16 hand-offs (tests/helpers/moe_reference.py), as for the msModelSlim
W8A8_DYNAMIC experts. Tolerance 1e-2 norm-relative (the scale is held in bf16 for the bf16 grouped matmul:
the library writes it in bf16 already, so no extra rounding); measured below.
"""

import pytest
import torch

from helpers.common import rel_err
from helpers.moe_checkpoints import E, H, I, PREFIX, ct_w8a8_dynamic_checkpoint, run_ct_experts
from helpers.moe_reference import moe_reference, routing
from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.moe import moe_method_for_compressed_tensors
from sgl_ascend.layers.moe.ct_w8a8_dynamic import CTW8A8DynamicExperts
from sgl_ascend.layers.registry import served_table
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint

TOLERANCE = 1e-2


def test_ct_w8a8_dynamic_experts_match_the_library(tmp_path, gen):
    qconfig, experts = ct_w8a8_dynamic_checkpoint(tmp_path, gen)
    ckpt = SafetensorsCheckpoint(str(tmp_path))
    method = moe_method_for_compressed_tensors(qconfig, PREFIX)
    assert isinstance(method.w13, CTW8A8DynamicExperts) and isinstance(method.w2, CTW8A8DynamicExperts)
    x = torch.randn(16, H, generator=gen).to(torch.bfloat16)
    w, ids = routing(16, E, 2, gen)
    for tp, ep in [(1, 1), (2, 1), (1, 2)]:
        out, layer = run_ct_experts(qconfig, ckpt, x, w, ids, tp, ep)
        ref = moe_reference(x, w, ids, experts, tp=tp, ep=ep)
        assert rel_err(out, ref) <= TOLERANCE, (tp, ep, rel_err(out, ref))
        assert layer.resident_bytes() == layer.moe_method.theoretical_bytes(layer.num_local_experts, H, I // tp)
        assert {name for name, _ in layer.named_parameters()} == {"w13_weight", "w13_weight_scale", "w2_weight",
                                                                  "w2_weight_scale"}


def test_fp16_model_holds_an_fp32_scale(tmp_path, gen):
    # the per-token grouped matmul takes an fp32 scale for fp16 output (bf16 scale: bf16 output only)
    qconfig, experts = ct_w8a8_dynamic_checkpoint(tmp_path, gen)
    x = torch.randn(16, H, generator=gen).to(torch.float16)
    w, ids = routing(16, E, 2, gen)
    out, layer = run_ct_experts(qconfig, SafetensorsCheckpoint(str(tmp_path)), x, w, ids, 1, 1, torch.float16)
    assert layer.w13_weight_scale.dtype == torch.float32 and layer.w2_weight_scale.dtype == torch.float32
    ref = moe_reference(x, w, ids, experts, dtype=torch.float16)
    assert rel_err(out, ref) <= TOLERANCE, rel_err(out, ref)
    assert layer.resident_bytes() == layer.moe_method.theoretical_bytes(layer.num_local_experts, H, I)


def test_per_tensor_weights_are_refused(tmp_path, gen):
    qconfig, _ = ct_w8a8_dynamic_checkpoint(tmp_path, gen)
    qconfig["config_groups"]["group_0"]["weights"]["strategy"] = "tensor"
    with pytest.raises(CheckpointError, match="W8A8 dynamic with tensor weights are not served"):
        moe_method_for_compressed_tensors(qconfig, PREFIX)


def test_scheme_listing_shows_it():
    assert ("compressed-tensors", "experts", "W8A8_DYNAMIC", "CTW8A8DynamicExperts") in served_table()
