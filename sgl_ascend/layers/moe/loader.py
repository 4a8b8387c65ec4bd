"""The fused-MoE weight loader: one expert's checkpoint tensor into its fused parameter.

Signature as SGLang's FusedMoE.weight_loader: (param, loaded_weight, weight_name, shard_id, expert_id)
with shard_id "w1" (gate_proj), "w3" (up_proj) or "w2" (down_proj) and a global expert id.
`FusedMoEMethod.create_weights` attaches it to every parameter as `param.weight_loader`, because
the parameters hold kernel layouts that only this loader knows how to fill.
"""

import functools

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.moe.base import SHARD_INDEX


def load_expert_tensor(layer, param, loaded: torch.Tensor, weight_name: str, shard_id: str,
                       expert_id: int) -> bool:
    """Write one expert's checkpoint tensor into its fused parameter; False if another ep rank holds it."""
    if shard_id not in ("w1", "w2", "w3"):
        raise ValueError(f"shard_id must be w1, w2 or w3, got {shard_id!r}")
    local = expert_id - layer.moe_ep_rank * layer.num_local_experts
    if not 0 <= local < layer.num_local_experts:
        return False
    spec = param.moe_spec
    spec.check(loaded.dtype, loaded.shape, weight_name)
    rank, tp = layer.moe_tp_rank, layer.moe_tp_size
    full = loaded
    if spec.tp_dim is not None and tp > 1:
        size = loaded.shape[spec.tp_dim]
        if size % tp:
            raise CheckpointError(f"dim {spec.tp_dim} of size {size} does not split into {tp} tensor-parallel "
                                  "slices", tensor=weight_name)
        loaded = loaded.narrow(spec.tp_dim, rank * (size // tp), size // tp)
    target = None
    if param.data.numel():
        target = param.data[local]
        if shard_id != "w2" and param.moe_n_dim is not None:
            half = target.shape[param.moe_n_dim] // 2
            target = target.narrow(param.moe_n_dim, SHARD_INDEX[shard_id] * half, half)
    try:
        if getattr(param, "moe_write_full", False):  # the write also needs the unsliced tensor
            param.moe_write(target, loaded, full, layer, local)
        else:
            param.moe_write(target, loaded)
    except CheckpointError as exc:
        if exc.tensor is None:
            raise CheckpointError(str(exc), tensor=weight_name) from exc
        raise
    return True


def bound_loader(layer: torch.nn.Module):
    """`param.weight_loader` for a layer's expert parameters (extra keywords such as SGLang's
    return_success are accepted; the result says whether this rank holds the expert)."""
    @functools.wraps(load_expert_tensor)
    def weight_loader(param, loaded_weight, weight_name, shard_id, expert_id, **_):
        return load_expert_tensor(layer, param, loaded_weight, weight_name, shard_id, expert_id)
    return weight_loader
