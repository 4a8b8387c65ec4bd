"""Static int8 KV cache: K and V quantized per channel with scales from the checkpoint (msModelSlim C8,
compressed-tensors int8 `kv_cache_scheme`).

msModelSlim 26.1.0's `dynamic_cache` step (qconfig per_channel / int8 / symmetric / minmax) writes,
per attention layer, `<attn>.k_proj.kv_cache_scale`, `.kv_cache_offset` and the same for `v_proj`,
shape [num_kv_heads * head_dim], fp32 or bf16, offsets zero; the description says
`kv_cache_type: "C8"`. compressed-tensors writes `<attn>.k_scale` / `.v_scale`, one value per tensor
(strategy "tensor"), which is the per-channel case with every channel equal.

How the NPU serves it (vllm-ascend's C8 attention; torch_npu 2.14.0 docs of the ops):
  write   npu_quantize(k, scale, None, qint8, axis=-1, div_mode=True): round(k / scale), int8, then
          the rows go to their cache slots;
  decode  npu_fused_infer_attention_score on the int8 paged cache (block_table, BSH, Q_S = 1) with the
          per-channel antiquant_scale [2, KV_N*D] (keys, values) in the query's dtype;
  extend  the op refuses antiquant for Q_S > 1 on a paged cache and in bf16 (docs :8089, :8216,
          :8220), so the request's rows are dequantized with npu_anti_quant first and attention runs on
          float K/V with a causal mask: prefill reads the same int8 values decode does.
"""

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.kv_cache.base import KVCacheScheme
from sgl_ascend.layers.parameters import register
from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.layers.schemes.common import drop_zero_offset, kernel_act_dtype
from sgl_ascend.ops import ops
from sgl_ascend.quant.scheme_key import COMPRESSED_TENSORS, KV_CACHE, MSMODELSLIM

_QINT8 = torch.qint8


@register_scheme(KV_CACHE, MSMODELSLIM, "C8")
@register_scheme(KV_CACHE, COMPRESSED_TENSORS, "int8")
class StaticInt8KVCache(KVCacheScheme):
    cache_dtype = torch.int8

    def __init__(self, per_tensor: bool = False, with_offset: bool = True):
        self.per_tensor = per_tensor
        self.with_offset = with_offset

    @classmethod
    def from_key(cls, key, **context) -> "StaticInt8KVCache":
        if key.format == COMPRESSED_TENSORS:
            strategy, dynamic, symmetric = key.param("strategy"), key.param("dynamic"), key.param("symmetric")
            if strategy != "tensor" or dynamic or symmetric is False:
                raise CheckpointError(
                    f"compressed-tensors kv_cache_scheme int8 with strategy={strategy!r}, dynamic={dynamic}, "
                    f"symmetric={symmetric}: sgl-ascend serves static symmetric per-tensor int8 KV scales "
                    "(the NPU attention op dequantizes per channel, which a per-tensor scale fills). "
                    "Re-export with strategy 'tensor', static and symmetric.", key="kv_cache_scheme")
            return cls(per_tensor=True, with_offset=False)
        return cls()

    def create_weights(self, layer, num_kv_heads: int, head_dim: int) -> None:
        channels = 1 if self.per_tensor else num_kv_heads * head_dim
        rules = {} if self.per_tensor else {"output_dim": 0}
        # fp32 holds either file dtype exactly (msModelSlim writes fp32 or bf16 scales).
        for name in ("k", "v"):
            register(layer, f"{name}_cache_scale", torch.empty(channels, dtype=torch.float32), **rules)
            if self.with_offset:
                register(layer, f"{name}_cache_offset", torch.empty(channels, dtype=torch.float32), **rules)
        layer.kv_channels = num_kv_heads * head_dim

    def process_weights_after_loading(self, layer, model_dtype: torch.dtype) -> None:
        kernel_act_dtype(model_dtype, "the int8 KV cache")
        scales = []
        for name in ("k", "v"):
            scale = getattr(layer, f"{name}_cache_scale")
            if not bool((scale.data > 0).all()):
                raise CheckpointError("KV-cache scales must be positive; the checkpoint's are not.",
                                      tensor=scale.tensor_name)
            if self.with_offset:
                drop_zero_offset(layer, f"{name}_cache_offset", "the int8 KV cache (npu_quantize and the "
                                 "attention op's antiquant run without offset)")
            scales.append(scale.data.expand(layer.kv_channels))
            delattr(layer, f"{name}_cache_scale")
        # npu_quantize / npu_anti_quant take fp32 (or bf16) scales, the attention op's antiquant_scale the
        # query's dtype: one [2, KV_N*D] tensor per use (2 x 4 x KV_N*D bytes at most).
        layer.kv_scale = torch.stack(scales).contiguous()
        layer.kv_antiquant_scale = layer.kv_scale.to(model_dtype)

    def write(self, layer, k, v, k_cache, v_cache, loc, scales=None) -> None:
        t = k.shape[0]
        k_q = ops.npu_quantize(k.reshape(t, -1), layer.kv_scale[0], None, _QINT8, -1, True)
        v_q = ops.npu_quantize(v.reshape(t, -1), layer.kv_scale[1], None, _QINT8, -1, True)
        k_cache[loc] = k_q.view(t, *k_cache.shape[1:])
        v_cache[loc] = v_q.view(t, *v_cache.shape[1:])

    def antiquant(self, layer, block_table, block_size: int, scales=None) -> dict:
        return dict(antiquant_scale=layer.kv_antiquant_scale, antiquant_mode=0)

    def dequantize(self, layer, k_rows, v_rows, dtype, row_scales=None):
        s = k_rows.shape[0]
        k = ops.npu_anti_quant(k_rows.reshape(s, -1), layer.kv_scale[0], dst_dtype=dtype)
        v = ops.npu_anti_quant(v_rows.reshape(s, -1), layer.kv_scale[1], dst_dtype=dtype)
        return k, v

    def bytes_per_token(self, num_kv_heads: int, head_dim: int) -> int:
        return 2 * num_kv_heads * head_dim

