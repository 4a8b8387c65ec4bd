"""W4A8_DYNAMIC experts: int4 symmetric weights, int8 per-token activations, one grouped matmul.

Checkpoint forms served (per expert and projection [n out, k in]):
- msModelSlim, current writers: `weight` int8 [n/2, k], two int4 per byte along n (low nibble =
  even row); `weight_scale`, `weight_offset` (zeros) [n, 1]; `scale_bias`: [n, 1] for gate/up,
  [n, 16] for down (8 * sum of the dequantized weight over each of 16 K-slices).
  Group-wise (description `group_size` > 0) adds `weight_scale_second` [n, k/g] and
  `weight_offset_second` (zeros); dequantized weight = q * weight_scale_second * weight_scale.
- msModelSlim, older writers (description `version` missing or "0"): `weight` int8 [n, k], one
  int4 per byte; the rest as above.
- compressed-tensors `pack-quantized` (int4 symmetric weights per channel or per group of g,
  dynamic per-token int8 input activations): `weight_packed` int32 [n, k/8], `weight_scale`
  [n, 1] or [n, k/g], `weight_shape`. These files carry no scale_bias; it is computed from the
  loaded weights (schemes/w4a8_kernel.py, shared with the dense W4A8 linears).
- activation clip (`activation_use_clip`, DeepSeek-V3.2 W4A8 recipes; per-channel only): no
  scale_bias; `bias` [n] of gate/up (-> w13_bias) and down (-> w2_bias) and `alpha` of down
  (-> w2_alpha); weight_scale may already be int64 (fp32 bits).

Meaning, and what runs: the grouped matmul (see ops twin) accumulates (x_q - 8) @ q per K-group
(x_q the int8 activation), scales by the weight scale (int64 fp32 bits), adds a per-channel fp32
`bias`, then multiplies by the token's activation scale s. The bias is scale_bias (summed over the
rank's 16 // tp K-slices for down) or, with activation clip, w13_bias / w2_bias as given (what
upstream's kernel call does). So a layer computes x_fq @ deq_w + (bias - 8 * sum_k deq_w) * s: the
extra term is zero when bias is the plain kernel correction, and otherwise an output offset in
units of the token's activation scale (docs/moe.md). Under tensor parallelism that extra term of
down cannot be split (every rank has its own activation scale), so with tp > 1 w2_bias must be the
plain correction over the full K (checked, up to 1e-4 relative) and each rank uses the correction
over its own K slice, computed from its weights; otherwise loading fails with a CheckpointError.
w2_alpha: upstream loads it and no kernel reads it, so any value but 1 would be silently ignored;
it is checked to be 1 while loading and otherwise rejected.

Memory: every tensor is written straight into its final layout while loading (weights as int32
[E, K, N/8], scales as int64 fp32 bits, down's scale_bias summed); the only post-processing is, for
group-wise msModelSlim files, multiplying the per-channel scale into the int64 group scales, expert
by expert (compressed-tensors group scales are final as loaded). Group-wise kernel scales are
rounded through fp16 as upstream does (`fp16_group_scale_bits`); per-channel ones keep fp32 bits.
"""

from typing import Dict

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.moe.base import ExpertScheme, TensorSpec, register_expert
from sgl_ascend.layers.moe.checks import CHECK_ONLY, drop_check_only, write_shape_check, write_zero_check
from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.layers.schemes.common import write_fp32_bits, write_int4_pairs, write_int4_values, write_scale_or_bits
from sgl_ascend.layers.schemes.ct_common import write_packed_int4
from sgl_ascend.layers.schemes.w4a8_kernel import kernel_correction, w4a8_grouped_matmul
from sgl_ascend.ops.int4 import CT_OFFSET_BITS, unpack_int32_to_int4, unpack_int8_pairs
from sgl_ascend.ops.scales import decode_int64_scale, encode_fp32_as_int64
from sgl_ascend.quant import compressed_tensors as ct
from sgl_ascend.quant.scheme_key import COMPRESSED_TENSORS, EXPERTS, MSMODELSLIM

FORMATS = ("modelslim", "modelslim_legacy", "compressed_tensors")
#: layer buffer (not a parameter) of w2's full-K int4 sums while a tp > 1 activation-clip layer loads
FULL_QSUM = "w2_full_qsum"
_LOW32 = 0xFFFFFFFF


