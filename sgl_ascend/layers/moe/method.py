"""The fused-MoE quant method (SGLang's FusedMoEMethodBase protocol) and the forward all schemes share.

`FusedMoEMethod` pairs a gate/up ("w13") and a down ("w2") expert scheme. SGLang's FusedMoE calls
`create_weights(layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
**extra_weight_attrs)` and `process_weights_after_loading(layer)`; the SGLang adapter's `apply`
calls `apply_moe(layer, x, topk_weights, topk_ids)`. Tensor/expert parallel sizes are read from the
layer attributes SGLang's FusedMoE carries: moe_tp_rank, moe_tp_size, moe_ep_rank, moe_ep_size,
num_experts, num_local_experts.
"""

from typing import Dict

import torch

from sgl_ascend.layers.moe.base import PROJECTIONS, ExpertScheme, TensorSpec
from sgl_ascend.layers.moe.loader import bound_loader
from sgl_ascend.layers.moe.routing import routing_version
from sgl_ascend.ops import ops


class FusedMoEMethod:
    def __init__(self, w13: ExpertScheme, w2: ExpertScheme):
        if w13.role != "w13" or w2.role != "w2":
            raise ValueError("FusedMoEMethod(w13 scheme, w2 scheme)")
        self.w13, self.w2 = w13, w2

    def create_weights(self, layer: torch.nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype, **extra_weight_attrs):
        tp_size = getattr(layer, "moe_tp_size", 1)
        layer.moe_method = self
        layer.moe_routing = routing_version()  # decided once per layer, never per forward
        extra_weight_attrs = dict(extra_weight_attrs, weight_loader=bound_loader(layer))
        self.w13.create_weights(layer, num_experts, 2 * intermediate_size_per_partition, hidden_size, tp_size,
                                **extra_weight_attrs)
        self.w2.create_weights(layer, num_experts, hidden_size, intermediate_size_per_partition, tp_size,
                               **extra_weight_attrs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.w13.process_weights_after_loading(layer)
        self.w2.process_weights_after_loading(layer)

    def checkpoint_tensors(self, hidden_size: int, intermediate_size: int,
                           tp_size: int) -> Dict[str, Dict[str, TensorSpec]]:
        """Projection -> suffix -> spec of one expert's checkpoint tensors (full sizes)."""
        out = {}
        for proj, (role, _) in PROJECTIONS.items():
            scheme = self.w13 if role == "w13" else self.w2
            n, k = (intermediate_size, hidden_size) if role == "w13" else (hidden_size, intermediate_size)
            out[proj] = scheme.checkpoint_tensors(n, k, tp_size)
        return out

    def theoretical_bytes(self, num_local_experts: int, hidden_size: int, intermediate_size_per_partition: int):
        i = intermediate_size_per_partition
        return (self.w13.theoretical_bytes(num_local_experts, 2 * i, hidden_size)
                + self.w2.theoretical_bytes(num_local_experts, hidden_size, i))

    def method_of(self, expert: int) -> "FusedMoEMethod":
        """The method serving global expert `expert`: this one for every expert (a composite's differ)."""
        return self

    def apply_moe(self, layer, x, topk_weights, topk_ids):
        local = layer.num_local_experts
        return apply_experts(layer, self, layer.moe_routing, x, topk_weights, topk_ids.to(torch.int32),
                             expert_num=layer.num_experts, first=layer.moe_ep_rank * local, local=local,
                             subset=layer.moe_ep_size > 1)


def apply_moe(layer: torch.nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """The layer's fused-MoE forward, as its method computes it (`FusedMoEMethod.apply_moe`, or a
    composite's over groups of experts, layers/moe/mixed.py)."""
    return layer.moe_method.apply_moe(layer, x, topk_weights, topk_ids)


def apply_experts(layer: torch.nn.Module, method: FusedMoEMethod, routing: str, x: torch.Tensor,
                  topk_weights: torch.Tensor, ids: torch.Tensor, *, expert_num: int, first: int, local: int,
                  subset: bool) -> torch.Tensor:
    """routing -> grouped matmul (gate/up) -> SwiGLU (+ requant for down) -> grouped matmul (down)
    -> finalize routing with the top-k weights, as SGLang's ascend_tp path calls the ops (docs/moe.md).
    ids: int32 [T, K] expert ids in [0, expert_num); `layer` holds the parameters of experts
    [first, first + local) (`subset`: not all of them), and pairs routed to other experts contribute
    zero. Under tp or ep the result is this rank's partial sum (the caller all-reduces, as SGLang's
    FusedMoE does).

    Graph-safe: no host sync and no data-dependent Python branch; every branch below reads the
    layer's static configuration (schemes, routing version, expert parallelism)."""
    num_tokens, top_k = ids.shape
    pairs = num_tokens * top_k
    probs = topk_weights.to(x.dtype)
    w13_int8 = method.w13.act_dtype == torch.int8
    if routing == "v2":
        rows, row_idx, group_list, row_scale = ops.npu_moe_init_routing_v2(
            x, ids, active_num=pairs, expert_num=expert_num, expert_tokens_num_type=1,
            expert_tokens_num_flag=True, active_expert_range=[first, first + local],
            quant_mode=1 if w13_int8 else -1)
        # counts (type 1) must not have length 1 (torch_npu docs); one expert's count is its end (type 0)
        group_list_type = 0 if local == 1 else 1
        if not w13_int8:
            row_scale = None
    else:
        rows, row_idx, group_list, ids = _route_v1(x, ids, local, first, subset)
        group_list_type, row_scale = 0, None
        if w13_int8:
            rows, row_scale = ops.npu_dynamic_quant(rows)
    if method.w13.act_dtype == torch.quint4x2:
        rows, row_scale = ops.npu_dynamic_quant(rows, dst_type=torch.quint4x2)
    hidden = method.w13.apply(layer, rows, row_scale, group_list, group_list_type, x.dtype)
    hidden, hidden_scale = _swiglu(hidden, method.w2.act_dtype)
    out_rows = method.w2.apply(layer, hidden, hidden_scale, group_list, group_list_type, x.dtype)
    if subset:
        out_rows = _zero_rows_past_groups(out_rows, group_list, group_list_type)
    if routing == "v2":
        if subset:  # pairs of experts not held here (index -1) read the last row, zero whenever such a pair exists
            row_idx = torch.where(row_idx < 0, pairs - 1, row_idx)
        return ops.npu_moe_finalize_routing(out_rows, skip1=None, skip2=None, bias=None, scales=probs,
                                            expanded_src_to_dst_row=row_idx, export_for_source_row=ids,
                                            drop_pad_mode=2)
    return ops.npu_moe_finalize_routing(out_rows, skip1=None, skip2=None, bias=None, scales=probs,
                                        expanded_src_to_dst_row=row_idx, export_for_source_row=ids,
                                        drop_pad_mode=0)


def _route_v1(x, ids, local, first, expert_parallel):
    """v1 routing (SGL hardware_backend/npu/moe/init_routing.py NPUMoEInitRouting_v1): row_idx[t, k] =
    k * T + t, cumulative ends per expert (int32 -> int64, group_list_type 0). v1 has no expert range:
    under expert parallelism other ranks' experts become one extra id `local`, sorted after every
    local expert, so their rows come last and are zeroed after the down projection.
    Returns (rows, k-major expanded_row_idx, int64 ends of the local experts, the ids routed)."""
    num_tokens, top_k = ids.shape
    if expert_parallel:
        shifted = ids - first
        ids = torch.where((shifted >= 0) & (shifted < local), shifted, local)
    row_idx = torch.arange(num_tokens * top_k, dtype=torch.int32, device=x.device).view(top_k, num_tokens)
    rows, expanded_row_idx, sorted_ids = ops.npu_moe_init_routing(x, row_idx.t().contiguous(), ids, num_tokens)
    ends = ops.npu_moe_compute_expert_tokens(sorted_ids, local + 1 if expert_parallel else local)
    ends = ends.to(torch.int64)
    return rows, expanded_row_idx, ends[:local] if expert_parallel else ends, ids


def _swiglu(hidden, act_dtype):
    """SwiGLU of the gate/up rows (gate = first half), quantized as the down projection takes them:
    int8 -> npu_dequant_swiglu_quant (fused SwiGLU + dynamic per-token int8, as SGLang's NPUSwigluQuant),
    int4 -> npu_swiglu + npu_dynamic_quant(quint4x2), float -> npu_swiglu."""
    if act_dtype == torch.int8:
        return ops.npu_dequant_swiglu_quant(hidden, quant_mode=1, activate_left=True)
    hidden = ops.npu_swiglu(hidden)
    if act_dtype == torch.quint4x2:
        return ops.npu_dynamic_quant(hidden, dst_type=torch.quint4x2)
    return hidden, None


def _zero_rows_past_groups(out_rows, group_list, group_list_type):
    """Rows past the local experts' groups are never written by the grouped matmul (uninitialised on
    the NPU, NaN in the twin): zero them, on the device, from the group list."""
    routed = group_list[-1] if group_list_type == 0 else group_list.sum()
    unwritten = torch.arange(out_rows.shape[0], device=out_rows.device) >= routed
    return out_rows.masked_fill(unwritten.unsqueeze(1), 0)
