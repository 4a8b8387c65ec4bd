"""The protocol of a KV-cache scheme, independent of SGLang.

`create_weights(layer, ...)` registers the layer's checkpoint tensors (scales) as ShardedParameters,
`process_weights_after_loading(layer)` turns them into what the NPU ops take, and the three apply
steps compute through `sgl_ascend.ops.ops`:
  write   K, V of new tokens -> the cache rows at their slots (quantize-on-write);
  decode  one query token per request against its paged cache (npu_fused_infer_attention_score);
  extend  the new tokens of one request against its whole sequence (prefix from the cache + new);
schemes differ in `write`, `antiquant` (decode's op arguments) and `dequantize` (extend's rows).
The attention backend (sgl_ascend.sglang.attention) owns batching and the page table.
"""

from abc import ABC, abstractmethod
from typing import Sequence

import torch

from sgl_ascend.ops import ops


class KVCacheScheme(ABC):
    #: dtype of the cache rows this scheme stores
    cache_dtype: torch.dtype

    #: the scheme keeps one fp32 scale per cached token for K and V: the backend gives it a [2, slots]
    #: buffer per layer (`scales` of write / decode; extend gets the request's rows of it)
    token_scales = False

    #: every registered scheme answers it (inspect checks msModelSlim's top-level group_size); KV scales have none
    reads_group_size = False

    @classmethod
    def from_key(cls, key, **context) -> "KVCacheScheme":
        return cls()

    @abstractmethod
    def create_weights(self, layer: torch.nn.Module, num_kv_heads: int, head_dim: int) -> None: ...

    @abstractmethod
    def process_weights_after_loading(self, layer: torch.nn.Module, model_dtype: torch.dtype) -> None: ...

    @abstractmethod
    def write(self, layer, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              loc: torch.Tensor, scales=None) -> None:
        """k, v [T, KV_N, D] in the model dtype -> rows `loc` of k_cache / v_cache [slots, KV_N, D]."""

    def antiquant(self, layer, block_table: torch.Tensor, block_size: int, scales=None) -> dict:
        """The attention op's antiquant arguments for this cache on the decode path (none for float K/V)."""
        return {}

    @abstractmethod
    def dequantize(self, layer, k_rows: torch.Tensor, v_rows: torch.Tensor, dtype: torch.dtype,
                   row_scales=None):
        """Cache rows [S, KV_N, D] as the cache holds them -> float k, v [S, KV_N*D] in `dtype`."""

    def decode(self, layer, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               block_table: torch.Tensor, seq_lens: Sequence[int], block_size: int, num_heads: int,
               num_kv_heads: int, scale: float, scales=None, atten_mask=None, softmax_lse_flag: bool = False):
        """q [B, N*D] -> [B, N*D] over each request's first seq_lens[b] cached tokens; with
        softmax_lse_flag also the op's log-sum-exp (B, N, 1, 1) (`atten_mask`: keys left out)."""
        out, lse = paged_attention(q, k_cache, v_cache, block_table, seq_lens, block_size, num_heads, num_kv_heads,
                                   scale, atten_mask=atten_mask, softmax_lse_flag=softmax_lse_flag,
                                   **self.antiquant(layer, block_table, block_size, scales))
        return (out, lse) if softmax_lse_flag else out

    def extend(self, layer, q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, num_heads: int,
               num_kv_heads: int, scale: float, row_scales=None, sinks=None) -> torch.Tensor:
        """One request: q [S_new, N*D] (the last S_new of its S tokens), k_rows / v_rows [S, KV_N, D] as the
        cache holds them -> causal attention [S_new, N*D]. The op refuses antiquant for Q_S > 1 on a paged
        cache and in bf16 (docs :8089, :8216, :8220), so the rows are dequantized first: prefill reads the
        values decode does. `sinks`: float (k, v) [n, KV_N, D] that replace the first n positions
        (`--kv-cache-keep-first`)."""
        s, s_new = k_rows.shape[0], q.shape[0]
        k, v = self.dequantize(layer, k_rows, v_rows, q.dtype, row_scales)
        if sinks is not None:
            n = sinks[0].shape[0]
            k = torch.cat([sinks[0].reshape(n, -1).to(q.dtype), k[n:]])
            v = torch.cat([sinks[1].reshape(n, -1).to(q.dtype), v[n:]])
        return causal_attention(q, k, v, num_heads, num_kv_heads, scale, s_new, s)

    @abstractmethod
    def bytes_per_token(self, num_kv_heads: int, head_dim: int) -> int:
        """Cache bytes one token takes in one layer (K and V), for memory plans and checks."""


def paged_attention(q, k_cache, v_cache, block_table, seq_lens: Sequence[int], block_size: int, num_heads: int,
                    num_kv_heads: int, scale: float, **antiquant) -> torch.Tensor:
    """One query token per request q [B, N*D] against its paged cache (rows [slots, KV_N, D] viewed as
    blocks of `block_size`): npu_fused_infer_attention_score, BSH -> (out [B, N*D], softmax_lse); `antiquant`:
    the int8 cache's antiquant_scale / antiquant_mode (none for a float cache), atten_mask, softmax_lse_flag."""
    b = q.shape[0]
    blocks = k_cache.shape[0] // block_size
    out, lse = ops.npu_fused_infer_attention_score(
        q.reshape(b, 1, -1).contiguous(), k_cache.view(blocks, block_size, -1), v_cache.view(blocks, block_size, -1),
        block_table=block_table, actual_seq_lengths_kv=seq_lens, num_heads=num_heads,
        num_key_value_heads=num_kv_heads, scale=scale, input_layout="BSH", block_size=block_size, **antiquant)
    return out.reshape(b, -1), lse


def causal_attention(q, k, v, num_heads: int, num_kv_heads: int, scale: float, s_new: int, s: int):
    """One request's new tokens q [S_new, N*D] against float k, v [S, KV_N*D] (the request's whole
    sequence, the new tokens last): npu_fused_infer_attention_score, BSH, explicit causal mask."""
    mask = causal_mask(s_new, s, q.device)
    out, _ = ops.npu_fused_infer_attention_score(
        q.reshape(1, s_new, -1).contiguous(), k.reshape(1, s, -1).contiguous(), v.reshape(1, s, -1).contiguous(),
        atten_mask=mask, num_heads=num_heads, num_key_value_heads=num_kv_heads, scale=scale, input_layout="BSH",
        sparse_mode=0)
    return out.reshape(s_new, -1)


def causal_mask(s_new: int, s: int, device) -> torch.Tensor:
    """(S_new, S) bool, True where a new token must not look: key j > its own position S - S_new + i."""
    rows = torch.arange(s_new, device=device).unsqueeze(1) + (s - s_new)
    return torch.arange(s, device=device).unsqueeze(0) > rows
