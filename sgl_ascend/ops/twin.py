"""Pure-PyTorch twins of the torch_npu ops the NPU path calls.

Each twin has its op's exact schema (sgl_ascend/ops/npu_schemas.py: names, order, keyword-only
markers, defaults), first checks the call against the op's contract (sgl_ascend/ops/contract.py:
a call the real op rejects raises NpuContractError naming the rule), then computes the numbers the
NPU op computes. Off-NPU they are registered as torch.ops.npu.* (sgl_ascend/ops/library.py).
`ASSUMPTION:` marks behaviour no source settles, tested in tests/test_ops_twin.py against an
independent producer where one exists.

Rounding: `npu_quantize(div_mode=False)` rounds half away from zero (it runs aclnnAscendQuantV3 with
round mode "round", Ascend C's 四舍五入). ASSUMPTION round-half-to-even (torch.round) in the other
quantizing ops, which no source settles; ties are measure-zero for real activations.
Rows an op leaves unwritten on the NPU (uninitialised memory) are NaN in the twins' float outputs,
so a caller that reads them fails on CPU too.
"""

from typing import List, Optional, Sequence

import torch

from sgl_ascend.ops import contract as c
from sgl_ascend.ops.int4 import pack_int4_to_int32, unpack_int32_to_int4
from sgl_ascend.ops.scales import decode_int64_scale

ACL_FORMAT_FRACTAL_NZ = c.ACL_FORMAT_FRACTAL_NZ

_INT8_MAX = 127.0
_INT4_MAX = 7.0
# Rows up to which torch's fp32 int8 weight-only kernel beats dequantize-then-matmul on CPU.
_INT8PACK_FP32_MAX_M = 16


def _int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 x int8 -> int32 product, a [M, K] @ b [K, N] (int32 accumulation, like the cube unit)."""
    if a.shape[0] == 0:
        return torch.zeros(0, b.shape[1], dtype=torch.int32, device=a.device)
    return torch._int_mm(a.contiguous(), b)


def _as_int8_values(t: torch.Tensor) -> torch.Tensor:
    """int8 tensors pass through; int32 tensors are int4 packed eight per element and are unpacked."""
    return unpack_int32_to_int4(t) if t.dtype == torch.int32 else t


def _dynamic_quant_rows(xf: torch.Tensor, int4: bool):
    """Per-row symmetric quant of fp32 rows: scale = max|x| / 127 (int8) or / 7 (int4), fp32."""
    qmax = _INT4_MAX if int4 else _INT8_MAX
    scale = xf.abs().amax(dim=-1) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / safe.unsqueeze(-1)).clamp_(-qmax - 1, qmax).to(torch.int8)
    return (pack_int4_to_int32(q) if int4 else q), scale


def npu_dynamic_quant(input: torch.Tensor, *, smooth_scales: Optional[torch.Tensor] = None,
                      group_index: Optional[torch.Tensor] = None, dst_type: Optional[int] = None,
                      quant_mode: str = "pertoken", dst_type_max: float = 0.0):
    """Per-token symmetric quant: scale = max|x|/127 (int8) or /7 (quint4x2, packed 8 per int32), fp32."""
    c.check_dynamic_quant(input, smooth_scales, group_index, dst_type, quant_mode, dst_type_max)
    xf = input.float()
    if smooth_scales is not None:
        xf = xf * smooth_scales.float()
    return _dynamic_quant_rows(xf, c.as_dtype(dst_type) == torch.quint4x2)


def npu_quantize(self: torch.Tensor, scales: torch.Tensor, zero_points: Optional[torch.Tensor], dtype: int,
                 axis: int = 1, div_mode: bool = True) -> torch.Tensor:
    """Static quant: sat(round(x / scales + zp)) with div_mode, sat(round(x * scales + zp)) without."""
    c.check_quantize(self, scales, zero_points, dtype, axis, div_mode)
    out = c.as_dtype(dtype)
    shape = (-1, 1) if axis == -2 else (-1,)
    xf = self.float()
    xf = xf / scales.float().reshape(shape) if div_mode else xf * scales.float().reshape(shape)
    if zero_points is not None:
        xf = xf + zero_points.float().reshape(shape)
    # div_mode=False: aclnnAscendQuantV3 round mode "round" = half away from zero (torch_npu op-plugin
    # source; Ascend C RoundMode CAST_ROUND); div_mode=True (aclnnQuantize): ASSUMPTION half to even.
    q = torch.sign(xf) * torch.floor(xf.abs() + 0.5) if not div_mode else torch.round(xf)
    if out == torch.quint4x2:
        return pack_int4_to_int32(q.clamp_(-8, 7).to(torch.int8))
    if out == torch.quint8:
        return q.clamp_(0, 255).to(torch.uint8)
    if out == torch.int32:
        return q.to(torch.int32)
    return q.clamp_(-128, 127).to(torch.int8)


def npu_quant_matmul(x1: torch.Tensor, x2: torch.Tensor, scale: torch.Tensor, *,
                     offset: Optional[torch.Tensor] = None, pertoken_scale: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None, output_dtype: Optional[int] = None,
                     x1_dtype: Optional[int] = None, x2_dtype: Optional[int] = None,
                     pertoken_scale_dtype: Optional[int] = None, scale_dtype: Optional[int] = None,
                     group_sizes: Optional[List[int]] = None, y_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out = ((x1 @ x2 in int32) + int32 bias) * scale * pertoken_scale[m] (+ float bias); x2 is [K, N].

    int4 operands arrive packed eight per int32 along the last dim. `scale` is fp32, bf16, or int64
    carrying fp32 bits. ASSUMPTION: a float `bias` (allowed with pertoken_scale) is added after scaling.
    int8 output (no per-token scale): sat8(round(acc * scale + offset)).
    """
    c.check_quant_matmul(x1, x2, scale, offset, pertoken_scale, bias, output_dtype, x1_dtype, x2_dtype,
                         pertoken_scale_dtype, scale_dtype, group_sizes, y_scale)
    out_dtype = c.as_dtype(output_dtype) or torch.int8
    a, b = _as_int8_values(x1), _as_int8_values(x2)
    lead = a.shape[:-1]
    acc = _int_matmul(a.reshape(-1, a.shape[-1]), b)
    if bias is not None and bias.dtype == torch.int32:
        acc = acc + bias.reshape(1, -1)
    c.require(out_dtype != torch.int32, "npu_quant_matmul", "the twin does not compute int32 outputs (what the "
              "scale does there is undocumented)", "twin scope")
    out = acc.to(torch.float32) * decode_int64_scale(scale)
    if pertoken_scale is not None:
        out = out * pertoken_scale.reshape(-1, 1).float()
    if bias is not None and bias.dtype != torch.int32:
        out = out + bias.float().reshape(1, -1)
    if out_dtype == torch.int8:
        if offset is not None:
            out = out + offset.float()
        return torch.round(out).clamp_(-128, 127).to(torch.int8).reshape(*lead, -1)
    return out.to(out_dtype).reshape(*lead, -1)


