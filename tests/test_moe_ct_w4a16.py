"""compressed-tensors W4A16 experts (int4 weight-only, pack-quantized), on checkpoints the compressed-tensors
library writes itself (calculate_qparams + PackedQuantizationCompressor): per group of 32 and per channel,
symmetric and asymmetric, at tp 1, tp 2 and ep 2.

Reference: the library's own decompress() of every expert weight (fp32), activations unquantized, the layer's
bf16 hand-offs (grouped-matmul outputs, SwiGLU output, each rank's result; tests/helpers/moe_reference.py).
Tolerance 2e-3 norm-relative: the scales and zero points are bf16 in the file and held in bf16, so what is
left is the bf16 rounding of the hand-offs the reference models in a different order (measured <= 1e-5).
"""

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.common import rel_err
from helpers.moe_checkpoints import E, GROUP, H, I, PREFIX, ct_w4a16_checkpoint, run_ct_experts, w4a16_scheme
from helpers.moe_reference import moe_reference, routing
from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.moe import build_moe, moe_method_for_compressed_tensors
from sgl_ascend.layers.moe.ct_w4a16 import CTW4A16Experts
from sgl_ascend.layers.registry import served_table
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint

TOLERANCE = 2e-3
SCHEMES = {"group": w4a16_scheme(GROUP), "channel": w4a16_scheme(0),
           "group-asym": w4a16_scheme(GROUP, symmetric=False), "channel-asym": w4a16_scheme(0, symmetric=False)}


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_ct_w4a16_experts_match_the_library(tmp_path, gen, name):
    scheme = SCHEMES[name]
    qconfig, experts = ct_w4a16_checkpoint(tmp_path, gen, scheme)
    ckpt = SafetensorsCheckpoint(str(tmp_path))
    method = moe_method_for_compressed_tensors(qconfig, PREFIX)
    assert isinstance(method.w13, CTW4A16Experts) and isinstance(method.w2, CTW4A16Experts)
    x = torch.randn(16, H, generator=gen).to(torch.bfloat16)
    w, ids = routing(16, E, 2, gen)
    group = scheme.weights.group_size or 0
    for tp, ep in [(1, 1), (2, 1), (1, 2)]:
        out, layer = run_ct_experts(qconfig, ckpt, x, w, ids, tp, ep)
        ref = moe_reference(x, w, ids, experts, act_bits=(None, None), tp=tp, ep=ep)
        assert rel_err(out, ref) <= TOLERANCE, (tp, ep, rel_err(out, ref))
        local = layer.num_local_experts
        # every weight once, in its kernel layout; scale and offset in the model dtype
        assert {n: (tuple(p.shape), p.dtype) for n, p in layer.named_parameters()} == {
            "w13_weight": ((local, H, 2 * I // tp // 8), torch.int32),
            "w2_weight": ((local, I // tp, H // 8), torch.int32),
            **{f"w13_weight_{s}": ((local, H // group, 2 * I // tp) if group else (local, 2 * I // tp), torch.bfloat16)
               for s in ("scale", "offset")},
            **{f"w2_weight_{s}": ((local, I // tp // group, H) if group else (local, H), torch.bfloat16)
               for s in ("scale", "offset")}}
        assert layer.resident_bytes() == layer.moe_method.theoretical_bytes(local, H, I // tp)
    if not scheme.weights.symmetric:  # the zero points matter: dropping them changes the output
        layer = run_ct_experts(qconfig, ckpt, x, w, ids, 1, 1)[1]
        assert layer.w13_weight_offset.abs().sum() > 0
        layer.w13_weight_offset.data.zero_()
        assert rel_err(layer(x, w, ids), moe_reference(x, w, ids, experts, act_bits=(None, None))) > 10 * TOLERANCE


def test_group_scales_in_the_wrong_k_order_are_caught(tmp_path, gen):
    qconfig, experts = ct_w4a16_checkpoint(tmp_path, gen)
    x = torch.randn(16, H, generator=gen).to(torch.bfloat16)
    w, ids = routing(16, E, 2, gen)
    layer = run_ct_experts(qconfig, SafetensorsCheckpoint(str(tmp_path)), x, w, ids, 1, 1)[1]
    layer.w13_weight_scale.data = layer.w13_weight_scale.data.flip(1)
    assert rel_err(layer(x, w, ids), moe_reference(x, w, ids, experts, act_bits=(None, None))) > 10 * TOLERANCE


def test_fp16_model(tmp_path, gen):
    """An fp16 model holds fp16 scales (the kernel takes antiquant_scale in x's dtype; bf16 file scales of this
    size convert exactly up to fp16's 11-bit significand)."""
    qconfig, experts = ct_w4a16_checkpoint(tmp_path, gen)
    x = torch.randn(16, H, generator=gen).to(torch.float16)
    w, ids = routing(16, E, 2, gen)
    out, layer = run_ct_experts(qconfig, SafetensorsCheckpoint(str(tmp_path)), x, w, ids, 1, 1, torch.float16)
    assert layer.w13_weight_scale.dtype == torch.float16 and layer.w2_weight_offset.dtype == torch.float16
    ref = moe_reference(x, w, ids, experts, act_bits=(None, None), dtype=torch.float16)
    assert rel_err(out, ref) <= TOLERANCE, rel_err(out, ref)
    assert layer.resident_bytes() == layer.moe_method.theoretical_bytes(E, H, I)


def test_refusals(tmp_path, gen):
    qconfig, _ = ct_w4a16_checkpoint(tmp_path, gen)
    for order in ("group", "dynamic"):  # weight_g_idx permutes K per group: the library's schema refuses it
        bad = {**qconfig, "config_groups": {"group_0": {**qconfig["config_groups"]["group_0"]}}}
        bad["config_groups"]["group_0"]["weights"] = {**bad["config_groups"]["group_0"]["weights"], "actorder": order}
        with pytest.raises(CheckpointError, match=f"actorder='{order}' has been removed. Consider using actorder='weight'"):
            moe_method_for_compressed_tensors(bad, PREFIX)
    ordered = {**qconfig, "config_groups": {"group_0": {**qconfig["config_groups"]["group_0"]}}}
    ordered["config_groups"]["group_0"]["weights"] = {**ordered["config_groups"]["group_0"]["weights"],
                                                      "actorder": "weight"}
    assert isinstance(moe_method_for_compressed_tensors(ordered, PREFIX).w13, CTW4A16Experts)  # same storage
    unpacked = {**qconfig, "format": "int-quantized"}
    with pytest.raises(CheckpointError, match="weight-only int4 group \\(int-quantized\\) are not served.*pack-quant"):
        moe_method_for_compressed_tensors(unpacked, PREFIX)
    w8 = {**qconfig, "config_groups": {"group_0": {**qconfig["config_groups"]["group_0"]}}}
    w8["config_groups"]["group_0"]["weights"] = {**w8["config_groups"]["group_0"]["weights"], "num_bits": 8}
    with pytest.raises(CheckpointError, match="weight-only int8 group"):
        moe_method_for_compressed_tensors(w8, PREFIX)
    ckpt = SafetensorsCheckpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="splits down_proj's input 64 into 16, which group size 32"):
        build_moe(moe_method_for_compressed_tensors(qconfig, PREFIX), ckpt, PREFIX, num_experts=E, hidden_size=H,
                  intermediate_size=I, tp_rank=0, tp_size=4)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        moe_method_for_compressed_tensors(qconfig, PREFIX, torch.float32)


def test_a_file_that_disagrees_with_its_config_names_the_tensor(tmp_path, gen):
    qconfig, _ = ct_w4a16_checkpoint(tmp_path, gen)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = f"{PREFIX}.experts.1.down_proj.weight_scale"
    tensors[name] = tensors[name][:, :1].contiguous()  # per channel where the config says groups of 32
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape \[128, 1\] where \[128, 2\] is expected") as info:
        build_moe(moe_method_for_compressed_tensors(qconfig, PREFIX), SafetensorsCheckpoint(str(bad)), PREFIX,
                  num_experts=E, hidden_size=H, intermediate_size=I)
    assert name in str(info.value)


def test_the_contract_requires_what_the_kernel_takes(tmp_path, gen):
    """int4 weight-only grouped matmul: an offset is passed (both upstreams do), G divides K."""
    from sgl_ascend.ops import ops
    from sgl_ascend.ops.contract import NpuContractError

    x = torch.randn(4, 64).to(torch.bfloat16)
    weight = torch.zeros(2, 64, 2, dtype=torch.int32)
    scale = torch.ones(2, 2, 16, dtype=torch.bfloat16)
    counts = torch.tensor([2, 2])
    kw = dict(split_item=2, group_type=0, group_list=counts, group_list_type=1, output_dtype=torch.bfloat16)
    ops.npu_grouped_matmul([x], [weight], antiquant_scale=[scale], antiquant_offset=[torch.zeros_like(scale)], **kw)
    with pytest.raises(NpuContractError, match="takes an antiquant_offset"):
        ops.npu_grouped_matmul([x], [weight], antiquant_scale=[scale], **kw)
    odd = torch.ones(2, 3, 16, dtype=torch.bfloat16)
    with pytest.raises(NpuContractError, match="G=3 must divide K=64"):
        ops.npu_grouped_matmul([x], [weight], antiquant_scale=[odd], antiquant_offset=[torch.zeros_like(odd)], **kw)
    with pytest.raises(NpuContractError, match="antiquant_offset must have antiquant_scale's dtype"):
        ops.npu_grouped_matmul([x], [weight], antiquant_scale=[scale], antiquant_offset=[scale.float()], **kw)


def test_scheme_listing_shows_it():
    assert ("compressed-tensors", "experts", "WNA16", "CTW4A16Experts") in served_table()
