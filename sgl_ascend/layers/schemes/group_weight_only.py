"""msModelSlim per-group W8A16, W8A8_DYNAMIC and W4A4_DYNAMIC linears, served weight-only per group.

The tool writes these with the type strings of the per-channel schemes (its saver's `on_w8a16_static_per_group`,
`on_w8a8_dynamic_per_group`, `on_w4a4_dynamic_per_group`) and the description's top-level group_size g:
weight int8 [N, K] (int4 values one per byte for W4A4), weight_scale and weight_offset fp32 [N, K/g],
dequantized (q - offset) * scale per group of g input channels. The resolver marks a layer `group_wise`
when its headers show the [N, K/g] scales (quant.modelslim.group_wise_layers), and the per-channel class
registered for the type string hands such a key to this one.

Kernel: npu_weight_quant_batchmatmul with antiquant_group_size g, scale / offset [K/g, N] in the
activation dtype, the int8 [K, N] view or the int4 pack [K, N/8]: what SGLang / vllm-ascend call for
weight-only per-group layers (vllm-ascend's W4A16, this package's W4A8_DYNAMIC and CT WNA16). W8A16 is
exactly that. W8A8_DYNAMIC and W4A4_DYNAMIC ask for int8 / int4 activations too, but no NPU kernel
multiplies quantized activations by weights with per-group scales (npu_quant_matmul's group_sizes serve
the MX formats only; vllm-ascend's W8A8_DYNAMIC / W4A4_DYNAMIC linears read [N, 1] scales only), so they
run weight-only as the dense W4A8_DYNAMIC layers do: the activations are not rounded, which takes the
activation-quantization error of the recipe away (closer to the float model), and the weights are the
checkpoint's exactly. A non-zero offset (asymmetric recipes) goes to the kernel negated, (w + (-offset)).
A rank holding a single group of K runs it per channel (the kernel's group size lies in [32, K-1]); group
sizes must be multiples of 32 (common.weight_only_group_size).
"""

import logging
from typing import List, Optional

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.parameters import register, replace_data
from sgl_ascend.layers.schemes.base import LinearScheme
from sgl_ascend.layers.schemes.common import (kernel_act_dtype, register_int4_weight, to_kernel_layout,
                                              weight_only_group_size, weight_only_matmul)

BITS = {"W8A16": 8, "W8A8_DYNAMIC": 8, "W4A4_DYNAMIC": 4}

logger = logging.getLogger(__name__)
_said = set()


def _log_weight_only(layer, name: str) -> None:
    """Say once per scheme (INFO; later layers DEBUG) that a per-group A8 / A4 layer runs weight-only: a
    scheme never runs as something else silently."""
    logger.log(logging.DEBUG if name in _said else logging.INFO,
               "%s: per-group msModelSlim %s runs weight-only per group on the NPU (npu_weight_quant_batchmatmul: "
               "no kernel takes quantized activations with per-group weight scales); activations are not quantized",
               getattr(layer, "prefix", "") or "layer", name)
    _said.add(name)


class GroupWeightOnlyLinear(LinearScheme):
    reads_group_size = True

    @classmethod
    def from_key(cls, key, **context) -> "GroupWeightOnlyLinear":
        return cls(key.name, key.param("group_size", 0))

    def __init__(self, name: str, group_size: int):
        self.name, self.bits, self.group_size = name, BITS[name], group_size

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: List[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **_):
        n, k, g = sum(output_partition_sizes), input_size_per_partition, self.group_size
        prefix = getattr(layer, "prefix", "")
        self.act_dtype = kernel_act_dtype(params_dtype, f"per-group {self.name}")
        if g <= 0:
            raise CheckpointError(f"layer {prefix} has per-group scales but the description's group_size is {g}; "
                                  "set it to the group size the weights were quantized with.", key="group_size")
        if k % g:
            raise CheckpointError(f"layer {prefix}: {k} input channels per rank are not a whole number of groups "
                                  f"of {g} (description group_size); pick a tp size that keeps K per rank a "
                                  "multiple of the group size.")
        self.kernel_group_size = weight_only_group_size(g, k, prefix)
        if self.name != "W8A16":
            _log_weight_only(layer, self.name)
        if self.bits == 4:
            register_int4_weight(layer, "weight", n, k)  # range-checked and packed as each shard loads
        else:
            register(layer, "weight", torch.empty(n, k, dtype=torch.int8), output_dim=0, input_dim=1)
        for attr in ("weight_scale", "weight_offset"):
            register(layer, attr, torch.empty(n, k // g, dtype=torch.float32), output_dim=0, input_dim=1)

    def process_weights_after_loading(self, layer):
        if self.bits == 8:
            replace_data(layer, "weight", to_kernel_layout(layer.weight.data))
        replace_data(layer, "weight_scale", layer.weight_scale.data.t().contiguous().to(self.act_dtype))
        self.asymmetric = bool(torch.count_nonzero(layer.weight_offset.data))
        if self.asymmetric:  # msModelSlim subtracts the offset, the kernel adds it
            replace_data(layer, "weight_offset", (-layer.weight_offset.data).t().contiguous().to(self.act_dtype))
        else:
            delattr(layer, "weight_offset")

    def apply_weights(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
        return weight_only_matmul(x, layer.weight, layer.weight_scale, getattr(layer, "weight_offset", None), bias,
                                  self.kernel_group_size)

    def theoretical_bytes(self, input_size_per_partition: int, output_size_per_partition: int) -> int:
        n, k = output_size_per_partition, input_size_per_partition
        per_group = torch.finfo(self.act_dtype).bits // 8 * (2 if getattr(self, "asymmetric", False) else 1)
        return n * k * self.bits // 8 + n * (k // self.group_size) * per_group
