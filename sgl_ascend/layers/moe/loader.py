"""The fused-MoE weight loader: one expert's checkpoint tensor into its fused parameter.

Signature as SGLang's FusedMoE.weight_loader: (param, loaded_weight, weight_name, shard_id, expert_id)
with shard_id "w1" (gate_proj), "w3" (up_proj) or "w2" (down_proj) and a global expert id.
`FusedMoEMethod.create_weights` attaches it to every parameter as `param.weight_loader`. The
parameters are `ShardedParameter`s (as the linears'), whose `ExpertLayout` holds the tensor-parallel
rule and the writer; this loader only maps the global expert id to the rank's local one.
"""

import functools

import torch


def load_expert_tensor(layer, param, loaded: torch.Tensor, weight_name: str, shard_id: str,
                       expert_id: int) -> bool:
    """Write one expert's checkpoint tensor into its fused parameter; False if another ep rank holds it."""
    if shard_id not in ("w1", "w2", "w3"):
        raise ValueError(f"shard_id must be w1, w2 or w3, got {shard_id!r}")
    local = expert_id - layer.moe_ep_rank * layer.num_local_experts
    if not 0 <= local < layer.num_local_experts:
        return False
    param.load_expert_weight(loaded, local_expert=local, shard_id=shard_id, tp_rank=layer.moe_tp_rank,
                             tp_size=layer.moe_tp_size, weight_name=weight_name)
    return True


def bound_loader(layer: torch.nn.Module):
    """`param.weight_loader` for a layer's expert parameters (extra keywords such as SGLang's
    return_success are accepted; the result says whether this rank holds the expert)."""
    @functools.wraps(load_expert_tensor)
    def weight_loader(param, loaded_weight, weight_name, shard_id, expert_id, **_):
        return load_expert_tensor(layer, param, loaded_weight, weight_name, shard_id, expert_id)
    return weight_loader
