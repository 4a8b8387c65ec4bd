"""W4A4_DYNAMIC: int4 per-channel symmetric weights, int4 per-token activations quantized at run time.

msModelSlim stores the weight as int8 [N, K] holding one int4 value per byte; each checkpoint shard
is range-checked and packed eight per int32 into the [K, N/8] weight of npu_quant_matmul while it
loads (register_int4_weight), so no int8 copy of the layer's weight is ever held.
Kernels, as SGLang calls them: npu_dynamic_quant(x, dst_type=quint4x2) (int4 per token, packed eight
per int32), npu_quant_matmul(x_q, w, weight_scale fp32, pertoken_scale, output_dtype=x.dtype). The op's
int4 row with a per-token scale takes no float bias, so a layer bias is added after the matmul (in
the model dtype: one more rounding where a layer has a bias).
"""

from typing import List, Optional

import torch

from sgl_ascend.layers.parameters import register
from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.layers.schemes.base import LinearScheme
from sgl_ascend.layers.schemes.group_weight_only import GroupWeightOnlyLinear
from sgl_ascend.layers.schemes.common import (drop_zero_offset, flatten_channel_scale, kernel_act_dtype,
                                              register_int4_weight)
from sgl_ascend.ops import ops
from sgl_ascend.quant.scheme_key import LINEAR, MSMODELSLIM


@register_scheme(LINEAR, MSMODELSLIM, "W4A4_DYNAMIC")
class W4A4DynamicLinear(LinearScheme):
    # per-group scales (the key's group_wise, from the headers): no kernel of this class takes them
    variants = {"group_wise": GroupWeightOnlyLinear}

    @classmethod
    def from_key(cls, key, **context):
        return GroupWeightOnlyLinear.from_key(key) if key.param("group_wise") else cls()

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: List[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **_):
        n, k = sum(output_partition_sizes), input_size_per_partition
        kernel_act_dtype(params_dtype, "W4A4_DYNAMIC")
        register_int4_weight(layer, "weight", n, k)
        register(layer, "weight_scale", torch.empty(n, 1, dtype=torch.float32), output_dim=0)
        register(layer, "weight_offset", torch.empty(n, 1, dtype=torch.float32), output_dim=0)

    def process_weights_after_loading(self, layer):
        flatten_channel_scale(layer, "weight_scale")
        drop_zero_offset(layer, "weight_offset", "the W4A4_DYNAMIC kernel")

    def apply_weights(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
        x_q, token_scale = ops.npu_dynamic_quant(x, dst_type=torch.quint4x2)
        out = ops.npu_quant_matmul(x_q, layer.weight, layer.weight_scale,
                                   pertoken_scale=token_scale.reshape(-1), output_dtype=x.dtype)
        return out if bias is None else out + bias

    def theoretical_bytes(self, input_size_per_partition: int, output_size_per_partition: int) -> int:
        return output_size_per_partition * (input_size_per_partition // 2 + 4)
