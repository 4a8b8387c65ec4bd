"""End to end: SGLang's multi-process CPU engine (gloo) serves our checkpoints at --tp 2 and
--tp 2 --ep-size 2, and refuses the MoE dispatch paths we do not serve at start-up.

Every tp2 server is compared with the float reference and tolerance its tp1 test uses
(tests/test_sglang_e2e_*.py: transformers on the checkpoint dequantized by its own convention, in
float32, teacher-forced on the served tokens; a token may differ from the float argmax only where
the float model's two logprobs are closer than the tolerance). tp1 passes the same check, so tp2 and
tp1 agree to within it, without a second server per model. The tp2 ranks exercise what a single
device never does: the row-parallel W8A8 quant_bias on rank 0 only, the 16 // tp columns of W4A8's
down-proj scale_bias, group scales split along K, expert ownership by ep rank, MLA heads per rank,
and SGLang's all-reduce after each of them.
"""

import time

import pytest

from helpers.common import msmodelslim_fixture
from helpers.float_reference import (compare, dequantize_modelslim, drop_zero_biases, teacher_forced_logprobs,
                                     write_float_checkpoint)
from helpers.sglang_server import launch, run_launcher

pytestmark = [pytest.mark.sglang, pytest.mark.sglang_tp]

PROMPT = list(range(10, 26))
MAX_TOKENS = 8
TP2 = ["--tp", "2"]
# Two ranks start (and each imports SGLang) on the same cores: allow twice a tp1 server's start limit.
START_TIMEOUT_S = 600

# name -> (msModelSlim fixture, extra args, tolerance in nats: the tp1 test's)
MODELSLIM_CASES = {
    "w8a8-static": ("qwen3-tiny-w8a8", TP2, 0.05),
    "w4a4-dynamic": ("qwen3-tiny-w4a4-dynamic", TP2 + ["--quantization", "w4a4_int4"], 0.15),
    "w4a8-dense": ("qwen3-tiny-w4a8-dynamic", TP2, 0.05),
    "moe-w4a8": ("qwen3moe-tiny-w4a8-dynamic", TP2, 0.05),
    "moe-w4a8-g64": ("qwen3moe-tiny-w4a8-dynamic-g64", TP2, 0.05),
    "moe-w4a8-ep2": ("qwen3moe-tiny-w4a8-dynamic", TP2 + ["--ep-size", "2"], 0.05),
}


def _resident_bytes_per_rank(log: str):
    """tp rank -> the bytes sgl_ascend.sglang.resident logged for it."""
    out = {}
    for line in log.splitlines():
        if "sgl-ascend resident bytes: tp rank " in line:
            rank = int(line.split("tp rank ")[1].split("/")[0])
            out[rank] = int(line.rsplit(": ", 1)[1])
    return out


def _serve(model_dir, extra_args):
    start = time.monotonic()
    with launch(model_dir, extra_args, start_timeout=START_TIMEOUT_S) as server:
        served = server.complete(PROMPT, MAX_TOKENS)
        log = server.log_tail(2000)
    return served, log, time.monotonic() - start


@pytest.mark.parametrize("case", list(MODELSLIM_CASES))
def test_tp2_serves_modelslim_checkpoint(tmp_path, case):
    from sgl_ascend.tools.plan import plan_checkpoint

    fixture, extra_args, tolerance = MODELSLIM_CASES[case]
    model_dir = msmodelslim_fixture(fixture)
    ep = int(extra_args[extra_args.index("--ep-size") + 1]) if "--ep-size" in extra_args else 1
    predicted = plan_checkpoint(model_dir, tp=2, ep=ep).memory()["resident_bytes_per_device"]
    served, log, served_s = _serve(model_dir, extra_args)
    reference_dir = write_float_checkpoint(model_dir, drop_zero_biases(dequantize_modelslim(model_dir)),
                                           str(tmp_path / "float"))
    result = compare(served, teacher_forced_logprobs(reference_dir, PROMPT, served["token_ids"]), tolerance)
    per_rank = _resident_bytes_per_rank(log)
    print(f"\n[tp] {case} {' '.join(extra_args)}: server {served_s:.1f}s, {result}; resident bytes per rank "
          f"{per_rank}, inspect predicts {predicted} per device")
    assert len(served["token_ids"]) == MAX_TOKENS
    assert result["ok"], result
    assert per_rank == {0: predicted, 1: predicted}, log[-3000:]


def test_dp_attention_serves_moe_checkpoint(tmp_path):
    """--tp 2 --dp-size 2 --enable-dp-attention: each DP rank runs attention unsharded on its own
    requests while the experts stay split over the two ranks (SGLang gathers the tokens around the MoE
    layer). Both ranks hold the same bytes; inspect has no DP notion, so they are compared with each other."""
    model_dir = msmodelslim_fixture("qwen3moe-tiny-w4a8-dynamic")
    served, log, served_s = _serve(model_dir, TP2 + ["--dp-size", "2", "--enable-dp-attention"])
    reference_dir = write_float_checkpoint(model_dir, dequantize_modelslim(model_dir), str(tmp_path / "float"))
    result = compare(served, teacher_forced_logprobs(reference_dir, PROMPT, served["token_ids"]), 0.05)
    per_rank = _resident_bytes_per_rank(log)
    print(f"\n[tp] moe-w4a8 --tp 2 --dp-size 2 --enable-dp-attention: server {served_s:.1f}s, {result}; "
          f"resident bytes per rank {per_rank}")
    assert result["ok"], result
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1], log[-3000:]


def test_tp2_serves_deepseek_v3(tmp_path):
    """MLA with q_lora (heads split over ranks), a dense layer, routed + shared experts (the shared
    expert runs as its own tensor-parallel MLP: SGLang does not fuse it on CPU)."""
    from helpers.deepseek_tiny import random_weights, write_modelslim_w8a8_dynamic

    model_dir = write_modelslim_w8a8_dynamic(str(tmp_path / "dsv3-w8a8-dynamic"), random_weights())
    served, _, served_s = _serve(model_dir, TP2)
    reference_dir = write_float_checkpoint(model_dir, dequantize_modelslim(model_dir), str(tmp_path / "float"))
    result = compare(served, teacher_forced_logprobs(reference_dir, PROMPT, served["token_ids"]), 0.06)
    print(f"\n[tp] deepseek-v3 tiny W8A8_DYNAMIC --tp 2: server {served_s:.1f}s, {result}")
    assert result["ok"], result


def test_tp2_serves_compressed_tensors_w4a16(tmp_path):
    from helpers.ct import library_decompressed_logprobs, write_qwen3_ct_checkpoint

    model_dir = write_qwen3_ct_checkpoint(str(tmp_path / "ct-w4a16"), "w4a16_group")
    served, _, served_s = _serve(model_dir, TP2)
    result = compare(served, library_decompressed_logprobs(model_dir, PROMPT, served["token_ids"]), 0.05)
    print(f"\n[tp] compressed-tensors w4a16_group --tp 2: server {served_s:.1f}s, {result}")
    assert result["ok"], result


def test_deepep_dispatch_is_refused_at_start_up():
    result = run_launcher(["--model-path", msmodelslim_fixture("qwen3moe-tiny-w4a8-dynamic"), "--device", "cpu",
                           "--attention-backend", "torch_native", "--disable-cuda-graph", "--port", "1",
                           "--tp", "2", "--ep-size", "2", "--moe-a2a-backend", "deepep"], timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "--moe-a2a-backend deepep is not served" in output, output[-3000:]
    assert "--moe-a2a-backend none" in output
