"""W8A8_DYNAMIC experts: int8 per-channel symmetric weights, int8 per-token activations.

msModelSlim per expert: weight int8 [N, K], weight_scale [N, 1] (fp32, or bf16 from the V0 writer),
weight_offset [N, 1] (zeros: checked while loading, never stored). compressed-tensors int-quantized
files carry no offset. The weight keeps the checkpoint's [E, N, K] bytes; the kernel reads the
[E, K, N] view. The scale is held once, in fp32 ([E, N]).
"""

from typing import Dict

import torch

from sgl_ascend.layers.moe.base import ExpertScheme, TensorSpec, register_expert
from sgl_ascend.layers.moe.checks import CHECK_ONLY, drop_check_only, write_zero_check
from sgl_ascend.layers.parameters import replace_data
from sgl_ascend.layers.schemes.common import to_kernel_layout
from sgl_ascend.ops import ops


class W8A8DynamicExperts(ExpertScheme):
    act_dtype = torch.int8

    def __init__(self, role: str, with_offset: bool = True):
        super().__init__(role)
        self.with_offset = with_offset

    def checkpoint_tensors(self, n, k, tp_size) -> Dict[str, TensorSpec]:
        out = 0 if self.role == "w13" else None
        specs = {"weight": TensorSpec((n, k), "int8", tp_dim=self.tp_split_dim()),
                 "weight_scale": TensorSpec((n, 1), "float", tp_dim=out)}
        if self.with_offset:
            specs["weight_offset"] = TensorSpec((n, 1), "float", tp_dim=out)
        return specs

    def create_weights(self, layer, num_experts, n, k, tp_size, **attrs):
        specs = self.checkpoint_tensors(*self.full_sizes(n, k, tp_size), tp_size)
        register_expert(layer, self.a("weight"), torch.empty(num_experts, n, k, dtype=torch.int8),
                        specs["weight"], **attrs)
        register_expert(layer, self.a("weight_scale"), torch.empty(num_experts, n, dtype=torch.float32),
                        specs["weight_scale"], **attrs)
        if self.with_offset:
            register_expert(layer, self.a("weight_offset"), CHECK_ONLY(), specs["weight_offset"],
                            write=write_zero_check, **attrs)

    def process_weights_after_loading(self, layer):
        replace_data(layer, self.a("weight"), to_kernel_layout(getattr(layer, self.a("weight")).data))
        drop_check_only(layer, self.role)

    def apply(self, layer, x, token_scale, group_list, output_dtype):
        return ops.npu_grouped_matmul([x], [getattr(layer, self.a("weight"))],
                                      scale=[getattr(layer, self.a("weight_scale"))],
                                      per_token_scale=[token_scale], group_list=group_list,
                                      group_list_type=1, output_dtype=output_dtype)[0]

    def theoretical_bytes(self, num_experts, n, k):
        return num_experts * n * (k + 4)
