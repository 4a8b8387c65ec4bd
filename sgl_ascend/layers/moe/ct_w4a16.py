"""compressed-tensors W4A16 experts: int4 weights (pack-quantized) per channel or per group of g, symmetric
or asymmetric; activations stay in the model dtype (bf16 / fp16).

Checkpoint per expert and projection [n out, k in] (the library's PackedQuantizationCompressor):
`weight_packed` int32 [n, k/8] (value q + 8, element k at bit 4k), `weight_scale` [n, k/g] or [n, 1] in the
model dtype, `weight_shape` [2] (checked, never stored) and, asymmetric only, `weight_zero_point` int32
[n/8, k/g] (or [n/8, 1]) packed along n the same way. The library dequantizes (q - z) * s.

Kernel: npu_grouped_matmul's weight-only ("伪量化") path, as vllm-ascend (quantization/methods/wna16/w4a16.py
+ ops/fused_moe/moe_mlp.py) and SGLang 0.5.23 (NPUWNA16Int4MoEMethod) serve CT W4A16 experts: x in the model
dtype, weight int4 eight per int32 [E, K, N/8], antiquant_scale and antiquant_offset in x's dtype, [E, N] per
channel or [E, G, N] per group; it computes x @ ((w + offset) * scale), so the offset is -z. Both upstreams
always pass an offset (zeros when symmetric; vllm-ascend notes the operator requires it), so a symmetric
layer holds a zero offset too (ops/contract.py requires it).

Memory: every tensor goes straight into its final layout while loading (the weight packed along N, shard by
shard, `write_packed_int4`; scales transposed into [G, N] and converted to the model dtype; zero points
unpacked, negated and transposed); a symmetric layer's zero offset is allocated after loading. Nothing is
held twice. Other bit widths and unpacked storage are refused, naming the module and what to do. Activation
ordering: `actorder` weight / static stores groups in order and is served; group / dynamic (a `weight_g_idx`
permuting K, which the kernel cannot apply) is refused by the library's own config validation (0.20:
"actorder='group' has been removed"), before any scheme is chosen.
"""

from typing import Dict

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.moe.base import (ExpertScheme, TensorSpec, copy_write, grouped_matmul, register_expert,
                                        transposed_write)
from sgl_ascend.layers.moe.checks import CHECK_ONLY, drop_check_only, write_shape_check
from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.layers.schemes.common import kernel_act_dtype
from sgl_ascend.layers.schemes.ct_common import write_packed_int4
from sgl_ascend.ops.int4 import CT_OFFSET_BITS, unpack_int32_to_int4
from sgl_ascend.quant import compressed_tensors as ct
from sgl_ascend.quant.scheme_key import COMPRESSED_TENSORS, EXPERTS

def write_negated_zero_point(target: torch.Tensor, packed: torch.Tensor) -> None:
    """Zero points int32 [n/8, G] packed along n (v + 8 per nibble) -> -z in the kernel's [G, n] (or [n])
    slot, in the model dtype: the kernel adds its offset, compressed-tensors subtracts its zero point."""
    values = unpack_int32_to_int4(packed.t().contiguous() ^ CT_OFFSET_BITS)  # [G, n]
    target.copy_(values.neg().reshape(target.shape))


