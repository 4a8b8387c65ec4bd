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

    def apply_moe(self, layer, x, topk_weights, topk_ids):
        return apply_moe(layer, x, topk_weights, topk_ids)


def apply_moe(layer: torch.nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """routing -> grouped matmul (gate/up) -> SwiGLU -> per-token requant -> grouped matmul (down)
    -> combine with the top-k weights. topk_ids are global expert ids; pairs routed to experts this
    rank does not hold contribute zero. Under tp or ep the result is this rank's partial sum
    (the caller all-reduces, as SGLang's FusedMoE does)."""
    method = layer.moe_method
    num_tokens, top_k = topk_ids.shape
    first = layer.moe_ep_rank * layer.num_local_experts
    last = first + layer.num_local_experts
    rows, row_idx, counts, row_scale = ops.npu_moe_init_routing_v2(
        x, topk_ids.to(torch.int32), active_num=num_tokens * top_k, expert_num=layer.num_experts,
        expert_tokens_num_type=1, expert_tokens_num_flag=True, active_expert_range=[first, last],
        quant_mode=1 if method.w13.act_dtype == torch.int8 else -1)
    if method.w13.act_dtype == torch.quint4x2:
        rows, row_scale = ops.npu_dynamic_quant(rows, dst_type=torch.quint4x2)
    hidden = method.w13.apply(layer, rows, row_scale, counts, x.dtype)
    hidden = ops.npu_swiglu(hidden)
    hidden_scale = None
    if method.w2.act_dtype is not None:
        hidden, hidden_scale = ops.npu_dynamic_quant(hidden, dst_type=method.w2.act_dtype)
    out_rows = method.w2.apply(layer, hidden, hidden_scale, counts, x.dtype)
    # Pairs of other ranks' experts have no row (index -1): point them at row 0 with weight zero.
    local = (topk_ids >= first) & (topk_ids < last)
    probs = torch.where(local, topk_weights, torch.zeros_like(topk_weights)).to(x.dtype)
    return ops.npu_moe_token_unpermute(out_rows, row_idx.clamp_min(0), probs=probs)
