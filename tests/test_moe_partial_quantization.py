"""MoE blocks mixing FLOAT and quantized experts (partial quantization, the DeepSeek MTP / NextN layer case),
on the real msmodelslim 26.1.0's output (configs/moe_w8a8_dynamic_partial.yaml: W8A8_DYNAMIC experts with
expert 1 of layer 1 excluded, so FLOAT), served by layers/moe/mixed.py: each scheme's experts in their own
layout, a static slot table, one fused forward per group over its slot range.

Tolerance: relative error (Frobenius) <= 2e-3 against the float reference (the quantized experts dequantized
with per-token int8 activations, the FLOAT expert as stored), the one the uniformly quantized blocks meet
(tests/test_npu_contract_moe.py).
"""

import json

import pytest
import torch

from helpers.common import rel_err
from helpers.moe_cases import routing_env
from helpers.moe_reference import int_dequant, moe_reference, routing
from helpers.msmodelslim_run import quantized
from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.moe import FusedMoEMethod, apply_moe, build_moe, moe_method_for_modelslim
from sgl_ascend.layers.moe.mixed import MixedExpertsMethod
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint
from sgl_ascend.quant.modelslim import ModelSlimConfig
from sgl_ascend.tools.cli import EXIT_CHECKPOINT_ERROR, EXIT_OK, main
from sgl_ascend.tools.plan import resident_bytes

BLOCK = "model.layers.1.mlp"
E, H, I, FLOAT_EXPERT = 4, 128, 64, 1
TOL = 2e-3
PROJS = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def partial():
    return quantized("moe_w8a8_dynamic_partial", "qwen3moe-tiny-bf16")


@pytest.fixture(scope="module")
def config(partial):
    return ModelSlimConfig.from_dir(partial)


def build(partial, config, tp=1, rank=0, ep=1, routing_version="v2"):
    with routing_env(routing_version):
        return build_moe(moe_method_for_modelslim(config, BLOCK), SafetensorsCheckpoint(partial), BLOCK,
                         num_experts=E, hidden_size=H, intermediate_size=I, tp_rank=rank, tp_size=tp,
                         ep_rank=0 if ep == 1 else rank, ep_size=ep)


def reference(partial, x, w, ids, tp=1):
    """Quantized experts (per-token int8 activations) plus the FLOAT expert (float activations)."""
    ckpt = SafetensorsCheckpoint(partial)
    experts = [tuple((ckpt.get(f"{BLOCK}.experts.{e}.{p}.weight").float() if e == FLOAT_EXPERT
                      else int_dequant(ckpt, f"{BLOCK}.experts.{e}.{p}")) for p in PROJS) for e in range(E)]
    is_float = ids == FLOAT_EXPERT
    quant = moe_reference(x, w.masked_fill(is_float, 0), ids, experts, act_bits=(8, 8), tp=tp)
    float_ = moe_reference(x, w.masked_fill(~is_float, 0), ids, experts, act_bits=(None, None), tp=tp)
    return quant + float_


def inputs(tokens=16):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, H, generator=gen).to(torch.bfloat16)
    w, ids = routing(tokens, E, 2, gen)
    ids[0, 0] = FLOAT_EXPERT  # the FLOAT expert is routed to, whatever the draw
    return x, w, ids


def test_the_tool_leaves_one_expert_float(partial):
    with open(f"{partial}/quant_model_description.json") as f:
        description = json.load(f)
    assert description["model.layers.1.mlp.experts.1.down_proj.weight"] == "FLOAT"
    assert description["model.layers.1.mlp.experts.0.down_proj.weight"] == "W8A8_DYNAMIC"


def test_the_block_groups_its_experts_by_scheme(config):
    assert isinstance(moe_method_for_modelslim(config, "model.layers.0.mlp"), FusedMoEMethod)  # quantized alike
    groups = config.expert_groups(BLOCK)
    assert [(w13.name, w2.name, experts) for (w13, w2), experts in groups] == [
        ("W8A8_DYNAMIC", "W8A8_DYNAMIC", [0, 2, 3]), ("FLOAT", "FLOAT", [1])]
    method = moe_method_for_modelslim(config, BLOCK)
    assert isinstance(method, MixedExpertsMethod)
    assert [method.slot_of[e] for e in range(E)] == [0, 3, 1, 2]  # each group contiguous


