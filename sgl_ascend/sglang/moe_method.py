"""SGLang's FusedMoEMethodBase around our fused-MoE core (`sgl_ascend.layers.moe.FusedMoEMethod`).

SGLang's FusedMoE builds the layer (num_experts, num_local_experts, moe_tp_*/moe_ep_* attributes),
its dispatcher hands us the layer's tokens with the router's top-k, and its model's load_weights
calls each parameter's `weight_loader(param, tensor, name, shard_id=, expert_id=)` with global
expert ids; the core attaches its own loader (`sgl_ascend.layers.moe.loader.bound_loader`), which
writes the tensor into the parameter's final layout.
"""

import torch
from sglang.srt.layers.quantization.base_config import FusedMoEMethodBase

from sgl_ascend.layers.moe import FusedMoEMethod, apply_moe


class AscendFusedMoEMethod(FusedMoEMethodBase):
    def __init__(self, method: FusedMoEMethod):
        self.method = method
        self.moe_runner_config = None

    def create_weights(self, layer: torch.nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype, **extra_weight_attrs):
        self.method.create_weights(layer, num_experts, hidden_size, intermediate_size_per_partition,
                                   params_dtype, **extra_weight_attrs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.method.process_weights_after_loading(layer)

    def create_moe_runner(self, layer: torch.nn.Module, moe_runner_config) -> None:
        activation = getattr(moe_runner_config, "activation", "silu")
        if activation != "silu" or getattr(moe_runner_config, "apply_router_weight_on_input", False):
            raise ValueError(f"sgl-ascend's fused MoE computes SwiGLU experts with top-k weights applied "
                             f"after the experts; {layer.prefix if hasattr(layer, 'prefix') else 'this layer'} "
                             f"asks for activation={activation!r}, apply_router_weight_on_input="
                             f"{moe_runner_config.apply_router_weight_on_input}.")
        self.moe_runner_config = moe_runner_config

    def apply(self, layer: torch.nn.Module, dispatch_output):
        from sglang.srt.layers.moe.token_dispatcher import StandardCombineInput

        topk = dispatch_output.topk_output
        out = apply_moe(layer, dispatch_output.hidden_states, topk.topk_weights, topk.topk_ids)
        return StandardCombineInput(hidden_states=out)
