"""SGLang's FusedMoEMethodBase around our fused-MoE core (`sgl_ascend.layers.moe.FusedMoEMethod`).

SGLang's FusedMoE builds the layer (num_experts, num_local_experts, moe_tp_*/moe_ep_* attributes),
its dispatcher hands us the layer's tokens with the router's top-k, and its model's load_weights
calls each parameter's `weight_loader(param, tensor, name, shard_id=, expert_id=)` with global
expert ids; the core attaches its own loader (`sgl_ascend.layers.moe.loader.bound_loader`), which
writes the tensor into the parameter's final layout.

Dispatch: our `apply_moe` routes the layer's tokens itself from global expert ids (docs/moe.md), so
the layer must get SGLang's StandardDispatcher output (tokens + top-k) with global ids. After
loading, `standard_dispatch` turns off the dispatcher's global->local expert remap under
--ep-size > 1, and on NPU replaces the AscendTPDispatcher SGLang picks there (it hands the method
pre-routed rows without the top-k output). Flags whose paths we cannot serve stop the server while
the model is built (`refuse_unserved_flags`), naming the flag and what to use instead.
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
        refuse_unserved_flags(layer)
        self.method.create_weights(layer, num_experts, hidden_size, intermediate_size_per_partition,
                                   params_dtype, **extra_weight_attrs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.method.process_weights_after_loading(layer)
        standard_dispatch(layer)

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


def refuse_unserved_flags(layer: torch.nn.Module) -> None:
    """Stop at model build for dispatch paths and expert placements our MoE methods do not serve."""
    from sglang.srt.layers.moe.utils import get_moe_a2a_backend
    from sglang.srt.runtime_context import get_exec

    where = f"sgl-ascend's fused-MoE methods ({getattr(layer, 'prefix', 'MoE layer')})"
    backend = get_moe_a2a_backend()
    if not backend.is_none():
        raise ValueError(
            f"--moe-a2a-backend {backend.value} is not served by {where}: they route tokens from the "
            "router's top-k themselves and hand back this rank's partial sum. Use --moe-a2a-backend none "
            "(the default) with --ep-size N for expert parallelism.")
    moe = get_exec().moe
    if moe.enable_eplb or moe.ep_num_redundant_experts or moe.init_expert_location not in (None, "trivial"):
        raise ValueError(
            f"EPLB / redundant experts / --init-expert-location place experts non-contiguously, which "
            f"{where} do not serve (ep rank r holds experts [r*E/ep, (r+1)*E/ep)). Drop --enable-eplb, "
            "--ep-num-redundant-experts and --init-expert-location.")
    if getattr(layer, "num_fused_shared_experts", 0):
        raise ValueError(
            f"shared experts fused into the routed experts are not served by {where}. Serve with "
            "--disable-shared-experts-fusion (the shared expert then runs as its own MLP).")


def standard_dispatch(layer: torch.nn.Module) -> None:
    """Give the layer SGLang's StandardDispatcher with global expert ids (see the module docstring)."""
    from sglang.srt.layers.moe.token_dispatcher.standard import StandardDispatcher

    dispatcher = getattr(layer, "dispatcher", None)
    if dispatcher is None:  # layers built outside SGLang's FusedMoE (tests of the adapter)
        return
    if not isinstance(dispatcher, StandardDispatcher):
        # the NPU's AscendTPDispatcher under --moe-a2a-backend none (others are refused above)
        dispatcher = layer.dispatcher = StandardDispatcher(layer.moe_runner_config)
    dispatcher.skip_local_expert_mapping = True
