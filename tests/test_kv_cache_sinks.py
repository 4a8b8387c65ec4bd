"""Attention sinks in full precision (`--kv-cache-keep-first N`): the FIA op's softmax_lse contract, the
log-sum-exp merge of two partial attentions, the float side buffer, and prefill / decode with sinks
against a float64 reference whose first N K/V are the exact bf16 values and the rest int8-quantized then
dequantized as the cache holds them. Tolerances: bf16 outputs 2e-2 absolute (BF16_TOL, bf16 rounding of
O(1) values); the op's fp32 LSE 1e-4 absolute vs float64."""

import pytest
import torch

from helpers.kv_attention import BF16_TOL, D, H, KV_N, N, PAGE, reference_attention
from sgl_ascend.layers.kv_cache import StaticInt8KVCache, sinks
from sgl_ascend.layers.kv_cache.int8_dynamic import DynamicInt8KVCache
from sgl_ascend.ops import NpuContractError, ops

KEEP = 4
LSE_TOL = 1e-4


def _lse_reference(q, k, v):
    """log-sum-exp over keys of scale * q k^T, float64: q [N, D], k [S, KV_N, D] -> [N]."""
    k = k.double().repeat_interleave(N // KV_N, dim=1)
    return torch.logsumexp(torch.einsum("hd,khd->hk", q.double(), k) * D ** -0.5, dim=-1)


# -- the op's softmax_lse contract ---------------------------------------------------------------------------

def test_softmax_lse_is_fp32_b_n_qs_1_and_the_log_sum_exp_of_the_scores():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 1, N * D, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(2, 40, H, generator=g).to(torch.bfloat16) for _ in range(2))
    lengths = [40, 17]
    out, lse = ops.npu_fused_infer_attention_score(q, k, v, actual_seq_lengths_kv=lengths, num_heads=N,
                                                   num_key_value_heads=KV_N, scale=D ** -0.5, input_layout="BSH",
                                                   softmax_lse_flag=True)
    assert lse.shape == (2, N, 1, 1) and lse.dtype == torch.float32  # docs :8148
    for b, length in enumerate(lengths):
        expected = _lse_reference(q[b].reshape(N, D), k[b, :length].reshape(length, KV_N, D), None)
        assert (lse[b, :, 0, 0].double() - expected).abs().max() < LSE_TOL
    # BSND with Q_S > 1: (B, N, Q_S, 1); without the flag a [1] tensor holding 0
    q4 = torch.randn(1, 3, N, D, generator=g).to(torch.bfloat16)
    k4, v4 = (torch.randn(1, 8, KV_N, D, generator=g).to(torch.bfloat16) for _ in range(2))
    _, lse4 = ops.npu_fused_infer_attention_score(q4, k4, v4, num_heads=N, num_key_value_heads=KV_N,
                                                  input_layout="BSND", softmax_lse_flag=True)
    assert lse4.shape == (1, N, 3, 1)
    _, none = ops.npu_fused_infer_attention_score(q4, k4, v4, num_heads=N, num_key_value_heads=KV_N,
                                                  input_layout="BSND")
    assert none.shape == (1,) and none.dtype == torch.float32 and none.item() == 0


def test_a_paged_mask_must_span_the_block_table_and_be_contiguous():
    k_cache, v_cache = (torch.randint(-127, 128, (3, PAGE, H), dtype=torch.int8) for _ in range(2))
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    q = torch.randn(1, 1, N * D).to(torch.bfloat16)
    common = dict(block_table=table, actual_seq_lengths_kv=[40], antiquant_scale=torch.full((2, H), 0.01).bfloat16(),
                  num_heads=N, num_key_value_heads=KV_N, input_layout="BSH", block_size=PAGE, softmax_lse_flag=True)
    short = torch.zeros(1, 1, 1, PAGE, dtype=torch.bool)
    with pytest.raises(NpuContractError, match="span"):  # docs :8292
        ops.npu_fused_infer_attention_score(q, k_cache, v_cache, atten_mask=short, **common)
    wide = torch.zeros(1, 1, 1, 4 * PAGE, dtype=torch.bool)[..., ::2]
    with pytest.raises(NpuContractError, match="contiguous"):
        ops.npu_fused_infer_attention_score(q, k_cache, v_cache, atten_mask=wide, **common)