def _write_low_bits(target, scale_second):
    """Group scales [n, K/g] -> low 32 bits of the [K/g, n] slots (fp32 bits)."""
    target.copy_((target & ~_LOW32) | encode_fp32_as_int64(scale_second.t()))


def fp16_group_scale_bits(group_scale: torch.Tensor, channel_scale=None) -> torch.Tensor:
    """Group-wise kernel scale: group scale [G, N] (times the channel scale [N]), rounded through fp16,
    as int64 fp32 bits. Both upstreams round the product so (SGLang moe_methods.py
    NPUW4A8Int8MoEMethod._process_scale: `(scale * per_group_scale).to(torch.float16).to(torch.float32)`);
    the kernel then sees at most 2^-11 relative change per group scale (fp16's 11-bit significand)."""
    product = group_scale.float()
    if channel_scale is not None:
        product = product * channel_scale.float().reshape(1, -1)
    return encode_fp32_as_int64(product.to(torch.float16).float())


def _write_group_bits(target, scale):
    """compressed-tensors group scales [n, K/g] -> the kernel's int64 [K/g, n] (final as written)."""
    target.copy_(fp16_group_scale_bits(scale.t()))


def _write_high_bits(target, scale):
    """Channel scale [n, 1] -> high 32 bits of every group's slot, until post-processing folds it in."""
    target.copy_((target & _LOW32) | (encode_fp32_as_int64(scale.reshape(1, -1)) << 32))


def _write_scale_bias(target, loaded):
    """[n, 1] as it is; down's [n, 16 // tp] K-slice sums are summed to this rank's correction."""
    target.copy_(loaded.float().sum(dim=-1).reshape(target.shape))


def _alpha_is_one(target, loaded):
    if not torch.all(loaded.float() == 1):
        raise CheckpointError(
            f"w2_alpha = {loaded.float().flatten().tolist()} but sgl-ascend serves activation-clip W4A8 "
            "experts only with w2_alpha == 1: no kernel applies it (upstream loads it and ignores it), "
            "so a different value would be silently dropped. Fold alpha into the down_proj scales.")


