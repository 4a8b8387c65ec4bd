"""SGLang-free fused-MoE layer for the tools and tests, its weight loader, and `load_moe`.

`MoELayer` carries the attributes SGLang's FusedMoE has (num_experts, num_local_experts,
moe_tp_rank/size, moe_ep_rank/size) and a `weight_loader(param, loaded_weight, weight_name,
shard_id, expert_id)` with SGLang's signature (shard_id "w1" gate, "w3" up, "w2" down; global
expert ids). Expert parallelism places experts contiguously: rank r holds
[r * num_local_experts, (r + 1) * num_local_experts).
"""

import itertools
from typing import Optional

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.moe.base import PROJECTIONS
from sgl_ascend.layers.moe.method import FusedMoEMethod, apply_moe

CLIP_SUFFIXES = ("bias", "alpha")


class MoELayer(torch.nn.Module):
    def __init__(self, method: FusedMoEMethod, *, num_experts: int, hidden_size: int, intermediate_size: int,
                 tp_rank: int = 0, tp_size: int = 1, ep_rank: int = 0, ep_size: int = 1,
                 params_dtype: torch.dtype = torch.bfloat16, prefix: str = ""):
        super().__init__()
        if num_experts % ep_size or intermediate_size % tp_size:
            raise CheckpointError(f"{num_experts} experts / intermediate {intermediate_size} do not divide by "
                                  f"ep {ep_size} / tp {tp_size}")
        self.prefix = prefix
        self.num_experts, self.num_local_experts = num_experts, num_experts // ep_size
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.intermediate_size_per_partition = intermediate_size // tp_size
        self.moe_tp_rank, self.moe_tp_size, self.moe_ep_rank, self.moe_ep_size = tp_rank, tp_size, ep_rank, ep_size
        method.create_weights(self, self.num_local_experts, hidden_size, self.intermediate_size_per_partition,
                              params_dtype)

    def weight_loader(self, param, loaded_weight, weight_name, shard_id, expert_id, **_) -> bool:
        """As SGLang's model loaders do: the parameter's own loader (the method attached it)."""
        return param.weight_loader(param, loaded_weight, weight_name, shard_id, expert_id)

    def forward(self, x, topk_weights, topk_ids):
        return apply_moe(self, x, topk_weights, topk_ids)

    def resident_bytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in itertools.chain(self.parameters(), self.buffers()))


def expert_prefix(prefix: str, expert: int, proj: str) -> str:
    return f"{prefix}.experts.{expert}.{proj}"


def check_moe_checkpoint(method: FusedMoEMethod, checkpoint, prefix: str, *, num_experts: int,
                         hidden_size: int, intermediate_size: int, tp_size: int = 1) -> None:
    """Every expert's tensors present with the right shape and dtype, from the headers only."""
    for expert in range(num_experts):
        served_by = method.method_of(expert)
        for proj, wanted in served_by.checkpoint_tensors(hidden_size, intermediate_size, tp_size).items():
            name = expert_prefix(prefix, expert, proj)
            present = checkpoint.with_prefix(name)
            if not present:
                raise CheckpointError(
                    f"expert {expert} of {num_experts} has no {proj} tensors; the checkpoint is incomplete "
                    "or the model config's num_experts is wrong.", file=checkpoint.path, tensor=f"{name}.weight")
            have_clip = sorted(s for s in present if s in CLIP_SUFFIXES)
            want_clip = sorted(s for s in wanted if s in CLIP_SUFFIXES)
            if have_clip != want_clip:
                raise CheckpointError(
                    f"activation-clip tensors are half present: {name} has {have_clip or 'none'} where this "
                    f"layer's scheme expects {want_clip or 'none'}; a clip checkpoint carries gate/up/down "
                    "bias and down alpha for every expert, a plain one none of them.",
                    file=checkpoint.path, tensor=name)
            for suffix in sorted(set(present) - set(wanted)):
                info = present[suffix]
                raise CheckpointError(
                    f"tensor has no place in this MoE layer ({type(served_by.w13 if proj != 'down_proj' else served_by.w2).__name__}"
                    f" expects {', '.join(sorted(wanted))}); the description's scheme does not match the tensors.",
                    file=info.file, tensor=info.name)
            for suffix in sorted(set(wanted) - set(present)):
                raise CheckpointError(
                    f"the layer needs {name}.{suffix} but the checkpoint does not have it; the checkpoint "
                    "is incomplete or its description is wrong.", file=checkpoint.path, tensor=f"{name}.{suffix}")
            for suffix, info in present.items():
                wanted[suffix].check(info.dtype, info.shape, info.name, info.file)


def load_moe(layer: MoELayer, checkpoint, prefix: str) -> None:
    """Check the checkpoint's expert tensors (headers), load this rank's experts, process the layer."""
    method = layer.moe_method
    check_moe_checkpoint(method, checkpoint, prefix, num_experts=layer.num_experts,
                         hidden_size=layer.hidden_size, intermediate_size=layer.intermediate_size,
                         tp_size=layer.moe_tp_size)
    first = layer.moe_ep_rank * layer.num_local_experts
    for expert in range(first, first + layer.num_local_experts):
        specs = method.method_of(expert).checkpoint_tensors(layer.hidden_size, layer.intermediate_size,
                                                            layer.moe_tp_size)
        for proj, (role, shard_id) in PROJECTIONS.items():
            for suffix in specs[proj]:
                name = f"{expert_prefix(prefix, expert, proj)}.{suffix}"
                layer.weight_loader(getattr(layer, f"{role}_{suffix}"), checkpoint.get(name), name, shard_id, expert)
    method.process_weights_after_loading(layer)


def build_moe(method: FusedMoEMethod, checkpoint, prefix: str, *, num_experts: int, hidden_size: int,
              intermediate_size: int, tp_rank: int = 0, tp_size: int = 1, ep_rank: int = 0, ep_size: int = 1,
              params_dtype: torch.dtype = torch.bfloat16, layer_prefix: Optional[str] = None) -> MoELayer:
    """Validate the checkpoint (headers only) before any parameter is allocated, then build and load."""
    check_moe_checkpoint(method, checkpoint, prefix, num_experts=num_experts, hidden_size=hidden_size,
                         intermediate_size=intermediate_size, tp_size=tp_size)
    layer = MoELayer(method, num_experts=num_experts, hidden_size=hidden_size, intermediate_size=intermediate_size,
                     tp_rank=tp_rank, tp_size=tp_size, ep_rank=ep_rank, ep_size=ep_size,
                     params_dtype=params_dtype, prefix=layer_prefix or f"{prefix}.experts")
    load_moe(layer, checkpoint, prefix)
    return layer
