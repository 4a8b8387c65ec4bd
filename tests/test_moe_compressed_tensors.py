"""compressed-tensors W4A8 experts, checkpoints written with the compressed-tensors library itself
(calculate_qparams + PackedQuantizationCompressor), per channel with and without activation-clip
tensors, and per group of 32 (group scales straight into the kernel's int64 [K/g, N] slots).

Reference: the library's own decompress() of every expert weight (in fp32), per-token int8
fake-quant of activations, bf16 hand-offs as the layer makes them (tests/helpers/moe_reference.py), plus,
for clip files, the documented meaning of w13_bias / w2_bias: whatever they add beyond the kernel
correction 8 * sum_k(deq) is an offset in units of the token's activation scale. Tolerance 2e-3.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.common import rel_err
from helpers.moe_checkpoints import E, GROUP, GROUP_SCHEME, H, I, PREFIX, make_checkpoint
from helpers.moe_reference import moe_reference, routing
from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.moe import build_moe, moe_method_for_compressed_tensors
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint

def _run(qconfig, ckpt, x, w, ids, tp, ep):
    total = None
    for rank in range(max(tp, ep)):
        layer = build_moe(moe_method_for_compressed_tensors(qconfig, PREFIX), ckpt, PREFIX, num_experts=E,
                          hidden_size=H, intermediate_size=I, tp_rank=rank if tp > 1 else 0, tp_size=tp,
                          ep_rank=rank if ep > 1 else 0, ep_size=ep)
        out = layer(x, w, ids).float()
        total = out if total is None else total + out
    return total, layer


@pytest.mark.parametrize("clip,int64_scales,extra", [(False, False, False), (True, False, True),
                                                     (True, True, True), (True, False, False)])
def test_ct_w4a8_experts_match_reference(tmp_path, gen, clip, int64_scales, extra):
    qconfig, experts, residuals = make_checkpoint(tmp_path, gen, clip=clip, int64_scales=int64_scales, extra=extra)
    ckpt = SafetensorsCheckpoint(str(tmp_path))
    method = moe_method_for_compressed_tensors(qconfig, PREFIX)
    assert (method.w13.fmt, method.w13.clip) == ("compressed_tensors", clip)
    x = torch.randn(16, H, generator=gen).to(torch.bfloat16)
    w, ids = routing(16, E, 2, gen)
    # an extra down offset cannot be split across tp ranks (see w4a8_dynamic.py): tp=2 only without
    for tp, ep in [(1, 1), (1, 2)] + ([] if extra else [(2, 1)]):
        out, layer = _run(qconfig, ckpt, x, w, ids, tp, ep)
        ref = moe_reference(x, w, ids, experts, tp=tp, ep=ep, residuals=residuals)
        assert rel_err(out, ref) <= 2e-3, (tp, ep)
        assert layer.resident_bytes() == layer.moe_method.theoretical_bytes(layer.num_local_experts, H, I // tp)
    if clip:
        assert not hasattr(layer, "w2_alpha")  # checked to be 1 while loading, never stored


def test_clip_down_offset_under_tp_is_rejected(tmp_path, gen):
    qconfig, _, _ = make_checkpoint(tmp_path, gen, clip=True, extra=True)
    with pytest.raises(CheckpointError, match="w2_bias differs from the kernel correction.*moe tp 1"):
        build_moe(moe_method_for_compressed_tensors(qconfig, PREFIX), SafetensorsCheckpoint(str(tmp_path)), PREFIX,
                  num_experts=E, hidden_size=H, intermediate_size=I, tp_rank=1, tp_size=2)


def test_w2_alpha_other_than_one_is_rejected(tmp_path, gen):
    qconfig, _, _ = make_checkpoint(tmp_path, gen, clip=True, alpha=0.5)
    with pytest.raises(CheckpointError, match="down_proj.alpha: w2_alpha = \\[0.5\\]"):
        build_moe(moe_method_for_compressed_tensors(qconfig, PREFIX), SafetensorsCheckpoint(str(tmp_path)), PREFIX,
                  num_experts=E, hidden_size=H, intermediate_size=I)


def test_ct_group_wise_w4a8_experts_match_reference(tmp_path, gen):
    """Group-wise (g = 32) experts at tp 1, 2 and ep 2; the correction 8 * sum_k deq_w is derived per
    rank from the group-scaled weights. Break-proof: group scales in the wrong K order."""
    qconfig, experts, _ = make_checkpoint(tmp_path, gen, scheme=GROUP_SCHEME)
    ckpt = SafetensorsCheckpoint(str(tmp_path))
    method = moe_method_for_compressed_tensors(qconfig, PREFIX)
    assert (method.w13.fmt, method.w13.group_size, method.w2.group_size) == ("compressed_tensors", GROUP, GROUP)
    x = torch.randn(16, H, generator=gen).to(torch.bfloat16)
    w, ids = routing(16, E, 2, gen)
    for tp, ep in [(1, 1), (2, 1), (1, 2)]:
        out, layer = _run(qconfig, ckpt, x, w, ids, tp, ep)
        ref = moe_reference(x, w, ids, experts, tp=tp, ep=ep)
        assert rel_err(out, ref) <= 2e-3, (tp, ep)
        local = layer.num_local_experts
        assert layer.w13_weight_scale.shape == (local, H // GROUP, 2 * I // tp)
        assert layer.w2_weight_scale.shape == (local, I // tp // GROUP, H)
        assert layer.resident_bytes() == layer.moe_method.theoretical_bytes(local, H, I // tp)
    layer, ref = _run(qconfig, ckpt, x, w, ids, 1, 1)[1], moe_reference(x, w, ids, experts)
    layer.w13_weight_scale.data = layer.w13_weight_scale.data.flip(1)  # groups of K in the wrong order
    assert rel_err(layer(x, w, ids), ref) > 50 * 2e-3
    layer = _run(qconfig, ckpt, x, w, ids, 1, 1)[1]
    layer.w2_scale_bias.data.zero_()  # no kernel correction on down
    assert rel_err(layer(x, w, ids), ref) > 50 * 2e-3


def test_ct_group_wise_w4a8_experts_bad_inputs(tmp_path, gen):
    qconfig, _, _ = make_checkpoint(tmp_path, gen, scheme=GROUP_SCHEME)
    ckpt = SafetensorsCheckpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="splits down_proj's input 64 into 16, which group size 32"):
        build_moe(moe_method_for_compressed_tensors(qconfig, PREFIX), ckpt, PREFIX, num_experts=E, hidden_size=H,
                  intermediate_size=I, tp_rank=0, tp_size=4)
    # a per-channel scale where the config says group-wise
    name = f"{PREFIX}.experts.2.up_proj.weight_scale"
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors[name] = tensors[name][:, :1].contiguous()
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape \[64, 1\] where \[64, 4\] is expected") as info:
        build_moe(moe_method_for_compressed_tensors(qconfig, PREFIX), SafetensorsCheckpoint(str(bad)), PREFIX,
                  num_experts=E, hidden_size=H, intermediate_size=I)
    assert name in str(info.value) and info.value.file.endswith("model.safetensors")
    clip = json.loads(json.dumps(qconfig))
    clip["config_groups"]["group_0"]["activation_use_clip"] = True
    with pytest.raises(CheckpointError, match="activation-clip W4A8 experts are per-channel"):
        moe_method_for_compressed_tensors(clip, PREFIX)
