"""compressed-tensors FP8 weights served weight-only (W8A16) on devices without an FP8 matmul.

Checkpoint (float-quantized): weight float8_e4m3fn [N, K]; weight_scale [N, 1] (channel) or [1] per
shard (tensor); input_scale [1] when the checkpoint calibrated static FP8 activations, which a
weight-only layer does not use (so it is not loaded). compressed-tensors dequantizes w * s.
The weights stay FP8 in memory (1 byte each). Atlas A2/A3 have no FP8 weight kernel
(npu_weight_quant_batchmatmul takes int8 / int4 weights), so each call dequantizes to the activation
dtype and multiplies as an unquantized layer does (F.linear): a transient bf16 copy of one layer's
weight per call, the price of serving FP8 checkpoints without FP8 hardware.
ASSUMPTION: casting float8_e4m3fn to bf16/fp16 runs on the NPU (torch_npu registers the dtype).
"""

from typing import List, Optional

import torch
import torch.nn.functional as F

from sgl_ascend.layers.parameters import register, replace_data
from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.layers.schemes.base import LinearScheme
from sgl_ascend.layers.schemes.ct_common import expand_per_shard
from sgl_ascend.quant.scheme_key import COMPRESSED_TENSORS, LINEAR


@register_scheme(LINEAR, COMPRESSED_TENSORS, "FP8_W8A16")
class CTFP8W8A16Linear(LinearScheme):
    @classmethod
    def from_key(cls, key, **context):
        return cls(key.param("strategy") == "channel", static_input_scale=key.param("act_dynamic") is False)

    def __init__(self, per_channel_weights: bool, static_input_scale: bool):
        self.per_channel = per_channel_weights
        # The weight-only layer has no use for the calibrated FP8 activation scale.
        self.ignored_suffixes = ("input_scale",) if static_input_scale else ()

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: List[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **_):
        n, k = sum(output_partition_sizes), input_size_per_partition
        self.partition_sizes, self.act_dtype = list(output_partition_sizes), params_dtype
        register(layer, "weight", torch.empty(n, k, dtype=torch.float8_e4m3fn), output_dim=0, input_dim=1)
        if self.per_channel:
            register(layer, "weight_scale", torch.empty(n, 1, dtype=params_dtype), output_dim=0)
        else:
            register(layer, "weight_scale", torch.empty(len(output_partition_sizes), dtype=params_dtype),
                     per_shard=True)

    def process_weights_after_loading(self, layer):
        scale = layer.weight_scale.data.reshape(-1)
        if not self.per_channel:
            scale = expand_per_shard(scale, self.partition_sizes)
        replace_data(layer, "weight_scale", scale.reshape(-1, 1))

    def apply_weights(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
        weight = layer.weight.to(x.dtype) * layer.weight_scale
        return F.linear(x, weight, bias)

    def theoretical_bytes(self, input_size_per_partition: int, output_size_per_partition: int) -> int:
        scale_bytes = torch.finfo(self.act_dtype).bits // 8
        return output_size_per_partition * (input_size_per_partition + scale_bytes)
