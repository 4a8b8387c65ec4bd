"""End to end: msModelSlim C8 checkpoints (int8 KV cache) in the real `sglang.launch_server` on CPU.

The checkpoints are written by the real msmodelslim 26.1.0 (`dynamic_cache` step, scripts/msmodelslim_tool.py committed).
The served tokens are compared with transformers running the same weights dequantized, in float32,
with the KV cache fake-quantized to int8 by the checkpoint's per-channel scales (every attention reads
the quantized K/V, as the served path does). The same server must miss a reference without the KV
quantization by more than the tolerance: the comparison sees the KV quantization.
The last test starts no server: it builds SGLang's int8 KV pool and our backend's buffers for the online
int8 cache and checks `inspect`'s KV bytes per token against what they allocate.
"""

import json
from types import SimpleNamespace

import pytest

from helpers.common import msmodelslim_fixture
from helpers.float_reference import (compare, dequantize_modelslim, drop_zero_biases, split_kv_cache_scales,
                                     teacher_forced_logprobs, write_float_checkpoint)
from helpers.sglang_server import launch

pytestmark = pytest.mark.sglang

PROMPT = list(range(10, 26))
MAX_TOKENS = 8
# nats, served vs the float model with the same int8 KV, for every case. Measured (max logprob difference,
# tokens equal of 8; then the same server vs a reference without the KV quantization, which must fail:
# the comparison sees the int8 KV cache):
#   W8A8_DYNAMIC + C8                        0.009, 7 (a flip by 0.0005);  vs float KV 0.061, 2 flips
#   W8A8 + C8                                0.018, 8;                     vs float KV 0.076, 4 flips
#   W8A8_MIX + C8 (stock w8a8c8 recipe)      0.009, 7 (a flip by 0.0005);  vs float KV 0.061, 2 flips
#   Qwen3-MoE W8A8_DYNAMIC / W4A8_DYNAMIC + C8  0.014, 8;                  vs float KV 0.091, 4 flips
TOLERANCE = 0.03
FIXTURES = ["qwen3-tiny-w8a8-dynamic-c8", "qwen3-tiny-w8a8-c8", "qwen3-tiny-w8a8-mix-c8", "qwen3moe-tiny-w4a8-dynamic-c8"]
# The CPU flags' default static fraction (0.05) leaves no room when the shared host's free memory drops
# while the weights load; the KV pool stays capped by --max-total-tokens.
MEM_ARGS = ["--mem-fraction-static", "0.2"]


@pytest.mark.parametrize("fixture", FIXTURES)
def test_serves_c8_checkpoint_with_an_int8_kv_cache(tmp_path, fixture):
    model_dir = msmodelslim_fixture(fixture)
    with launch(model_dir, MEM_ARGS) as server:
        served = server.complete(PROMPT, MAX_TOKENS)
        log = server.log_tail(400)
    assert "KV Cache is allocated. dtype: torch.int8" in log, log[-3000:]
    assert "attention backend AscendInt8KVBackend (int8 KV cache, page size 128)" in log, log[-3000:]
    tensors, kv_scales = split_kv_cache_scales(dequantize_modelslim(model_dir))
    assert sorted(kv_scales) == [0, 1]
    reference_dir = write_float_checkpoint(model_dir, drop_zero_biases(tensors), str(tmp_path / "float"))
    result = compare(served, teacher_forced_logprobs(reference_dir, PROMPT, served["token_ids"],
                                                     kv_scales=kv_scales), TOLERANCE)
    plain = compare(served, teacher_forced_logprobs(reference_dir, PROMPT, served["token_ids"]), TOLERANCE)
    print(f"\n[e2e] {fixture}: vs float with int8 KV {result}; vs float with float KV {plain}")
    assert len(served["token_ids"]) == MAX_TOKENS
    assert result["ok"], result
    assert not plain["ok"], plain


