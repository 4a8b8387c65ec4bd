"""Registers the contract-checked twins as torch.ops.npu.* on hosts without an NPU.

Each op is defined with torch_npu's own schema (npu_schemas.py), its CPU kernel is the twin, and
its fake (meta) kernel checks the same contract and returns outputs of the real op's shapes and
dtypes, so torch.compile traces a forward through them as it would through torch_npu. SGLang's
NPU code (`torch.ops.npu.npu_quant_matmul(...)`) and ours bind to the same checked twin.

Never done where torch_npu is loaded (the real ops own the namespace) nor on CUDA/ROCm hosts.
"""

import sys
import types

import torch

from sgl_ascend.ops import contract as c
from sgl_ascend.ops import twin
from sgl_ascend.ops.npu_schemas import SCHEMAS

_LIBRARY = None


def _int4_last(shape, factor=8):
    return (*shape[:-1], shape[-1] // factor)


def _fake_dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                        dst_type_max=0.0):
    c.check_dynamic_quant(input, smooth_scales, group_index, dst_type, quant_mode, dst_type_max)
    scale = input.new_empty(input.shape[:-1], dtype=torch.float32)
    if c.as_dtype(dst_type) == torch.quint4x2:
        return input.new_empty(_int4_last(input.shape), dtype=torch.int32), scale
    return input.new_empty(input.shape, dtype=torch.int8), scale


def _fake_quantize(self, scales, zero_points, dtype, axis=1, div_mode=True):
    c.check_quantize(self, scales, zero_points, dtype, axis, div_mode)
    out = c.as_dtype(dtype)
    if out == torch.quint4x2:
        return self.new_empty(_int4_last(self.shape), dtype=torch.int32)
    return self.new_empty(self.shape, dtype={torch.quint8: torch.uint8, torch.int32: torch.int32}.get(out, torch.int8))


def _fake_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                       x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None,
                       y_scale=None):
    c.check_quant_matmul(x1, x2, scale, offset, pertoken_scale, bias, output_dtype, x1_dtype, x2_dtype,
                         pertoken_scale_dtype, scale_dtype, group_sizes, y_scale)
    n = x2.shape[-1] * (c.INT4_PER_INT32 if x2.dtype == torch.int32 else 1)
    return x1.new_empty((*x1.shape[:-1], n), dtype=c.as_dtype(output_dtype) or torch.int8)


def _fake_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
                                   quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0,
                                   weight_dtype=None):
    c.check_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset, bias,
                                     antiquant_group_size, inner_precise, weight_dtype)
    n = weight.shape[1] * (c.INT4_PER_INT32 if weight.dtype == torch.int32 and weight.is_contiguous() else 1)
    return x.new_empty((x.shape[0], n), dtype=x.dtype)


def _fake_convert_weight_to_int4pack(weight, inner_k_tiles=0):
    c.check_convert_weight_to_int4pack(weight, inner_k_tiles)
    return weight.new_empty(_int4_last(weight.shape), dtype=torch.int32)


def _fake_format_cast(self, acl_format, *, customize_dtype=None, input_dtype=None):
    c.check_format_cast(self, acl_format, customize_dtype, input_dtype)
    return torch.empty_strided(self.shape, self.stride(), dtype=self.dtype, device=self.device)


def _fake_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                         antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                         activation_quant_scale=None, activation_quant_offset=None, split_item=0, group_type=None,
                         group_list_type=0, act_type=0, tuning_config=None, output_dtype=None, x_dtype=None,
                         weight_dtype=None, scale_dtype=None, per_token_scale_dtype=None):
    c.check_grouped_matmul(x, weight, bias, scale, offset, antiquant_scale, antiquant_offset, per_token_scale,
                           group_list, activation_input, activation_quant_scale, activation_quant_offset,
                           split_item, group_type, group_list_type, act_type, tuning_config, output_dtype, x_dtype,
                           weight_dtype, scale_dtype, per_token_scale_dtype)
    w = weight[0]
    n = w.shape[-1] * (c.INT4_PER_INT32 if w.dtype == torch.int32 else 1)
    return [x[0].new_empty((x[0].shape[0], n), dtype=twin._gmm_output_dtype(x[0], output_dtype))]


