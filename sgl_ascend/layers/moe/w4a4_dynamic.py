"""W4A4_DYNAMIC experts: int4 per-channel symmetric weights, int4 per-token activations.

msModelSlim per expert: weight int8 [N, K] holding one int4 value per byte, weight_scale [N, 1],
weight_offset [N, 1] (zeros: checked while loading, never stored). The weight is packed straight
into the kernel's [K, N/8] int32 while loading; the scale is held once, as int64 fp32 bits (the
form upstream hands the W4A4 grouped matmul).
"""

from typing import Dict

import torch

from sgl_ascend.layers.moe.base import ExpertScheme, TensorSpec, register_expert
from sgl_ascend.layers.moe.checks import CHECK_ONLY, drop_check_only, write_zero_check
from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.layers.schemes.common import write_fp32_bits, write_int4_values
from sgl_ascend.quant.scheme_key import EXPERTS, MSMODELSLIM


@register_scheme(EXPERTS, MSMODELSLIM, "W4A4_DYNAMIC")
class W4A4DynamicExperts(ExpertScheme):
    act_dtype = torch.quint4x2

    def checkpoint_tensors(self, n, k, tp_size) -> Dict[str, TensorSpec]:
        return self.per_channel_specs(n, k)

    def create_weights(self, layer, num_experts, n, k, tp_size, **attrs):
        specs = self.checkpoint_tensors(*self.full_sizes(n, k, tp_size), tp_size)
        register_expert(layer, self.a("weight"), torch.empty(num_experts, k, n // 8, dtype=torch.int32),
                        specs["weight"], n_dim=1, write=write_int4_values, **attrs)
        register_expert(layer, self.a("weight_scale"), torch.empty(num_experts, n, dtype=torch.int64),
                        specs["weight_scale"], write=write_fp32_bits, **attrs)
        register_expert(layer, self.a("weight_offset"), CHECK_ONLY(), specs["weight_offset"],
                        write=write_zero_check, **attrs)

    def process_weights_after_loading(self, layer):
        drop_check_only(layer, self.role)

    def apply(self, layer, x, token_scale, group_list, group_list_type, output_dtype):
        return self.scaled_grouped_matmul(layer, x, token_scale, group_list, group_list_type, output_dtype)

    def theoretical_bytes(self, num_experts, n, k):
        return num_experts * n * (k // 2 + 8)
