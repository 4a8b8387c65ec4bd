"""compressed-tensors W8A8 dynamic with per-tensor weight scales (one per fused shard).

Per-channel checkpoints fit `W8A8DynamicLinear(with_offset=False)` as they are (weight int8 [N, K],
weight_scale [N, 1]). Per-tensor ones store weight_scale [1] per shard; after loading it is expanded
to one value per output channel, which is what npu_quant_matmul's scale takes.
"""

from typing import List

import torch

from sgl_ascend.layers.parameters import register, replace_data
from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.layers.schemes.common import kernel_act_dtype, to_kernel_layout
from sgl_ascend.layers.schemes.ct_common import expand_per_shard
from sgl_ascend.layers.schemes.w8a8_dynamic import W8A8DynamicLinear
from sgl_ascend.quant.scheme_key import COMPRESSED_TENSORS, LINEAR


@register_scheme(LINEAR, COMPRESSED_TENSORS, "W8A8_DYNAMIC")
class CTW8A8DynamicTensorLinear(W8A8DynamicLinear):
    @classmethod
    def from_key(cls, key, **context):
        """Per-channel int8 weights fit msModelSlim's W8A8_DYNAMIC layer as they are (no offset)."""
        if key.param("strategy") == "channel":
            return W8A8DynamicLinear(with_offset=False)
        return cls()

    def __init__(self):
        super().__init__(with_offset=False)

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: List[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **_):
        n, k = sum(output_partition_sizes), input_size_per_partition
        self.partition_sizes = list(output_partition_sizes)
        kernel_act_dtype(params_dtype, "W8A8 dynamic")
        register(layer, "weight", torch.empty(n, k, dtype=torch.int8), output_dim=0, input_dim=1)
        register(layer, "weight_scale", torch.empty(len(output_partition_sizes), dtype=torch.float32),
                 per_shard=True)

    def process_weights_after_loading(self, layer):
        replace_data(layer, "weight", to_kernel_layout(layer.weight.data))
        replace_data(layer, "weight_scale", expand_per_shard(layer.weight_scale.data, self.partition_sizes))
