"""The schemes msModelSlim writes beyond the checked-in fixtures, through SGLang: the real server serves the
real tool's W8A8_MIX output (the dynamic path) and per-group W8A8_DYNAMIC (weight-only per group, its
group-wise layers found from the checkpoint's headers), and a PD-disaggregated decode server
(`--disaggregation-mode decode`) picks W8A8_MIX's static path.

The served-vs-float comparison is tests/test_sglang_e2e_modelslim.py's (greedy tokens and logprobs against
transformers on the checkpoint's own dequantized weights, float32); tolerance 0.05 nats as for
W8A8_DYNAMIC there.
"""

import json
import time

import pytest

from helpers.common import msmodelslim_fixture
from helpers.float_reference import (compare, dequantize_modelslim, drop_zero_biases, teacher_forced_logprobs,
                                     write_float_checkpoint)
from helpers.msmodelslim_run import quantized
from helpers.sglang_server import launch

pytestmark = pytest.mark.sglang

PROMPT = list(range(10, 26))
MAX_TOKENS = 8
FLATQUANT_TOLERANCE = 0.15


# (recipe, base model, what the plugin's config line must name). moe_w8a8_dynamic_partial is the real tool's
# partial quantization (expert 1 of layer 1 left FLOAT beside W8A8_DYNAMIC experts, the DeepSeek MTP / NextN
# layer case) through SGLang's Qwen3-MoE, served by layers/moe/mixed.py.
SERVED = [("w8a8_mix", "qwen3-tiny-bf16", ["W8A8_MIX linear -> W8A8MixLinear"]),
          ("w8a8_dynamic_g32", "qwen3-tiny-bf16", ["W8A8_DYNAMIC linear -> W8A8DynamicLinear"]),
          ("moe_w8a8_dynamic_partial", "qwen3moe-tiny-bf16",
           ["FLOAT experts -> UnquantizedExperts", "W8A8_DYNAMIC experts -> W8A8DynamicExperts"])]


@pytest.mark.parametrize("recipe, base, served_by", SERVED)
def test_server_serves_it(tmp_path, recipe, base, served_by):
    """Against the float model of the checkpoint's own dequantized weights, W8A8_DYNAMIC's tolerance."""
    model_dir = quantized(recipe, base)
    start = time.monotonic()
    with launch(model_dir) as server:
        served = server.complete(PROMPT, MAX_TOKENS)
        log = server.log_tail(400)
    reference = write_float_checkpoint(model_dir, drop_zero_biases(dequantize_modelslim(model_dir)),
                                       str(tmp_path / "float"))
    result = compare(served, teacher_forced_logprobs(reference, PROMPT, served["token_ids"]), 0.05)
    print(f"\n[e2e] {recipe}: server {time.monotonic() - start:.1f}s, {result}")
    assert all(line in log for line in served_by), log[-3000:]
    assert result["ok"], result


def test_server_serves_flatquant(tmp_path):
    """The real tool's W4A4_FLATQUANT_DYNAMIC (every linear; o_proj's transform read from the headers) in the
    real server, against the float model of the checkpoint's own weights (transforms folded in): its int4
    activations are the gap, so the tolerance is the W4A4 one of test_sglang_e2e_modelslim.py (measured: max
    logprob difference 0.054 nats, one flip between tokens 0.034 apart)."""
    model_dir = msmodelslim_fixture("qwen3-tiny-w4a4-flatquant")
    start = time.monotonic()
    with launch(model_dir) as server:
        served = server.complete(PROMPT, MAX_TOKENS)
        log = server.log_tail(400)
    reference = write_float_checkpoint(model_dir, dequantize_modelslim(model_dir), str(tmp_path / "float"))
    result = compare(served, teacher_forced_logprobs(reference, PROMPT, served["token_ids"]), FLATQUANT_TOLERANCE)
    print(f"\n[e2e] flatquant: server {time.monotonic() - start:.1f}s, {result}")
    assert "W4A4_FLATQUANT_DYNAMIC linear -> W4A4FlatQuantDynamicLinear" in log
    assert result["ok"], result


def test_config_reads_per_group_layers_from_the_headers():
    """SGLang hands the description with its hf_config; the headers of that folder mark per-group layers."""
    from types import SimpleNamespace

    from sgl_ascend.layers.schemes.group_weight_only import GroupWeightOnlyLinear
    from sgl_ascend.sglang.modelslim_config import AscendModelSlimConfig

    model_dir = quantized("w8a8_dynamic_g32")
    with open(f"{model_dir}/quant_model_description.json") as f:
        description = {**json.load(f), "quant_method": "modelslim", "hf_config": SimpleNamespace(_name_or_path=model_dir)}
    config = AscendModelSlimConfig(description)
    assert isinstance(config.linear_scheme("model.layers.0.mlp.down_proj", None), GroupWeightOnlyLinear)


def test_decode_node_takes_the_static_path(monkeypatch):
    from sglang.srt import runtime_context

    from sgl_ascend.sglang.modelslim_config import AscendModelSlimConfig

    model_dir = quantized("w8a8_mix")
    with open(f"{model_dir}/quant_model_description.json") as f:
        description = {**json.load(f), "quant_method": "modelslim"}
    config = AscendModelSlimConfig(description)
    prefix = "model.layers.0.mlp.down_proj"
    assert not config.linear_scheme(prefix, None).decode_node  # no published server args: not a decode node

    class Disagg:
        disaggregation_mode = "decode"

    monkeypatch.setattr(runtime_context, "get_disagg", lambda: Disagg)
    scheme = config.linear_scheme(prefix, None)
    assert scheme.decode_node and "weight_scale" in scheme.ignored_suffixes
    Disagg.disaggregation_mode = "prefill"
    assert not config.linear_scheme(prefix, None).decode_node