@register_scheme(EXPERTS, MSMODELSLIM, "W4A8_DYNAMIC")
@register_scheme(EXPERTS, COMPRESSED_TENSORS, ct.W4A8)
class W4A8DynamicExperts(ExpertScheme):
    act_dtype = torch.int8
    reads_group_size = True

    @classmethod
    def from_key(cls, key, *, role: str, module: str = "", **context):
        clip = key.param("clip", False)
        if key.format == MSMODELSLIM:
            return cls(role, fmt="modelslim_legacy" if key.param("legacy") else "modelslim",
                       group_size=key.param("group_size", 0), clip=clip)
        group_size = key.param("group_size") or 0
        if not (key.param("packed") and (key.param("strategy") == "channel" or group_size)):
            raise CheckpointError(
                f"experts quantized as W4A8 with {key.param('strategy')} weights (group_size "
                f"{key.param('group_size')}), format {key.param('storage')} are not served; served: int4 symmetric "
                "weights per channel or group (pack-quantized) with dynamic per-token int8 activations.",
                tensor=module)
        return cls(role, fmt="compressed_tensors", group_size=group_size, clip=clip)

    def __init__(self, role: str, fmt: str = "modelslim", group_size: int = 0, clip: bool = False):
        super().__init__(role)
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
        if clip and group_size:
            raise CheckpointError("activation-clip W4A8 experts are per-channel; group_size must be 0 "
                                  f"(got {group_size})")
        self.fmt, self.group_size, self.clip = fmt, group_size, clip
        self.bias_attr = self.a("bias" if clip else "scale_bias")

    # -- checkpoint ------------------------------------------------------------------------------
    def checkpoint_tensors(self, n, k, tp_size) -> Dict[str, TensorSpec]:
        split, out = self.tp_split_dim(), (0 if self.role == "w13" else None)
        if self.group_size and k % self.group_size:
            raise CheckpointError(f"group size {self.group_size} does not divide the input size {k} of "
                                  f"{self.role}; the description's group_size does not match the model.")
        if self.role == "w2" and self.group_size and (k // tp_size) % self.group_size:
            raise CheckpointError(f"tensor parallelism {tp_size} splits down_proj's input {k} into "
                                  f"{k // tp_size}, which group size {self.group_size} does not divide")
        specs = {}
        if self.fmt == "compressed_tensors":
            specs["weight_packed"] = TensorSpec((n, k // 8), "int32", tp_dim=split)
            specs["weight_shape"] = TensorSpec((2,), "int")
        else:
            rows = n // 2 if self.fmt == "modelslim" else n
            specs["weight"] = TensorSpec((rows, k), "int8", tp_dim=split)
            specs["weight_offset"] = TensorSpec((n, 1), "float", tp_dim=out)
        if self.group_size and self.fmt == "compressed_tensors":
            specs["weight_scale"] = TensorSpec((n, k // self.group_size), "float", tp_dim=split)
        else:
            specs["weight_scale"] = TensorSpec((n, 1), "float_or_int64" if self.clip else "float", tp_dim=out)
        if self.group_size and self.fmt != "compressed_tensors":
            specs["weight_scale_second"] = TensorSpec((n, k // self.group_size), "float", tp_dim=split)
            specs["weight_offset_second"] = TensorSpec((n, k // self.group_size), "number", tp_dim=split)
        if self.clip:
            specs["bias"] = TensorSpec((n,), "float", tp_dim=out)
            if self.role == "w2":
                specs["alpha"] = TensorSpec((1,), "float")
        elif self.fmt != "compressed_tensors":
            if self.role == "w13":
                specs["scale_bias"] = TensorSpec((n, 1), "float", tp_dim=0)
            else:  # 16 K-slice sums: a rank takes the 16 // tp slices of its part of K
                if 16 % tp_size:
                    raise CheckpointError(f"down_proj scale_bias has 16 K-slices, which tp size {tp_size} "
                                          "does not divide")
                specs["scale_bias"] = TensorSpec((n, 16), "float", tp_dim=1)
        return specs

    def create_weights(self, layer, num_experts, n, k, tp_size, **attrs):
        if n % 8:
            raise CheckpointError(f"int4 experts need the per-rank output size of {self.role} to be a "
                                  f"multiple of 8 (16 for gate+up), got {n}")
        specs = self.checkpoint_tensors(*self.full_sizes(n, k, tp_size), tp_size)
        weight_write = {"modelslim": write_int4_pairs, "modelslim_legacy": write_int4_values,
                        "compressed_tensors": write_packed_int4}[self.fmt]
        weight_suffix = "weight_packed" if self.fmt == "compressed_tensors" else "weight"
        e = num_experts

        def reg(suffix, data, **kw):
            register_expert(layer, self.a(suffix), data, specs[suffix], **kw, **attrs)

        record = None
        if self.clip and self.role == "w2" and tp_size > 1:
            # sum_k q over the full (unsliced) K per output channel, until post-processing splits w2_bias
            sums = torch.zeros(e, n, dtype=torch.int32)
            layer.register_buffer(FULL_QSUM, sums, persistent=False)
            record = _full_sums_recorder(sums, self.fmt)
        reg(weight_suffix, torch.empty(e, k, n // 8, dtype=torch.int32), n_dim=1, write=weight_write,
            record_full=record)
        if self.fmt == "compressed_tensors":
            full_n, full_k = self.full_sizes(n, k, tp_size)
            reg("weight_shape", CHECK_ONLY(), n_dim=None, write=write_shape_check(full_n, full_k))
        else:
            reg("weight_offset", CHECK_ONLY(), write=write_zero_check)
        if self.group_size and self.fmt == "compressed_tensors":
            reg("weight_scale", torch.empty(e, k // self.group_size, n, dtype=torch.int64), n_dim=1,
                write=_write_group_bits)
        elif self.group_size:
            # Both scales go straight into the final int64 [K/g, N] slots: the group scale's fp32 bits
            # in the low half, the channel scale's in the (finally zero) high half of every group;
            # post-processing multiplies them in place. So no scale is ever held twice.
            slots = torch.empty(e, k // self.group_size, n, dtype=torch.int64)
            reg("weight_scale", slots, n_dim=1, write=_write_high_bits)
            reg("weight_scale_second", slots, n_dim=1, write=_write_low_bits)
            reg("weight_offset_second", CHECK_ONLY(), write=write_zero_check)
        else:
            reg("weight_scale", torch.empty(e, n, dtype=torch.int64),
                write=write_scale_or_bits if self.clip else write_fp32_bits)
        if self.clip:
            reg("bias", torch.empty(e, n, dtype=torch.float32))
            if self.role == "w2":
                reg("alpha", CHECK_ONLY(), n_dim=None, write=_alpha_is_one)
        elif self.fmt != "compressed_tensors":
            reg("scale_bias", torch.empty(e, n, dtype=torch.float32), write=_write_scale_bias)

    # -- after loading ---------------------------------------------------------------------------
    def process_weights_after_loading(self, layer):
        drop_check_only(layer, self.role)
        if self.fmt == "compressed_tensors":
            weight = getattr(layer, self.a("weight_packed"))
            delattr(layer, self.a("weight_packed"))
            layer.register_parameter(self.a("weight"), weight)
        if self.group_size and self.fmt != "compressed_tensors":
            groups = getattr(layer, self.a("weight_scale_second"))
            for e in range(groups.shape[0]):  # in place, one expert at a time
                slot = groups.data[e]
                channel = decode_int64_scale((slot >> 32) & _LOW32)[0]
                slot.copy_(fp16_group_scale_bits(decode_int64_scale(slot & _LOW32), channel))
            delattr(layer, self.a("weight_scale"))
            delattr(layer, self.a("weight_scale_second"))
            layer.register_parameter(self.a("weight_scale"), groups)
        if self.fmt == "compressed_tensors" and not self.clip:
            bias = torch.nn.Parameter(self._rank_correction(layer), requires_grad=False)
            layer.register_parameter(self.a("scale_bias"), bias)
        if self.clip and self.role == "w2" and hasattr(layer, FULL_QSUM):
            self._split_w2_bias(layer)

    def _rank_correction(self, layer):
        """8 * sum_k deq_w over this rank's K: the kernel correction, from the loaded int4 weights."""
        weight = getattr(layer, self.a("weight")).data
        scale = getattr(layer, self.a("weight_scale")).data
        return torch.stack([kernel_correction(weight[e], scale[e]) for e in range(weight.shape[0])])

    def _split_w2_bias(self, layer):
        """tp > 1: w2_bias must be the full-K correction; each rank then adds its own slice's."""
        bias = getattr(layer, self.a("bias"))
        full = 8 * getattr(layer, FULL_QSUM).float() * decode_int64_scale(getattr(layer, self.a("weight_scale")).data)
        delattr(layer, FULL_QSUM)
        extra = (bias.data - full).abs().max().item()
        if extra > 1e-4 * full.abs().max().item() + 1e-6:
            raise CheckpointError(
                f"w2_bias differs from the kernel correction 8 * sum_k(dequantized down weight) by up to {extra:g}; "
                "that extra offset is in units of each rank's own activation scale and cannot be split across "
                "tensor-parallel ranks. Serve this checkpoint with moe tp 1 (expert parallelism).",
                tensor=bias.tensor_name)
        bias.data = self._rank_correction(layer)

    def apply(self, layer, x, token_scale, group_list, group_list_type, output_dtype):
        return w4a8_grouped_matmul(x, token_scale, getattr(layer, self.a("weight")),
                                   getattr(layer, self.a("weight_scale")), getattr(layer, self.bias_attr),
                                   group_list, output_dtype, group_list_type=group_list_type)

    def theoretical_bytes(self, num_experts, n, k):
        scales = n * 8 * (k // self.group_size if self.group_size else 1)
        return num_experts * (n * k // 2 + scales + n * 4)


def _full_sums_recorder(sums: torch.Tensor, fmt: str):
    """ExpertLayout.record_full of the w2 weight: sum_k q of one expert's unsliced tensor into sums[local]."""
    def record(local, full):
        if fmt == "compressed_tensors":  # [n, k/8] words along K, ours XOR CT_OFFSET_BITS
            values = unpack_int32_to_int4(full ^ CT_OFFSET_BITS)
        else:
            values = unpack_int8_pairs(full, 0) if fmt == "modelslim" else full
        sums[local] = values.sum(dim=1, dtype=torch.int32)
    return record

