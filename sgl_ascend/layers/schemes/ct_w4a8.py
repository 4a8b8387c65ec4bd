"""compressed-tensors W4A8 linears: int4 symmetric weights per channel or per group, dynamic
per-token int8 activations, on the W4A8 grouped matmul (single group), the kernel msModelSlim's
W4A8_DYNAMIC targets (schemes/w4a8_kernel.py).

Checkpoint tensors are WNA16's (ct_wna16.py: weight_packed + weight_shape, or int8 `weight` one value
per byte; weight_scale [N, 1] or [N, K/g] in the model dtype), packed into the kernel layout while
they load, as WNA16's. These files carry no kernel correction: scale_bias = 8 * sum_k deq_w is
derived from the loaded weights, over the rank's own K for row-parallel layers (each rank's kernel
adds it times its own token scale). After loading: weight int32 [1, K, N/8], weight_scale int64 (fp32 bits) [1, N] or
[1, K/g, N], scale_bias fp32 [1, N].
"""

from typing import Optional

import torch

from sgl_ascend.layers.schemes.ct_wna16 import CTWNA16Linear
from sgl_ascend.layers.schemes.w4a8_kernel import apply_w4a8_linear, finish_w4a8_linear, w4a8_linear_bytes
from sgl_ascend.ops.scales import encode_fp32_as_int64


class CTW4A8Linear(CTWNA16Linear):
    def __init__(self, group_size: int, packed: bool):
        super().__init__(4, group_size, symmetric=True, packed=packed)

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra):
        super().create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                               params_dtype, **extra)
        # the kernel takes fp32 scales: load them in fp32, so fp32 files are not rounded to the model dtype
        layer.weight_scale.data = torch.empty_like(layer.weight_scale.data, dtype=torch.float32)

    def process_weights_after_loading(self, layer):
        weight = self._kernel_weight(layer)  # int4 packed into the kernel layout while loading
        scale = layer.weight_scale.data  # [N, groups]
        finish_w4a8_linear(layer, weight, encode_fp32_as_int64(scale.t() if self.group_size else scale.reshape(-1)))

    def apply_weights(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
        return apply_w4a8_linear(layer, x, bias)

    def theoretical_bytes(self, input_size_per_partition: int, output_size_per_partition: int) -> int:
        return w4a8_linear_bytes(input_size_per_partition, output_size_per_partition, self.group_size)