@pytest.mark.parametrize("routing_version", ["v2", "v1"])
@pytest.mark.parametrize("tp", [1, 2])
def test_mixed_block_matches_the_float_reference(partial, config, violations, tp, routing_version):
    x, w, ids = inputs()
    out = sum(build(partial, config, tp, rank, routing_version=routing_version)(x, w, ids).float()
              for rank in range(tp))
    assert violations == []
    assert rel_err(out, reference(partial, x, w, ids, tp)) <= TOL


def test_each_weight_once_at_its_own_size(partial, config):
    """Quantized experts int8 [K, N] + a bf16 scale per channel; the FLOAT expert bf16; the slot table."""
    layer = build(partial, config)
    w8a8 = 3 * (2 * I * (H + 2) + H * (I + 2))
    bf16 = 1 * 3 * H * I * 2
    assert resident_bytes(layer) == w8a8 + bf16 + 4 * E
    assert layer.moe_method.theoretical_bytes(E, H, I) == resident_bytes(layer)
    assert [name for name, _ in layer.named_parameters(recurse=False)] == []  # the loading proxies are gone
    quantized_group, float_group = layer.expert_groups
    assert quantized_group.w13_weight.dtype == torch.int8 and quantized_group.w13_weight.shape == (3, H, 2 * I)
    assert float_group.w13_weight.dtype == torch.bfloat16 and float_group.w13_weight.shape == (1, H, 2 * I)


def _npu_ops(gm):
    counts, host_built = {}, []
    for node in gm.graph.nodes:
        name = str(node.target)
        if node.op == "call_function" and name.startswith("npu."):
            counts[name.split(".")[1]] = counts.get(name.split(".")[1], 0) + 1
        if node.op == "call_function" and node.target in (torch.tensor, torch.as_tensor, torch.from_numpy):
            host_built.append(name)
    return counts, host_built + [str(n) for n in gm.graph.nodes if n.op == "get_attr" and "_tensor_constant" in str(n.target)]


def test_graph_safe(partial, config):
    """fullgraph compile (no host sync, no data-dependent branch), equal to eager; per group the uniform
    block's ops (int8: routing_v2, gmm, dequant_swiglu_quant, gmm, finalize; FLOAT: swiglu instead)."""
    layer = build(partial, config)
    x, w, ids = inputs()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    eager = apply_moe(layer, x, w, ids)
    compiled = torch.compile(lambda a, b, c: apply_moe(layer, a, b, c), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, w, ids), eager)
    torch._dynamo.reset()
    torch.compile(lambda a, b, c: apply_moe(layer, a, b, c), fullgraph=True, backend=capture)(x, w, ids)
    torch._dynamo.reset()
    counts, host_built = _npu_ops(graphs[0])
    assert host_built == []
    assert counts == {"npu_moe_init_routing_v2": 2, "npu_grouped_matmul": 4, "npu_dequant_swiglu_quant": 1,
                      "npu_swiglu": 1, "npu_moe_finalize_routing": 2}


def test_expert_parallel_is_refused_naming_the_block(partial, config, capsys):
    with pytest.raises(CheckpointError, match="--ep-size 2 .* Serve with --ep-size 1") as info:
        build(partial, config, ep=2)
    assert "W8A8_DYNAMIC (experts 0, 2, 3) + FLOAT (experts 1)" in str(info.value)
    assert main(["inspect", partial, "--tp", "2", "--ep", "2", "--json"]) == EXIT_CHECKPOINT_ERROR
    errors = json.loads(capsys.readouterr().out)["errors"]
    assert len(errors) == 1 and "served without expert parallelism only" in errors[0]


def test_inspect_and_verify_pass(partial, capsys):
    assert main(["inspect", partial, "--json"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["errors"] == []
    block = next(e for e in data["layers"] if e["prefix"] == f"{BLOCK}.experts")
    assert block["scheme"] == "W8A8_DYNAMIC x3 (experts 0, 2, 3) | FLOAT x1 (experts 1)"
    assert main(["verify", partial]) == EXIT_OK