@register_scheme(EXPERTS, COMPRESSED_TENSORS, ct.WNA16)
class CTW4A16Experts(ExpertScheme):
    act_dtype = None  # weight-only: the rows stay in the model dtype

    @classmethod
    def from_key(cls, key, *, role: str, module: str = "", params_dtype: torch.dtype = torch.bfloat16, **context):
        bits, strategy, packed = key.param("num_bits"), key.param("strategy"), key.param("packed")
        if bits != 4 or not packed or strategy not in ("channel", "group"):
            raise CheckpointError(
                f"experts quantized as weight-only int{bits} {strategy} ({key.param('storage')}) are not served; "
                "served: int4 weights per channel or per group, pack-quantized (W4A16). Re-quantize the experts "
                "with llm-compressor's W4A16 preset (format pack-quantized).", tensor=module)
        return cls(role, params_dtype, group_size=key.param("group_size") or 0, symmetric=key.param("symmetric"))

    def __init__(self, role: str, params_dtype: torch.dtype = torch.bfloat16, group_size: int = 0,
                 symmetric: bool = True):
        super().__init__(role, kernel_act_dtype(params_dtype, "W4A16 experts"))
        self.group_size, self.symmetric = group_size, symmetric

    def checkpoint_tensors(self, n, k, tp_size) -> Dict[str, TensorSpec]:
        g = self.group_size
        if g and k % g:
            raise CheckpointError(f"group size {g} does not divide the input size {k} of {self.role}; the "
                                  "quantization_config's group_size does not match the model.")
        if self.role == "w2" and g and (k // tp_size) % g:
            raise CheckpointError(f"tensor parallelism {tp_size} splits down_proj's input {k} into {k // tp_size}, "
                                  f"which group size {g} does not divide; serve with a smaller moe tp (or ep).")
        split, out = self.tp_split_dim(), (0 if self.role == "w13" else None)
        side_dim = split if g else out  # group scales split with K on down; channel scales with N only
        groups = k // g if g else 1
        specs = {"weight_packed": TensorSpec((n, k // 8), "int32", tp_dim=split),
                 "weight_shape": TensorSpec((2,), "int"),
                 "weight_scale": TensorSpec((n, groups), "float", tp_dim=side_dim)}
        if not self.symmetric:
            specs["weight_zero_point"] = TensorSpec((n // 8, groups), "int32", tp_dim=side_dim)
        return specs

    def _side_shape(self, e: int, n: int, k: int):
        """antiquant_scale / antiquant_offset: [E, G, N] per group, [E, N] per channel (torch_npu docs)."""
        return (e, k // self.group_size, n) if self.group_size else (e, n)

    def create_weights(self, layer, num_experts, n, k, tp_size, **attrs):
        shard_n = n // 2 if self.role == "w13" else n
        if shard_n % 8 or k % 8:
            raise CheckpointError(f"int4 experts pack 8 values per int32 along both dims: {self.role} needs its "
                                  f"per-rank output size per projection ({shard_n}) and input size ({k}) to be "
                                  "multiples of 8; pick another moe tp size.")
        specs = self.checkpoint_tensors(*self.full_sizes(n, k, tp_size), tp_size)

        def reg(suffix, data, **kw):
            register_expert(layer, self.a(suffix), data, specs[suffix], **kw, **attrs)

        side, side_n_dim = self._side_shape(num_experts, n, k), (1 if self.group_size else 0)
        side_write = transposed_write if self.group_size else copy_write
        reg("weight_packed", torch.empty(num_experts, k, n // 8, dtype=torch.int32), n_dim=1, write=write_packed_int4)
        reg("weight_shape", CHECK_ONLY(), n_dim=None, write=write_shape_check(*self.full_sizes(n, k, tp_size)))
        reg("weight_scale", torch.empty(side, dtype=self.params_dtype), n_dim=side_n_dim, write=side_write)
        if not self.symmetric:
            reg("weight_zero_point", torch.empty(side, dtype=self.params_dtype), n_dim=side_n_dim,
                write=write_negated_zero_point)

    def process_weights_after_loading(self, layer):
        drop_check_only(layer, self.role)
        weight = getattr(layer, self.a("weight_packed"))
        delattr(layer, self.a("weight_packed"))
        layer.register_parameter(self.a("weight"), weight)
        if self.symmetric:  # the kernel call takes an offset (see module docstring): zeros
            scale = getattr(layer, self.a("weight_scale"))
            offset = torch.nn.Parameter(torch.zeros_like(scale.data), requires_grad=False)
        else:
            offset = getattr(layer, self.a("weight_zero_point"))
            delattr(layer, self.a("weight_zero_point"))
        layer.register_parameter(self.a("weight_offset"), offset)

    def apply(self, layer, x, token_scale, group_list, group_list_type, output_dtype):
        return grouped_matmul(x, getattr(layer, self.a("weight")), group_list, group_list_type, output_dtype,
                              antiquant_scale=[getattr(layer, self.a("weight_scale"))],
                              antiquant_offset=[getattr(layer, self.a("weight_offset"))])

    def theoretical_bytes(self, num_experts, n, k):
        groups = k // self.group_size if self.group_size else 1
        return num_experts * (n * k // 2 + 2 * groups * n * self.params_dtype.itemsize)  # weight, scale + offset
