"""The int8 KV cache off SGLang: the attention op's twin and contract, the C8 / CT int8 scheme, the resolver.

References are float64 attention over K/V quantized as the cache holds them (round(x / scale) saturated,
times scale); tolerances are the bf16 output rounding.
"""

import pytest
import torch

from helpers.common import msmodelslim_fixture
from helpers.kv_attention import BF16_TOL, D, H, KV_N, N, PAGE, reference_attention
from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.kv_cache import StaticInt8KVCache
from sgl_ascend.layers.registry import check_served, kv_cache_scheme
from sgl_ascend.ops import NpuContractError, ops
from sgl_ascend.quant.compressed_tensors import CompressedTensorsConfig
from sgl_ascend.quant.modelslim import ModelSlimConfig
from sgl_ascend.quant.scheme_key import COMPRESSED_TENSORS, KV_CACHE, SchemeKey
from sgl_ascend.sglang.kv_cache import attention_tensor_name, checkpoint_kv_quantized, kv_head_loader


def _fake_quant(x, scale):
    return torch.round(x.float() / scale.float()).clamp(-128, 127) * scale.float()


def _scales(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, H, generator=g) * 0.02 + 0.01


# -- the op twin and its contract --------------------------------------------------------------------------

def test_paged_int8_decode_twin_equals_dequantized_attention():
    g = torch.Generator().manual_seed(1)
    blocks, lengths, table = 6, [40, 70], torch.tensor([[0, 2, 0], [1, 3, 4]], dtype=torch.int32)
    k_cache = torch.randint(-127, 128, (blocks, PAGE, H), dtype=torch.int8, generator=g)
    v_cache = torch.randint(-127, 128, (blocks, PAGE, H), dtype=torch.int8, generator=g)
    scale = _scales().to(torch.bfloat16)
    q = torch.randn(2, 1, N * D, generator=g).to(torch.bfloat16)
    out, lse = ops.npu_fused_infer_attention_score(
        q, k_cache, v_cache, block_table=table, actual_seq_lengths_kv=lengths, antiquant_scale=scale,
        num_heads=N, num_key_value_heads=KV_N, scale=D ** -0.5, input_layout="BSH", block_size=PAGE)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert lse.shape == (1,) and lse.dtype == torch.float32 and lse.item() == 0  # docs :8148, no flag
    for b, length in enumerate(lengths):
        rows = lambda cache: cache[table[b].long()].reshape(-1, KV_N, D)[:length].float()  # noqa: E731
        k = rows(k_cache) * scale[0].float().reshape(KV_N, D)
        v = rows(v_cache) * scale[1].float().reshape(KV_N, D)
        expected = reference_attention(q[b].reshape(1, N, D), k, v)
        assert (out[b].reshape(1, N, D).double() - expected).abs().max() < BF16_TOL


def test_prefill_twin_with_a_causal_mask_equals_causal_attention():
    g = torch.Generator().manual_seed(2)
    s, s_new = 24, 10
    q = torch.randn(1, s_new, N * D, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(1, s, H, generator=g).to(torch.bfloat16) for _ in range(2))
    rows = torch.arange(s_new).unsqueeze(1) + (s - s_new)
    mask = torch.arange(s).unsqueeze(0) > rows
    out, _ = ops.npu_fused_infer_attention_score(q, k, v, atten_mask=mask, num_heads=N, num_key_value_heads=KV_N,
                                                 scale=D ** -0.5, input_layout="BSH")
    expected = reference_attention(q[0].reshape(s_new, N, D), k[0].reshape(s, KV_N, D), v[0].reshape(s, KV_N, D),
                          causal_offset=s - s_new)
    assert (out[0].reshape(s_new, N, D).double() - expected).abs().max() < BF16_TOL


