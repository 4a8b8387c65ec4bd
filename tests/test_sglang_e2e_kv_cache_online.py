"""End to end: the online int8 KV cache (`--kv-cache-dtype int8`, `--kv-cache-skip-layers`) on a bf16
checkpoint in the real `sglang.launch_server` on CPU.

Served greedy tokens and logprobs are compared with transformers on the same checkpoint in float32
whose KV cache is fake-quantized per token as the server writes it (max|row| / 127 over all KV heads;
the skipped layers left in float). A reference with the other selection is reported beside it.
"""

import pytest

from helpers.common import msmodelslim_fixture
from helpers.float_reference import compare, per_token_kv_quant, teacher_forced_logprobs
from helpers.sglang_server import launch

pytestmark = pytest.mark.sglang

PROMPT = list(range(10, 26))
MAX_TOKENS = 8
# nats: served (bf16 activations, int8 KV) vs the float32 model with the same KV quantization
TOLERANCE = 0.03
MEM_ARGS = ["--mem-fraction-static", "0.2"]


@pytest.mark.parametrize("skip, skipped", [(None, ()), ("-1", (1,))])
def test_online_int8_kv_cache_serves_a_bf16_checkpoint(skip, skipped):
    model_dir = msmodelslim_fixture("qwen3-tiny-bf16")
    args = [*MEM_ARGS, "--kv-cache-dtype", "int8", *(["--kv-cache-skip-layers", skip] if skip else [])]
    with launch(model_dir, args) as server:
        served = server.complete(PROMPT, MAX_TOKENS)
        log = server.log_tail(400)
    assert "KV Cache is allocated. dtype: torch.int8" in log, log[-3000:]
    assert "KV cache stored as torch.int8 (DynamicInt8KVCache)" in log, log[-3000:]
    if skip:
        assert f"layers [1] keep a float KV cache (--kv-cache-skip-layers {skip})" in log, log[-3000:]
    result = compare(served, teacher_forced_logprobs(model_dir, PROMPT, served["token_ids"],
                                                     kv_quant=per_token_kv_quant(skipped)), TOLERANCE)
    other = compare(served, teacher_forced_logprobs(model_dir, PROMPT, served["token_ids"],
                                                    kv_quant=per_token_kv_quant(() if skipped else (1,))), TOLERANCE)
    plain = compare(served, teacher_forced_logprobs(model_dir, PROMPT, served["token_ids"]), TOLERANCE)
    print(f"\n[e2e] online int8 KV, skip {skip}: vs same KV quantization {result}; vs the other selection "
          f"{other}; vs float KV {plain}")
    assert len(served["token_ids"]) == MAX_TOKENS
    assert result["ok"], result