def npu_weight_quant_batchmatmul(x: torch.Tensor, weight: torch.Tensor, antiquant_scale: torch.Tensor,
                                 antiquant_offset: Optional[torch.Tensor] = None,
                                 quant_scale: Optional[torch.Tensor] = None,
                                 quant_offset: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                                 antiquant_group_size: int = 0, inner_precise: int = 0,
                                 weight_dtype: Optional[int] = None) -> torch.Tensor:
    """Weight-only: out = x @ ((w + offset) * scale) + bias; x [M, K], w [K, N] int8 or int4 packed in int32.

    Scale/offset (x's dtype) are [N] per channel or [ceil(K/g), N] per group of `antiquant_group_size`
    rows of K. ASSUMPTION: the dequantized weight and the product are exact in fp32, rounded once.
    """
    c.check_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset, bias,
                                     antiquant_group_size, inner_precise, weight_dtype)
    per_channel = antiquant_group_size == 0
    if per_channel and weight.dtype == torch.int8 and weight.t().is_contiguous():
        # Fast path: torch's int8 weight-only kernel wants [N, K], which is how our processed
        # weights sit in memory (common.to_kernel_layout keeps the view on CPU). fp32 so the output
        # is rounded once, after the offset term; the bf16 kernel (the only one faster than bf16
        # F.linear at decode) when nothing is added after the product, and K % 16 == 0 (it crashes
        # otherwise, torch 2.13 CPU). torch's fp32 kernel is a per-row loop: for M >= 16 a
        # dequantized fp32 matmul is ~30x faster.
        w_nk, m = weight.t(), x.shape[0]
        scale = antiquant_scale.reshape(-1)
        if x.dtype == torch.bfloat16 and antiquant_offset is None and bias is None and x.shape[1] % 16 == 0:
            return torch._weight_int8pack_mm(x.contiguous(), w_nk, scale.to(torch.bfloat16))
        scale = scale.float().expand(w_nk.shape[0])
        if m < _INT8PACK_FP32_MAX_M:
            out = torch._weight_int8pack_mm(x.float().contiguous(), w_nk, scale.contiguous())
        else:
            out = x.float() @ (w_nk.float() * scale.unsqueeze(1)).t()
        if antiquant_offset is not None:
            out = out + x.float().sum(dim=-1, keepdim=True) * (antiquant_offset.float().reshape(-1) * scale)
    else:
        w = _as_int8_values(weight).float()
        scale = antiquant_scale.float().reshape(-1 if per_channel else antiquant_scale.shape[0], w.shape[1])
        offset = None if antiquant_offset is None else antiquant_offset.float().reshape(scale.shape)
        if not per_channel:
            scale = scale.repeat_interleave(antiquant_group_size, dim=0)[:w.shape[0]]
            offset = None if offset is None else offset.repeat_interleave(antiquant_group_size, dim=0)[:w.shape[0]]
        w = (w + offset) * scale if offset is not None else w * scale
        out = x.float() @ w
    if bias is not None:
        out = out + bias.float().reshape(1, -1)
    return out.to(x.dtype)


