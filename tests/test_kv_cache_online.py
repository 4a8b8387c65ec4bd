"""Online int8 KV cache (`--kv-cache-dtype int8`): per-token scales, quantize-on-write, the FIA op's
per-token antiquant mode, and the plugin's flag plumbing. Tolerances: bf16 outputs vs a float64
reference on the same quantized K/V, 2e-2 absolute (bf16 rounding of O(1) values)."""

import pytest
import torch

from helpers.kv_attention import BF16_TOL, D, H, KV_N, N, PAGE, reference_attention
from sgl_ascend.layers.kv_cache.int8_dynamic import DynamicInt8KVCache, position_scales
from sgl_ascend.layers.registry import create
from sgl_ascend.ops import NpuContractError, ops
from sgl_ascend.quant.scheme_key import KV_CACHE, ONLINE, SchemeKey


def _per_token_fake_quant(x):
    """x [S, KV_N, D]: each token's row (all heads) rounded to int8 with scale max|row| / 127."""
    rows = x.float().reshape(x.shape[0], -1)
    scale = rows.abs().amax(1, keepdim=True) / 127
    return (torch.round(rows / scale).clamp(-128, 127) * scale).reshape(x.shape)


def test_the_registry_creates_the_online_scheme():
    scheme = create(SchemeKey.make(KV_CACHE, ONLINE, "int8"))
    assert isinstance(scheme, DynamicInt8KVCache) and scheme.token_scales and scheme.cache_dtype == torch.int8
    # int8 K and V rows plus one fp32 scale each
    assert scheme.bytes_per_token(8, 128) == 2 * 8 * 128 + 8


def test_per_token_antiquant_twin_scales_each_key_position():
    g = torch.Generator().manual_seed(1)
    table, lengths = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32), [40, 50]
    k_cache, v_cache = (torch.randint(-127, 128, (4, PAGE, H), dtype=torch.int8, generator=g) for _ in range(2))
    scales = torch.rand(2, 2, 2 * PAGE, generator=g) * 0.02 + 0.005
    q = torch.randn(2, 1, N * D, generator=g).to(torch.bfloat16)
    out, _ = ops.npu_fused_infer_attention_score(
        q, k_cache, v_cache, block_table=table, actual_seq_lengths_kv=lengths, antiquant_scale=scales,
        antiquant_mode=1, num_heads=N, num_key_value_heads=KV_N, scale=D ** -0.5, input_layout="BSH",
        block_size=PAGE)
    for b, length in enumerate(lengths):
        rows = lambda cache: cache[table[b].long()].reshape(-1, KV_N, D)[:length].float()  # noqa: E731
        k = rows(k_cache) * scales[0, b, :length].reshape(-1, 1, 1)
        v = rows(v_cache) * scales[1, b, :length].reshape(-1, 1, 1)
        assert (out[b].reshape(1, N, D).double() - reference_attention(q[b].reshape(1, N, D), k, v)).abs().max() < BF16_TOL


@pytest.mark.parametrize("scale, rule", [
    (torch.ones(2, 2, 2 * PAGE, dtype=torch.bfloat16), ":8165"),  # per-token scales are float32
    (torch.ones(2, 2, PAGE), ":8165"),  # (2, B, KV_S), KV_S = blocks * block_size
])
def test_the_contract_refuses_per_token_scales_the_op_refuses(scale, rule):
    k = torch.zeros(4, PAGE, H, dtype=torch.int8)
    with pytest.raises(NpuContractError, match=rule):
        ops.npu_fused_infer_attention_score(
            torch.zeros(2, 1, N * D, dtype=torch.bfloat16), k, k.clone(),
            block_table=torch.tensor([[2, 0], [1, 3]], dtype=torch.int32), actual_seq_lengths_kv=[40, 50],
            antiquant_scale=scale, antiquant_mode=1, num_heads=N, num_key_value_heads=KV_N, input_layout="BSH",
            block_size=PAGE)


