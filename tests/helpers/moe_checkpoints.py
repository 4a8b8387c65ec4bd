"""Tiny MoE checkpoints written for the expert tests: compressed-tensors W4A8 experts through the
library itself (calculate_qparams + PackedQuantizationCompressor), msModelSlim W4A4 experts (one int4
value per byte, range [-7, 7] as the tool writes), and rewritten copies of the msModelSlim fixtures."""


import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams

from helpers.common import msmodelslim_fixture, rewrite_modelslim
from sgl_ascend.layers.moe import build_moe, moe_method_for_compressed_tensors
from sgl_ascend.ops.scales import encode_fp32_as_int64
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint
from sgl_ascend.testing import synthetic

PREFIX = "model.layers.0.mlp"
E, H, I = 4, 128, 64
SCHEME = QuantizationScheme(
    targets=["re:.*mlp\\.experts\\..*"],
    weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="channel"),
    input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True))
GROUP = 32
GROUP_SCHEME = SCHEME.model_copy(update={"weights": QuantizationArgs(num_bits=4, type="int", symmetric=True,
                                                                     strategy="group", group_size=GROUP)})


def _observe(w, scheme):
    if scheme.weights.strategy == "group":  # min-max per group of GROUP input channels
        grouped = w.reshape(w.shape[0], -1, GROUP)
        return grouped.amin(dim=-1), grouped.amax(dim=-1)
    return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)


def make_checkpoint(path, gen, clip=False, alpha=1.0, int64_scales=False, extra=True, scheme=SCHEME):
    """Returns (quantization_config dict, experts [(gate, up, down) dequantized], residuals or None).

    Clip files: bias = 8 * sum_k(deq) (the kernel correction) + an extra offset when `extra`."""
    tensors, experts, residuals = {}, [], []
    for e in range(E):
        deq = []
        for proj, (n, k) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            w = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)
            scale, zp = calculate_qparams(*_observe(w, scheme), scheme.weights)
            sd = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp},
                                                       scheme)
            # the library's dequantization, kept in fp32 (in bf16 it would round q * scale)
            fp32 = dict(sd, weight_scale=sd["weight_scale"].float())
            deq.append(PackedQuantizationCompressor.decompress(fp32, scheme)["weight"].float())
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
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                 ignore=["lm_head"]).model_dump(exclude_none=True)
    qconfig["config_groups"]["group_0"]["activation_use_clip"] = clip
    synthetic.write_ct_folder(str(path), tensors, qconfig)
    return qconfig, experts, residuals if clip else None


def w4a4_checkpoint(path, gen, num_experts=4, hidden=128, inter=64):
    tensors, description, experts = {}, {"version": "1.0.0", "group_size": 0}, []
    for e in range(num_experts):
        deq = []
        for proj, (n, k) in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
            w = torch.randn(n, k, generator=gen) * 0.05
            scale = w.abs().amax(dim=1, keepdim=True) / 7
            q = torch.round(w / scale).clamp(-7, 7).to(torch.int8)
            name = f"{PREFIX}.experts.{e}.{proj}"
            tensors.update({f"{name}.weight": q, f"{name}.weight_scale": scale,
                            f"{name}.weight_offset": torch.zeros_like(scale)})
            description.update({f"{name}.{s}": "W4A4_DYNAMIC" for s in ("weight", "weight_scale", "weight_offset")})
            deq.append(q.float() * scale)
        experts.append(tuple(deq))
    synthetic.write_modelslim_folder(str(path), tensors, description, indexed=False)
    return experts


def copy_fixture(tmp_path, fixture, rewrite, description_edit=None):
    """A copy of a fixture with some tensors rewritten (name -> tensor or None to drop)."""
    return rewrite_modelslim(msmodelslim_fixture(fixture), str(tmp_path / fixture), rewrite, description_edit)


def w4a8_clip_copy(src: str, dst: str, int64_scales: bool = False) -> str:
    """The per-channel W4A8 msModelSlim checkpoint at `src` in activation-clip form: no scale_bias;
    expert bias = the kernel correction (scale_bias summed over its K-slices); down alpha = 1; with
    `int64_scales` the expert weight_scale as int64 fp32 bits (upstream creates its clip scale
    parameters int64)."""
    ckpt = SafetensorsCheckpoint(src)

    def rewrite(name, t):
        if ".experts." not in name:
            return t
        if name.endswith(".scale_bias"):
            return None
        return encode_fp32_as_int64(t) if int64_scales and name.endswith(".weight_scale") else t

    extra = {}
    for name in ckpt.names():
        if ".experts." in name and name.endswith(".scale_bias"):
            extra[name.replace(".scale_bias", ".bias")] = ckpt.get(name).float().sum(dim=-1)
            if ".down_proj." in name:
                extra[name.replace(".scale_bias", ".alpha")] = torch.ones(1)

    def description(d):
        for name in list(d):
            if ".experts." in name and name.endswith(".scale_bias"):
                del d[name]
                d[name.replace(".scale_bias", ".bias")] = "W4A8_DYNAMIC"
                if ".down_proj." in name:
                    d[name.replace(".scale_bias", ".alpha")] = "W4A8_DYNAMIC"

    return rewrite_modelslim(src, dst, rewrite, description, extra)


