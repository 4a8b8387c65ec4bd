"""apply_moe is graph-safe for every expert scheme, at tp 1 and ep 2, with both routing versions:
`torch.compile(fullgraph=True)` traces it through the registered twins (their fake kernels check the
contract on fake tensors) without a graph break, so there is no host sync (.item(), .tolist(),
int(tensor)) and no data-dependent Python branch; the compiled forward equals the eager one bit for
bit. The captured graph also shows no tensor built on the host per call (no torch.tensor /
as_tensor call, no constant tensor) and gives the torch_npu op count per forward, which must not
exceed upstream's (SGLang 0.5.23 ascend_tp; docs/moe.md)."""

import pytest
import torch

from helpers.moe_cases import CASES, inputs
from sgl_ascend.layers.moe import apply_moe

PARALLEL = {"tp1": (1, 1), "ep2": (1, 2)}

# SGLang 0.5.23 ascend_tp path (token_dispatcher/ascend_tp.py, moe_runner/ascend.py): routing_v2 ->
# gmm -> npu_dequant_swiglu_quant (W8A8/W4A8) or npu_swiglu -> gmm -> finalize_routing; W4A4
# quantizes each gmm's input with npu_dynamic_quant(quint4x2).
UPSTREAM = {"w4a4": {"npu_moe_init_routing_v2": 1, "npu_dynamic_quant": 2, "npu_grouped_matmul": 2,
                     "npu_swiglu": 1, "npu_moe_finalize_routing": 1},
            "bf16": {"npu_moe_init_routing_v2": 1, "npu_grouped_matmul": 2, "npu_swiglu": 1,
                     "npu_moe_finalize_routing": 1}}
# weight-only int4 (compressed-tensors W4A16): the float path with antiquant scales (vllm-ascend moe_mlp.py)
UPSTREAM.update({name: UPSTREAM["bf16"] for name in ("ct-w4a16-group", "ct-w4a16-channel-asym")})
INT8 = {"npu_moe_init_routing_v2": 1, "npu_grouped_matmul": 2, "npu_dequant_swiglu_quant": 1,
        "npu_moe_finalize_routing": 1}
# v1 (no fused quant in routing): init_routing + compute_expert_tokens, int8 experts quantize the rows
V1_SWAP = {"npu_moe_init_routing_v2": {"npu_moe_init_routing": 1, "npu_moe_compute_expert_tokens": 1}}


def expected_ops(name, routing):
    ops = dict(UPSTREAM.get(name, INT8))
    if routing == "v1":
        del ops["npu_moe_init_routing_v2"]
        ops.update(V1_SWAP["npu_moe_init_routing_v2"])
        if name not in UPSTREAM:  # int8 gate/up: v2 quantized inside the routing op
            ops["npu_dynamic_quant"] = 1
    return ops


def _npu_ops(gm):
    counts, host_built = {}, []
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
            name = str(target)  # npu.npu_x (packet) or npu.npu_x.default (overload)
            if name.startswith("npu."):
                op = name.split(".")[1]
                counts[op] = counts.get(op, 0) + 1
        if node.op == "call_function" and target in (torch.tensor, torch.as_tensor, torch.from_numpy):
            host_built.append(str(node))
    constants = [n for n in gm.graph.nodes if n.op == "get_attr" and "_tensor_constant" in str(n.target)]
    return counts, host_built + [str(n) for n in constants]


@pytest.mark.parametrize("routing", ["v2", "v1"])
@pytest.mark.parametrize("parallel", sorted(PARALLEL))
@pytest.mark.parametrize("name", CASES)
def test_apply_moe_traces_without_breaks_and_matches_eager(cases, gen, name, parallel, routing):
    case = cases(name)
    tp, ep = PARALLEL[parallel]
    x, w, ids = inputs(gen)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for rank in range(max(tp, ep)):
        layer = case.layer(tp, ep, rank, routing)
        torch._dynamo.reset()
        eager = apply_moe(layer, x, w, ids)
        compiled = torch.compile(lambda a, b, c: apply_moe(layer, a, b, c), fullgraph=True, backend="eager")
        assert torch.equal(compiled(x, w, ids), eager)
        if rank == 0:
            torch._dynamo.reset()
            torch.compile(lambda a, b, c: apply_moe(layer, a, b, c), fullgraph=True, backend=capture)(x, w, ids)
    torch._dynamo.reset()
    assert len(graphs) == 1
    counts, host_built = _npu_ops(graphs[0])
    assert host_built == []
    assert counts == expected_ops(name, routing)
    if routing == "v2":  # never above upstream's count (upstream has no v1 path in ascend_tp)
        assert sum(counts.values()) <= sum(dict(UPSTREAM.get(name, INT8)).values())
