"""Which routing op pair the fused-MoE forward uses, decided once per layer (at create_weights).

- "v2": `npu_moe_init_routing_v2` (+ `npu_moe_finalize_routing(drop_pad_mode=2)`): what SGLang 0.5.23's
  ascend_tp dispatcher and current vllm-ascend always run; the torch_npu docs list it on A2 and A3.
- "v1": `npu_moe_init_routing` + `npu_moe_compute_expert_tokens` (+ `npu_moe_finalize_routing(
  drop_pad_mode=0)`): for torch_npu builds without v2 (SGLang's NPUMoEInitRouting_v1).

`SGL_ASCEND_MOE_ROUTING` = v1 | v2 | auto (default). auto takes v2 where `torch.ops.npu` has it (the
twins have both), else v1. Neither upstream switches by SoC, so neither does auto.
"""

import os


ROUTING_ENV = "SGL_ASCEND_MOE_ROUTING"
ROUTINGS = ("v1", "v2")


def _has_routing_v2() -> bool:
    from sgl_ascend.ops import ops

    return hasattr(ops, "npu_moe_init_routing_v2")  # the op surface leaves out ops the build lacks


def routing_version() -> str:
    choice = os.environ.get(ROUTING_ENV, "auto")
    if choice not in ("auto",) + ROUTINGS:
        raise ValueError(f"{ROUTING_ENV} must be v1, v2 or auto; got {choice!r}")
    if choice != "auto":
        return choice
    return "v2" if _has_routing_v2() else "v1"
