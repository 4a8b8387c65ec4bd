"""An MoE block whose experts use different schemes: partial quantization, as msModelSlim writes the DeepSeek
MTP / NextN layer (experts left FLOAT by `disable_names` / `exclude` beside quantized ones).

`MixedExpertsMethod` holds one `FusedMoEMethod` per scheme, each over its own experts only, so every weight
exists once, in its own scheme's layout (no dequantized copy). Each group's parameters live in a child
module, `layer.expert_groups[g]`, which carries the attributes a FusedMoEMethod reads (its experts are
its local experts).

Physical layout: group g occupies the contiguous slots [start_g, start_g + n_g), groups in order.
`layer.expert_slot` (int32 [E], a device buffer built at create_weights from the checkpoint's
description, never per forward) maps router expert ids to slots. The forward gathers topk_ids through
it, runs each group's fused forward (`apply_experts`) over its slot range, where the routing op's
`active_expert_range` drops the pairs of other groups exactly as under expert parallelism, and sums the
groups' outputs. Graph-safe: a gather, then a Python loop over the static groups.

Loading: SGLang's model loaders map every expert's checkpoint tensor to the layer's `w13_<suffix>` /
`w2_<suffix>` parameter by name. The layer carries a zero-byte parameter under each name some group uses,
whose loader writes into the group holding the expert, at its index in the group; they are removed after
loading. Expert parallelism is refused (its contiguous expert ranges would cut across the groups).
"""

from typing import Sequence, Tuple

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.moe.loader import load_expert_tensor
from sgl_ascend.layers.moe.method import FusedMoEMethod, apply_experts
from sgl_ascend.layers.moe.routing import routing_version


class ExpertGroup(torch.nn.Module):
    """One scheme's experts of a mixed block: its parameters and the FusedMoE attributes its method reads."""

    def __init__(self, layer: torch.nn.Module, index: int, count: int):
        super().__init__()
        self.prefix = f"{getattr(layer, 'prefix', '') or type(layer).__name__}.expert_groups.{index}"
        self.num_experts = self.num_local_experts = count
        self.moe_tp_rank, self.moe_tp_size = getattr(layer, "moe_tp_rank", 0), getattr(layer, "moe_tp_size", 1)
        self.moe_ep_rank, self.moe_ep_size = 0, 1


class MixedExpertsMethod:
    """groups: (FusedMoEMethod, its global expert ids, scheme label) per scheme; together every expert once."""

    def __init__(self, groups: Sequence[Tuple[FusedMoEMethod, Sequence[int], str]], block: str = "MoE block"):
        self.groups = [(method, tuple(experts), label) for method, experts, label in groups]
        self.block = block
        self.num_experts = sum(len(experts) for _, experts, _ in self.groups)
        self.slot_of, self.group_of = {}, {}
        slot = 0
        for index, (_, experts, _) in enumerate(self.groups):
            for position, expert in enumerate(experts):
                self.slot_of[expert], self.group_of[expert] = slot, (index, position)
                slot += 1
        if sorted(self.slot_of) != list(range(self.num_experts)):
            raise ValueError(f"{block}: the groups must hold experts 0..{self.num_experts - 1} once each")

    def method_of(self, expert: int) -> FusedMoEMethod:
        return self.groups[self.group_of[expert][0]][0]

    def describe(self) -> str:
        """e.g. "W8A8_DYNAMIC (7 experts) + FLOAT (experts 1)"."""
        return " + ".join(f"{label} ({len(experts)} experts)" if len(experts) > 3 else
                          f"{label} (experts {', '.join(map(str, experts))})" for _, experts, label in self.groups)

    def create_weights(self, layer: torch.nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype, **extra_weight_attrs):
        if getattr(layer, "moe_ep_size", 1) > 1:
            raise CheckpointError(
                f"{self.block} mixes expert schemes ({self.describe()}), which sgl-ascend serves without expert "
                f"parallelism only: --ep-size {layer.moe_ep_size} would split the experts across ranks by id, "
                "cutting across the scheme groups. Serve with --ep-size 1 (tensor parallelism is served), or "
                "quantize every expert of the block alike.", tensor=f"{self.block}.experts")
        if num_experts != self.num_experts:
            raise CheckpointError(f"the model has {num_experts} experts in {self.block} but the description types "
                                  f"{self.num_experts}; the description does not match this model.",
                                  tensor=f"{self.block}.experts")
        layer.moe_method = self
        layer.moe_routing = routing_version()  # decided once per layer, never per forward
        slots = [self.slot_of[expert] for expert in range(num_experts)]
        layer.register_buffer("expert_slot", torch.tensor(slots, dtype=torch.int32), persistent=False)
        layer.expert_groups = torch.nn.ModuleList(
            ExpertGroup(layer, index, len(experts)) for index, (_, experts, _) in enumerate(self.groups))
        names = []
        for (method, experts, _), group in zip(self.groups, layer.expert_groups):
            method.create_weights(group, len(experts), hidden_size, intermediate_size_per_partition, params_dtype,
                                  **extra_weight_attrs)
            names += [name for name, _ in group.named_parameters(recurse=False) if name not in names]
        for name in names:
            proxy = torch.nn.Parameter(torch.empty(0), requires_grad=False)
            proxy.weight_loader = self._loader(layer, name)
            proxy.mixed_experts_proxy = True
            layer.register_parameter(name, proxy)

    def _loader(self, layer: torch.nn.Module, attr: str):
        def weight_loader(param, loaded_weight, weight_name, shard_id, expert_id, **_) -> bool:
            if expert_id not in self.group_of:
                raise CheckpointError(f"expert {expert_id} is outside the {self.num_experts} experts of "
                                      f"{self.block}.", tensor=weight_name)
            index, position = self.group_of[expert_id]
            group = layer.expert_groups[index]
            target = getattr(group, attr, None)
            if target is None:
                raise CheckpointError(
                    f"expert {expert_id} is {self.groups[index][2]} in the description, which has no {attr} "
                    "tensor; the description does not match the tensors.", tensor=weight_name)
            return load_expert_tensor(group, target, loaded_weight, weight_name, shard_id, position)
        return weight_loader

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        for name, param in list(layer.named_parameters(recurse=False)):
            if getattr(param, "mixed_experts_proxy", False):
                delattr(layer, name)
        for (method, _, _), group in zip(self.groups, layer.expert_groups):
            method.process_weights_after_loading(group)

    def theoretical_bytes(self, num_local_experts: int, hidden_size: int, intermediate_size_per_partition: int):
        if num_local_experts != self.num_experts:
            raise CheckpointError(f"{self.block} mixes expert schemes ({self.describe()}) and is served without "
                                  "expert parallelism only; use ep 1.", tensor=f"{self.block}.experts")
        return sum(method.theoretical_bytes(len(experts), hidden_size, intermediate_size_per_partition)
                   for method, experts, _ in self.groups) + 4 * self.num_experts  # + the int32 slot table

    def apply_moe(self, layer, x, topk_weights, topk_ids):
        slots = layer.expert_slot[topk_ids]
        out = None
        start = 0
        for (method, experts, _), group in zip(self.groups, layer.expert_groups):
            part = apply_experts(group, method, layer.moe_routing, x, topk_weights, slots, expert_num=self.num_experts,
                                 first=start, local=len(experts), subset=True)
            out = part if out is None else out + part
            start += len(experts)
        return out