def _paged_call(**over):
    args = dict(query=torch.zeros(1, 1, N * D, dtype=torch.bfloat16),
                key=torch.zeros(2, PAGE, H, dtype=torch.int8), value=torch.zeros(2, PAGE, H, dtype=torch.int8),
                block_table=torch.zeros(1, 2, dtype=torch.int32), actual_seq_lengths_kv=[40],
                antiquant_scale=torch.ones(2, H, dtype=torch.bfloat16), num_heads=N, num_key_value_heads=KV_N,
                input_layout="BSH", block_size=PAGE)
    args.update(over)
    query, key, value = args.pop("query"), args.pop("key"), args.pop("value")
    return ops.npu_fused_infer_attention_score(query, key, value, **args)


@pytest.mark.parametrize("over, rule", [
    (dict(query=torch.zeros(1, 3, N * D, dtype=torch.bfloat16)), "antiquant with Q_S=3 > 1 needs a float16"),
    (dict(antiquant_scale=torch.ones(2, H, dtype=torch.float32)), "antiquant_scale must have the query's dtype"),
    (dict(antiquant_scale=torch.ones(2, KV_N, D, dtype=torch.bfloat16)), "per-channel antiquant_scale for BSH"),
    (dict(antiquant_scale=None), "int8 key/value need antiquant_scale"),
    (dict(antiquant_mode=2), "antiquant_mode must be 0"),
    (dict(antiquant_mode=1), "per-token antiquant_scale must be"),
    (dict(block_size=48, key=torch.zeros(2, 48, H, dtype=torch.int8), value=torch.zeros(2, 48, H, dtype=torch.int8)),
     "32-aligned for torch.int8"),
    (dict(actual_seq_lengths_kv=None), "page attention needs actual_seq_lengths_kv"),
    (dict(block_table=torch.zeros(1, 2, dtype=torch.int64)), "block_table must be int32"),
    (dict(key=torch.zeros(2, H, PAGE, dtype=torch.int8).transpose(1, 2)), "must be contiguous"),
])
def test_the_contract_refuses_what_the_npu_op_refuses(over, rule):
    with pytest.raises(NpuContractError, match=rule) as info:
        _paged_call(**over)
    assert "torch_npu 2.14.0" in info.value.source


