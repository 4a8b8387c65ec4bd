"""compressed-tensors W4A8 experts, checkpoints written with the compressed-tensors library itself
(calculate_qparams + PackedQuantizationCompressor), with and without activation-clip tensors.

Reference: the library's own decompress() of every expert weight (in fp32), per-token int8
fake-quant of activations, bf16 hand-offs as the layer makes them (tests/moe_reference.py), plus,
for clip files, the documented meaning of w13_bias / w2_bias: whatever they add beyond the kernel
correction 8 * sum_k(deq) is an offset in units of the token's activation scale. Tolerance 2e-3.
"""

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import save_file

from conftest import rel_err
from moe_reference import moe_reference, routing
from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.moe import build_moe, moe_method_for_compressed_tensors
from sgl_ascend.ops.scales import encode_fp32_as_int64
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint

PREFIX = "model.layers.0.mlp"
E, H, I = 4, 128, 64
SCHEME = QuantizationScheme(
    targets=["re:.*mlp\\.experts\\..*"],
    weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="channel"),
    input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True))


def make_checkpoint(path, gen, clip=False, alpha=1.0, int64_scales=False, extra=True):
    """Returns (quantization_config dict, experts [(gate, up, down) dequantized], residuals or None).

    Clip files: bias = 8 * sum_k(deq) (the kernel correction) + an extra offset when `extra`."""
    tensors, experts, residuals = {}, [], []
    for e in range(E):
        deq = []
        for proj, (n, k) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            w = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)
            scale, zp = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), SCHEME.weights)
            sd = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp},
                                                       SCHEME)
            # the library's dequantization, kept in fp32 (in bf16 it would round q * scale)
            fp32 = dict(sd, weight_scale=sd["weight_scale"].float())
            deq.append(PackedQuantizationCompressor.decompress(fp32, SCHEME)["weight"].float())
            name = f"{PREFIX}.experts.{e}.{proj}"
            for key, value in sd.items():
                tensors[f"{name}.{key}"] = value
            if clip:
                if int64_scales:
                    tensors[f"{name}.weight_scale"] = encode_fp32_as_int64(sd["weight_scale"].float())
                offset = torch.randn(n, generator=gen) * (0.5 if extra else 0.0)
                tensors[f"{name}.bias"] = 8 * deq[-1].sum(dim=1) + offset
                deq[-1] = (deq[-1], offset)
        if clip:
            tensors[f"{PREFIX}.experts.{e}.down_proj.alpha"] = torch.tensor([alpha])
            down_extra = deq[2][1].unsqueeze(1).expand(-1, 16) / 16  # as 16 K-slices, summed by the reference
            residuals.append((torch.cat([deq[0][1], deq[1][1]]), down_extra))
            deq = [d[0] for d in deq]
        experts.append(tuple(deq))
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    qconfig = QuantizationConfig(config_groups={"group_0": SCHEME}, format="pack-quantized",
                                 ignore=["lm_head"]).model_dump(exclude_none=True)
    qconfig["config_groups"]["group_0"]["activation_use_clip"] = clip
    (path / "config.json").write_text(json.dumps({"quantization_config": qconfig}))
    return qconfig, experts, residuals if clip else None


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
