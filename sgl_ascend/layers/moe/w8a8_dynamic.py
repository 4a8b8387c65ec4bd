"""W8A8_DYNAMIC experts: int8 per-channel symmetric weights, int8 per-token activations.

msModelSlim per expert: weight int8 [N, K], weight_scale [N, 1] (fp32, or bf16 from the V0 writer),
weight_offset [N, 1] (zeros: checked while loading, never stored). The weight is copied transposed
into the kernel's [E, K, N] layout while loading, then cast to FRACTAL_NZ (identity on the CPU
twin); the scale is held once, in fp32 ([E, N]).
"""

from typing import Dict

import torch

from sgl_ascend.layers.moe.base import ExpertScheme, TensorSpec, register_expert, transposed_write
from sgl_ascend.layers.moe.checks import CHECK_ONLY, drop_check_only, write_zero_check
from sgl_ascend.layers.parameters import replace_data
from sgl_ascend.ops import ops, to_nz


class W8A8DynamicExperts(ExpertScheme):
    act_dtype = torch.int8

    def checkpoint_tensors(self, n, k, tp_size) -> Dict[str, TensorSpec]:
        return self.per_channel_specs(n, k)

    def create_weights(self, layer, num_experts, n, k, tp_size, **attrs):
        specs = self.checkpoint_tensors(*self.full_sizes(n, k, tp_size), tp_size)
        register_expert(layer, self.a("weight"), torch.empty(num_experts, k, n, dtype=torch.int8),
                        specs["weight"], n_dim=1, write=transposed_write, **attrs)
        register_expert(layer, self.a("weight_scale"), torch.empty(num_experts, n, dtype=torch.float32),
                        specs["weight_scale"], **attrs)
        register_expert(layer, self.a("weight_offset"), CHECK_ONLY(), specs["weight_offset"],
                        write=write_zero_check, **attrs)

    def process_weights_after_loading(self, layer):
        weight = getattr(layer, self.a("weight")).data
        replace_data(layer, self.a("weight"), to_nz(weight))
        drop_check_only(layer, self.role)

    def apply(self, layer, x, token_scale, group_list, output_dtype):
        return self.scaled_grouped_matmul(layer, x, token_scale, group_list, output_dtype)

    def theoretical_bytes(self, num_experts, n, k):
        return num_experts * n * (k + 4)
