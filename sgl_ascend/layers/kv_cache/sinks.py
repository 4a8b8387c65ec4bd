"""Attention sinks in full precision (`--kv-cache-keep-first N`): the first N positions of every request
keep their K/V in the model dtype while the rest of the KV cache is int8 (online or C8).

Where the sinks live: SGLang's paged pool puts position p of a request in row p % P of one of its pages
(P = page size), so with N <= P the first N positions are rows 0..N-1 of the request's first page. A
float side buffer per layer holds rows 0..N-1 of every page: row r < N of page g at g * N + r, plus one
dump row. Keyed by page, not by request, it follows SGLang's radix cache (a request that reuses a
cached prefix reuses its pages, sinks included) and every row is rewritten when its slot is.
  write   every new token to its int8 slot as before, and those with slot % P < N also to the side
          buffer (index arithmetic, the others to the dump row: no host sync, no data-dependent branch);
  decode  two partial attentions merged by their log-sum-exp (softmax_lse_flag=True, docs
          `_op_plugin_docs.py:8132, 8148`; vllm-ascend merges its context-parallel decode the same way):
          the op on the int8 paged cache with the first N keys masked out (atten_mask on a Q_S = 1 paged
          call, docs :8079, :8292), and the op on the request's N float sink rows;
  extend  the request's rows dequantized, then its first min(S, N) rows replaced by the sink rows.
A request of at most N tokens has no int8 key: its masked int8 pass is dropped by the merge (where).
"""

from typing import Sequence

import torch

from sgl_ascend.ops import ops

#: the server argument, for messages
FLAG = "--kv-cache-keep-first"


def check_keep_first(n: int, page_size: int) -> None:
    """N the sinks can serve: 1 <= N <= page size (the sinks are rows of a request's first page)."""
    if not 1 <= n <= page_size:
        raise ValueError(f"{FLAG} {n}: the first N positions are kept in rows 0..N-1 of each request's first "
                         f"KV page, so N must be in [1, page size = {page_size}]; lower N or raise --page-size "
                         "(a multiple of 32)")


def sink_index(loc: torch.Tensor, page_size: int, n: int, dump: int) -> torch.Tensor:
    """Cache slots -> side-buffer rows: slot g * P + r with r < N -> g * N + r, the others -> `dump`."""
    row = loc.long() % page_size
    return torch.where(row < n, loc.long() // page_size * n + row, torch.full_like(row, dump))


def side_buffer(pages: int, n: int, num_kv_heads: int, head_dim: int, dtype, device) -> torch.Tensor:
    """[pages * N + 1, KV_N, D]: rows 0..N-1 of every page and the dump row (zeros: a row not yet written
    is never read)."""
    return torch.zeros(pages * n + 1, num_kv_heads, head_dim, dtype=dtype, device=device)


def write_sinks(k: torch.Tensor, v: torch.Tensor, loc: torch.Tensor, sink_k: torch.Tensor, sink_v: torch.Tensor,
                page_size: int, n: int) -> None:
    """k, v [T, KV_N, D] of the new tokens at slots `loc` -> their side-buffer rows (rows < N of a page)."""
    index = sink_index(loc, page_size, n, sink_k.shape[0] - 1)
    sink_k[index] = k.to(sink_k.dtype)
    sink_v[index] = v.to(sink_v.dtype)


def sink_rows(sink: torch.Tensor, tokens: torch.Tensor, page_size: int, n: int) -> torch.Tensor:
    """One request's sink rows [len(tokens), KV_N, D] for its first len(tokens) <= N slots."""
    return sink[sink_index(tokens, page_size, n, sink.shape[0] - 1)]


def int8_mask(batch: int, kv_s: int, n: int, device) -> torch.Tensor:
    """(B, 1, 1, KV_S) bool, True on the first N key positions: the int8 pass leaves the sinks out."""
    return (torch.arange(kv_s, device=device) < n).reshape(1, 1, 1, kv_s).expand(batch, 1, 1, kv_s).contiguous()


def sink_attention(q: torch.Tensor, sink_k: torch.Tensor, sink_v: torch.Tensor, block_table: torch.Tensor,
                   seq_lens: Sequence[int], n: int, num_heads: int, num_kv_heads: int, scale: float):
    """q [B, N*D] against each request's first min(len, N) positions in float (the side-buffer rows of its
    first page, block_table[:, 0]): npu_fused_infer_attention_score, BSH -> (out [B, 1, N*D], lse)."""
    b = q.shape[0]
    rows = block_table[:, 0].long().unsqueeze(1) * n + torch.arange(n, device=q.device)
    k = sink_k[rows].reshape(b, n, -1).to(q.dtype)
    v = sink_v[rows].reshape(b, n, -1).to(q.dtype)
    return ops.npu_fused_infer_attention_score(
        q.reshape(b, 1, -1).contiguous(), k, v, actual_seq_lengths_kv=[min(int(s), n) for s in seq_lens],
        num_heads=num_heads, num_key_value_heads=num_kv_heads, scale=scale, input_layout="BSH",
        softmax_lse_flag=True)


def merge_partial(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
                  use_a: torch.Tensor) -> torch.Tensor:
    """Two attentions of the same queries over disjoint keys -> the attention over their union:
    out = (e^(lse_a - m) out_a + e^(lse_b - m) out_b) / (e^(lse_a - m) + e^(lse_b - m)), m the larger lse,
    per batch and head, in fp32. out_* [B, N*D] (or [B, 1, N*D]), lse_* (B, N, 1, 1); `use_a` [B] bool:
    False where part a had no key (its output and lse are then undefined and left out)."""
    b, heads = lse_a.shape[0], lse_a.shape[1]
    keep = use_a.reshape(b, 1, 1)
    a = torch.where(keep, out_a.float().reshape(b, heads, -1), 0.0)
    la = torch.where(keep, lse_a.reshape(b, heads, 1), float("-inf"))
    lb = lse_b.reshape(b, heads, 1)
    m = torch.maximum(la, lb)
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    out = (wa * a + wb * out_b.float().reshape(b, heads, -1)) / (wa + wb)
    return out.reshape(b, -1).to(out_a.dtype)


def decode_with_sinks(scheme, layer, q, k_cache, v_cache, block_table, seq_lens: Sequence[int], block_size: int,
                      num_heads: int, num_kv_heads: int, scale: float, sink_k, sink_v, n: int, mask, past_sinks,
                      scales=None) -> torch.Tensor:
    """Decode q [B, N*D] -> [B, N*D]: the int8 pages without the first N keys (`mask`, int8_mask) merged
    with the N float sinks; `past_sinks` [B] bool: the request has more than N tokens."""
    out_q, lse_q = scheme.decode(layer, q, k_cache, v_cache, block_table, seq_lens, block_size, num_heads,
                                 num_kv_heads, scale, scales=scales, atten_mask=mask, softmax_lse_flag=True)
    out_s, lse_s = sink_attention(q, sink_k, sink_v, block_table, seq_lens, n, num_heads, num_kv_heads, scale)
    return merge_partial(out_q, lse_q, out_s, lse_s, past_sinks)
