"""compressed-tensors WNA16: int4 / int8 weights per channel or per group, activations in bf16/fp16.

Checkpoint, pack-quantized: weight_packed int32 [N, K*b/32] (value q + 2^(b-1), element k at bit
k*b, unpacked by the library's `unpack_from_int32`), weight_scale [N, K/g] or [N, 1], weight_shape
[2] (metadata: checked, then dropped), weight_zero_point int32 [N*b/32, K/g] (packed along N) when
asymmetric. int-quantized stores `weight` int8 [N, K], one value per byte, zero point unpacked.
compressed-tensors dequantizes (q - z) * s; npu_weight_quant_batchmatmul computes (w + offset) * scale,
so the offset handed over is -z. int4 goes to the kernel eight per int32 along N ([K, N/8]), packed
shard by shard while it loads (the parameter holds that layout from creation on); int8 becomes the
[K, N] view after loading; group scales become [K/g, N] in the activation dtype (converted once,
after loading: npu_weight_quant_batchmatmul takes antiquant_scale / antiquant_offset in x's dtype).
A rank holding a single group of K runs it as a per-channel scale [1, N] (the kernel's group size must
lie in [32, K-1]); group sizes must be multiples of 32 (common.weight_only_group_size).

Tensor parallelism: row-parallel layers split K of weight_packed (K*b/32 words per rank) and of the
group scales (K/g per rank), so the local K must be a multiple of 32/b and of g.
"""

from typing import List, Optional

import torch
from compressed_tensors.compressors import unpack_from_int32

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.parameters import register, replace_data
from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.layers.schemes.base import LinearScheme
from sgl_ascend.layers.schemes.common import (kernel_act_dtype, register_int4_weight, to_kernel_layout,
                                              weight_only_group_size, weight_only_matmul)
from sgl_ascend.layers.schemes.ct_common import (check_and_drop_weight_shape, register_weight_shape,
                                                 write_packed_int4)
from sgl_ascend.quant.scheme_key import COMPRESSED_TENSORS, LINEAR


@register_scheme(LINEAR, COMPRESSED_TENSORS, "WNA16")
class CTWNA16Linear(LinearScheme):
    @classmethod
    def from_key(cls, key, **context):
        return cls(key.param("num_bits"), key.param("group_size", 0), key.param("symmetric"),
                   packed=key.param("packed", False))

    def __init__(self, num_bits: int, group_size: int, symmetric: bool, packed: bool):
        if num_bits not in (4, 8):
            raise ValueError(f"WNA16 serves 4- and 8-bit weights, got {num_bits}")
        self.num_bits, self.group_size = num_bits, group_size
        self.symmetric, self.packed = symmetric, packed

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: List[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **_):
        n, k, b = sum(output_partition_sizes), input_size_per_partition, self.num_bits
        self.act_dtype = kernel_act_dtype(params_dtype, type(self).__name__)
        self.full_size = (output_size, input_size)
        prefix = getattr(layer, "prefix", "")
        per_word = 32 // b
        if self.packed and k % per_word:
            raise CheckpointError(
                f"layer {prefix}: {k} input channels per rank do not fill whole int32 words of {per_word} "
                f"{b}-bit values; pick a tp size that keeps K per rank a multiple of {per_word}.")
        if self.group_size and k % self.group_size:
            raise CheckpointError(
                f"layer {prefix}: {k} input channels per rank are not a whole number of groups of "
                f"{self.group_size}; pick a tp size that keeps K per rank a multiple of the group size.")
        self.kernel_group_size = weight_only_group_size(self.group_size, k, prefix)
        if self.packed and b == 4:
            register_int4_weight(layer, "weight_packed", n, k, checkpoint_shape=(n, k // per_word),
                                 checkpoint_dtype=torch.int32, write=write_packed_int4)
        elif self.packed:
            register(layer, "weight_packed", torch.empty(n, k // per_word, dtype=torch.int32),
                     output_dim=0, input_dim=1)
        elif b == 4:
            register_int4_weight(layer, "weight", n, k)
        else:
            register(layer, "weight", torch.empty(n, k, dtype=torch.int8), output_dim=0, input_dim=1)
        if self.packed:
            register_weight_shape(layer, len(output_partition_sizes), input_size)
        groups = k // self.group_size if self.group_size else 1
        group_dim = 1 if self.group_size else None
        register(layer, "weight_scale", torch.empty(n, groups, dtype=params_dtype), output_dim=0,
                 input_dim=group_dim)
        if not self.symmetric:
            if self.packed:
                if n % per_word:
                    raise CheckpointError(
                        f"layer {prefix}: {n} output channels per rank do not fill whole int32 words of "
                        f"packed zero points ({per_word} per word); pick another tp size.")
                register(layer, "weight_zero_point", torch.empty(n // per_word, groups, dtype=torch.int32),
                         output_dim=0, output_pack_factor=per_word, input_dim=group_dim)
            else:
                register(layer, "weight_zero_point", torch.empty(n, groups, dtype=torch.int8), output_dim=0,
                         input_dim=group_dim)

    def _kernel_weight(self, layer) -> torch.Tensor:
        """int4: the weight as loaded (already the kernel's); int8: the [K, N] view of the values."""
        attr = "weight_packed" if self.packed else "weight"
        weight = getattr(layer, attr).data
        delattr(layer, attr)
        if self.packed:
            check_and_drop_weight_shape(layer, self.full_size[1], self.full_size[0])
        if self.num_bits == 4:
            return weight
        if self.packed:
            n, k = weight.shape[0], weight.shape[1] * 32 // self.num_bits
            weight = unpack_from_int32(weight, self.num_bits, torch.Size([n, k]))
        return to_kernel_layout(weight)

    def _kernel_side(self, per_row: torch.Tensor) -> torch.Tensor:
        """[N, groups] -> [groups, N] per group, [N] per channel, in the activation dtype."""
        if self.group_size:
            return per_row.t().contiguous().to(self.act_dtype)
        return per_row.reshape(-1).to(self.act_dtype)

    def process_weights_after_loading(self, layer):
        kernel_weight = self._kernel_weight(layer)
        layer.register_parameter("weight", torch.nn.Parameter(kernel_weight, requires_grad=False))
        replace_data(layer, "weight_scale", self._kernel_side(layer.weight_scale.data))
        if not self.symmetric:
            zp = layer.weight_zero_point.data
            if self.packed:
                n = zp.shape[0] * 32 // self.num_bits
                zp = unpack_from_int32(zp, self.num_bits, torch.Size([n, zp.shape[1]]), packed_dim=0)
            if torch.count_nonzero(zp):
                replace_data(layer, "weight_zero_point", self._kernel_side(-zp.to(torch.float32)))
            else:
                delattr(layer, "weight_zero_point")

    def apply_weights(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
        return weight_only_matmul(x, layer.weight, layer.weight_scale, getattr(layer, "weight_zero_point", None),
                                  bias, self.kernel_group_size)

    def theoretical_bytes(self, input_size_per_partition: int, output_size_per_partition: int) -> int:
        n, k = output_size_per_partition, input_size_per_partition
        groups = k // self.group_size if self.group_size else 1
        scale_bytes = torch.finfo(self.act_dtype).bits // 8
        per_group = scale_bytes * (1 if self.symmetric else 2)
        return n * k * self.num_bits // 8 + n * groups * per_group