def test_anti_quant_twin_is_scale_times_value():
    x = torch.tensor([[-128, -1, 0, 127]], dtype=torch.int8)
    scale = torch.tensor([0.5, 1.0, 2.0, 0.25])
    out = ops.npu_anti_quant(x, scale, dst_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.float().tolist() == [[-64.0, -1.0, 0.0, 31.75]]
    with pytest.raises(NpuContractError, match="scale must be 1-D"):
        ops.npu_anti_quant(x, scale[:2])


# -- the scheme --------------------------------------------------------------------------------------------

def _loaded_layer(scheme, scales, offsets=None):
    layer = torch.nn.Module()
    layer.prefix = "model.layers.0.self_attn.attn"
    scheme.create_weights(layer, KV_N, D)
    for i, name in enumerate(("k", "v")):
        getattr(layer, f"{name}_cache_scale").data.copy_(scales[i].expand_as(getattr(layer, f"{name}_cache_scale")))
        if scheme.with_offset:
            getattr(layer, f"{name}_cache_offset").data.copy_(offsets[i] if offsets is not None else 0)
    scheme.process_weights_after_loading(layer, torch.bfloat16)
    return layer


def test_scheme_writes_round_k_over_scale_and_decode_extend_read_it_back():
    scales = _scales(3)
    layer = _loaded_layer(StaticInt8KVCache(), scales)
    assert not any(True for _ in layer.parameters()) and layer.kv_scale.shape == (2, H)
    assert layer.kv_antiquant_scale.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(4)
    s = 70
    k, v = (torch.randn(s, KV_N, D, generator=g).to(torch.bfloat16) for _ in range(2))
    k_cache, v_cache = (torch.zeros(3 * PAGE, KV_N, D, dtype=torch.int8) for _ in range(2))
    slots = torch.cat([torch.arange(2 * PAGE, 3 * PAGE), torch.arange(0, PAGE), torch.arange(PAGE, 2 * PAGE)])[:s]
    StaticInt8KVCache().write(layer, k, v, k_cache, v_cache, slots)
    expected_k = torch.round(k.float() / scales[0].reshape(KV_N, D)).clamp(-128, 127)
    assert torch.equal(k_cache[slots].float(), expected_k)

    kq, vq = (_fake_quant(t, sc.reshape(KV_N, D)) for t, sc in ((k, scales[0]), (v, scales[1])))
    q = torch.randn(1, N * D, generator=g).to(torch.bfloat16)
    table = torch.tensor([[2, 0, 1]], dtype=torch.int32)
    out = StaticInt8KVCache().decode(layer, q, k_cache, v_cache, table, [s], PAGE, N, KV_N, D ** -0.5)
    assert (out.reshape(1, N, D).double() - reference_attention(q.reshape(1, N, D), kq, vq)).abs().max() < BF16_TOL

    s_new = 6
    q_new = torch.randn(s_new, N * D, generator=g).to(torch.bfloat16)
    out = StaticInt8KVCache().extend(layer, q_new, k_cache[slots], v_cache[slots], N, KV_N, D ** -0.5)
    expected = reference_attention(q_new.reshape(s_new, N, D), kq, vq, causal_offset=s - s_new)
    assert (out.reshape(s_new, N, D).double() - expected).abs().max() < BF16_TOL


def test_decode_is_graph_safe():
    layer = _loaded_layer(StaticInt8KVCache(), _scales(5))
    k_cache, v_cache = (torch.zeros(2 * PAGE, KV_N, D, dtype=torch.int8) for _ in range(2))
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    q = torch.randn(1, N * D).to(torch.bfloat16)
    eager = StaticInt8KVCache().decode(layer, q, k_cache, v_cache, table, [40], PAGE, N, KV_N, D ** -0.5)
    compiled = torch.compile(lambda q: StaticInt8KVCache().decode(layer, q, k_cache, v_cache, table, [40], PAGE, N,
                                                                  KV_N, D ** -0.5), fullgraph=True)
    assert torch.equal(compiled(q), eager)


def test_nonzero_offsets_and_nonpositive_scales_are_refused_naming_the_tensor():
    with pytest.raises(CheckpointError, match="non-zero weight offset") as info:
        _loaded_layer(StaticInt8KVCache(), _scales(), offsets=(torch.zeros(H), torch.full((H,), 0.5)))
    assert info.value.tensor == "model.layers.0.self_attn.attn.v_cache_offset"
    with pytest.raises(CheckpointError, match="must be positive") as info:
        _loaded_layer(StaticInt8KVCache(), (torch.zeros(H), torch.ones(H)))
    assert info.value.tensor == "model.layers.0.self_attn.attn.k_cache_scale"


def test_compressed_tensors_int8_kv_scheme_is_per_tensor_and_other_strategies_are_refused():
    def config(**kv):
        raw = {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {},
               "kv_cache_scheme": {"num_bits": 8, "type": "int", "strategy": "tensor", "dynamic": False,
                                   "symmetric": True, **kv}}
        return check_served(CompressedTensorsConfig.from_dict(raw))

    scheme = kv_cache_scheme(config())
    assert isinstance(scheme, StaticInt8KVCache) and scheme.per_tensor and not scheme.with_offset
    layer = _loaded_layer(scheme, (torch.tensor([0.02]), torch.tensor([0.03])))
    assert torch.equal(layer.kv_scale[1], torch.full((H,), 0.03))
    with pytest.raises(CheckpointError, match="strategy='channel'"):
        kv_cache_scheme(config(strategy="channel"))
    assert SchemeKey.make(KV_CACHE, COMPRESSED_TENSORS, "int8").name == "int8"


# -- the real C8 checkpoint and its names ---------------------------------------------------------------------

def test_the_real_c8_description_resolves_and_its_kv_tensors_are_not_linear_layers():
    config = check_served(ModelSlimConfig.from_dir(msmodelslim_fixture("qwen3-tiny-w8a8-dynamic-c8")))
    assert config.kv_cache_key().name == "C8" and isinstance(kv_cache_scheme(config), StaticInt8KVCache)
    entries = [entry for key, entry in config.tensor_keys() if key.kind == KV_CACHE]
    assert entries == ["kv_cache_type"]
    assert config.linear_key("model.layers.0.self_attn.qkv_proj").name == "W8A8_DYNAMIC"
    assert checkpoint_kv_quantized(msmodelslim_fixture("qwen3-tiny-w8a8-dynamic-c8"))
    assert not checkpoint_kv_quantized(msmodelslim_fixture("qwen3-tiny-w8a8-dynamic"))


def test_checkpoint_names_map_to_the_attention_parameters_and_tp_ranks_take_their_heads():
    assert attention_tensor_name("model.layers.3.self_attn.k_proj.kv_cache_scale") == \
        "model.layers.3.self_attn.attn.k_cache_scale"
    assert attention_tensor_name("model.layers.3.self_attn.v_scale") == "model.layers.3.self_attn.attn.v_cache_scale"
    assert attention_tensor_name("model.layers.3.self_attn.k_proj.weight") == "model.layers.3.self_attn.k_proj.weight"
    from sgl_ascend.layers.parameters import ShardedParameter

    full = torch.arange(4 * D, dtype=torch.float32)  # 4 KV heads
    for tp, rank, head in ((2, 1, 2), (8, 5, 2)):  # split; replicated (8 ranks over 4 heads)
        local = 2 * D if tp == 2 else D
        param = ShardedParameter(torch.empty(local), name="x.k_cache_scale", output_dim=0)
        kv_head_loader(rank, tp)(param, full.to(torch.bfloat16))
        assert torch.equal(param.data, full[head * D: head * D + local])


def test_inspect_predicts_kv_bytes_per_token_and_the_tokens_that_fit():
    from sgl_ascend.tools.plan import plan_checkpoint, tokens_that_fit

    c8 = plan_checkpoint(msmodelslim_fixture("qwen3-tiny-w8a8-dynamic-c8"))
    bf16_kv = plan_checkpoint(msmodelslim_fixture("qwen3-tiny-w8a8-dynamic"))
    assert c8.ok, c8.errors
    # 2 layers x (K + V) x 2 KV heads x head_dim 32 x 1 byte (int8) / 2 bytes (bf16)
    assert c8.kv_cache["bytes_per_token_per_device"] == 2 * 2 * 2 * 32
    assert c8.kv_cache["bf16_bytes_per_token_per_device"] == bf16_kv.kv_cache["bytes_per_token_per_device"] == 512
    assert not [u for u in c8.unused if "kv_cache" in u["tensor"]]  # the scales are the KV cache's, not unused
    fit = tokens_that_fit(c8, 2 ** 30, 0.5)
    assert fit["tokens"] == (2 ** 29 - fit["weight_bytes"]) // 256 and fit["tokens"] == 2 * fit["tokens_bf16_kv"]


def test_the_pool_dtype_hook_sets_int8_and_refuses_mla_and_other_kv_dtypes():
    from types import SimpleNamespace

    from sgl_ascend.sglang.kv_cache import AscendKVCacheMethod, int8_kv_cache_dtype

    attention = torch.nn.Module()
    attention.quant_method = AscendKVCacheMethod(StaticInt8KVCache(), "model.layers.0.self_attn.attn")
    model = torch.nn.Sequential(attention)

    def runner(**over):
        return SimpleNamespace(**{"model": model, "kv_cache_dtype": torch.bfloat16, "kv_cache_dtype_str": "auto",
                                  "use_mla_backend": False, **over})

    served = runner()
    int8_kv_cache_dtype(None, served)
    assert served.kv_cache_dtype == torch.int8 and served.kv_cache_dtype_str == "int8"
    with pytest.raises(CheckpointError, match="MLA model") as info:
        int8_kv_cache_dtype(None, runner(use_mla_backend=True))
    assert info.value.key == "kv_cache_type"
    with pytest.raises(ValueError, match="--kv-cache-dtype fp8_e4m3"):
        int8_kv_cache_dtype(None, runner(kv_cache_dtype_str="fp8_e4m3"))
    plain = SimpleNamespace(model=torch.nn.Linear(2, 2), kv_cache_dtype=torch.bfloat16)
    int8_kv_cache_dtype(None, plain)
    assert plain.kv_cache_dtype == torch.bfloat16
