"""A checkpoint's own float weights, by the producer's dequantization convention.

This is the reference `sgl-ascend verify` measures the served layers against when no bf16 model is
given, so it is written from the format description (msModelSlim: dq = (q - offset) * scale) or by the
producer's own library (compressed-tensors' unpack_from_int32 and dequantize), not from the schemes:
a scheme that loads or lays out a tensor wrongly then shows up as an error.
"""

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.ops.int4 import unpack_int8_pairs
from sgl_ascend.ops.scales import decode_int64_scale


def dequantize_modelslim(checkpoint, prefix: str, kind: str, legacy: bool = False) -> torch.Tensor:
    """Float32 [N, K] weight of the checkpoint layer `prefix` whose description type is `kind`."""

    def get(suffix):
        return checkpoint.get(f"{prefix}.{suffix}")

    def has(suffix):
        return f"{prefix}.{suffix}" in checkpoint

    weight = get("weight")
    if kind == "FLOAT":
        return weight.float()
    if kind == "W4A8_DYNAMIC":
        # current writers pack two int4 along the output dim; legacy writers store one per byte
        weight = weight if legacy else unpack_int8_pairs(weight, dim=0)
        if has("weight_scale_second"):  # group-wise: q * scale_second[n, k // g] * scale[n]
            second = get("weight_scale_second").float()
            group = weight.shape[1] // second.shape[1]
            weight = weight.float() * second.repeat_interleave(group, dim=1)
    if kind == "W8A8" and not has("weight_scale"):
        # deq_scale = input_scale * weight_scale (int64 carrying fp32 bits for fp16 models)
        scale = decode_int64_scale(get("deq_scale")).float().reshape(-1, 1) / get("input_scale").float()
        return weight.float() * scale
    # W8A8_MIX carries weight_scale / weight_offset beside its static tensors: the same weight either way
    if kind == "W4A4_FLATQUANT_DYNAMIC":
        return _flatquant_weight(get, has, dequantize_modelslim(checkpoint, prefix, "W4A4_DYNAMIC"))
    if kind not in ("W8A8", "W8A8_DYNAMIC", "W8A8_MIX", "W8A16", "W4A4_DYNAMIC", "W4A8_DYNAMIC"):
        raise CheckpointError(f"verify cannot dequantize scheme {kind}", tensor=f"{prefix}.weight")
    values = weight.float()  # in place from here: verify dequantizes layers of hundreds of MiB
    # [N, 1] per channel, or [N, K / g] per group (W8A16 / W8A8_DYNAMIC / W4A4_DYNAMIC): as [N, G, 1] against
    # the weight viewed [N, G, K / G], so both are one broadcast, in place
    scale = get("weight_scale").float().reshape(values.shape[0], -1, 1)
    grouped = values.view(values.shape[0], scale.shape[1], -1)
    if has("weight_offset"):
        grouped -= get("weight_offset").float().reshape(scale.shape)
    grouped.mul_(scale)
    return values


def _flatquant_weight(get, has, weight: torch.Tensor) -> torch.Tensor:
    """FlatQuant serves x -> x @ kron(left, right) (msModelSlim's FlatQuantOnlineWrapper._apply_flat: x @ right,
    then left^T on the [L, R] view), then the W4A4 weight: the layer's float weight is W @ kron(left, right)^T.
    A layer without right_trans (o_proj) has the identity there."""
    left = get("left_trans").double()
    k = weight.shape[1]
    right = get("right_trans").double() if has("right_trans") else torch.eye(k // left.shape[0], dtype=torch.float64)
    if left.shape[0] * right.shape[0] != k:
        raise CheckpointError(f"left_trans {tuple(left.shape)} and right_trans {tuple(right.shape)} do not multiply to "
                              f"the weight's input size {k}", tensor="left_trans")
    # (W @ kron(L, R)^T) row by row is each [L, R] weight row mapped by L @ row @ R^T: no K x K matrix
    rows = weight.double().view(-1, left.shape[0], right.shape[0])
    return (left @ rows @ right.t()).reshape(weight.shape).float()


def dequantize_compressed_tensors(checkpoint, prefix: str, args) -> torch.Tensor:
    """Float32 [N, K] weight of a compressed-tensors layer, by the library (None args: not quantized)."""
    from compressed_tensors.compressors import unpack_from_int32
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    if args is None:
        return checkpoint.get(f"{prefix}.weight").float()
    zero_point = None
    if f"{prefix}.weight_packed" in checkpoint:
        shape = torch.Size(checkpoint.get(f"{prefix}.weight_shape").tolist())
        values = unpack_from_int32(checkpoint.get(f"{prefix}.weight_packed"), args.weights.num_bits, shape)
        if f"{prefix}.weight_zero_point" in checkpoint:
            packed_zp = checkpoint.get(f"{prefix}.weight_zero_point")
            zp_shape = torch.Size([shape[0], packed_zp.shape[1]])
            zero_point = unpack_from_int32(packed_zp, args.weights.num_bits, zp_shape, packed_dim=0)
    else:
        values = checkpoint.get(f"{prefix}.weight")
        if f"{prefix}.weight_zero_point" in checkpoint:
            zero_point = checkpoint.get(f"{prefix}.weight_zero_point")
    scale = checkpoint.get(f"{prefix}.weight_scale").float()
    return dequantize(values.float(), scale, zero_point, args.weights, dtype=torch.float32)
