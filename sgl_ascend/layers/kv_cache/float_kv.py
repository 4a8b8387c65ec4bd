"""A layer kept in float KV inside an int8-KV model (`--kv-cache-skip-layers`): its K/V are stored in
the model dtype, unquantized, and read by the same attention op without antiquant.

The attention backend gives such a layer float cache buffers of its own (SGLang's pool is one dtype
for every layer); decode is npu_fused_infer_attention_score on the float paged cache (block size
16-aligned, docs `_op_plugin_docs.py:8280`), extend the causal attention the int8 schemes use.
"""

import torch

from sgl_ascend.layers.kv_cache.base import KVCacheScheme
from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.quant.scheme_key import ONLINE

#: the name of the float KV scheme (the model's own dtype)
FLOAT_KV = "float"


@register_scheme("kv_cache", ONLINE, FLOAT_KV)
class FloatKVCache(KVCacheScheme):
    #: the model dtype: set per layer (layer.kv_model_dtype); the backend sizes the layer's buffers by it
    cache_dtype = None

    def create_weights(self, layer, num_kv_heads: int, head_dim: int) -> None:
        layer.kv_channels = num_kv_heads * head_dim

    def process_weights_after_loading(self, layer, model_dtype: torch.dtype) -> None:
        pass

    def write(self, layer, k, v, k_cache, v_cache, loc, scales=None) -> None:
        k_cache[loc] = k.to(k_cache.dtype)
        v_cache[loc] = v.to(v_cache.dtype)

    def dequantize(self, layer, k_rows, v_rows, dtype, row_scales=None):
        s = k_rows.shape[0]
        return k_rows.reshape(s, -1).to(dtype), v_rows.reshape(s, -1).to(dtype)

    def bytes_per_token(self, num_kv_heads: int, head_dim: int) -> int:
        return 2 * num_kv_heads * head_dim * 2  # bf16 / fp16 K and V
