"""FLOAT experts (bf16/fp16), in the kernel's [E, K, N] layout from the start: each expert's [N, K]
checkpoint tensor is copied transposed into its slice while loading, and the layer is then cast to
FRACTAL_NZ (identity on the CPU twin). No [E, N, K] copy ever exists beside it."""

from typing import Dict

import torch

from sgl_ascend.layers.moe.base import ExpertScheme, TensorSpec, grouped_matmul, register_expert, transposed_write
from sgl_ascend.layers.parameters import replace_data
from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.ops import to_nz
from sgl_ascend.quant.scheme_key import COMPRESSED_TENSORS, EXPERTS, MSMODELSLIM


@register_scheme(EXPERTS, MSMODELSLIM, "FLOAT")
@register_scheme(EXPERTS, COMPRESSED_TENSORS, "FLOAT")
class UnquantizedExperts(ExpertScheme):
    act_dtype = None

    def checkpoint_tensors(self, n, k, tp_size) -> Dict[str, TensorSpec]:
        return {"weight": TensorSpec((n, k), "float", tp_dim=self.tp_split_dim())}

    def create_weights(self, layer, num_experts, n, k, tp_size, **attrs):
        specs = self.checkpoint_tensors(*self.full_sizes(n, k, tp_size), tp_size)
        register_expert(layer, self.a("weight"), torch.empty(num_experts, k, n, dtype=self.params_dtype),
                        specs["weight"], n_dim=1, write=transposed_write, **attrs)

    def process_weights_after_loading(self, layer):
        weight = getattr(layer, self.a("weight")).data
        replace_data(layer, self.a("weight"), to_nz(weight))

    def apply(self, layer, x, token_scale, group_list, group_list_type, output_dtype):
        return grouped_matmul(x, getattr(layer, self.a("weight")), group_list, group_list_type, output_dtype)

    def theoretical_bytes(self, num_experts, n, k):
        return num_experts * n * k * torch.finfo(self.params_dtype).bits // 8
