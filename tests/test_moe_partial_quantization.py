"""MoE blocks mixing FLOAT and quantized experts (partial quantization, the DeepSeek MTP / NextN layer case),
on the real msmodelslim 26.1.0's output (configs/moe_w8a8_dynamic_partial.yaml: W8A8_DYNAMIC experts with
expert 1 of layer 1 excluded, so FLOAT). Not served yet: refused up front, naming the odd expert's tensor
and what to do, instead of the misleading "incomplete checkpoint" the per-tensor load gave before.
"""

import json

import pytest

from helpers.msmodelslim_run import quantized
from sgl_ascend.errors import CheckpointError
from sgl_ascend.quant.modelslim import ModelSlimConfig
from sgl_ascend.tools.cli import EXIT_CHECKPOINT_ERROR, main


@pytest.fixture(scope="module")
def partial():
    return quantized("moe_w8a8_dynamic_partial", "qwen3moe-tiny-bf16")


def test_the_tool_leaves_one_expert_float(partial):
    with open(f"{partial}/quant_model_description.json") as f:
        description = json.load(f)
    assert description["model.layers.1.mlp.experts.1.down_proj.weight"] == "FLOAT"
    assert description["model.layers.1.mlp.experts.0.down_proj.weight"] == "W8A8_DYNAMIC"


def test_mixed_block_is_refused_naming_the_expert(partial):
    config = ModelSlimConfig.from_dir(partial)
    w13, w2 = config.expert_keys("model.layers.0.mlp")  # a block quantized alike is served
    assert w13.name == w2.name == "W8A8_DYNAMIC"
    with pytest.raises(CheckpointError, match="expert 1 is FLOAT while expert 0's .* is W8A8_DYNAMIC") as info:
        config.expert_keys("model.layers.1.mlp")
    assert info.value.tensor.startswith("model.layers.1.mlp.experts.1.")
    assert "Quantize every expert of the block alike" in str(info.value)


def test_inspect_reports_it(partial, capsys):
    assert main(["inspect", partial, "--json"]) == EXIT_CHECKPOINT_ERROR
    data = json.loads(capsys.readouterr().out)
    assert len(data["errors"]) == 1 and "mixes schemes across experts" in data["errors"][0]