# -- the merge --------------------------------------------------------------------------------------------

def test_two_partial_fia_calls_merged_by_lse_equal_one_attention_over_all_keys():
    g = torch.Generator().manual_seed(2)
    b, s, split = 3, 50, 9
    q = torch.randn(b, N * D, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(b, s, H, generator=g).to(torch.bfloat16) for _ in range(2))

    def part(keys, values):
        return ops.npu_fused_infer_attention_score(q.reshape(b, 1, -1), keys.contiguous(), values.contiguous(),
                                                   num_heads=N, num_key_value_heads=KV_N, scale=D ** -0.5,
                                                   input_layout="BSH", softmax_lse_flag=True)

    (out_a, lse_a), (out_b, lse_b) = part(k[:, split:], v[:, split:]), part(k[:, :split], v[:, :split])
    merged = sinks.merge_partial(out_a, lse_a, out_b, lse_b, torch.ones(b, dtype=torch.bool))
    for i in range(b):
        expected = reference_attention(q[i].reshape(1, N, D), k[i].reshape(s, KV_N, D), v[i].reshape(s, KV_N, D))
        assert (merged[i].reshape(1, N, D).double() - expected).abs().max() < BF16_TOL
    # a request whose part a has no key: part b alone, whatever part a returned
    bad = torch.full_like(out_a, float("nan"))
    alone = sinks.merge_partial(bad, torch.full_like(lse_a, float("nan")), out_b, lse_b,
                                torch.zeros(b, dtype=torch.bool))
    assert torch.equal(alone, out_b.reshape(b, -1))


# -- the side buffer ----------------------------------------------------------------------------------------

def test_the_side_buffer_takes_rows_below_n_of_each_page_only():
    pages = 3
    sink_k, sink_v = (sinks.side_buffer(pages, KEEP, KV_N, D, torch.bfloat16, "cpu") for _ in range(2))
    loc = torch.cat([torch.arange(2 * PAGE, 2 * PAGE + 10), torch.arange(PAGE + 2, PAGE + 6)])
    k = torch.arange(len(loc), dtype=torch.float32).reshape(-1, 1, 1).expand(-1, KV_N, D).to(torch.bfloat16)
    sinks.write_sinks(k, -k, loc, sink_k, sink_v, PAGE, KEEP)
    # page 2 rows 0..3 (positions 0..3 of a request on page 2) and page 1 rows 2, 3
    assert torch.equal(sink_k[2 * KEEP:3 * KEEP, 0, 0].float(), torch.tensor([0.0, 1, 2, 3]))
    assert torch.equal(sink_k[KEEP + 2:KEEP + 4, 0, 0].float(), torch.tensor([10.0, 11]))
    assert torch.equal(sink_v[2 * KEEP:3 * KEEP, 0, 0].float(), -torch.tensor([0.0, 1, 2, 3]))
    untouched = torch.ones(pages * KEEP, dtype=torch.bool)
    untouched[2 * KEEP:3 * KEEP] = False
    untouched[KEEP + 2:KEEP + 4] = False
    assert not sink_k[:-1][untouched].any()  # rows >= N of a page went to the dump row only
    idx = sinks.sink_index(loc, PAGE, KEEP, pages * KEEP)
    assert set(idx[(loc % PAGE) >= KEEP].tolist()) == {pages * KEEP}


def test_keep_first_must_fit_in_a_page():
    sinks.check_keep_first(PAGE, PAGE)
    for bad in (0, PAGE + 1):
        with pytest.raises(ValueError, match="--kv-cache-keep-first"):
            sinks.check_keep_first(bad, PAGE)


# -- prefill and decode with sinks vs a reference ------------------------------------------------------------

def _online():
    return DynamicInt8KVCache(), None


def _static():
    return StaticInt8KVCache(), torch.rand(2, H, generator=torch.Generator().manual_seed(9)) * 0.02 + 0.03