def test_position_scales_follow_the_block_table():
    scales = torch.arange(2 * 4 * PAGE, dtype=torch.float32).reshape(2, 4 * PAGE)
    table = torch.tensor([[2, 0]], dtype=torch.int32)
    got = position_scales(scales, table, PAGE)
    assert got.shape == (2, 1, 2 * PAGE)
    assert torch.equal(got[:, 0, :PAGE], scales[:, 2 * PAGE:3 * PAGE])
    assert torch.equal(got[:, 0, PAGE:], scales[:, :PAGE])


def test_write_quantizes_per_token_and_decode_extend_read_it_back():
    scheme = DynamicInt8KVCache()
    layer = torch.nn.Module()
    scheme.create_weights(layer, KV_N, D)
    scheme.process_weights_after_loading(layer, torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    s = 70
    k, v = (torch.randn(s, KV_N, D, generator=g).to(torch.bfloat16) for _ in range(2))
    k_cache, v_cache = (torch.zeros(3 * PAGE, KV_N, D, dtype=torch.int8) for _ in range(2))
    scales = torch.ones(2, 3 * PAGE)
    slots = torch.cat([torch.arange(2 * PAGE, 3 * PAGE), torch.arange(0, PAGE), torch.arange(PAGE, 2 * PAGE)])[:s]
    scheme.write(layer, k, v, k_cache, v_cache, slots, scales=scales)
    # the cache holds round(row / (max|row| / 127)), the scale buffer max|row| / 127, per token
    row_scale = k.float().reshape(s, -1).abs().amax(1) / 127
    assert torch.allclose(scales[0, slots], row_scale, rtol=1e-6)
    assert (k_cache[slots].float() - k.float() / row_scale.reshape(s, 1, 1)).abs().max() <= 0.5 + 1e-3

    kq, vq = _per_token_fake_quant(k), _per_token_fake_quant(v)
    q = torch.randn(1, N * D, generator=g).to(torch.bfloat16)
    table = torch.tensor([[2, 0, 1]], dtype=torch.int32)
    out = scheme.decode(layer, q, k_cache, v_cache, table, [s], PAGE, N, KV_N, D ** -0.5, scales=scales)
    assert (out.reshape(1, N, D).double() - reference_attention(q.reshape(1, N, D), kq, vq)).abs().max() < BF16_TOL

    s_new = 6
    q_new = torch.randn(s_new, N * D, generator=g).to(torch.bfloat16)
    out = scheme.extend(layer, q_new, k_cache[slots], v_cache[slots], N, KV_N, D ** -0.5,
                        row_scales=scales[:, slots])
    expected = reference_attention(q_new.reshape(s_new, N, D), kq, vq, causal_offset=s - s_new)
    assert (out.reshape(s_new, N, D).double() - expected).abs().max() < BF16_TOL


def test_online_decode_is_graph_safe():
    scheme, layer = DynamicInt8KVCache(), torch.nn.Module()
    k_cache, v_cache = (torch.randint(-127, 128, (2 * PAGE, KV_N, D), dtype=torch.int8) for _ in range(2))
    scales = torch.rand(2, 2 * PAGE) * 0.01 + 0.001
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    q = torch.randn(1, N * D).to(torch.bfloat16)

    def decode(q):
        return scheme.decode(layer, q, k_cache, v_cache, table, [40], PAGE, N, KV_N, D ** -0.5, scales=scales)

    assert torch.equal(torch.compile(decode, fullgraph=True)(q), decode(q))


# -- the layer selector (--kv-cache-skip-layers) ----------------------------------------------------------

def test_skip_layers_counts_negative_indices_from_the_end_and_refuses_unknown_layers():
    from sgl_ascend.sglang.kv_cache import skip_layers

    assert skip_layers("0,1,-1", 28) == {0, 1, 27}
    assert skip_layers(None, 28) == set() and skip_layers("", 28) == set()
    with pytest.raises(ValueError, match="layer 28 does not exist"):
        skip_layers("28", 28)
    with pytest.raises(ValueError, match="'x' is not a layer index"):
        skip_layers("0,x", 28)


def test_the_server_arguments_add_int8_and_the_skip_selector_to_the_parser(monkeypatch):
    import argparse

    from sgl_ascend.sglang.kv_cache import SKIP_LAYERS_ENV, add_kv_cache_server_args

    monkeypatch.setenv(SKIP_LAYERS_ENV, "")  # the parser writes it; monkeypatch restores it afterwards
    parser = argparse.ArgumentParser()
    parser.add_argument("--kv-cache-dtype", choices=["auto", "bf16"], default="auto", help="dtype.")
    add_kv_cache_server_args(None, parser)
    add_kv_cache_server_args(None, parser)  # SGLang builds the parser more than once: idempotent
    args = parser.parse_args(["--kv-cache-dtype", "int8", "--kv-cache-skip-layers", "0,-1"])
    assert args.kv_cache_dtype == "int8"
    # the scheduler processes read it from the environment they inherit
    import os
    assert os.environ[SKIP_LAYERS_ENV] == "0,-1"
    assert "--kv-cache-skip-layers" in parser.format_help()


def test_a_skipped_layer_stores_float_kv_and_reads_it_without_antiquant():
    from sgl_ascend.layers.kv_cache.float_kv import FloatKVCache

    scheme, layer = FloatKVCache(), torch.nn.Module()
    scheme.create_weights(layer, KV_N, D)
    g = torch.Generator().manual_seed(6)
    s = 40
    k, v = (torch.randn(s, KV_N, D, generator=g).to(torch.bfloat16) for _ in range(2))
    k_cache, v_cache = (torch.zeros(2 * PAGE, KV_N, D, dtype=torch.bfloat16) for _ in range(2))
    slots = torch.cat([torch.arange(PAGE, 2 * PAGE), torch.arange(0, PAGE)])[:s]
    scheme.write(layer, k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache[slots], k)
    q = torch.randn(1, N * D, generator=g).to(torch.bfloat16)
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    out = scheme.decode(layer, q, k_cache, v_cache, table, [s], PAGE, N, KV_N, D ** -0.5)
    assert (out.reshape(1, N, D).double() - reference_attention(q.reshape(1, N, D), k, v)).abs().max() < BF16_TOL
    q_new = torch.randn(5, N * D, generator=g).to(torch.bfloat16)
    out = scheme.extend(layer, q_new, k_cache[slots], v_cache[slots], N, KV_N, D ** -0.5)
    expected = reference_attention(q_new.reshape(5, N, D), k, v, causal_offset=s - 5)
    assert (out.reshape(5, N, D).double() - expected).abs().max() < BF16_TOL


def test_the_synthetic_c8_writer_is_read_as_c8_and_inspect_predicts_half_the_kv_bytes(tmp_path):
    from sgl_ascend.testing import synthetic
    from sgl_ascend.tools.plan import plan_checkpoint, tokens_that_fit

    shape = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=64, num_hidden_layers=2, vocab_size=512)
    plan = plan_checkpoint(synthetic.write_modelslim(str(tmp_path / "c8"), "W8A8", c8=True, **shape))
    assert plan.ok, plan.errors
    # K and V, 2 KV heads of 64, 2 layers: 512 bytes per token in int8, 1024 in bf16
    assert plan.kv_cache == {"scheme": "StaticInt8KVCache", "cache_dtype": "int8", "bytes_per_token_per_device": 512,
                             "pool_bytes_per_token_per_device": 512, "bf16_bytes_per_token_per_device": 1024}
    fit = tokens_that_fit(plan, 2 ** 30, 0.5)
    assert fit["tokens"] == (2 ** 29 - fit["weight_bytes"]) // 512 and fit["tokens_bf16_kv"] == fit["tokens"] // 2