W8A8_SCHEME = QuantizationScheme(
    targets=["re:.*mlp\\.experts\\..*"],
    weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel"),
    input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True))


def ct_w8a8_dynamic_checkpoint(path, gen):
    """compressed-tensors W8A8 dynamic experts written by the library's int-quantized compressor (bf16
    weight_scale [N, 1], no zero point). Returns (quantization_config dict, experts [(gate, up, down)] as the
    library's own decompress gives them, in fp32)."""
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor

    tensors, experts = {}, []
    for e in range(E):
        deq = []
        for proj, (n, k) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            w = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)
            scale, zp = calculate_qparams(*_observe(w, W8A8_SCHEME), W8A8_SCHEME.weights)
            sd = IntQuantizationCompressor.compress({"weight": w, "weight_scale": scale.to(torch.bfloat16),
                                                     "weight_zero_point": zp}, W8A8_SCHEME)
            fp32 = dict(sd, weight_scale=sd["weight_scale"].float())
            deq.append(IntQuantizationCompressor.decompress(fp32, W8A8_SCHEME)["weight"].float())
            for key, value in sd.items():
                tensors[f"{PREFIX}.experts.{e}.{proj}.{key}"] = value
        experts.append(tuple(deq))
    qconfig = QuantizationConfig(config_groups={"group_0": W8A8_SCHEME}, format="int-quantized",
                                 ignore=["lm_head"]).model_dump(exclude_none=True)
    synthetic.write_ct_folder(str(path), tensors, qconfig)
    return qconfig, experts


def w4a16_scheme(group_size=GROUP, symmetric=True, **weights) -> QuantizationScheme:
    """compressed-tensors W4A16 experts (llm-compressor's W4A16 preset on the experts): int4 weights per group of
    `group_size` (0: per channel), no activation quantization."""
    strategy = {"strategy": "group", "group_size": group_size} if group_size else {"strategy": "channel"}
    return QuantizationScheme(targets=["re:.*mlp\\.experts\\..*"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=symmetric, **strategy, **weights))


def ct_w4a16_checkpoint(path, gen, scheme=None):
    """compressed-tensors W4A16 experts written by the library's pack-quantized compressor (weight_packed, bf16
    weight_scale, weight_shape and, asymmetric, packed weight_zero_point). Returns (quantization_config dict,
    experts [(gate, up, down)] as the library's own decompress gives them, in fp32)."""
    scheme = scheme or w4a16_scheme()
    tensors, experts = {}, []
    for e in range(E):
        deq = []
        for proj, (n, k) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            w = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)
            if scheme.weights.strategy == "group":
                grouped = w.reshape(n, -1, scheme.weights.group_size)
                lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
            else:
                lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
            scale, zp = calculate_qparams(lo, hi, scheme.weights)
            sd = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp},
                                                       scheme)
            fp32 = dict(sd, weight_scale=sd["weight_scale"].float())
            deq.append(PackedQuantizationCompressor.decompress(fp32, scheme)["weight"].float())
            for key, value in sd.items():
                tensors[f"{PREFIX}.experts.{e}.{proj}.{key}"] = value
        experts.append(tuple(deq))
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                 ignore=["lm_head"]).model_dump(exclude_none=True)
    synthetic.write_ct_folder(str(path), tensors, qconfig)
    return qconfig, experts


def run_ct_experts(qconfig, ckpt, x, w, ids, tp, ep, dtype=torch.bfloat16):
    """A compressed-tensors expert block built from `ckpt` once per rank of tp (or ep) and run on the same
    routed tokens: (the ranks' outputs summed in fp32, as the all-reduce does; the last rank's layer)."""
    total = None
    for rank in range(max(tp, ep)):
        layer = build_moe(moe_method_for_compressed_tensors(qconfig, PREFIX, dtype), ckpt, PREFIX, num_experts=E,
                          hidden_size=H, intermediate_size=I, tp_rank=rank if tp > 1 else 0, tp_size=tp,
                          ep_rank=rank if ep > 1 else 0, ep_size=ep, params_dtype=dtype)
        out = layer(x, w, ids).float()
        total = out if total is None else total + out
    return total, layer
