"""The W4A8 grouped-matmul conventions of the W4A8 experts, and the dense W4A8 linears' kernel.

Dense W4A8 linears (msModelSlim W4A8_DYNAMIC, compressed-tensors W4A8) do not run on the grouped
matmul: a dense layer would be a single group, and npu_grouped_matmul's documentation forbids a
counts group_list of length 1 (and a group_list built per call breaks graph capture). They run as
vllm-ascend's AscendW4A8DynamicLinearMethod does, on npu_weight_quant_batchmatmul with the int4
weight packed eight per int32 [K, N/8] and the dequantization scale (channel scale times group scale)
in the activation dtype: `install_w4a8_weight_only` / `apply_w4a8_weight_only` below.

Expert kernel operands (per expert): weight int32 [K, N/8], eight signed int4
along N; weight scale int64 carrying fp32 bits, [N] per channel or [K/g, N] per group of g rows of K
(the group's scale times the channel's); bias fp32 [N]. The kernel accumulates (x_q - 8) @ q (see
the grouped-matmul twin), so the bias must carry the correction 8 * sum_k deq_w over the K the
kernel sees (the rank's K under tensor parallelism), which `kernel_correction` derives from the
loaded weights for files that do not store it.
"""

import logging
from typing import Optional

import torch

from sgl_ascend.layers.schemes.common import weight_only_matmul
from sgl_ascend.ops import ops
from sgl_ascend.ops.int4 import unpack_int32_to_int4
from sgl_ascend.ops.scales import decode_int64_scale, encode_fp32_as_int64

#: rows of K unpacked per step when summing int4 weights, so the int8 staging tensor stays small
_ROWS = 256

logger = logging.getLogger(__name__)
_said_weight_only = False


def log_weight_only(layer: torch.nn.Module, scheme: str) -> None:
    """Say once (at INFO; later layers at DEBUG) that a dense W4A8 layer runs weight-only: a scheme
    never runs as something else silently."""
    global _said_weight_only
    logger.log(logging.DEBUG if _said_weight_only else logging.INFO,
               "%s: %s W4A8 runs weight-only int4 on the NPU (npu_weight_quant_batchmatmul, as vllm-ascend serves "
               "dense W4A8); activations are not quantized", getattr(layer, "prefix", "") or "layer", scheme)
    _said_weight_only = True


def group_scale_bits(group_scale: torch.Tensor, channel_scale: torch.Tensor) -> torch.Tensor:
    """Group scales [G, N] times the channel scale [N] (or [1, N]) -> the kernel's int64 [G, N]."""
    return encode_fp32_as_int64(group_scale.float() * channel_scale.float().reshape(1, -1))


def kernel_correction(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """8 * sum_k deq_w of one int32 [K, N/8] weight with its kernel scale ([N] or [G, N]) -> fp32 [N]."""
    groups = decode_int64_scale(scale).reshape(-1, weight.shape[1] * 8)
    size = weight.shape[0] // groups.shape[0]
    total = torch.zeros(groups.shape[1], dtype=torch.float32)
    for g in range(groups.shape[0]):
        sums = torch.zeros(groups.shape[1], dtype=torch.int32)
        for start in range(g * size, (g + 1) * size, _ROWS):
            rows = weight[start:min(start + _ROWS, (g + 1) * size)]
            sums += unpack_int32_to_int4(rows).sum(dim=0, dtype=torch.int32)
        total += sums.float() * groups[g]
    return 8 * total


def w4a8_grouped_matmul(x_q: torch.Tensor, token_scale: torch.Tensor, weight: torch.Tensor,
                        scale: torch.Tensor, bias: torch.Tensor, group_list: torch.Tensor,
                        output_dtype: torch.dtype, group_list_type: int = 1) -> torch.Tensor:
    """int8 rows x int4 experts [E, K, N/8] (group_list: counts per expert, or cumulative ends with
    group_list_type=0) -> [T, N]. Grouped on M as upstream calls it: split_item=2, group_type=0."""
    return ops.npu_grouped_matmul([x_q], [weight], scale=[scale], bias=[bias], per_token_scale=[token_scale],
                                  group_list=group_list, split_item=2, group_type=0,
                                  group_list_type=group_list_type, output_dtype=output_dtype)[0]


# -- dense W4A8 linears: weight-only int4 ------------------------------------------------------------

def install_w4a8_weight_only(layer: torch.nn.Module, weight_kn: torch.Tensor, scale: torch.Tensor,
                             act_dtype: torch.dtype) -> None:
    """Install a dense layer's kernel operands: weight int32 [K, N/8] as it is (packed, one copy) and
    the fp32 dequantization scale, [N] per channel or [G, N] per group of K, as weight_scale in the
    activation dtype (a single group becomes the per-channel [N]). The checkpoint's tensors go."""
    if scale.dim() == 2 and scale.shape[0] == 1:
        scale = scale.reshape(-1)
    for attr in ("weight", "weight_scale", "weight_offset", "weight_scale_second", "weight_offset_second"):
        if hasattr(layer, attr):
            delattr(layer, attr)
    layer.register_parameter("weight", torch.nn.Parameter(weight_kn, requires_grad=False))
    layer.register_parameter("weight_scale", torch.nn.Parameter(scale.to(act_dtype), requires_grad=False))


def apply_w4a8_weight_only(layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor],
                           group_size: int) -> torch.Tensor:
    """y = x @ (q * weight_scale) + bias, activations unquantized (group_size 0: per channel)."""
    return weight_only_matmul(x, layer.weight, layer.weight_scale, None, bias, group_size)


def w4a8_linear_bytes(k: int, n: int, group_size: int, act_dtype: torch.dtype) -> int:
    """int4 weight + one scale in the activation dtype per channel (and group of K)."""
    groups = k // group_size if group_size else 1
    return n * (k // 2 + torch.finfo(act_dtype).bits // 8 * groups)