def test_int8_kv_pool_holds_twice_the_tokens_of_bf16_per_byte():
    """SGLang's own numbers: max_total_num_tokens over the KV pool's bytes (kv_cache_memory_usage_gb), for the
    same model with a bf16 cache (W8A8_DYNAMIC) and with the C8 int8 cache."""
    args = ["--enable-metrics", "--page-size", "128", *MEM_ARGS]
    per_gb = {}
    for fixture in ("qwen3-tiny-w8a8-dynamic", "qwen3-tiny-w8a8-dynamic-c8"):
        with launch(msmodelslim_fixture(fixture), args) as server:
            metrics = server.metrics()
        per_gb[fixture] = metrics["sglang:max_total_num_tokens"] / metrics["sglang:kv_cache_memory_usage_gb"]
    ratio = per_gb["qwen3-tiny-w8a8-dynamic-c8"] / per_gb["qwen3-tiny-w8a8-dynamic"]
    print(f"\n[e2e] tokens per KV GiB: bf16 {per_gb['qwen3-tiny-w8a8-dynamic']:.0f}, "
          f"int8 {per_gb['qwen3-tiny-w8a8-dynamic-c8']:.0f}, ratio {ratio:.3f}")
    assert abs(ratio - 2.0) <= 0.1, ratio


@pytest.mark.parametrize("skip", [None, "0", "-1"])
def test_inspect_predicts_the_bytes_the_online_int8_kv_cache_allocates(capsys, monkeypatch, skip):
    """`inspect --kv-cache-dtype int8 [--kv-cache-skip-layers ...]` vs what serving allocates, without a server:
    SGLang's own int8 KV pool (MHATokenToKVPool, as the runner builds it) and our backend's buffers beside it
    (per-token scales, skipped layers' float K/V), after every layer's first write, for the attention layers of
    qwen3-tiny-bf16 with the plugin's online schemes attached as in the server."""
    import torch
    from sglang.srt.distributed import parallel_state
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    from sgl_ascend.sglang.int8_kv_backend import AscendInt8KVBackend
    from sgl_ascend.sglang.kv_cache import INT8_KV_PAGE_SIZE, attach_online_kv_cache
    from sgl_ascend.tools.cli import main

    model_dir = msmodelslim_fixture("qwen3-tiny-bf16")
    argv = ["inspect", model_dir, "--json", "--kv-cache-dtype", "int8"]
    argv += ["--kv-cache-skip-layers", skip] if skip else []
    assert main(argv) == 0
    kv = json.loads(capsys.readouterr().out)["kv_cache"]

    layers, kv_heads, head_dim, page = 2, 2, 32, INT8_KV_PAGE_SIZE  # qwen3-tiny-bf16's config
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: 1)
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(8, 8, dtype=torch.bfloat16)
    model.attn = torch.nn.ModuleList(RadixAttention(4, head_dim, head_dim ** -0.5, kv_heads, i) for i in range(layers))
    attach_online_kv_cache(model, skip)
    size = 4 * page  # SGLang's pool holds size + page_size slots (slot 0 is the padding slot)
    pool = MHATokenToKVPool(size, page, torch.int8, kv_heads, head_dim, layers, "cpu", False)
    runner = SimpleNamespace(device="cpu", page_size=page, req_to_token_pool=ReqToTokenPool(4, 64, "cpu", False),
                             token_to_kv_pool=pool)
    backend = AscendInt8KVBackend(runner)
    for layer in model.attn:
        k_cache, _ = backend._caches(layer)
        backend._scales(layer, k_cache.shape[0])
    allocated = (sum(b.nbytes for b in pool.k_buffer + pool.v_buffer)
                 + sum(s.nbytes for s in backend.token_scales.values())
                 + sum(b.nbytes for pair in backend.float_caches.values() for b in pair))
    slots = size + page
    print(f"\n[kv memory] skip {skip}: allocated {allocated / slots} bytes per slot, inspect {kv}")
    assert sum(b.nbytes for b in pool.k_buffer + pool.v_buffer) == kv["pool_bytes_per_token_per_device"] * slots
    assert allocated == kv["bytes_per_token_per_device"] * slots
