"""Pure-PyTorch twins of the torch_npu ops the NPU path calls.

Each twin computes the numbers its NPU op computes, as documented by torch_npu, so that layers,
loaders and models run unchanged on a CPU. Every function states its semantics in one line;
`ASSUMPTION:` marks behaviour the documentation leaves open, settled here and tested in
tests/test_ops_twin.py against an independent producer where one exists.

Rounding: ASSUMPTION round-half-to-even (torch.round) wherever an op rounds; the NPU documentation
does not say, and ties are measure-zero for real activations.
"""

from typing import Optional, Sequence

import torch

from sgl_ascend.ops.int4 import pack_int4_to_int32, unpack_int32_to_int4
from sgl_ascend.ops.scales import decode_int64_scale

ACL_FORMAT_FRACTAL_NZ = 29

_INT8_MAX = 127.0
_INT4_MAX = 7.0


def _int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 x int8 -> int32 product, a [M, K] @ b [K, N] (int32 accumulation, like the cube unit)."""
    if a.shape[0] == 0:
        return torch.zeros(0, b.shape[1], dtype=torch.int32, device=a.device)
    return torch._int_mm(a.contiguous(), b)


def _as_int8_values(t: torch.Tensor) -> torch.Tensor:
    """int8 tensors pass through; int32 tensors are int4 packed eight per element and are unpacked."""
    if t.dtype == torch.int32:
        return unpack_int32_to_int4(t)
    if t.dtype != torch.int8:
        raise TypeError(f"expected int8 or int4-packed int32, got {t.dtype}")
    return t


def npu_dynamic_quant(x: torch.Tensor, *, smooth_scales: Optional[torch.Tensor] = None,
                      dst_type: torch.dtype = torch.int8):
    """Per-token symmetric quant: scale = max|x|/127 (int8) or /7 (quint4x2, packed 8 per int32), fp32."""
    xf = x.float()
    if smooth_scales is not None:
        xf = xf * smooth_scales.float()
    int4 = dst_type == torch.quint4x2
    if not int4 and dst_type != torch.int8:
        raise TypeError(f"npu_dynamic_quant twin: dst_type must be torch.int8 or torch.quint4x2, got {dst_type}")
    qmax = _INT4_MAX if int4 else _INT8_MAX
    scale = xf.abs().amax(dim=-1) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / safe.unsqueeze(-1)).clamp_(-qmax - 1, qmax).to(torch.int8)
    if int4:
        return pack_int4_to_int32(q), scale
    return q, scale


def npu_quantize(input: torch.Tensor, scales: torch.Tensor, zero_points: Optional[torch.Tensor],
                 dtype: torch.dtype, axis: int = 1, div_mode: bool = True) -> torch.Tensor:
    """Static quant: sat8(round(x / scales + zp)) with div_mode, sat8(round(x * scales + zp)) without."""
    if dtype != torch.qint8:
        raise TypeError(f"npu_quantize twin supports torch.qint8 output only, got {dtype}")
    xf = input.float()
    xf = xf / scales.float() if div_mode else xf * scales.float()
    if zero_points is not None:
        xf = xf + zero_points.float()
    return torch.round(xf).clamp_(-128, 127).to(torch.int8)


def npu_quant_matmul(x1: torch.Tensor, x2: torch.Tensor, scale: torch.Tensor, *,
                     pertoken_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                     output_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """out = ((x1 @ x2 in int32) + int32 bias) * scale * pertoken_scale[m] (+ float bias); x2 is [K, N].

    int4 operands arrive packed eight per int32 along the last dim. `scale` is fp32, bf16, or int64
    carrying fp32 bits. ASSUMPTION: a float `bias` (allowed with pertoken_scale) is added after scaling.
    """
    if output_dtype is None:
        raise ValueError("npu_quant_matmul twin computes dequantized outputs only: pass output_dtype")
    a = _as_int8_values(x1)
    b = _as_int8_values(x2)
    lead = a.shape[:-1]
    acc = _int_matmul(a.reshape(-1, a.shape[-1]), b)
    if bias is not None and bias.dtype == torch.int32:
        acc = acc + bias
    out = acc.to(torch.float32) * decode_int64_scale(scale)
    if pertoken_scale is not None:
        out = out * pertoken_scale.reshape(-1, 1).float()
    if bias is not None and bias.dtype != torch.int32:
        out = out + bias.float()
    return out.to(output_dtype).reshape(*lead, -1)


def npu_weight_quant_batchmatmul(x: torch.Tensor, weight: torch.Tensor, antiquant_scale: torch.Tensor,
                                 antiquant_offset: Optional[torch.Tensor] = None,
                                 bias: Optional[torch.Tensor] = None,
                                 antiquant_group_size: int = 0) -> torch.Tensor:
    """Weight-only: out = x @ ((w + offset) * scale) + bias; w [K, N] int8 or int4 packed in int32.

    Scale/offset are [N] per channel or [K/g, N] per group of `antiquant_group_size` rows of K.
    """
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    per_channel = antiquant_group_size == 0
    if per_channel and weight.dtype == torch.int8 and weight.t().is_contiguous():
        # Fast path: torch's int8 weight-only kernel wants [N, K], which is how our processed
        # weights sit in memory (common.to_kernel_layout). Run in fp32 so the output is rounded once,
        # after the offset term (a bf16 product would be rounded before a large offset term cancels
        # against it); the bf16 kernel also crashes (SIGSEGV, torch 2.13 CPU) when K % 16 != 0.
        scale = antiquant_scale.reshape(-1).float()
        out = torch._weight_int8pack_mm(x2d.float().contiguous(), weight.t(), scale)
        if antiquant_offset is not None:
            offset = antiquant_offset.reshape(-1).float() * antiquant_scale.reshape(-1).float()
            out = out + x2d.float().sum(dim=-1, keepdim=True) * offset
    else:
        w = _as_int8_values(weight).float()
        scale = antiquant_scale.float()
        offset = antiquant_offset.float() if antiquant_offset is not None else None
        if not per_channel:
            scale = scale.repeat_interleave(antiquant_group_size, dim=0)
            offset = offset.repeat_interleave(antiquant_group_size, dim=0) if offset is not None else None
        w = (w + offset) * scale if offset is not None else w * scale
        out = x2d.float() @ w
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*lead, -1)


def npu_convert_weight_to_int4pack(weight: torch.Tensor, inner_k_tiles: int = 0) -> torch.Tensor:
    """int32 tensor of int4 values [..., N] -> int32 [..., N/8], eight nibbles per element (see int4.py)."""
    if weight.dtype != torch.int32:
        raise TypeError(f"npu_convert_weight_to_int4pack expects int32 values, got {weight.dtype}")
    return pack_int4_to_int32(weight)


def npu_format_cast(tensor: torch.Tensor, acl_format: int) -> torch.Tensor:
    """Physical layout change only (ND <-> FRACTAL_NZ); logical values are unchanged, so: identity."""
    return tensor


def _group_ends(group_list: torch.Tensor, group_list_type: int, num_groups: int) -> list:
    counts = group_list.tolist()
    if len(counts) != num_groups:
        raise ValueError(f"group_list has {len(counts)} entries for {num_groups} weight groups")
    if group_list_type == 1:
        ends, total = [], 0
        for c in counts:
            total += int(c)
            ends.append(total)
        return ends
    return [int(c) for c in counts]


def npu_grouped_matmul(x: Sequence[torch.Tensor], weight: Sequence[torch.Tensor], *,
                       bias: Optional[Sequence[torch.Tensor]] = None,
                       scale: Optional[Sequence[torch.Tensor]] = None,
                       per_token_scale: Optional[Sequence[torch.Tensor]] = None,
                       group_list: Optional[torch.Tensor] = None, split_item: int = 2,
                       group_type: int = 0, group_list_type: int = 0,
                       output_dtype: Optional[torch.dtype] = None) -> list:
    """One matmul per expert e over its contiguous row range of x: y[r] = x[r] @ w[e] (grouped on M).

    Supported form (the one MoE layers use): one x [T, K], one weight [E, K, N] (bf16/fp16, int8, or
    int4 packed eight per int32 as [E, K, N/8]), group_list of E cumulative ends (type 0) or counts
    (type 1); rows past the last group stay zero. x is bf16/fp16 with float weights, int8 (W8A8,
    W4A8) or int4 packed eight per int32 (W4A4) with quantized weights.
    Quantized: y = (sum_g acc_g * scale[e, g] + bias[e]) * per_token_scale[r], where `scale[e]` is
    [N] per channel (fp32, bf16, or int64 carrying fp32 bits) or [K/G, N] per group of G = K/(K/G)
    rows of K (W4A8 group-wise), and acc_g the int32 product over group g.
    ASSUMPTION (int8 x with int4 weights, W4A8): the kernel multiplies int8 activations split into
    signed nibbles, i.e. it accumulates (x - 8) @ w; `bias` must carry 8 * sum_k deq_w (msModelSlim's
    `scale_bias`) to restore x @ w. A missing or mis-sharded scale_bias therefore shows as an error.
    ASSUMPTION (group-wise): each group's int32 partial sum is scaled in fp32 before summing groups.
    """
    if len(x) != 1 or len(weight) != 1 or group_type != 0 or split_item not in (2, 3):
        raise NotImplementedError(
            "npu_grouped_matmul twin supports one x, one stacked weight, group_type=0, split_item 2/3")
    x0, w = x[0], weight[0]
    ends = _group_ends(group_list, group_list_type, w.shape[0])
    quantized = w.dtype in (torch.int8, torch.int32)
    nibble_trick = w.dtype == torch.int32 and x0.dtype == torch.int8
    out_dtype = output_dtype or (x0.dtype if not quantized else torch.bfloat16)
    n_out = w.shape[-1] * (8 if w.dtype == torch.int32 else 1)
    out = torch.zeros(x0.shape[0], n_out, dtype=out_dtype, device=x0.device)
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            rows = x0[start:end]
            if quantized:
                y = _quant_group_matmul(_as_int8_values(rows), _as_int8_values(w[e]), scale[0][e],
                                        nibble_trick)
                if bias is not None:
                    y = y + bias[0][e].float().reshape(1, -1)
                if per_token_scale is not None:
                    y = y * per_token_scale[0][start:end].float().reshape(-1, 1)
            else:
                y = rows @ w[e]
                if bias is not None:
                    y = y + bias[0][e]
            out[start:end] = y.to(out_dtype)
        start = end
    return [out]


def _quant_group_matmul(a: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, nibble_trick: bool):
    """sum over K-groups of (int32 a_g @ w_g) * scale_g, in fp32; scale [N] or [K/G, N]."""
    scale = decode_int64_scale(scale)
    groups = 1 if scale.dim() == 1 else scale.shape[0]
    k = w.shape[0]
    if k % groups:
        raise ValueError(f"K = {k} does not divide into {groups} scale groups")
    size = k // groups
    y = None
    for g in range(groups):
        w_g = w[g * size:(g + 1) * size]
        acc = _int_matmul(a[:, g * size:(g + 1) * size], w_g)
        if nibble_trick:  # (x - 8) @ w, without leaving int8 for x
            acc = acc - 8 * w_g.sum(dim=0, dtype=torch.int32)
        part = acc.float() * scale.reshape(groups, -1)[g]
        y = part if y is None else y + part
    return y


def npu_swiglu(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """silu(first half) * second half along `dim`."""
    gate, up = x.chunk(2, dim=dim)
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(x.dtype)


def npu_moe_init_routing_v2(x: torch.Tensor, expert_idx: torch.Tensor, *, scale: Optional[torch.Tensor] = None,
                            offset: Optional[torch.Tensor] = None, active_num: int = -1,
                            expert_capacity: int = -1, expert_num: int = -1, drop_pad_mode: int = 0,
                            expert_tokens_num_type: int = 0, expert_tokens_num_flag: bool = False,
                            quant_mode: int = 0, active_expert_range: Sequence[int] = (),
                            row_idx_type: int = 0):
    """Sort the (token, k) pairs by expert: returns (expanded_x, expanded_row_idx, expert_tokens, expanded_scale).

    Pair p = t * K + k (row-major over expert_idx [T, K]) is kept when its expert lies in
    active_expert_range [start, end) (default [0, expert_num)); kept pairs are ordered by expert,
    stably, and row i of expanded_x is x[t] of the i-th kept pair. expanded_row_idx[p] is that
    row i (row_idx_type 0, "gather"), or expanded_row_idx[i] = p (row_idx_type 1, "scatter").
    expert_tokens (with expert_tokens_num_flag): per expert of the range, cumulative ends (type 0)
    or counts (type 1), int64. quant_mode -1: rows as they are (expanded_scale = scale[t] when a [T]
    scale is given); quant_mode 1: dynamic int8 per row, scale = max|x[t] (* scale[expert])| / 127.
    ASSUMPTION: pairs outside the range get expanded_row_idx -1 and rows past the kept ones are
    zero (undefined on the NPU); callers give those pairs zero weight when combining.
    """
    if drop_pad_mode != 0 or expert_capacity not in (-1, 0) or offset is not None:
        raise NotImplementedError("npu_moe_init_routing_v2 twin: dropless mode without offset only")
    if quant_mode not in (-1, 1):
        raise NotImplementedError(f"npu_moe_init_routing_v2 twin: quant_mode -1 or 1, got {quant_mode}")
    if expert_tokens_num_flag and expert_tokens_num_type not in (0, 1):
        raise NotImplementedError("npu_moe_init_routing_v2 twin: expert_tokens_num_type 0 or 1")
    num_tokens, top_k = expert_idx.shape
    start, end = active_expert_range if len(active_expert_range) else (0, expert_num)
    flat = expert_idx.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    kept = (sorted_experts >= start) & (sorted_experts < end)
    pairs = order[kept]
    rows = num_tokens * top_k if active_num < 0 else min(active_num, num_tokens * top_k)
    pairs = pairs[:rows]
    source = pairs // top_k
    expanded_row_idx = torch.full((num_tokens * top_k,), -1, dtype=torch.int32, device=x.device)
    kept_rows = torch.arange(pairs.numel(), dtype=torch.int32, device=x.device)
    if row_idx_type == 0:
        expanded_row_idx[pairs] = kept_rows
    else:
        expanded_row_idx[:pairs.numel()] = pairs.to(torch.int32)
    picked = x[source]
    expanded_scale = torch.zeros(rows, dtype=torch.float32, device=x.device)
    if quant_mode == 1:
        if scale is not None:
            picked = picked.float() * scale.float()[flat[pairs] - start]
        q, row_scale = npu_dynamic_quant(picked)
        expanded_x = torch.zeros(rows, x.shape[1], dtype=torch.int8, device=x.device)
        expanded_x[:pairs.numel()] = q
        expanded_scale[:pairs.numel()] = row_scale
    else:
        expanded_x = torch.zeros(rows, x.shape[1], dtype=x.dtype, device=x.device)
        expanded_x[:pairs.numel()] = picked
        if scale is not None:
            expanded_scale[:pairs.numel()] = scale.float()[source]
    counts = torch.bincount(flat[pairs] - start, minlength=end - start).to(torch.int64)
    expert_tokens = (counts.cumsum(0) if expert_tokens_num_type == 0 else counts) if expert_tokens_num_flag else None
    return expanded_x, expanded_row_idx, expert_tokens, expanded_scale


def npu_moe_token_unpermute(permuted_tokens: torch.Tensor, sorted_indices: torch.Tensor,
                            probs: Optional[torch.Tensor] = None, padded_mode: bool = False,
                            restore_shape=None) -> torch.Tensor:
    """out[t] = sum_k probs[t, k] * permuted_tokens[sorted_indices[t * K + k]] (K = 1 without probs).

    ASSUMPTION: products and the sum over k in fp32, rounded once to permuted_tokens' dtype.
    """
    if padded_mode:
        raise NotImplementedError("npu_moe_token_unpermute twin: padded_mode=False only")
    top_k = 1 if probs is None else probs.shape[1]
    index = sorted_indices.to(torch.int64)
    if index.numel() and (index.min() < 0 or index.max() >= permuted_tokens.shape[0]):
        raise IndexError(f"sorted_indices out of range [0, {permuted_tokens.shape[0]})")
    rows = permuted_tokens[index].float().reshape(-1, top_k, permuted_tokens.shape[-1])
    if probs is not None:
        rows = rows * probs.float().unsqueeze(-1)
    return rows.sum(dim=1).to(permuted_tokens.dtype)
