"""W8A8_MIX: one int8 weight, activations quantized per token while prefilling and statically while decoding.

msModelSlim writes it for the `pd_mix` activation scope (the stock Qwen3-32B C8 recipe): the fake-quant
module (msmodelslim ir/w8a8_pdmix.py) runs dynamic per-token symmetric int8 in its prefilling state and
static per-tensor asymmetric int8 in its decoding state. Its saver (ascendv1.py `on_w8a8_pd_mix`) writes
both sets of tensors beside one int8 weight [N, K]:
- static:  input_scale [1], input_offset [1], quant_bias int32 [N] (= round(bias / deq_scale) -
           input_offset * sum_k w), deq_scale [N] (= input_scale * weight_scale; fp32, or int64 fp32 bits);
- dynamic: weight_scale [N, 1] fp32, weight_offset [N, 1] zeros;
- a FLOAT `bias` when the layer has one (already inside quant_bias for the static path).

The choice between the two is a deployment one, as in vllm-ascend (AscendW8A8PDMixLinearMethod): a
PD-disaggregated decode node (vllm-ascend: KV consumer; SGLang: `--disaggregation-mode decode`) serves the
static path, every other server the dynamic one. The scheme is fixed when the layer is built (context
`decode_node`), so the forward has no branch, and it holds only the tensors its path uses: the other
path's tensors are not loaded (`ignored_suffixes`), so resident bytes are those of W8A8 / W8A8_DYNAMIC.
Each path is the existing scheme's, kernels and numerics included (w8a8_static.py, w8a8_dynamic.py).
"""

from typing import List, Optional

import torch

from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.layers.schemes.base import LinearScheme
from sgl_ascend.layers.schemes.w8a8_dynamic import W8A8DynamicLinear
from sgl_ascend.layers.schemes.w8a8_static import W8A8StaticLinear
from sgl_ascend.quant.scheme_key import LINEAR, MSMODELSLIM

STATIC_ONLY = ("input_scale", "input_offset", "quant_bias", "deq_scale")
DYNAMIC_ONLY = ("weight_scale", "weight_offset")


@register_scheme(LINEAR, MSMODELSLIM, "W8A8_MIX")
class W8A8MixLinear(LinearScheme):
    @classmethod
    def from_key(cls, key, *, decode_node: bool = False, **context) -> "W8A8MixLinear":
        return cls(decode_node=decode_node)

    def __init__(self, decode_node: bool = False):
        self.decode_node = decode_node
        self.path = W8A8StaticLinear() if decode_node else W8A8DynamicLinear()
        self.ignored_suffixes = DYNAMIC_ONLY if decode_node else STATIC_ONLY
        # the static path takes the float bias inside quant_bias; the dynamic one adds the layer's bias
        self.folds_float_bias = self.path.folds_float_bias

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: List[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra):
        self.path.create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                                 params_dtype, **extra)

    def process_weights_after_loading(self, layer):
        self.path.process_weights_after_loading(layer)

    def apply_weights(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
        return self.path.apply_weights(layer, x, bias)

    def theoretical_bytes(self, input_size_per_partition: int, output_size_per_partition: int) -> int:
        return self.path.theoretical_bytes(input_size_per_partition, output_size_per_partition)
