"""W4A8_DYNAMIC linear layers (msModelSlim MLP linears): int4 per-channel symmetric weights, int8
per-token activations, computed as a grouped matmul with a single group, so it shares the expert
kernels' layout and conventions (sgl_ascend/layers/moe/w4a8_dynamic.py explains scale_bias).

Checkpoint: weight int8 [N/2, K], two int4 per byte along N (low nibble = even row); weight_scale,
weight_offset (zeros) [N, 1]; scale_bias [N, 1] for column-parallel layers, [N, 16] (sums over 16
K-slices) for row-parallel ones, of which a rank takes its 16 // tp. After loading: weight int32
[1, K, N/8], weight_scale int64 (fp32 bits) [1, N], scale_bias [1, N] (the rank's slices summed).
Per-channel files of the current writer only (group-wise and unpacked-int4 dense files: not served).
"""

from typing import List, Optional

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.parameters import register, replace_data
from sgl_ascend.layers.schemes.base import LinearScheme
from sgl_ascend.layers.schemes.common import drop_zero_offset
from sgl_ascend.ops import ops
from sgl_ascend.ops.scales import encode_fp32_as_int64

_SLICES = 16


def _is_row_parallel(layer) -> bool:
    """Our ParallelLinear says so; SGLang's RowParallelLinear has input_is_parallel."""
    return getattr(layer, "parallel", None) == "row" or hasattr(layer, "input_is_parallel")


class W4A8DynamicLinear(LinearScheme):
    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: List[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **_):
        n, k = sum(output_partition_sizes), input_size_per_partition
        if any(size % 8 for size in output_partition_sizes):
            raise CheckpointError(f"W4A8 layer {getattr(layer, 'prefix', '')}: output sizes "
                                  f"{output_partition_sizes} must be multiples of 8 to pack int4")
        register(layer, "weight", torch.empty(n // 2, k, dtype=torch.int8), output_dim=0, input_dim=1,
                 output_pack_factor=2)
        register(layer, "weight_scale", torch.empty(n, 1, dtype=torch.float32), output_dim=0)
        register(layer, "weight_offset", torch.empty(n, 1, dtype=torch.float32), output_dim=0)
        if _is_row_parallel(layer):
            tp_size = input_size // input_size_per_partition
            if _SLICES % tp_size:
                raise CheckpointError(f"scale_bias has {_SLICES} K-slices, which tp size {tp_size} does not divide")
            register(layer, "scale_bias", torch.empty(n, _SLICES // tp_size, dtype=torch.float32), input_dim=1)
        else:
            register(layer, "scale_bias", torch.empty(n, 1, dtype=torch.float32), output_dim=0)

    def process_weights_after_loading(self, layer):
        packed = layer.weight.data
        # bytes of the transposed pairs are the kernel's int32 [K, N/8] (see moe/int4.py)
        replace_data(layer, "weight", packed.t().contiguous().view(torch.int32).unsqueeze(0))
        replace_data(layer, "weight_scale", encode_fp32_as_int64(layer.weight_scale.data.reshape(1, -1)))
        replace_data(layer, "scale_bias", layer.scale_bias.data.sum(dim=-1).reshape(1, -1))
        drop_zero_offset(layer, "weight_offset", "the W4A8_DYNAMIC kernel")

    def apply_weights(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
        lead = x.shape[:-1]
        x_q, token_scale = ops.npu_dynamic_quant(x.reshape(-1, x.shape[-1]))
        out = ops.npu_grouped_matmul([x_q], [layer.weight], scale=[layer.weight_scale], bias=[layer.scale_bias],
                                     per_token_scale=[token_scale], group_list=torch.tensor([x_q.shape[0]]),
                                     group_list_type=1, output_dtype=x.dtype)[0]
        if bias is not None:
            out = out + bias
        return out.reshape(*lead, -1)

    def theoretical_bytes(self, input_size_per_partition: int, output_size_per_partition: int) -> int:
        return output_size_per_partition * (input_size_per_partition // 2 + 8 + 4)
