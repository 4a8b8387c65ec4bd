"""W8A8_DYNAMIC experts: int8 per-channel symmetric weights, int8 per-token activations.

msModelSlim per expert: weight int8 [N, K], weight_scale [N, 1] (fp32, or bf16 from the V0 writer),
weight_offset [N, 1] (zeros: checked while loading, never stored). The weight is copied transposed
into the kernel's [E, K, N] layout while loading, then cast to FRACTAL_NZ (identity on the CPU
twin). The scale is written once, straight into the dtype the per-token grouped matmul needs for
the serving dtype ([E, N]): the documented table (torch_npu _op_plugin_docs.py, per-token rows)
allows a bf16 scale with bf16 output and an fp32 scale with fp16 output only. So a bf16 model holds
a bf16 scale (as SGLang's NPUW8A8Int8MoEMethod does; fp32 checkpoint scales are rounded to bf16
while loading) and an fp16 model an fp32 one. No other copy of the scale exists.
"""

from typing import Dict

import torch

from sgl_ascend.layers.moe.base import ExpertScheme, TensorSpec, register_expert, transposed_write
from sgl_ascend.layers.moe.checks import CHECK_ONLY, drop_check_only, write_zero_check
from sgl_ascend.layers.parameters import replace_data
from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.ops import to_nz
from sgl_ascend.quant.scheme_key import EXPERTS, MSMODELSLIM


def scale_dtype_for(params_dtype: torch.dtype) -> torch.dtype:
    """Per-token grouped matmul: bf16 scale -> bf16 output, fp32 scale -> fp16 output."""
    if params_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"W8A8 experts serve bfloat16 or float16 models, got {params_dtype}")
    return torch.bfloat16 if params_dtype == torch.bfloat16 else torch.float32


@register_scheme(EXPERTS, MSMODELSLIM, "W8A8_DYNAMIC")
class W8A8DynamicExperts(ExpertScheme):
    act_dtype = torch.int8

    def __init__(self, role: str, params_dtype: torch.dtype = torch.bfloat16):
        super().__init__(role, params_dtype)
        self.scale_dtype = scale_dtype_for(params_dtype)

    def checkpoint_tensors(self, n, k, tp_size) -> Dict[str, TensorSpec]:
        return self.per_channel_specs(n, k)

    def create_weights(self, layer, num_experts, n, k, tp_size, **attrs):
        specs = self.checkpoint_tensors(*self.full_sizes(n, k, tp_size), tp_size)
        register_expert(layer, self.a("weight"), torch.empty(num_experts, k, n, dtype=torch.int8),
                        specs["weight"], n_dim=1, write=transposed_write, **attrs)
        register_expert(layer, self.a("weight_scale"), torch.empty(num_experts, n, dtype=self.scale_dtype),
                        specs["weight_scale"], **attrs)
        if "weight_offset" in specs:  # msModelSlim writes a zero offset (checked, not kept); symmetric CT none
            register_expert(layer, self.a("weight_offset"), CHECK_ONLY(), specs["weight_offset"],
                            write=write_zero_check, **attrs)

    def process_weights_after_loading(self, layer):
        weight = getattr(layer, self.a("weight")).data
        replace_data(layer, self.a("weight"), to_nz(weight))
        drop_check_only(layer, self.role)

    def apply(self, layer, x, token_scale, group_list, group_list_type, output_dtype):
        return self.scaled_grouped_matmul(layer, x, token_scale, group_list, group_list_type, output_dtype)

    def theoretical_bytes(self, num_experts, n, k):
        return num_experts * n * (k + self.scale_dtype.itemsize)