def _per_token(x):
    rows = x.float().reshape(x.shape[0], -1)
    scale = rows.abs().amax(1, keepdim=True) / 127
    return (torch.round(rows / scale).clamp(-128, 127) * scale).reshape(x.shape)


def _per_channel(x, scale):
    return torch.round(x.float() / scale.float().reshape(KV_N, D)).clamp(-128, 127) * scale.float().reshape(KV_N, D)


@pytest.mark.parametrize("make", [_online, _static], ids=["online", "c8"])
@pytest.mark.parametrize("keep", [KEEP, PAGE])
def test_prefill_and_decode_with_sinks_equal_exact_sinks_plus_int8_rest(make, keep):
    scheme, kv_scale = make()
    layer = torch.nn.Module()
    scheme.create_weights(layer, KV_N, D)
    if kv_scale is not None:
        layer.k_cache_scale.data.copy_(kv_scale[0])
        layer.v_cache_scale.data.copy_(kv_scale[1])
        layer.k_cache_offset.data.zero_()
        layer.v_cache_offset.data.zero_()
    scheme.process_weights_after_loading(layer, torch.bfloat16)

    def fake(x, which):
        return _per_token(x) if kv_scale is None else _per_channel(x, kv_scale[which])

    g = torch.Generator().manual_seed(5)
    pages = 6
    k_cache, v_cache = (torch.zeros(pages * PAGE, KV_N, D, dtype=torch.int8) for _ in range(2))
    scales = torch.ones(2, pages * PAGE) if kv_scale is None else None
    sink_k, sink_v = (sinks.side_buffer(pages, keep, KV_N, D, torch.bfloat16, "cpu") for _ in range(2))
    # request 0: 70 tokens on pages 3, 0, 5; request 1: 3 tokens (all sinks when keep >= 3) on page 1
    lengths, tables = [70, 3], [[3, 0, 5], [1, 1, 1]]
    kv, slots = [], []
    for length, table in zip(lengths, tables):
        loc = (torch.tensor(table).repeat_interleave(PAGE) * PAGE + torch.arange(PAGE).repeat(3))[:length]
        k, v = (torch.randn(length, KV_N, D, generator=g).to(torch.bfloat16) for _ in range(2))
        scheme.write(layer, k, v, k_cache, v_cache, loc, scales=scales)
        sinks.write_sinks(k, v, loc, sink_k, sink_v, PAGE, keep)
        kv.append((k, v))
        slots.append(loc)

    def expected_kv(i):
        k, v = kv[i]
        n = min(keep, k.shape[0])
        return (torch.cat([k[:n].float(), fake(k, 0)[n:]]), torch.cat([v[:n].float(), fake(v, 1)[n:]]))

    # prefill: the last 6 tokens of request 0 against its whole sequence
    loc = slots[0]
    q_new = torch.randn(6, N * D, generator=g).to(torch.bfloat16)
    kept = tuple(sinks.sink_rows(t, loc[:keep], PAGE, keep) for t in (sink_k, sink_v))
    out = scheme.extend(layer, q_new, k_cache[loc], v_cache[loc], N, KV_N, D ** -0.5,
                        row_scales=None if scales is None else scales[:, loc], sinks=kept)
    k_ref, v_ref = expected_kv(0)
    ref = reference_attention(q_new.reshape(6, N, D), k_ref, v_ref, causal_offset=70 - 6)
    assert (out.reshape(6, N, D).double() - ref).abs().max() < BF16_TOL

    # decode: the batch of both requests
    table = torch.tensor(tables, dtype=torch.int32)
    q = torch.randn(2, N * D, generator=g).to(torch.bfloat16)
    mask = sinks.int8_mask(2, 3 * PAGE, keep, "cpu")
    out = sinks.decode_with_sinks(scheme, layer, q, k_cache, v_cache, table, lengths, PAGE, N, KV_N, D ** -0.5,
                                  sink_k, sink_v, keep, mask, torch.tensor(lengths) > keep, scales=scales)
    for i in range(2):
        k_ref, v_ref = expected_kv(i)
        ref = reference_attention(q[i].reshape(1, N, D), k_ref, v_ref)
        assert (out[i].reshape(1, N, D).double() - ref).abs().max() < BF16_TOL
    # and the sinks matter: the same read without them (all int8) is further from the reference
    if keep == PAGE:
        plain = scheme.decode(layer, q, k_cache, v_cache, table, lengths, PAGE, N, KV_N, D ** -0.5, scales=scales)
        k_ref, v_ref = expected_kv(0)
        ref = reference_attention(q[0].reshape(1, N, D), k_ref, v_ref)
        assert (plain[0].reshape(1, N, D).double() - ref).abs().max() > \
            (out[0].reshape(1, N, D).double() - ref).abs().max()


