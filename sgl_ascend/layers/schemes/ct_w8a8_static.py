"""compressed-tensors W8A8 static: int8 weights, int8 activations with a calibrated per-tensor scale.

Checkpoint (int-quantized): weight int8 [N, K]; weight_scale [N, 1] (channel) or [1] per shard
(tensor); input_scale [1] per shard; input_zero_point int8 [1] per shard when the activations are
asymmetric (msmodelslim's compressed-tensors writer stores it in the model dtype: whole numbers, taken
as int8). compressed-tensors quantizes x_q = sat8(round(x / s_x + z_x)) and dequantizes
(x_q - z_x) * s_x, so with symmetric weights
    y = s_x * s_w[n] * (x_q @ w - z_x * sum_k w[n, k]),
which is npu_quantize -> npu_quant_matmul with deq_scale = s_x * s_w and the int32 bias
-z_x * sum_k w (each rank sums its own K slice; the all-reduce adds the slices up).
npu_quantize runs as upstream calls it (div_mode=False): x * (1 / s_x) + z_x, the reciprocal scale
and the zero point one element each in the activation dtype (the op's rule: zero point and scale
share dtype and shape); see w8a8_static.py for the reciprocal's bf16 rounding. deq_scale is fp32 for
bf16 models and int64 (fp32 bits) for fp16 ones, as npu_quant_matmul takes it.
Shards of a fused layer were calibrated on the same input; where their scales differ the largest is
used for the whole layer (vLLM does the same), and their zero points must agree.
"""

from typing import List, Optional

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.parameters import register, replace_data
from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.layers.schemes.base import LinearScheme
from sgl_ascend.layers.schemes.common import kernel_act_dtype, to_kernel_layout
from sgl_ascend.layers.schemes.ct_common import expand_per_shard, float_zero_point_to_int8
from sgl_ascend.layers.schemes.w8a8_static import install_input_scale_reciprocal
from sgl_ascend.ops import ops
from sgl_ascend.ops.scales import encode_fp32_as_int64
from sgl_ascend.quant.scheme_key import COMPRESSED_TENSORS, LINEAR


@register_scheme(LINEAR, COMPRESSED_TENSORS, "W8A8_STATIC")
class CTW8A8StaticLinear(LinearScheme):
    @classmethod
    def from_key(cls, key, **context):
        return cls(key.param("strategy") == "channel", key.param("act_symmetric"))

    def __init__(self, per_channel_weights: bool, symmetric_activations: bool):
        self.per_channel = per_channel_weights
        self.symmetric_acts = symmetric_activations

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: List[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **_):
        n, k, shards = sum(output_partition_sizes), input_size_per_partition, len(output_partition_sizes)
        self.partition_sizes = list(output_partition_sizes)
        self.params_dtype = kernel_act_dtype(params_dtype, "compressed-tensors W8A8 static")
        register(layer, "weight", torch.empty(n, k, dtype=torch.int8), output_dim=0, input_dim=1)
        if self.per_channel:
            register(layer, "weight_scale", torch.empty(n, 1, dtype=torch.float32), output_dim=0)
        else:
            register(layer, "weight_scale", torch.empty(shards, dtype=torch.float32), per_shard=True)
        register(layer, "input_scale", torch.empty(shards, dtype=torch.float32), per_shard=True)
        if not self.symmetric_acts:
            register(layer, "input_zero_point", torch.empty(shards, dtype=torch.int8), per_shard=True,
                     converters={d: float_zero_point_to_int8 for d in (torch.bfloat16, torch.float16, torch.float32)})

    def process_weights_after_loading(self, layer):
        weight = layer.weight.data
        weight_scale = layer.weight_scale.data.reshape(-1)
        if not self.per_channel:
            weight_scale = expand_per_shard(weight_scale, self.partition_sizes)
        input_scale = layer.input_scale.data.max().reshape(1)
        deq_scale = input_scale * weight_scale
        if self.params_dtype == torch.float16:  # the fp16 kernel takes its scale as int64 (fp32 bits)
            deq_scale = encode_fp32_as_int64(deq_scale)
        delattr(layer, "weight_scale")
        install_input_scale_reciprocal(layer, input_scale, self.params_dtype)
        layer.register_buffer("deq_scale", deq_scale)
        if not self.symmetric_acts:
            zero_points = layer.input_zero_point.data
            if not torch.all(zero_points == zero_points[0]):
                raise CheckpointError(
                    f"the fused shards carry different activation zero points {zero_points.tolist()}; one "
                    "activation quantization serves the fused layer. Re-calibrate them on one input.",
                    tensor=layer.input_zero_point.tensor_name)
            layer.register_buffer("quant_bias", -int(zero_points[0]) * weight.sum(dim=1, dtype=torch.int32))
            replace_data(layer, "input_zero_point", zero_points[:1].to(self.params_dtype))
        replace_data(layer, "weight", to_kernel_layout(weight))

    def apply_weights(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
        zero_point = None if self.symmetric_acts else layer.input_zero_point
        x_q = ops.npu_quantize(x, layer.input_scale_reciprocal, zero_point, torch.qint8, -1, False)
        out = ops.npu_quant_matmul(x_q, layer.weight, layer.deq_scale, bias=getattr(layer, "quant_bias", None),
                                   output_dtype=x.dtype)
        return out if bias is None else out + bias

    def theoretical_bytes(self, input_size_per_partition: int, output_size_per_partition: int) -> int:
        # int8 weight + fp32/int64 deq_scale (4 or 8 bytes) + int32 bias of asymmetric activations, and
        # the reciprocal input scale (+ zero point) one element each in the activation dtype
        deq_bytes = 8 if self.params_dtype == torch.float16 else 4
        act_bytes = torch.empty((), dtype=self.params_dtype).element_size()
        per_row = input_size_per_partition + deq_bytes + (0 if self.symmetric_acts else 4)
        return output_size_per_partition * per_row + act_bytes * (1 if self.symmetric_acts else 2)
