"""End to end: the real `python -m sglang.launch_server` on CPU serves msModelSlim checkpoints.

Each test starts one server for one checkpoint (tests/fixtures/msmodelslim, written by the real
msmodelslim tool), asks /v1/completions for greedy tokens with logprobs, and compares them with
transformers running the same weights dequantized by msModelSlim's own convention, in float32
(tests/helpers/float_reference.py). The fixtures are random tiny models whose top-2 logprobs are often only
hundredths of a nat apart, so a token may flip within quantization error: the test accepts a flip
only where the float model's logprobs of the two tokens differ by less than the tolerance, and
requires every served logprob within the tolerance of the float model's.
"""

import time

import pytest

from helpers.common import msmodelslim_fixture
from helpers.float_reference import (compare, dequantize_modelslim, drop_zero_biases, norm_biases,
                                     teacher_forced_logprobs, write_float_checkpoint)
from helpers.sglang_server import launch, run_launcher

pytestmark = pytest.mark.sglang

PROMPT = list(range(10, 26))
MAX_TOKENS = 8

# nats; measured max |served - float| logprob: see the report in each test's output.
CASES = {
    "qwen3-tiny-w8a8": ([], 0.05),
    "qwen3-tiny-w8a8-dynamic": ([], 0.05),
    "qwen3-tiny-w4a4-dynamic": (["--quantization", "w4a4_int4"], 0.15),
    "qwen3-tiny-w4a8-dynamic": ([], 0.05),
    "qwen3moe-tiny-w4a8-dynamic": ([], 0.05),
}


def served_vs_float(tmp_path, fixture: str, extra_args, tolerance: float, swap_nibbles: bool = False):
    model_dir = msmodelslim_fixture(fixture)
    start = time.monotonic()
    with launch(model_dir, extra_args) as server:
        served = server.complete(PROMPT, MAX_TOKENS)
        log = server.log_tail(400)
    served_s = time.monotonic() - start
    reference_dir = write_float_checkpoint(model_dir, drop_zero_biases(dequantize_modelslim(model_dir)),
                                           str(tmp_path / "float"))
    result = compare(served, teacher_forced_logprobs(reference_dir, PROMPT, served["token_ids"]), tolerance)
    print(f"\n[e2e] {fixture} {' '.join(extra_args)}: server {served_s:.1f}s, {result}")
    if swap_nibbles:
        broken_dir = write_float_checkpoint(
            model_dir, drop_zero_biases(dequantize_modelslim(model_dir, swap_nibbles=True)), str(tmp_path / "broken"))
        broken = compare(served, teacher_forced_logprobs(broken_dir, PROMPT, served["token_ids"]), tolerance)
        print(f"[e2e] {fixture} vs a reference with swapped int4 nibbles: {broken}")
        assert not broken["ok"], "the comparison must catch a wrong int4 nibble order"
    return served, result, log


@pytest.mark.parametrize("fixture", list(CASES))
def test_serves_modelslim_checkpoint(tmp_path, fixture):
    extra_args, tolerance = CASES[fixture]
    # MoE W4A8 also proves the comparison is sharp enough to catch a wrong packing order.
    served, result, log = served_vs_float(tmp_path, fixture, extra_args, tolerance,
                                          swap_nibbles="w4a8" in fixture)
    assert len(served["token_ids"]) == MAX_TOKENS
    assert result["ok"], result
    # The scheduler process (where SGLang builds the model) served it with our config: the plugin
    # was registered there too.
    config_name = "w4a4_int4" if "w4a4_int4" in extra_args else "modelslim"
    assert f"sgl-ascend {config_name} config: msModelSlim checkpoint" in log, log[-3000:]


def test_help_lists_w4a4_int4():
    result = run_launcher(["--help"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "w4a4_int4" in result.stdout


def test_w4a4_int4_flag_on_w8a8_checkpoint_is_a_clear_error():
    result = run_launcher(["--model-path", msmodelslim_fixture("qwen3-tiny-w8a8"), "--quantization",
                           "w4a4_int4", "--device", "cpu", "--port", "1"], timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "--quantization w4a4_int4 needs a W4A4_DYNAMIC checkpoint" in output, output[-3000:]
    assert "model_quant_type='W8A8'" in output


def test_anti_outlier_norm_bias_is_applied(tmp_path):
    """qwen3moe-tiny-w8a8-v0 (older msModelSlim writer, anti-outlier smoothing): W8A8 static attention
    with float q/k/v biases folded into quant_bias, W8A8_DYNAMIC experts, and FLOAT norm biases that
    SGLang's RMSNorm would drop. The float reference applies rmsnorm(x) * w + b and the projection
    biases; dropping the norm biases moves the logprobs far outside the tolerance (checked below)."""
    fixture, tolerance = "qwen3moe-tiny-w8a8-v0", 0.05
    model_dir = msmodelslim_fixture(fixture)
    start = time.monotonic()
    with launch(model_dir) as server:
        served = server.complete(PROMPT, MAX_TOKENS)
    served_s = time.monotonic() - start
    tensors = dequantize_modelslim(model_dir)
    biases = norm_biases(tensors)
    reference_dir = write_float_checkpoint(model_dir, tensors, str(tmp_path / "float"), {"attention_bias": True})
    result = compare(served, teacher_forced_logprobs(reference_dir, PROMPT, served["token_ids"], biases), tolerance)
    without = compare(served, teacher_forced_logprobs(reference_dir, PROMPT, served["token_ids"]), tolerance)
    print(f"\n[e2e] {fixture}: server {served_s:.1f}s, {result}; reference without norm biases: {without}")
    assert any(b.abs().max() > 0 for b in biases.values())
    assert result["ok"], result
    assert not without["ok"], "the norm biases must matter for this check to mean anything"