def _fake_swiglu(self, dim=-1):
    c.check_swiglu(self, dim)
    shape = list(self.shape)
    shape[dim] //= 2
    return self.new_empty(shape)


def _fake_dequant_swiglu_quant(x, *, weight_scale=None, activation_scale=None, bias=None, quant_scale=None,
                               quant_offset=None, group_index=None, activate_left=False, quant_mode=0, dst_type=None,
                               round_mode=None, activate_dim=None, swiglu_mode=0, clamp_limit=7.0, glu_alpha=1.702,
                               glu_bias=1.0):
    c.check_dequant_swiglu_quant(x, weight_scale, activation_scale, bias, quant_scale, quant_offset, group_index,
                                 activate_left, quant_mode, dst_type, round_mode, activate_dim, swiglu_mode,
                                 clamp_limit, glu_alpha, glu_bias)
    return (x.new_empty((x.shape[0], x.shape[1] // 2), dtype=torch.int8),
            x.new_empty((x.shape[0],), dtype=torch.float32))


def _fake_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                              expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0, expert_tokens_num_flag=False,
                              quant_mode=-1, active_expert_range=(), row_idx_type=0, x_dtype=None):
    c.check_moe_init_routing_v2(x, expert_idx, scale, offset, active_num, expert_capacity, expert_num,
                                drop_pad_mode, expert_tokens_num_type, expert_tokens_num_flag, quant_mode,
                                active_expert_range, row_idx_type, x_dtype)
    pairs = expert_idx.shape[0] * expert_idx.shape[1]
    rows = pairs if active_num < 0 else min(active_num, pairs)
    span = (active_expert_range[1] - active_expert_range[0]) if len(active_expert_range) else expert_num
    return (x.new_empty((rows, x.shape[1]), dtype=torch.int8 if quant_mode == 1 else x.dtype),
            x.new_empty((pairs,), dtype=torch.int32),
            x.new_empty((span if expert_tokens_num_flag else 0,), dtype=torch.int64),
            x.new_empty((rows,), dtype=torch.float32))


def _fake_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
    c.check_moe_token_unpermute(permuted_tokens, sorted_indices, probs, padded_mode, restore_shape)
    top_k = 1 if probs is None else probs.shape[1]
    return permuted_tokens.new_empty((sorted_indices.shape[0] // top_k, permuted_tokens.shape[-1]))


def _fake_moe_init_routing(x, row_idx, expert_idx, active_num):
    c.check_moe_init_routing(x, row_idx, expert_idx, active_num)
    num_tokens, top_k = expert_idx.shape
    return (x.new_empty((min(num_tokens, active_num) * top_k, x.shape[1])),
            x.new_empty((num_tokens * top_k,), dtype=torch.int32), x.new_empty((num_tokens * top_k,), dtype=torch.int32))


def _fake_moe_compute_expert_tokens(sorted_expert_for_source_row, num_expert):
    c.check_moe_compute_expert_tokens(sorted_expert_for_source_row, num_expert)
    return sorted_expert_for_source_row.new_empty((num_expert,), dtype=torch.int32)


def _fake_moe_finalize_routing(expanded_permuted_rows, skip1, skip2, bias, scales, expanded_src_to_dst_row,
                               export_for_source_row, drop_pad_mode=0, k=1):
    c.check_moe_finalize_routing(expanded_permuted_rows, skip1, skip2, bias, scales, expanded_src_to_dst_row,
                                 export_for_source_row, drop_pad_mode, k)
    rows = scales.shape[0] if scales is not None else expanded_src_to_dst_row.shape[0] // k
    return expanded_permuted_rows.new_empty((rows, expanded_permuted_rows.shape[1]))


def _fake_anti_quant(x, scale, *, offset=None, dst_dtype=None, src_dtype=None):
    c.check_anti_quant(x, scale, offset, dst_dtype, src_dtype)
    return x.new_empty(x.shape, dtype=c.as_dtype(dst_dtype) or torch.float16)


def _fake_kronecker_quant(x, kronecker_p1, kronecker_p2, clip_ratio=None, dst_dtype=None, dst_type_max=None):
    c.check_kronecker_quant(x, kronecker_p1, kronecker_p2, clip_ratio, dst_dtype, dst_type_max)
    return x.new_empty(_int4_last(x.shape), dtype=torch.int32), x.new_empty(x.shape[:1], dtype=torch.float32)


def _fake_fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None,
                                      actual_seq_lengths_kv=None, antiquant_scale=None, antiquant_offset=None,
                                      block_table=None, num_heads=1, input_layout="BSH", num_key_value_heads=0,
                                      sparse_mode=0, block_size=0, antiquant_mode=0, softmax_lse_flag=False,
                                      **rest):
    unmodelled = {name: rest.get(name) for name in c.FIA_UNMODELLED if name in rest}
    unmodelled["pse_shift"] = pse_shift
    c.check_fused_infer_attention_score(query, key, value, unmodelled, atten_mask, actual_seq_lengths,
                                        actual_seq_lengths_kv, antiquant_scale, antiquant_offset, block_table,
                                        num_heads, input_layout, num_key_value_heads, sparse_mode, block_size,
                                        antiquant_mode, softmax_lse_flag)
    return torch.empty_like(query), query.new_zeros(c.fia_lse_shape(query, num_heads, input_layout, softmax_lse_flag),
                                                    dtype=torch.float32)


FAKES = {
    "npu_dynamic_quant": _fake_dynamic_quant,
    "npu_quantize": _fake_quantize,
    "npu_quant_matmul": _fake_quant_matmul,
    "npu_weight_quant_batchmatmul": _fake_weight_quant_batchmatmul,
    "npu_convert_weight_to_int4pack": _fake_convert_weight_to_int4pack,
    "npu_format_cast": _fake_format_cast,
    "npu_grouped_matmul": _fake_grouped_matmul,
    "npu_swiglu": _fake_swiglu,
    "npu_dequant_swiglu_quant": _fake_dequant_swiglu_quant,
    "npu_moe_init_routing_v2": _fake_moe_init_routing_v2,
    "npu_moe_token_unpermute": _fake_moe_token_unpermute,
    "npu_moe_init_routing": _fake_moe_init_routing,
    "npu_moe_compute_expert_tokens": _fake_moe_compute_expert_tokens,
    "npu_moe_finalize_routing": _fake_moe_finalize_routing,
    "npu_anti_quant": _fake_anti_quant,
    "npu_fused_infer_attention_score": _fake_fused_infer_attention_score,
    "npu_kronecker_quant": _fake_kronecker_quant,
}


def register_twins() -> bool:
    """Define npu::<op> with torch_npu's schema, CPU kernel = twin, fake kernel = contract + shapes.

    Returns False (and registers nothing) where torch_npu is loaded or a CUDA/ROCm device is present.
    """
    global _LIBRARY
    if _LIBRARY is not None:
        return True
    if "torch_npu" in sys.modules or torch.cuda.is_available():
        return False
    lib = torch.library.Library("npu", "FRAGMENT")
    for name, schema in SCHEMAS.items():
        lib.define(schema)
        lib.impl(name, getattr(twin, name), "CPU")
        torch.library.register_fake(f"npu::{name}", FAKES[name], lib=lib)
    _LIBRARY = lib
    return True


def twin_torch_npu_module() -> types.ModuleType:
    """A stand-in `torch_npu` module whose npu_* ops are the registered twins (torch.ops.npu.*), for
    running code written against `torch_npu.npu_*` (e.g. upstream NPU methods) on CPU."""
    register_twins()
    module = types.ModuleType("torch_npu")
    for name in SCHEMAS:
        setattr(module, name, getattr(torch.ops.npu, name))
    return module
