"""End to end: attention sinks in bf16 (`--kv-cache-keep-first N`) on the online int8 KV cache, in the
real `sglang.launch_server` on CPU (one server start).

Served greedy tokens and logprobs are compared with transformers on the same checkpoint in float32 whose
KV cache keeps the first N positions exact and quantizes the others per token as the server writes them.
References with every position quantized and with float KV are reported beside it. A prompt longer than
one page (128) is then served twice: the second time SGLang's radix cache reuses its first page, so the
sinks must come from that page's side-buffer rows (written by the first request), not from the request.
"""

import re

import pytest

from helpers.common import msmodelslim_fixture
from helpers.float_reference import compare, per_token_kv_quant, teacher_forced_logprobs
from helpers.sglang_server import launch, run_launcher

pytestmark = pytest.mark.sglang

PROMPT = list(range(10, 26))
MAX_TOKENS = 8
KEEP = 4
LONG_PROMPT = list(range(10, 150))  # 140 tokens: one whole 128-token page the radix cache can share
LONG_TOKENS = 4
# nats: served (bf16 activations, int8 KV past the sinks) vs the float32 model with the same KV quantization
TOLERANCE = 0.03


def test_help_lists_keep_first():
    result = run_launcher(["--help"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--kv-cache-keep-first" in result.stdout


def test_attention_sinks_in_bf16_on_the_online_int8_kv_cache():
    model_dir = msmodelslim_fixture("qwen3-tiny-bf16")
    args = ["--mem-fraction-static", "0.2", "--kv-cache-dtype", "int8", "--kv-cache-keep-first", str(KEEP)]
    with launch(model_dir, args) as server:
        served = server.complete(PROMPT, MAX_TOKENS)
        first = server.complete(LONG_PROMPT, LONG_TOKENS)
        cached = server.complete(LONG_PROMPT, LONG_TOKENS)
        log = server.log_tail(400)
    assert "KV Cache is allocated. dtype: torch.int8" in log, log[-3000:]
    sink_log = re.search(rf"--kv-cache-keep-first {KEEP} keeps the first {KEEP} positions of every request in "
                         r"torch.bfloat16 K/V: side buffers of (\d+) bytes \((\d+) layers\)", log)
    assert sink_log, log[-3000:]
    result = compare(served, teacher_forced_logprobs(model_dir, PROMPT, served["token_ids"],
                                                     kv_quant=per_token_kv_quant(keep_first=KEEP)), TOLERANCE)
    all_int8 = compare(served, teacher_forced_logprobs(model_dir, PROMPT, served["token_ids"],
                                                       kv_quant=per_token_kv_quant()), TOLERANCE)
    plain = compare(served, teacher_forced_logprobs(model_dir, PROMPT, served["token_ids"]), TOLERANCE)
    print(f"\n[e2e] online int8 KV, keep first {KEEP} (side buffers {sink_log.group(1)} bytes, "
          f"{sink_log.group(2)} layers): vs same KV quantization {result}; vs all positions int8 {all_int8}; "
          f"vs float KV {plain}")
    assert len(served["token_ids"]) == MAX_TOKENS
    assert result["ok"], result

    assert "#cached-token: 128" in log, log[-3000:]  # the second long request reused the first page
    reference = teacher_forced_logprobs(model_dir, LONG_PROMPT, cached["token_ids"],
                                        kv_quant=per_token_kv_quant(keep_first=KEEP))
    long_result = compare(cached, reference, TOLERANCE)
    print(f"[e2e] 140-token prompt served again from the radix cache: vs same KV quantization {long_result}; "
          f"same tokens as the first time: {cached['token_ids'] == first['token_ids']}")
    assert cached["token_ids"] == first["token_ids"]
    assert long_result["ok"], long_result
