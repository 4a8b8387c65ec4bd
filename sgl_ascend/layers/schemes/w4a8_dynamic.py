"""W4A8_DYNAMIC linear layers (msModelSlim MLP linears): int4 symmetric weights, per channel or per
group.

Kernel (decided with the NPU op contract, see schemes/w4a8_kernel.py): weight-only int4 on
npu_weight_quant_batchmatmul, as vllm-ascend serves dense W4A8 (AscendW4A8DynamicLinearMethod):
y = x @ (q * s) with x unquantized. The single-group grouped matmul the expert kernel uses is not
legal for a dense layer (a counts group_list of length 1 is forbidden by the op's documentation).
Accuracy consequence: the activations are NOT quantized to int8 per token, so the layer is closer to
the float model than msModelSlim's W4A8 simulation (no activation rounding: that error term is gone);
the dequantization scale s = weight_scale_second * weight_scale is rounded once to the activation
dtype (bf16: relative 2^-9 per scale), which the kernel demands. Prefill runs at weight-only speed
(no int8 cube matmul); decode, memory-bound, reads the same 0.5 byte per weight.

Checkpoint: weight int8 [N/2, K], two int4 per byte along N (low nibble = even row), or, from older
writers (description version missing or "0"), int8 [N, K] with one int4 per byte; weight_scale,
weight_offset (zeros) [N, 1]; group-wise (description group_size g > 0) adds weight_scale_second
[N, K/g] (dequantized weight = q * weight_scale_second * weight_scale) and weight_offset_second
(zeros, int64 as the tool writes it). scale_bias (the int8-activation kernel's correction) is not
needed by the weight-only kernel and is not loaded.
After loading: weight int32 [K, N/8] (packed, the only copy), weight_scale [N] or [K/g, N] in the
activation dtype. Group sizes must be multiples of 32 (the kernel's rule); a rank holding a single
group runs it per channel.
"""

from typing import List, Optional

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.parameters import register
from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.layers.schemes.base import LinearScheme
from sgl_ascend.layers.schemes.common import (check_int_range, drop_zero_offset, kernel_act_dtype,
                                              pack_int4_for_kernel, weight_only_group_size)
from sgl_ascend.layers.schemes.w4a8_kernel import (apply_w4a8_weight_only, install_w4a8_weight_only, log_weight_only,
                                                   w4a8_linear_bytes)
from sgl_ascend.quant.scheme_key import LINEAR, MSMODELSLIM


@register_scheme(LINEAR, MSMODELSLIM, "W4A8_DYNAMIC")
class W4A8DynamicLinear(LinearScheme):
    # the int8-activation kernel's correction: the weight-only kernel has no use for it
    ignored_suffixes = ("scale_bias",)
    reads_group_size = True

    @classmethod
    def from_key(cls, key, **context):
        return cls(key.param("group_size", 0), legacy=key.param("legacy", False))

    def __init__(self, group_size: int = 0, legacy: bool = False):
        self.group_size, self.legacy = group_size, legacy

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: List[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **_):
        n, k, g = sum(output_partition_sizes), input_size_per_partition, self.group_size
        prefix = getattr(layer, "prefix", "")
        self.act_dtype = kernel_act_dtype(params_dtype, "W4A8_DYNAMIC")
        if any(size % 8 for size in output_partition_sizes):
            raise CheckpointError(f"W4A8 layer {prefix}: output sizes {output_partition_sizes} must be "
                                  "multiples of 8 to pack int4")
        if g and k % g:
            raise CheckpointError(f"W4A8 layer {prefix}: {k} input channels per rank are not a whole number "
                                  f"of groups of {g} (description group_size); pick a tp size that keeps K "
                                  "per rank a multiple of the group size.")
        self.kernel_group_size = weight_only_group_size(g, k, prefix)
        if self.legacy:
            register(layer, "weight", torch.empty(n, k, dtype=torch.int8), output_dim=0, input_dim=1)
        else:
            register(layer, "weight", torch.empty(n // 2, k, dtype=torch.int8), output_dim=0, input_dim=1,
                     output_pack_factor=2)
        register(layer, "weight_scale", torch.empty(n, 1, dtype=torch.float32), output_dim=0)
        register(layer, "weight_offset", torch.empty(n, 1, dtype=torch.float32), output_dim=0)
        if g:
            register(layer, "weight_scale_second", torch.empty(n, k // g, dtype=torch.float32), output_dim=0,
                     input_dim=1)
            register(layer, "weight_offset_second", torch.empty(n, k // g, dtype=torch.int64), output_dim=0,
                     input_dim=1)
        log_weight_only(layer, "msModelSlim")

    def process_weights_after_loading(self, layer):
        drop_zero_offset(layer, "weight_offset", "the W4A8_DYNAMIC kernel")
        if self.legacy:
            check_int_range(layer, "weight", -8, 7)
            weight = pack_int4_for_kernel(layer.weight.data)
        else:  # bytes of the transposed pairs are the kernel's int32 [K, N/8] (common.write_int4_pairs)
            weight = layer.weight.data.t().contiguous().view(torch.int32)
        scale = layer.weight_scale.data.reshape(-1).float()
        if self.group_size:
            drop_zero_offset(layer, "weight_offset_second", "the W4A8_DYNAMIC kernel")
            scale = layer.weight_scale_second.data.t().float() * scale.reshape(1, -1)  # [G, N]
        install_w4a8_weight_only(layer, weight, scale, self.act_dtype)

    def apply_weights(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
        return apply_w4a8_weight_only(layer, x, bias, self.kernel_group_size)

    def theoretical_bytes(self, input_size_per_partition: int, output_size_per_partition: int) -> int:
        return w4a8_linear_bytes(input_size_per_partition, output_size_per_partition, self.group_size, self.act_dtype)
