"""The W4A8 grouped-matmul conventions shared by the dense W4A8 linears (msModelSlim and
compressed-tensors) and the W4A8 experts.

Kernel operands (per expert; a dense layer is one expert): weight int32 [K, N/8], eight signed int4
along N; weight scale int64 carrying fp32 bits, [N] per channel or [K/g, N] per group of g rows of K
(the group's scale times the channel's); bias fp32 [N]. The kernel accumulates (x_q - 8) @ q (see
the grouped-matmul twin), so the bias must carry the correction 8 * sum_k deq_w over the K the
kernel sees (the rank's K under tensor parallelism), which `kernel_correction` derives from the
loaded weights for files that do not store it.
"""

from typing import Optional

import torch

from sgl_ascend.ops import ops
from sgl_ascend.ops.int4 import unpack_int32_to_int4
from sgl_ascend.ops.scales import decode_int64_scale, encode_fp32_as_int64

#: rows of K unpacked per step when summing int4 weights, so the int8 staging tensor stays small
_ROWS = 256


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


def apply_w4a8_linear(layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """A dense W4A8 layer (weight [1, K, N/8], weight_scale, scale_bias): a single-group grouped matmul."""
    lead = x.shape[:-1]
    x_q, token_scale = ops.npu_dynamic_quant(x.reshape(-1, x.shape[-1]))
    out = w4a8_grouped_matmul(x_q, token_scale, layer.weight, layer.weight_scale, layer.scale_bias,
                              torch.tensor([x_q.shape[0]]), x.dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*lead, -1)


def w4a8_linear_bytes(k: int, n: int, group_size: int) -> int:
    """int4 weight + int64 scale per channel (and group) + fp32 correction per channel."""
    groups = k // group_size if group_size else 1
    return n * (k // 2 + 8 * groups + 4)


def finish_w4a8_linear(layer: torch.nn.Module, weight_kn: torch.Tensor, scale: torch.Tensor,
                       scale_bias: Optional[torch.Tensor] = None) -> None:
    """Install the kernel operands of a dense layer: weight int32 [K, N/8], scale int64 [N] / [G, N],
    and scale_bias fp32 [N] (derived from the weights when None). Each becomes [1, ...] (one group)."""
    if scale_bias is None:
        scale_bias = kernel_correction(weight_kn, scale)
    for attr, data in (("weight", weight_kn), ("weight_scale", scale), ("scale_bias", scale_bias)):
        if hasattr(layer, attr):
            delattr(layer, attr)
        layer.register_parameter(attr, torch.nn.Parameter(data.unsqueeze(0), requires_grad=False))
