"""`AscendInt8KVBackend`: SGLang attention over an int8 paged KV cache, through the layer's KV-cache scheme.

SGLang keeps, per request, the cache slot of every token (`req_to_token`) and, with page size P, puts
a request's tokens in whole pages: page `slot // P`, row `slot % P`. Viewed as [pages, P, KV_N*D]
the pool is the (blocknum, block_size, H) cache npu_fused_infer_attention_score reads, and the page
ids of a request's tokens (every P-th slot // P) are its block_table row.

Per forward:
  write    every layer quantizes its new K/V into their slots (scheme.write);
  decode   one op call for the batch: the int8 pages, block_table, each request's length;
  extend   per request (as SGLang's torch_native backend): its tokens' cache rows, dequantized, with
           its new queries under a causal mask, so prefill and decode read the same int8 values.
With `--kv-cache-keep-first N` the first N positions of every request also go to a float side buffer
per int8 layer and are read from it (sgl_ascend.layers.kv_cache.sinks).
"""

import logging
import os
from typing import List

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

from sgl_ascend.layers.kv_cache import sinks
from sgl_ascend.sglang.kv_cache import INT8_KV_BLOCK_ALIGN, KEEP_FIRST_ENV

logger = logging.getLogger(__name__)


class AscendInt8KVBackend(TorchNativeAttnBackend):
    def __init__(self, model_runner):
        super().__init__(model_runner)
        self.page_size = model_runner.page_size
        if self.page_size % INT8_KV_BLOCK_ALIGN:
            raise ValueError(f"the int8 KV cache is read in blocks of a multiple of {INT8_KV_BLOCK_ALIGN} tokens "
                             f"(npu_fused_infer_attention_score), but --page-size is {self.page_size}; serve with "
                             "--page-size 128 (SGLang's NPU default) or leave it unset.")
        self.block_table = None
        self.seq_lens: List[int] = []
        # per-token schemes (online int8): one [2, slots] fp32 scale buffer per layer, beside SGLang's pool
        self.token_scales = {}
        # layers kept in float KV (--kv-cache-skip-layers): their K/V buffers, beside SGLang's int8 pool
        self.float_caches = {}
        # --kv-cache-keep-first N: per int8 layer the float (K, V) side buffers of the first N positions
        keep_first = os.environ.get(KEEP_FIRST_ENV)
        self.keep_first = int(keep_first) if keep_first else 0
        self.sinks = self._sink_buffers(model_runner) if keep_first else {}  # N = 0 given is refused there
        self.sink_mask = self.past_sinks = None

    def _sink_buffers(self, model_runner) -> dict:
        sinks.check_keep_first(self.keep_first, self.page_size)
        buffers = {}
        for module in model_runner.model.modules():
            scheme = getattr(module, "kv_scheme", None)
            if scheme is None or scheme.cache_dtype is None:  # no int8 KV, or a layer kept in float KV
                continue
            pages = self.token_to_kv_pool.get_key_buffer(module.layer_id).shape[0] // self.page_size
            buffers[module.layer_id] = tuple(
                sinks.side_buffer(pages, self.keep_first, module.tp_k_head_num, module.head_dim,
                                  module.kv_model_dtype, self.req_to_token_pool.req_to_token.device)
                for _ in range(2))
        total = sum(t.numel() * t.element_size() for pair in buffers.values() for t in pair)
        logger.info("sgl-ascend: %s %d keeps the first %d positions of every request in %s K/V: side buffers "
                    "of %d bytes (%d layers) outside SGLang's KV pool budget", sinks.FLAG, self.keep_first,
                    self.keep_first, next(iter(buffers.values()))[0].dtype if buffers else None, total,
                    len(buffers))
        return buffers

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        # Host lengths: the op takes actual_seq_lengths_kv as a list (SymInt[]), as SGLang's NPU backend passes.
        self.seq_lens = forward_batch.seq_lens_cpu.tolist()
        if forward_batch.forward_mode.is_decode_or_idle() and self.seq_lens:
            pages = -(-max(self.seq_lens) // self.page_size)
            slots = self.req_to_token_pool.req_to_token[forward_batch.req_pool_indices,
                                                        : pages * self.page_size: self.page_size]
            self.block_table = torch.div(slots, self.page_size, rounding_mode="floor").to(torch.int32)
            if self.keep_first:
                self.sink_mask = sinks.int8_mask(len(self.seq_lens), pages * self.page_size, self.keep_first,
                                                 slots.device)
                self.past_sinks = forward_batch.seq_lens > self.keep_first

    def _caches(self, layer):
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        rows = k_cache.shape[0] // self.page_size * self.page_size
        if layer.kv_scheme.cache_dtype is None:  # a layer kept in float KV: buffers of its own, same slots
            if layer.layer_id not in self.float_caches:
                self.float_caches[layer.layer_id] = tuple(
                    torch.zeros(rows, *k_cache.shape[1:], dtype=layer.kv_model_dtype, device=k_cache.device)
                    for _ in range(2))
            return self.float_caches[layer.layer_id]
        return k_cache[:rows], v_cache[:rows]

    def _scales(self, layer, slots: int):
        """The layer's per-token scale buffer (None for per-channel schemes); allocated on the layer's
        first forward, sized to the pool, so that no per-layer list is needed before the model runs."""
        if not layer.kv_scheme.token_scales:
            return None
        if layer.layer_id not in self.token_scales:
            self.token_scales[layer.layer_id] = torch.ones(2, slots, dtype=torch.float32,
                                                           device=self.req_to_token_pool.req_to_token.device)
        return self.token_scales[layer.layer_id]

    def _write(self, k, v, layer, forward_batch, save_kv_cache):
        if not save_kv_cache:
            raise NotImplementedError("the int8 KV backend reads every token from the cache; a forward that "
                                      "does not save K/V (cross-layer KV sharing) is not served")
        k_cache, v_cache = self._caches(layer)
        scales = self._scales(layer, k_cache.shape[0])
        n, d = layer.tp_k_head_num, layer.head_dim
        k, v = k.reshape(-1, n, d), v.reshape(-1, n, d)
        layer.kv_scheme.write(layer, k, v, k_cache, v_cache, forward_batch.out_cache_loc, scales=scales)
        if layer.layer_id in self.sinks:
            sinks.write_sinks(k, v, forward_batch.out_cache_loc, *self.sinks[layer.layer_id], self.page_size,
                              self.keep_first)
        return k_cache, v_cache, scales

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        k_cache, v_cache, scales = self._write(k, v, layer, forward_batch, save_kv_cache)
        b = len(self.seq_lens)
        if layer.layer_id in self.sinks:
            out = sinks.decode_with_sinks(
                layer.kv_scheme, layer, q.reshape(b, -1), k_cache, v_cache, self.block_table, self.seq_lens,
                self.page_size, layer.tp_q_head_num, layer.tp_k_head_num, layer.scaling,
                *self.sinks[layer.layer_id], self.keep_first, self.sink_mask, self.past_sinks, scales=scales)
            return out.reshape(q.shape[0], -1)
        out = layer.kv_scheme.decode(layer, q.reshape(b, -1), k_cache, v_cache, self.block_table, self.seq_lens,
                                     self.page_size, layer.tp_q_head_num, layer.tp_k_head_num, layer.scaling,
                                     scales=scales)
        return out.reshape(q.shape[0], -1)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        k_cache, v_cache, scales = self._write(k, v, layer, forward_batch, save_kv_cache)
        q = q.reshape(-1, layer.tp_q_head_num * layer.head_dim)
        out = torch.empty_like(q)
        req_to_token = self.req_to_token_pool.req_to_token
        start = 0
        for i, (new, total) in enumerate(zip(forward_batch.extend_seq_lens_cpu, self.seq_lens)):
            tokens = req_to_token[forward_batch.req_pool_indices[i], :total]
            kept = None
            if layer.layer_id in self.sinks:
                first = tokens[:min(total, self.keep_first)]
                kept = tuple(sinks.sink_rows(t, first, self.page_size, self.keep_first)
                             for t in self.sinks[layer.layer_id])
            out[start:start + new] = layer.kv_scheme.extend(
                layer, q[start:start + new], k_cache[tokens], v_cache[tokens], layer.tp_q_head_num,
                layer.tp_k_head_num, layer.scaling, row_scales=None if scales is None else scales[:, tokens],
                sinks=kept)
            start += new
        return out
