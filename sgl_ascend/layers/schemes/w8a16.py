"""W8A16: int8 per-channel weights, activations stay in bf16/fp16 (weight-only).

msModelSlim dequantizes as (w - offset) * scale; npu_weight_quant_batchmatmul computes
(w + antiquant_offset) * antiquant_scale, so a non-zero offset is handed over negated (the fixtures'
offsets are all zero, so the sign is pinned by tests/test_linear_schemes.py's asymmetric case).
A zero offset is dropped. Scale and offset are converted once, after loading, to the activation
dtype the kernel demands (antiquant_scale / antiquant_offset must have x's dtype): one copy each.
The kernel takes 2-D x (leading dims are flattened and restored) and the bias by keyword, fp32 for
bf16 x (common.weight_only_matmul).
"""

from typing import List, Optional

import torch

from sgl_ascend.layers.parameters import register, replace_data
from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.layers.schemes.base import LinearScheme
from sgl_ascend.layers.schemes.group_weight_only import GroupWeightOnlyLinear
from sgl_ascend.layers.schemes.common import (flatten_channel_scale, kernel_act_dtype, to_kernel_layout,
                                              weight_only_matmul)
from sgl_ascend.quant.scheme_key import LINEAR, MSMODELSLIM


@register_scheme(LINEAR, MSMODELSLIM, "W8A16")
class W8A16Linear(LinearScheme):
    # per-group scales (the key's group_wise, from the headers): no kernel of this class takes them
    variants = {"group_wise": GroupWeightOnlyLinear}

    @classmethod
    def from_key(cls, key, **context):
        return GroupWeightOnlyLinear.from_key(key) if key.param("group_wise") else cls()

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: List[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **_):
        n, k = sum(output_partition_sizes), input_size_per_partition
        self.act_dtype = kernel_act_dtype(params_dtype, "W8A16")
        register(layer, "weight", torch.empty(n, k, dtype=torch.int8), output_dim=0, input_dim=1)
        register(layer, "weight_scale", torch.empty(n, 1, dtype=torch.float32), output_dim=0)
        register(layer, "weight_offset", torch.empty(n, 1, dtype=torch.float32), output_dim=0)

    def process_weights_after_loading(self, layer):
        replace_data(layer, "weight", to_kernel_layout(layer.weight.data))
        flatten_channel_scale(layer, "weight_scale")
        replace_data(layer, "weight_scale", layer.weight_scale.data.to(self.act_dtype))
        flatten_channel_scale(layer, "weight_offset")
        self.asymmetric = bool(torch.count_nonzero(layer.weight_offset.data))
        if self.asymmetric:
            replace_data(layer, "weight_offset", (-layer.weight_offset.data).to(self.act_dtype))
        else:
            delattr(layer, "weight_offset")

    def apply_weights(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
        return weight_only_matmul(x, layer.weight, layer.weight_scale, getattr(layer, "weight_offset", None), bias)

    def theoretical_bytes(self, input_size_per_partition: int, output_size_per_partition: int) -> int:
        # int8 weight + scale (and the negated offset of asymmetric checkpoints) in the activation dtype
        vector_bytes = torch.finfo(self.act_dtype).bits // 8 * (2 if getattr(self, "asymmetric", False) else 1)
        return output_size_per_partition * (input_size_per_partition + vector_bytes)
