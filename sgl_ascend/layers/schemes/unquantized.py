"""FLOAT layers (msModelSlim) and ignored layers (compressed-tensors): plain bf16/fp16 weights."""

from typing import List, Optional

import torch
import torch.nn.functional as F

from sgl_ascend.layers.parameters import register
from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.layers.schemes.base import LinearScheme
from sgl_ascend.quant.scheme_key import COMPRESSED_TENSORS, LINEAR, MSMODELSLIM


@register_scheme(LINEAR, MSMODELSLIM, "FLOAT")
@register_scheme(LINEAR, COMPRESSED_TENSORS, "FLOAT")
class UnquantizedLinear(LinearScheme):
    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: List[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **_):
        self.dtype = params_dtype
        register(layer, "weight", torch.empty(sum(output_partition_sizes), input_size_per_partition,
                                              dtype=params_dtype), output_dim=0, input_dim=1)

    def process_weights_after_loading(self, layer):
        pass  # F.linear takes the checkpoint layout as it is

    def apply_weights(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
        return F.linear(x, layer.weight, bias)

    def theoretical_bytes(self, input_size_per_partition: int, output_size_per_partition: int) -> int:
        return output_size_per_partition * input_size_per_partition * torch.finfo(self.dtype).bits // 8
