"""W4A8_DYNAMIC linear layers (msModelSlim MLP linears): int4 symmetric weights, per channel or per
group, int8 per-token activations, computed as a grouped matmul with a single group, so it shares
the expert kernels' layout and conventions (schemes/w4a8_kernel.py; moe/w4a8_dynamic.py explains
scale_bias).

Checkpoint: weight int8 [N/2, K], two int4 per byte along N (low nibble = even row), or, from older
writers (description version missing or "0"), int8 [N, K] with one int4 per byte; weight_scale,
weight_offset (zeros) [N, 1]; group-wise (description group_size g > 0) adds weight_scale_second
[N, K/g] (dequantized weight = q * weight_scale_second * weight_scale) and weight_offset_second
(zeros, int64 as the tool writes it). scale_bias [N, 1] for column-parallel layers, [N, 16] (sums
over 16 K-slices) for row-parallel ones, of which a rank takes its 16 // tp. Older writers store no
scale_bias: it is derived from the loaded weights (any present is ignored).
After loading: weight int32 [1, K, N/8], weight_scale int64 (fp32 bits) [1, N] or [1, K/g, N]
(group times channel scale), scale_bias [1, N] (the rank's slices summed).
"""

from typing import List, Optional

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.parameters import register
from sgl_ascend.layers.schemes.base import LinearScheme
from sgl_ascend.layers.schemes.common import check_int_range, drop_zero_offset, pack_int4_for_kernel
from sgl_ascend.layers.schemes.w4a8_kernel import (apply_w4a8_linear, finish_w4a8_linear, group_scale_bits,
                                                   w4a8_linear_bytes)
from sgl_ascend.ops.scales import encode_fp32_as_int64

_SLICES = 16


def _is_row_parallel(layer) -> bool:
    """Our ParallelLinear says so; SGLang's RowParallelLinear has input_is_parallel."""
    return getattr(layer, "parallel", None) == "row" or hasattr(layer, "input_is_parallel")


class W4A8DynamicLinear(LinearScheme):
    def __init__(self, group_size: int = 0, legacy: bool = False):
        self.group_size, self.legacy = group_size, legacy
        # older writers' files carry no scale_bias; one that is there anyway is not needed
        self.ignored_suffixes = ("scale_bias",) if legacy else ()

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: List[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **_):
        n, k, g = sum(output_partition_sizes), input_size_per_partition, self.group_size
        prefix = getattr(layer, "prefix", "")
        if any(size % 8 for size in output_partition_sizes):
            raise CheckpointError(f"W4A8 layer {prefix}: output sizes {output_partition_sizes} must be "
                                  "multiples of 8 to pack int4")
        if g and k % g:
            raise CheckpointError(f"W4A8 layer {prefix}: {k} input channels per rank are not a whole number "
                                  f"of groups of {g} (description group_size); pick a tp size that keeps K "
                                  "per rank a multiple of the group size.")
        if self.legacy:
            register(layer, "weight", torch.empty(n, k, dtype=torch.int8), output_dim=0, input_dim=1)
        else:
            register(layer, "weight", torch.empty(n // 2, k, dtype=torch.int8), output_dim=0, input_dim=1,
                     output_pack_factor=2)
        register(layer, "weight_scale", torch.empty(n, 1, dtype=torch.float32), output_dim=0)
        register(layer, "weight_offset", torch.empty(n, 1, dtype=torch.float32), output_dim=0)
        if g:
            register(layer, "weight_scale_second", torch.empty(n, k // g, dtype=torch.float32), output_dim=0,
                     input_dim=1)
            register(layer, "weight_offset_second", torch.empty(n, k // g, dtype=torch.int64), output_dim=0,
                     input_dim=1)
        if self.legacy:
            return
        if _is_row_parallel(layer):
            tp_size = input_size // input_size_per_partition
            if _SLICES % tp_size:
                raise CheckpointError(f"scale_bias has {_SLICES} K-slices, which tp size {tp_size} does not divide")
            register(layer, "scale_bias", torch.empty(n, _SLICES // tp_size, dtype=torch.float32), input_dim=1)
        else:
            register(layer, "scale_bias", torch.empty(n, 1, dtype=torch.float32), output_dim=0)

    def process_weights_after_loading(self, layer):
        drop_zero_offset(layer, "weight_offset", "the W4A8_DYNAMIC kernel")
        if self.legacy:
            check_int_range(layer, "weight", -8, 7)
            weight = pack_int4_for_kernel(layer.weight.data)
        else:  # bytes of the transposed pairs are the kernel's int32 [K, N/8] (see moe/int4.py)
            weight = layer.weight.data.t().contiguous().view(torch.int32)
        channel = layer.weight_scale.data.reshape(-1)
        if self.group_size:
            drop_zero_offset(layer, "weight_offset_second", "the W4A8_DYNAMIC kernel")
            scale = group_scale_bits(layer.weight_scale_second.data.t(), channel)
            delattr(layer, "weight_scale_second")
        else:
            scale = encode_fp32_as_int64(channel)
        scale_bias = None if self.legacy else layer.scale_bias.data.sum(dim=-1)
        finish_w4a8_linear(layer, weight, scale, scale_bias)

    def apply_weights(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
        return apply_w4a8_linear(layer, x, bias)

    def theoretical_bytes(self, input_size_per_partition: int, output_size_per_partition: int) -> int:
        return w4a8_linear_bytes(input_size_per_partition, output_size_per_partition, self.group_size)
