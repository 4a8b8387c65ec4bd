"""W8A8_DYNAMIC: int8 per-channel symmetric weights, int8 per-token activations quantized at run time.

Serves msModelSlim `W8A8_DYNAMIC` (weight, weight_scale [N,1], weight_offset [N,1] of zeros) and
compressed-tensors int8 channel weights with dynamic per-token activations (no offset tensor).
Kernels, as SGLang calls them: npu_dynamic_quant(x) (bf16/fp16 x -> int8, fp32 per-token scale), then
npu_quant_matmul(x_q, w, weight_scale fp32, pertoken_scale, bias = the layer's bias in the model dtype,
output_dtype=x.dtype): bf16 or fp16 only, the op has no fp32 output.
"""

from typing import List, Optional

import torch

from sgl_ascend.layers.parameters import register, replace_data
from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.layers.schemes.base import LinearScheme
from sgl_ascend.layers.schemes.group_weight_only import GroupWeightOnlyLinear
from sgl_ascend.layers.schemes.common import drop_zero_offset, flatten_channel_scale, kernel_act_dtype, to_kernel_layout
from sgl_ascend.ops import ops
from sgl_ascend.quant.scheme_key import LINEAR, MSMODELSLIM


@register_scheme(LINEAR, MSMODELSLIM, "W8A8_DYNAMIC")
class W8A8DynamicLinear(LinearScheme):
    # per-group scales (the key's group_wise, from the headers): no kernel of this class takes them
    variants = {"group_wise": GroupWeightOnlyLinear}

    @classmethod
    def from_key(cls, key, **context):
        return GroupWeightOnlyLinear.from_key(key) if key.param("group_wise") else cls()

    def __init__(self, with_offset: bool = True):
        self.with_offset = with_offset

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: List[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **_):
        n, k = sum(output_partition_sizes), input_size_per_partition
        kernel_act_dtype(params_dtype, "W8A8 dynamic")
        register(layer, "weight", torch.empty(n, k, dtype=torch.int8), output_dim=0, input_dim=1)
        register(layer, "weight_scale", torch.empty(n, 1, dtype=torch.float32), output_dim=0)
        if self.with_offset:
            register(layer, "weight_offset", torch.empty(n, 1, dtype=torch.float32), output_dim=0)

    def process_weights_after_loading(self, layer):
        replace_data(layer, "weight", to_kernel_layout(layer.weight.data))
        flatten_channel_scale(layer, "weight_scale")
        if self.with_offset:
            drop_zero_offset(layer, "weight_offset", "the W8A8_DYNAMIC kernel")

    def apply_weights(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
        x_q, token_scale = ops.npu_dynamic_quant(x)
        return ops.npu_quant_matmul(x_q, layer.weight, layer.weight_scale,
                                    pertoken_scale=token_scale.reshape(-1), bias=bias,
                                    output_dtype=x.dtype)

    def theoretical_bytes(self, input_size_per_partition: int, output_size_per_partition: int) -> int:
        return output_size_per_partition * (input_size_per_partition + 4)
