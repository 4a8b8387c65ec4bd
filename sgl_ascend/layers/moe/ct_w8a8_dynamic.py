"""compressed-tensors W8A8 dynamic experts: int8 symmetric per-channel weights, dynamic per-token int8
activations (llm-compressor's W8A8 int8 preset on an MoE model).

The library's int-quantized format (IntQuantizationCompressor) writes per expert weight int8 [N, K] and
weight_scale [N, 1] in the model dtype; symmetric weights carry no zero point. The kernels, layouts and
numerics are msModelSlim W8A8_DYNAMIC's (w8a8_dynamic.py: the weight transposed into [E, K, N] while
loading, the scale straight into the per-token grouped matmul's dtype), without the zero weight_offset
msModelSlim adds. Per-tensor weight scales, asymmetric weights and the packed format are refused naming
what is served.
"""

from typing import Dict

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.moe.base import TensorSpec
from sgl_ascend.layers.moe.w8a8_dynamic import W8A8DynamicExperts
from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.quant import compressed_tensors as ct
from sgl_ascend.quant.scheme_key import COMPRESSED_TENSORS, EXPERTS


@register_scheme(EXPERTS, COMPRESSED_TENSORS, ct.W8A8_DYNAMIC)
class CTW8A8DynamicExperts(W8A8DynamicExperts):
    @classmethod
    def from_key(cls, key, *, role: str, module: str = "", params_dtype: torch.dtype = torch.bfloat16, **context):
        if key.param("strategy") != "channel" or key.param("packed"):
            raise CheckpointError(
                f"experts quantized as W8A8 dynamic with {key.param('strategy')} weights"
                f"{' (pack-quantized)' if key.param('packed') else ''} are not served; served: int8 symmetric "
                "per-channel weights (int-quantized) with dynamic per-token int8 activations.", tensor=module)
        return cls(role, params_dtype)

    def checkpoint_tensors(self, n, k, tp_size) -> Dict[str, TensorSpec]:
        specs = self.per_channel_specs(n, k)
        del specs["weight_offset"]  # symmetric: the library writes no zero point
        return specs