def npu_convert_weight_to_int4pack(weight: torch.Tensor, inner_k_tiles: int = 0) -> torch.Tensor:
    """int32 tensor of int4 values [K, N] -> int32 [K, N/8], eight nibbles per element (see int4.py)."""
    c.check_convert_weight_to_int4pack(weight, inner_k_tiles)
    return pack_int4_to_int32(weight)


def npu_format_cast(self: torch.Tensor, acl_format: int, *, customize_dtype: Optional[int] = None,
                    input_dtype: Optional[int] = None) -> torch.Tensor:
    """Physical layout change only (ND <-> FRACTAL_NZ): the same logical values in a new tensor. The
    CPU copy keeps the input's strides, so a transposed weight stays [N, K] in memory for torch's
    int8 kernels."""
    c.check_format_cast(self, acl_format, customize_dtype, input_dtype)
    return self.clone(memory_format=torch.preserve_format)


def _group_bounds(group_list: torch.Tensor, group_list_type: int, rows: int) -> List[int]:
    """Start offsets of each group plus the end of the last one (host values: the twin is eager)."""
    values = group_list.tolist()
    ends, total = [], 0
    for v in values:
        total = total + int(v) if group_list_type == 1 else int(v)
        ends.append(total)
    starts = [0] + ends[:-1]
    bad = any(e < s for s, e in zip(starts, ends)) or any(int(v) < 0 for v in values) or (ends and ends[-1] > rows)
    c.require(not bad, "npu_grouped_matmul",
              f"group_list must be non-negative (and non-decreasing as cumsum) within the {rows} rows of x, got "
              f"{values}", f"{c.DOC}:5870-5874")
    return starts + ends[-1:]