def test_decode_with_sinks_is_graph_safe():
    scheme, layer = DynamicInt8KVCache(), torch.nn.Module()
    k_cache, v_cache = (torch.randint(-127, 128, (2 * PAGE, KV_N, D), dtype=torch.int8) for _ in range(2))
    scales = torch.rand(2, 2 * PAGE) * 0.01 + 0.001
    sink_k, sink_v = (torch.randn(2 * KEEP + 1, KV_N, D).to(torch.bfloat16) for _ in range(2))
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    mask, past = sinks.int8_mask(1, 2 * PAGE, KEEP, "cpu"), torch.tensor([True])
    q = torch.randn(1, N * D).to(torch.bfloat16)

    def decode(q):
        return sinks.decode_with_sinks(scheme, layer, q, k_cache, v_cache, table, [40], PAGE, N, KV_N, D ** -0.5,
                                       sink_k, sink_v, KEEP, mask, past, scales=scales)

    assert torch.equal(torch.compile(decode, fullgraph=True)(q), decode(q))


# -- the server argument -------------------------------------------------------------------------------------

def test_the_keep_first_argument_is_in_help_reaches_the_environment_and_needs_an_int8_cache(monkeypatch):
    import argparse
    import os
    from types import SimpleNamespace

    from sgl_ascend.sglang.kv_cache import KEEP_FIRST_ENV, add_kv_cache_server_args, int8_kv_cache_dtype

    monkeypatch.setenv(KEEP_FIRST_ENV, "")
    parser = argparse.ArgumentParser()
    parser.add_argument("--kv-cache-dtype", choices=["auto", "bf16"], default="auto", help="dtype.")
    add_kv_cache_server_args(None, parser)
    add_kv_cache_server_args(None, parser)
    args = parser.parse_args(["--kv-cache-dtype", "int8", "--kv-cache-keep-first", "4"])
    assert args.sgl_ascend_kv_cache_keep_first == 4 and os.environ[KEEP_FIRST_ENV] == "4"
    assert "--kv-cache-keep-first" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-keep-first", "four"])
    plain = SimpleNamespace(model=torch.nn.Linear(2, 2), kv_cache_dtype=torch.bfloat16, kv_cache_dtype_str="auto")
    with pytest.raises(ValueError, match="--kv-cache-keep-first"):
        int8_kv_cache_dtype(None, plain)


def test_an_n_the_page_cannot_hold_is_refused_while_the_server_arguments_resolve(monkeypatch):
    from types import SimpleNamespace

    from sgl_ascend.sglang.kv_cache import KEEP_FIRST_ENV, int8_kv_page_size

    view = SimpleNamespace(page_size=None, model_path=None, kv_cache_dtype="int8")
    monkeypatch.setenv(KEEP_FIRST_ENV, "4")
    assert int8_kv_page_size(view) == {"page_size": 128}
    monkeypatch.setenv(KEEP_FIRST_ENV, "129")
    with pytest.raises(ValueError, match="--kv-cache-keep-first 129"):
        int8_kv_page_size(view)
    monkeypatch.setenv(KEEP_FIRST_ENV, "64")
    with pytest.raises(ValueError, match="page size = 32"):
        int8_kv_page_size(SimpleNamespace(page_size=32, model_path=None, kv_cache_dtype="int8"))
