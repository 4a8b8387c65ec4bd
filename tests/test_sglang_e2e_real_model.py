"""End to end with a real trained model: the real `python -m sglang.launch_server` on CPU serves
SmolLM2-135M-Instruct quantized to W8A8_DYNAMIC by the real msmodelslim (scripts/real_model.py, cached)
through SGLang's own Llama class with sgl-ascend's msModelSlim config, and answers in English."""

import pytest
from transformers import AutoTokenizer

from helpers.sglang_server import launch

pytestmark = pytest.mark.sglang
# On CPU SGLang budgets the KV cache from host memory measured before and after the weight load; other
# processes allocating meanwhile (a shared box) eat a 0.05 budget. --max-total-tokens still caps the pool.
MEM_ARGS = ["--mem-fraction-static", "0.5"]


def test_real_model_w8a8_dynamic_knows_the_capital_of_france(real_model):
    model_dir = real_model["w8a8_dynamic"]
    ids = AutoTokenizer.from_pretrained(model_dir)("The capital of France is")["input_ids"]
    with launch(model_dir, MEM_ARGS) as server:
        served = server.complete(ids, max_tokens=8)
        log = server.log_tail(400)
    print(f"\n[e2e real model] {served['text']!r}")
    assert "LlamaForCausalLM" in log or "llama" in log.lower()
    assert "W8A8_DYNAMIC" in log  # the plugin chose the scheme from the checkpoint
    assert served["text"].startswith(" Paris"), served["text"]