def npu_grouped_matmul(x: Sequence[torch.Tensor], weight: Sequence[torch.Tensor], *,
                       bias: Optional[Sequence[torch.Tensor]] = None, scale: Optional[Sequence[torch.Tensor]] = None,
                       offset: Optional[Sequence[torch.Tensor]] = None,
                       antiquant_scale: Optional[Sequence[torch.Tensor]] = None,
                       antiquant_offset: Optional[Sequence[torch.Tensor]] = None,
                       per_token_scale: Optional[Sequence[torch.Tensor]] = None,
                       group_list: Optional[torch.Tensor] = None,
                       activation_input: Optional[Sequence[torch.Tensor]] = None,
                       activation_quant_scale: Optional[Sequence[torch.Tensor]] = None,
                       activation_quant_offset: Optional[Sequence[torch.Tensor]] = None,
                       split_item: Optional[int] = 0, group_type: Optional[int] = None,
                       group_list_type: Optional[int] = 0, act_type: Optional[int] = 0,
                       tuning_config: Optional[List[int]] = None, output_dtype: Optional[int] = None,
                       x_dtype: Optional[int] = None, weight_dtype: Optional[int] = None,
                       scale_dtype: Optional[int] = None, per_token_scale_dtype: Optional[int] = None) -> List[torch.Tensor]:
    """One matmul per expert e over its contiguous row range of x: y[r] = x[r] @ w[e] (grouped on M).

    Form (the one MoE layers use): one x [M, K], one weight [E, K, N] (float, int8, or int4 packed
    eight per int32 as [E, K, N/8]), group_list of E cumulative ends (type 0) or counts (type 1).
    Quantized: y = (sum_g acc_g * scale[e, g] + bias[e]) * per_token_scale[r], scale [E, N] per channel
    or [E, G, N] per group of K/G rows (W4A8 group-wise), acc_g the int32 product over group g.
    Weight-only (antiquant): y = x @ ((w + antiquant_offset[e]) * antiquant_scale[e]) + bias[e].
    ASSUMPTION (int8 x with int4 weights, W4A8): the kernel multiplies int8 activations split into
    signed nibbles, i.e. it accumulates (x - 8) @ w; `bias` must carry 8 * sum_k deq_w (msModelSlim's
    `scale_bias`) to restore x @ w. A missing or mis-sharded scale_bias therefore shows as an error.
    ASSUMPTION (group-wise): each group's int32 partial sum is scaled in fp32 before summing groups.
    Rows past the groups are not written (NaN here, uninitialised on the NPU).
    """
    c.check_grouped_matmul(x, weight, bias, scale, offset, antiquant_scale, antiquant_offset, per_token_scale,
                           group_list, activation_input, activation_quant_scale, activation_quant_offset,
                           split_item, group_type, group_list_type, act_type, tuning_config, output_dtype, x_dtype,
                           weight_dtype, scale_dtype, per_token_scale_dtype)
    x0, w = x[0], weight[0]
    bounds = _group_bounds(group_list, group_list_type, x0.shape[0])
    out_dtype = _gmm_output_dtype(x0, output_dtype)
    n_out = w.shape[-1] * (8 if w.dtype == torch.int32 else 1)
    out = torch.empty(x0.shape[0], n_out, dtype=out_dtype, device=x0.device)
    out.fill_(float("nan") if out_dtype.is_floating_point else 0)
    quantized = x0.dtype in (torch.int8, torch.int32)
    for e in range(w.shape[0]):
        start, end = bounds[e], bounds[e + 1]
        if end <= start:
            continue
        rows = x0[start:end]
        if quantized:
            y = _quant_group_matmul(_as_int8_values(rows), _as_int8_values(w[e]), scale[0][e],
                                    w.dtype == torch.int32 and x0.dtype == torch.int8)
            if bias is not None:
                y = y + bias[0][e].float().reshape(1, -1)
            if per_token_scale is not None:
                y = y * per_token_scale[0][start:end].float().reshape(-1, 1)
        elif antiquant_scale is not None:
            groups = antiquant_scale[0][e].reshape(-1, n_out)
            wq = _as_int8_values(w[e]).float()
            if antiquant_offset is not None:
                wq = wq + antiquant_offset[0][e].float().reshape(groups.shape).repeat_interleave(
                    wq.shape[0] // groups.shape[0], dim=0)
            y = rows.float() @ (wq * groups.float().repeat_interleave(wq.shape[0] // groups.shape[0], dim=0))
            if bias is not None:
                y = y + bias[0][e].float()
        else:
            y = rows.float() @ w[e].float()
            if bias is not None:
                y = y + bias[0][e].float()
        out[start:end] = y.to(out_dtype)
    return [out]


def _gmm_output_dtype(x0: torch.Tensor, output_dtype) -> torch.dtype:
    out = c.as_dtype(output_dtype)
    return out if out is not None else x0.dtype


def _quant_group_matmul(a: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, nibble_trick: bool):
    """sum over K-groups of (int32 a_g @ w_g) * scale_g, in fp32; scale [N] or [G, N]."""
    scale = decode_int64_scale(scale)
    groups = 1 if scale.dim() == 1 else scale.shape[0]
    size = w.shape[0] // groups
    y = None
    for g in range(groups):
        w_g = w[g * size:(g + 1) * size]
        acc = _int_matmul(a[:, g * size:(g + 1) * size], w_g)
        if nibble_trick:  # (x - 8) @ w, without leaving int8 for x
            acc = acc - 8 * w_g.sum(dim=0, dtype=torch.int32)
        part = acc.float() * scale.reshape(groups, -1)[g]
        y = part if y is None else y + part
    return y


def npu_swiglu(self: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """silu(first half) * second half along `dim`."""
    c.check_swiglu(self, dim)
    gate, up = self.chunk(2, dim=dim)
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(self.dtype)


def npu_dequant_swiglu_quant(x: torch.Tensor, *, weight_scale: Optional[torch.Tensor] = None,
                             activation_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                             quant_scale: Optional[torch.Tensor] = None, quant_offset: Optional[torch.Tensor] = None,
                             group_index: Optional[torch.Tensor] = None, activate_left: bool = False,
                             quant_mode: int = 0, dst_type: Optional[int] = None, round_mode: Optional[int] = None,
                             activate_dim: Optional[int] = None, swiglu_mode: int = 0, clamp_limit: float = 7.0,
                             glu_alpha: float = 1.702, glu_bias: float = 1.0):
    """SwiGLU then per-row dynamic int8 quant: h = silu(left) * right (activate_left=True; else
    silu(right) * left), y, scale = int8(h / (max|h| / 127)), max|h| / 127. int32 x is first
    dequantized: x * weight_scale[expert of the row] * activation_scale[row] (group_index: per-expert
    row counts). Computed in fp32. ASSUMPTION: h is not rounded to the input dtype before quantizing."""
    c.check_dequant_swiglu_quant(x, weight_scale, activation_scale, bias, quant_scale, quant_offset, group_index,
                                 activate_left, quant_mode, dst_type, round_mode, activate_dim, swiglu_mode,
                                 clamp_limit, glu_alpha, glu_bias)
    rows = x.shape[0] if group_index is None else int(group_index.sum())
    c.require(rows <= x.shape[0], "npu_dequant_swiglu_quant", f"group_index sums to {rows} > {x.shape[0]} rows of x",
              f"{c.DOC}:11678")
    xf = x[:rows].float()

    def per_row(t):  # [groups, C] -> [rows, C]: group g covers group_index[g] rows
        t = t.float().reshape(-1, t.shape[-1])
        if group_index is None or t.shape[0] == 1:
            return t
        return t.repeat_interleave(group_index.to(torch.int64), dim=0, output_size=rows)
    if x.dtype == torch.int32:
        xf = xf * per_row(weight_scale) * activation_scale[:rows].float().reshape(-1, 1)
    first, second = xf.chunk(2, dim=-1)
    gate, up = (first, second) if activate_left else (second, first)
    h = torch.nn.functional.silu(gate) * up
    if quant_scale is not None:
        h = h * per_row(quant_scale)
    q, scale = _dynamic_quant_rows(h, False)
    if rows == x.shape[0]:
        return q, scale
    # rows past the groups are not written (DOC 11680: garbage, may be inf/nan)
    y = torch.zeros(x.shape[0], x.shape[1] // 2, dtype=torch.int8, device=x.device)
    out_scale = torch.full((x.shape[0],), float("nan"), dtype=torch.float32, device=x.device)
    y[:rows], out_scale[:rows] = q, scale
    return y, out_scale


def npu_moe_init_routing_v2(x: torch.Tensor, expert_idx: torch.Tensor, *, scale: Optional[torch.Tensor] = None,
                            offset: Optional[torch.Tensor] = None, active_num: int = -1, expert_capacity: int = -1,
                            expert_num: int = -1, drop_pad_mode: int = 0, expert_tokens_num_type: int = 0,
                            expert_tokens_num_flag: bool = False, quant_mode: int = -1,
                            active_expert_range: Sequence[int] = (), row_idx_type: int = 0,
                            x_dtype: Optional[int] = None):
    """Sort the (token, k) pairs by expert: returns (expanded_x, expanded_row_idx, expert_tokens, expanded_scale).

    Pair p = t * K + k (row-major over expert_idx [T, K]) is kept when its expert lies in
    active_expert_range [start, end) (default [0, expert_num)); kept pairs are ordered by expert,
    stably, and row i of expanded_x is x[t] of the i-th kept pair. expanded_row_idx[p] is that
    row i (row_idx_type 0, "gather"), or expanded_row_idx[i] = p (row_idx_type 1, "scatter").
    expert_tokens (with expert_tokens_num_flag): per expert of the range, cumulative ends (type 0)
    or counts (type 1), int64. quant_mode -1: rows as they are (expanded_scale = scale[t] when a [T]
    scale is given); quant_mode 1: dynamic int8 per row, scale = max|x[t] (* scale[expert])| / 127.
    ASSUMPTION: pairs outside the range get expanded_row_idx -1; rows past the kept ones are not
    written (NaN / 0 here, uninitialised on the NPU).
    """
    c.check_moe_init_routing_v2(x, expert_idx, scale, offset, active_num, expert_capacity, expert_num,
                                drop_pad_mode, expert_tokens_num_type, expert_tokens_num_flag, quant_mode,
                                active_expert_range, row_idx_type, x_dtype)
    num_tokens, top_k = expert_idx.shape
    start, end = active_expert_range if len(active_expert_range) else (0, expert_num)
    flat = expert_idx.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    pairs = order[(sorted_experts >= start) & (sorted_experts < end)]
    rows = num_tokens * top_k if active_num < 0 else min(active_num, num_tokens * top_k)
    pairs = pairs[:rows]
    kept = pairs.numel()
    source = pairs // top_k
    expanded_row_idx = torch.full((num_tokens * top_k,), -1, dtype=torch.int32, device=x.device)
    if row_idx_type == 0:
        expanded_row_idx[pairs] = torch.arange(kept, dtype=torch.int32, device=x.device)
    else:
        expanded_row_idx[:kept] = pairs.to(torch.int32)
    picked = x[source]
    expanded_scale = torch.full((rows,), float("nan"), dtype=torch.float32, device=x.device)
    if quant_mode == 1:
        picked = picked.float()
        if scale is not None:
            picked = picked * scale.float()[(flat[pairs] - start) if scale.shape[0] > 1 else 0]
        q, row_scale = _dynamic_quant_rows(picked, False)
        expanded_x = torch.zeros(rows, x.shape[1], dtype=torch.int8, device=x.device)
        expanded_x[:kept] = q
        expanded_scale[:kept] = row_scale
    else:
        expanded_x = torch.full((rows, x.shape[1]), float("nan"), dtype=x.dtype, device=x.device)
        expanded_x[:kept] = picked
        if scale is not None:
            expanded_scale[:kept] = scale.float()[source]
    counts = torch.bincount(flat[pairs] - start, minlength=end - start).to(torch.int64)
    expert_tokens = (counts.cumsum(0) if expert_tokens_num_type == 0 else counts) if expert_tokens_num_flag \
        else torch.empty(0, dtype=torch.int64, device=x.device)
    return expanded_x, expanded_row_idx, expert_tokens, expanded_scale


def npu_moe_token_unpermute(permuted_tokens: torch.Tensor, sorted_indices: torch.Tensor,
                            probs: Optional[torch.Tensor] = None, padded_mode: bool = False,
                            restore_shape: Optional[List[int]] = None) -> torch.Tensor:
    """out[t] = sum_k probs[t, k] * permuted_tokens[sorted_indices[t * K + k]] (K = 1 without probs).

    ASSUMPTION: products and the sum over k in fp32, rounded once to permuted_tokens' dtype.
    """
    c.check_moe_token_unpermute(permuted_tokens, sorted_indices, probs, padded_mode, restore_shape)
    top_k = 1 if probs is None else probs.shape[1]
    index = sorted_indices.to(torch.int64)
    in_range = bool((index >= 0).all() and (index < permuted_tokens.shape[0]).all()) if index.numel() else True
    c.require(in_range and index.unique().numel() == index.numel(), "npu_moe_token_unpermute",
              f"sorted_indices must lie in [0, {permuted_tokens.shape[0]}) without repeats",
              f"{c.DOC}:16942 (取值范围是[0, tokens_num * topK_num - 1]，且没有重复索引)")
    rows = permuted_tokens[index].float().reshape(-1, top_k, permuted_tokens.shape[-1])
    if probs is not None:
        rows = rows * probs.float().unsqueeze(-1)
    return rows.sum(dim=1).to(permuted_tokens.dtype)


def npu_moe_init_routing(x: torch.Tensor, row_idx: torch.Tensor, expert_idx: torch.Tensor, active_num: int):
    """v1 routing (Atlas A2): key-value sort of (expert_idx, row_idx) by expert, stable in pair order p = t*K + k;
    expanded_row_idx[sorted_row_idx[i]] = i, expanded_x[i] = x[sorted_row_idx[i] % T], and the sorted
    expert ids. Upstream passes row_idx[t, k] = k * T + t, so expanded_row_idx is indexed k * T + t.
    ASSUMPTION: the sort is stable (ties keep pair order)."""
    c.check_moe_init_routing(x, row_idx, expert_idx, active_num)
    num_tokens, top_k = expert_idx.shape
    flat = expert_idx.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    sorted_row_idx = row_idx.reshape(-1)[order].to(torch.int64)
    rows = min(num_tokens, active_num) * top_k
    expanded_row_idx = torch.empty(num_tokens * top_k, dtype=torch.int32, device=x.device)
    expanded_row_idx[sorted_row_idx] = torch.arange(num_tokens * top_k, dtype=torch.int32, device=x.device)
    expanded_x = x[sorted_row_idx[:rows] % num_tokens]
    return expanded_x, expanded_row_idx, flat[order].to(torch.int32)


def npu_moe_compute_expert_tokens(sorted_expert_for_source_row: torch.Tensor, num_expert: int) -> torch.Tensor:
    """Per expert e, the end (exclusive) of its rows in the sorted expert ids: a cumulative count, int32."""
    c.check_moe_compute_expert_tokens(sorted_expert_for_source_row, num_expert)
    experts = torch.arange(num_expert, dtype=sorted_expert_for_source_row.dtype,
                           device=sorted_expert_for_source_row.device)
    return torch.searchsorted(sorted_expert_for_source_row, experts, right=True).to(torch.int32)


def npu_moe_finalize_routing(expanded_permuted_rows: torch.Tensor, skip1: Optional[torch.Tensor],
                             skip2: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                             scales: Optional[torch.Tensor], expanded_src_to_dst_row: torch.Tensor,
                             export_for_source_row: Optional[torch.Tensor], drop_pad_mode: Optional[int] = 0,
                             k: Optional[int] = 1) -> torch.Tensor:
    """out[i] = skip1 + skip2 + sum_k scales[i, k] * (rows[src_to_dst[i + k * T]] + bias[expert[i, k]])
    (DOC 10606). The index is k-major (i + k * T) as v1 routing writes it with drop_pad_mode 0;
    with drop_pad_mode 2 it is token-major (i * K + k), as v2 routing writes it (SGLang pairs
    npu_moe_init_routing_v2 with drop_pad_mode=2: layers/moe/token_dispatcher/ascend_tp.py:81).
    ASSUMPTION: fp32 accumulation, rounded once."""
    c.check_moe_finalize_routing(expanded_permuted_rows, skip1, skip2, bias, scales, expanded_src_to_dst_row,
                                 export_for_source_row, drop_pad_mode, k)
    top_k = scales.shape[1] if scales is not None else k
    num_rows = expanded_src_to_dst_row.shape[0] // top_k
    index = expanded_src_to_dst_row.to(torch.int64)
    c.require(not index.numel() or bool((index >= 0).all() and (index < expanded_permuted_rows.shape[0]).all()),
              "npu_moe_finalize_routing", f"expanded_src_to_dst_row must lie in [0, {expanded_permuted_rows.shape[0]})",
              f"{c.DOC}:10616")
    index = index.reshape(top_k, num_rows).t() if drop_pad_mode in (0, None) else index.reshape(num_rows, top_k)
    rows = expanded_permuted_rows[index].float()  # [T, K, H]
    if bias is not None:
        rows = rows + bias.float()[export_for_source_row.to(torch.int64)]
    if scales is not None:
        rows = rows * scales.float().unsqueeze(-1)
    out = rows.sum(dim=1)
    for skip in (skip1, skip2):
        if skip is not None:
            out = out + skip.float()
    return out.to(expanded_permuted_rows.dtype)


def npu_anti_quant(x: torch.Tensor, scale: torch.Tensor, *, offset: Optional[torch.Tensor] = None,
                   dst_dtype: Optional[int] = None, src_dtype: Optional[int] = None) -> torch.Tensor:
    """(x + offset) * scale along the last dim, in dst_dtype (float16 by default), as documented."""
    c.check_anti_quant(x, scale, offset, dst_dtype, src_dtype)
    xf = x.float()
    if offset is not None:
        xf = xf + offset.float()
    return (xf * scale.float()).to(c.as_dtype(dst_dtype) or torch.float16)


def npu_kronecker_quant(x: torch.Tensor, kronecker_p1: torch.Tensor, kronecker_p2: torch.Tensor,
                        clip_ratio: Optional[float] = None, dst_dtype: Optional[int] = None,
                        dst_type_max: Optional[float] = None):
    """FlatQuant's activation step, per token k of x [K, M, N] (aclnnFlatQuant's formula):
    x'' = kronecker_p1 @ (x[k] @ kronecker_p2); scale[k] = max|x''| * clip_ratio / 7 (fp32 [K]);
    out = x'' / scale rounded and saturated to int4, packed eight per int32 along N -> int32 [K, M, N / 8].
    ASSUMPTION: the two products are rounded to x's dtype, as the kernel's matmuls output it."""
    c.check_kronecker_quant(x, kronecker_p1, kronecker_p2, clip_ratio, dst_dtype, dst_type_max)
    ratio = 1.0 if clip_ratio is None else clip_ratio
    right = (x.float() @ kronecker_p2.float()).to(x.dtype)
    both = (kronecker_p1.float() @ right.float()).to(x.dtype).float()
    scale = both.abs().amax(dim=(1, 2)) * ratio / _INT4_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(both / safe.view(-1, 1, 1)).clamp_(-_INT4_MAX - 1, _INT4_MAX).to(torch.int8)
    return pack_int4_to_int32(q), scale


def _fia_kv_rows(key: torch.Tensor, b: int, length: int, block_table, block_size: int, kv_n: int, d: int):
    """Batch b's first `length` key (or value) rows as [length, KV_N, D]: through its blocks when paged."""
    if block_table is None:
        return key[b, :length].reshape(length, kv_n, d)
    blocks = (length + block_size - 1) // block_size
    rows = key[block_table[b, :blocks].long()].reshape(blocks * block_size, kv_n, d)
    return rows[:length]


def npu_fused_infer_attention_score(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, pse_shift=None, atten_mask=None,
        actual_seq_lengths=None, actual_seq_lengths_kv=None, dequant_scale1=None, quant_scale1=None,
        dequant_scale2=None, quant_scale2=None, quant_offset2=None, antiquant_scale=None, antiquant_offset=None,
        key_antiquant_scale=None, key_antiquant_offset=None, value_antiquant_scale=None, value_antiquant_offset=None,
        block_table=None, query_padding_size=None, kv_padding_size=None, key_shared_prefix=None,
        value_shared_prefix=None, actual_shared_prefix_len=None, query_rope=None, key_rope=None,
        key_rope_antiquant_scale=None, num_heads: int = 1, scale: float = 1.0, pre_tokens: int = 2147483647,
        next_tokens: int = 2147483647, input_layout: str = "BSH", num_key_value_heads: int = 0,
        sparse_mode: int = 0, inner_precise: int = 0, block_size: int = 0, antiquant_mode: int = 0,
        key_antiquant_mode: int = 0, value_antiquant_mode: int = 0, softmax_lse_flag: bool = False):
    """softmax(scale * q k^T + mask) v per batch and head (GQA: query head h reads KV head h // (N / KV_N)),
    over the first actual_seq_lengths_kv[b] keys; int8 key/value are dequantized with the per-channel
    antiquant_scale (row 0 keys, row 1 values; antiquant_mode 1: [2, B, KV_S] per token) first. Masked positions (mask value 1/True) get no weight.
    Scores and softmax in fp32, output in the query's dtype; query rows past actual_seq_lengths[b] are 0.
    Returns (attention_out, softmax_lse): with softmax_lse_flag the float32 log-sum-exp of the scaled,
    masked scores over the keys each query row reads, shape (B, N, Q_S, 1) (BSH / BSND, docs
    `_op_plugin_docs.py:8148`; -inf for a row every key of which is masked); without it a float32 [1]
    holding 0 (:8148)."""
    unmodelled = dict(pse_shift=pse_shift, dequant_scale1=dequant_scale1, quant_scale1=quant_scale1,
                      dequant_scale2=dequant_scale2, quant_scale2=quant_scale2, quant_offset2=quant_offset2,
                      key_antiquant_scale=key_antiquant_scale, key_antiquant_offset=key_antiquant_offset,
                      value_antiquant_scale=value_antiquant_scale, value_antiquant_offset=value_antiquant_offset,
                      query_padding_size=query_padding_size, kv_padding_size=kv_padding_size,
                      key_shared_prefix=key_shared_prefix, value_shared_prefix=value_shared_prefix,
                      actual_shared_prefix_len=actual_shared_prefix_len, query_rope=query_rope, key_rope=key_rope,
                      key_rope_antiquant_scale=key_rope_antiquant_scale)
    c.check_fused_infer_attention_score(query, key, value, unmodelled, atten_mask, actual_seq_lengths,
                                        actual_seq_lengths_kv, antiquant_scale, antiquant_offset, block_table,
                                        num_heads, input_layout, num_key_value_heads, sparse_mode, block_size,
                                        antiquant_mode, softmax_lse_flag)
    b, q_s, n, d = c.fia_dims(query, num_heads, input_layout)
    kv_n = num_key_value_heads or n
    kv_s = key.shape[1] if block_table is None else block_table.shape[1] * block_size
    q_lens = list(actual_seq_lengths) if actual_seq_lengths is not None else [q_s]
    kv_lens = list(actual_seq_lengths_kv) if actual_seq_lengths_kv is not None else [kv_s]
    out = torch.zeros(b, q_s, n, d, dtype=torch.float32)
    lse = torch.zeros(c.fia_lse_shape(query, num_heads, input_layout, True), dtype=torch.float32)
    if antiquant_scale is not None and antiquant_mode == 0:
        k_scale, v_scale = (s.float().reshape(kv_n, d) for s in antiquant_scale)
    for i in range(b):
        q_len = min(int(q_lens[i if len(q_lens) > 1 else 0]), q_s)
        kv_len = int(kv_lens[i if len(kv_lens) > 1 else 0])
        k = _fia_kv_rows(key, i, kv_len, block_table, block_size, kv_n, d).float()
        v = _fia_kv_rows(value, i, kv_len, block_table, block_size, kv_n, d).float()
        if antiquant_scale is not None and antiquant_mode == 1:  # per token: one scale per key position
            k_scale, v_scale = (s[i, :kv_len].float().reshape(kv_len, 1, 1) for s in antiquant_scale)
        if antiquant_scale is not None:
            k, v = k * k_scale, v * v_scale
        q = query[i, :q_len].reshape(q_len, n, d).float()
        group = n // kv_n
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        if atten_mask is not None:
            mask = atten_mask[i, 0] if atten_mask.dim() == 4 else atten_mask  # (Q_S, KV_S)
            mask = mask[:q_len, :kv_len]
            scores = scores.masked_fill(mask.bool().unsqueeze(0), float("-inf"))
        out[i, :q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)
        lse[i, :, :q_len, 0] = torch.logsumexp(scores, dim=-1)
    if not softmax_lse_flag:
        lse = torch.zeros(c.fia_lse_shape(query, num_heads, input_layout, False), dtype=torch.float32)
    return out.to(query.dtype).reshape(query.shape), lse
