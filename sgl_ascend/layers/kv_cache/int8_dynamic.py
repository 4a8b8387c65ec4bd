"""Online int8 KV cache: K and V quantized per token as they are written, for checkpoints without KV
scales (`--kv-cache-dtype int8` on a bf16 or W8A8 checkpoint).

The granularity is what the NPU attention op reads for a per-token cache: npu_fused_infer_attention_score
with `antiquant_mode=1` takes `antiquant_scale` of shape (2, B, KV_S), float32, one scale per key /
value position (torch_npu 2.14.0 docs `_op_plugin_docs.py:8131, 8165`). So each token's K (and V) row,
all KV heads together, gets scale = max|row| / 127:
  write   npu_dynamic_quant(row) (per-token symmetric int8, fp32 scale, the op W8A8_DYNAMIC uses for
          activations): the int8 row to the token's cache slot, its scale to the slot of a [2, slots]
          fp32 buffer the attention backend keeps per layer (8 bytes per token per layer beside the
          2 * KV_N * D bytes of the cache);
  decode  the op on the int8 paged cache, BSH, with the scales of each request's positions gathered
          through its block table into (2, B, KV_S), antiquant_mode=1;
  extend  as the static cache: the op refuses antiquant for Q_S > 1 on a paged cache and in bf16
          (docs :8089, :8216, :8220), so the request's rows are dequantized (row * its scale) and
          attention runs on float K/V under a causal mask; prefill reads the int8 values decode does.
"""

import torch

from sgl_ascend.layers.kv_cache.base import KVCacheScheme
from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.layers.schemes.common import kernel_act_dtype
from sgl_ascend.ops import ops
from sgl_ascend.quant.scheme_key import ONLINE

#: the online scheme's name: the `--kv-cache-dtype` value that selects it
ONLINE_INT8 = "int8"


@register_scheme("kv_cache", ONLINE, ONLINE_INT8)
class DynamicInt8KVCache(KVCacheScheme):
    cache_dtype = torch.int8
    token_scales = True

    def create_weights(self, layer, num_kv_heads: int, head_dim: int) -> None:
        layer.kv_channels = num_kv_heads * head_dim  # no checkpoint tensors: the scales come with each token

    def process_weights_after_loading(self, layer, model_dtype: torch.dtype) -> None:
        kernel_act_dtype(model_dtype, "the int8 KV cache")

    def write(self, layer, k, v, k_cache, v_cache, loc, scales=None) -> None:
        t = k.shape[0]
        k_q, k_scale = ops.npu_dynamic_quant(k.reshape(t, -1).contiguous())
        v_q, v_scale = ops.npu_dynamic_quant(v.reshape(t, -1).contiguous())
        k_cache[loc] = k_q.view(t, *k_cache.shape[1:])
        v_cache[loc] = v_q.view(t, *v_cache.shape[1:])
        scales[0, loc] = k_scale
        scales[1, loc] = v_scale

    def antiquant(self, layer, block_table, block_size: int, scales=None) -> dict:
        return dict(antiquant_scale=position_scales(scales, block_table, block_size), antiquant_mode=1)

    def dequantize(self, layer, k_rows, v_rows, dtype, row_scales=None):
        s = k_rows.shape[0]
        k = (k_rows.reshape(s, -1).float() * row_scales[0].unsqueeze(1)).to(dtype)
        v = (v_rows.reshape(s, -1).float() * row_scales[1].unsqueeze(1)).to(dtype)
        return k, v

    def bytes_per_token(self, num_kv_heads: int, head_dim: int) -> int:
        return 2 * num_kv_heads * head_dim + 2 * 4  # int8 K, V rows + their fp32 scales


def position_scales(scales: torch.Tensor, block_table: torch.Tensor, block_size: int) -> torch.Tensor:
    """[2, slots] per-slot scales -> (2, B, blocks * block_size): position p of request b sits in slot
    block_table[b, p // block_size] * block_size + p % block_size (positions past a request's length
    read whatever slot its padded table names; the op stops at actual_seq_lengths_kv)."""
    b, blocks = block_table.shape
    offsets = torch.arange(block_size, device=block_table.device)
    slots = (block_table.long().unsqueeze(-1) * block_size + offsets).reshape(b, blocks * block_size)
    return scales[:, slots]
