"""The int8 KV cache in SGLang: scales on each RadixAttention, an int8 KV pool, our attention backend.

For a checkpoint whose KV cache is quantized (msModelSlim C8, compressed-tensors int8 kv_cache_scheme)
every RadixAttention gets an `AscendKVCacheMethod` just before the weights load (`attach_kv_cache_methods`:
SGLang's models build RadixAttention without the quant config), its scales load like any weight, and
three plugin hooks do the rest, with no change to SGLang:
  - `int8_kv_page_size` (a server-argument resolution pass): the NPU attention op reads the cache
    in blocks of a 32-aligned size (torch_npu docs :8280), so SGLang's page size becomes 128 (its NPU
    default) unless the user chose a multiple of 32;
  - `int8_kv_cache_dtype` (after ModelRunner.configure_kv_cache_dtype): the KV pool stores int8, so
    SGLang sizes it at 1 byte per element: about twice the tokens of bf16 in the same memory;
  - `int8_kv_attention_backend` (around SGLang's backend factory): `AscendInt8KVBackend`
    writes quantized K/V and reads them through the scheme (sgl_ascend.layers.kv_cache).
"""

import argparse
import json
import logging
import os
from typing import Optional

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.kv_cache import KVCacheScheme
from sgl_ascend.layers.kv_cache.float_kv import FLOAT_KV
from sgl_ascend.layers.kv_cache.int8_dynamic import ONLINE_INT8
from sgl_ascend.layers.kv_cache.sinks import check_keep_first
from sgl_ascend.layers.registry import create
from sgl_ascend.layers.parameters import ShardedParameter, check_dtype
from sgl_ascend.quant.modelslim import DESCRIPTION_FILE
from sgl_ascend.quant.scheme_key import KV_CACHE, ONLINE, SchemeKey

logger = logging.getLogger(__name__)

#: SGLang's page size on NPU; a multiple of the 32 the op needs for int8 blocks
INT8_KV_PAGE_SIZE = 128
INT8_KV_BLOCK_ALIGN = 32


def checkpoint_kv_quantized(model_path: Optional[str]) -> bool:
    """Does the (local) checkpoint quantize its KV cache: msModelSlim kv_cache_type, or a compressed-tensors
    kv_cache_scheme? Read before SGLang builds the model, to size pages; the scheme is checked later."""
    if not model_path or not os.path.isdir(model_path):
        return False
    try:
        with open(os.path.join(model_path, DESCRIPTION_FILE)) as f:
            return bool(json.load(f).get("kv_cache_type"))
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            quant = json.load(f).get("quantization_config") or {}
        return bool(quant.get("kv_cache_scheme"))
    except (OSError, ValueError, AttributeError):
        return False


#: the server-argument resolution step after which the page size is settled for the int8 cache (after
#: the platform defaults: SGLang's NPU handler sets 128 itself)
RESOLUTION_STEP = "handle_attention_backend_compatibility"


def resolve_int8_kv_page_size(server_args, previous) -> None:
    """Wrapper of RESOLUTION_STEP: the step, then `int8_kv_page_size` as a post-process pass."""
    from sglang.srt.arg_groups.overrides import run_post_process_pass

    previous(server_args)
    run_post_process_pass(server_args, int8_kv_page_size)


def int8_kv_page_size(view) -> dict:
    """Post-process pass: a page size the int8 paged attention can read."""
    page_size = view.page_size
    if not (checkpoint_kv_quantized(view.model_path) or view.kv_cache_dtype == ONLINE_INT8):
        return {}
    resolved = INT8_KV_PAGE_SIZE if page_size is None or page_size % INT8_KV_BLOCK_ALIGN else page_size
    if os.environ.get(KEEP_FIRST_ENV):  # refused before the model loads (the backend checks it again)
        check_keep_first(int(os.environ[KEEP_FIRST_ENV]), resolved)
    if resolved != page_size:
        logger.info("sgl-ascend: int8 KV cache, page size %s -> %d (npu_fused_infer_attention_score reads int8 "
                    "KV blocks of a multiple of %d tokens)", page_size, INT8_KV_PAGE_SIZE, INT8_KV_BLOCK_ALIGN)
        return {"page_size": INT8_KV_PAGE_SIZE}
    return {}


class AscendKVCacheMethod:
    """The quant method of a RadixAttention whose KV cache a KVCacheScheme stores."""

    def __init__(self, scheme: KVCacheScheme, prefix: str):
        self.scheme = scheme
        self.prefix = prefix

    def create_weights(self, layer: torch.nn.Module, model_dtype: torch.dtype, device: torch.device) -> None:
        from sglang.srt.distributed.parallel_state import (get_tensor_model_parallel_rank,
                                                           get_tensor_model_parallel_world_size)

        layer.prefix = self.prefix
        layer.kv_scheme = self.scheme
        layer.kv_model_dtype = model_dtype  # the attention op's antiquant scale takes the query's dtype
        self.scheme.create_weights(layer, layer.tp_k_head_num, layer.head_dim)
        loader = kv_head_loader(get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())
        for param in layer.parameters(recurse=False):
            if isinstance(param, ShardedParameter):
                param.data = param.data.to(device)
                param.weight_loader = loader

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.scheme.process_weights_after_loading(layer, layer.kv_model_dtype)


def attach_kv_cache_methods(model: torch.nn.Module, scheme: KVCacheScheme, per_layer=None) -> None:
    """Give every RadixAttention of `model` the KV-cache scheme (before its weights load); `per_layer`:
    {layer_id: scheme} for layers that take another."""
    from sglang.srt.layers.radix_attention import RadixAttention

    floats = [p for p in model.parameters() if p.is_floating_point()]
    dtype, device = floats[0].dtype, floats[0].device  # the embeddings: the model dtype
    for name, module in model.named_modules():
        if isinstance(module, RadixAttention) and module.quant_method is None:
            module.quant_method = AscendKVCacheMethod((per_layer or {}).get(module.layer_id, scheme), name)
            module.quant_method.create_weights(module, dtype, device)


def kv_head_loader(tp_rank: int, tp_size: int):
    """Loads this rank's KV heads of a [num_kv_heads * head_dim] scale (whole when per-tensor): SGLang
    splits KV heads over ranks and replicates them when there are fewer heads than ranks."""

    def load(param: ShardedParameter, loaded: torch.Tensor, *_, **__) -> None:
        check_dtype(loaded.dtype, "float", tensor=param.tensor_name)
        loaded = loaded.reshape(-1)
        local = param.data.numel()
        if loaded.numel() == local or local == 1:
            if loaded.numel() != local:
                raise CheckpointError(f"a per-tensor KV scale has 1 element, got {loaded.numel()}",
                                      tensor=param.tensor_name)
            param.data.copy_(loaded)
            return
        if loaded.numel() % local:
            raise CheckpointError(f"{loaded.numel()} channels do not split into this rank's {local} (whole KV "
                                  "heads); the checkpoint does not match config.json.", tensor=param.tensor_name)
        heads_total = loaded.numel() // local  # groups of this rank's size
        group = tp_rank * heads_total // tp_size if heads_total < tp_size else tp_rank
        param.data.copy_(loaded[group * local:(group + 1) * local])

    return load


# -- checkpoint tensor names -> the attention layer's parameters --------------------------------------

_RENAMES = ((".k_proj.kv_cache_scale", ".attn.k_cache_scale"), (".k_proj.kv_cache_offset", ".attn.k_cache_offset"),
            (".v_proj.kv_cache_scale", ".attn.v_cache_scale"), (".v_proj.kv_cache_offset", ".attn.v_cache_offset"),
            (".self_attn.k_scale", ".self_attn.attn.k_cache_scale"),
            (".self_attn.v_scale", ".self_attn.attn.v_cache_scale"))


def attention_tensor_name(name: str) -> str:
    """msModelSlim `<attn>.k_proj.kv_cache_scale` and compressed-tensors `<attn>.k_scale` -> the name of the
    RadixAttention (`<attn>.attn`) parameter that takes it; other names unchanged."""
    for old, new in _RENAMES:
        if name.endswith(old):
            return name[: -len(old)] + new
    return name


# -- the pool dtype and the backend -------------------------------------------------------------------

def model_kv_scheme(model: torch.nn.Module) -> Optional[KVCacheScheme]:
    """The scheme of the model's KV pool (layers kept in float KV, cache_dtype None, have their own)."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, AscendKVCacheMethod) and method.scheme.cache_dtype is not None:
            return method.scheme
    return None


#: how `--kv-cache-skip-layers` reaches the scheduler processes: SGLang's ServerArgs keeps its own fields
#: only, and the processes it spawns inherit the launcher's environment
SKIP_LAYERS_ENV = "SGL_ASCEND_KV_CACHE_SKIP_LAYERS"
#: how `--kv-cache-keep-first` reaches them (the same way)
KEEP_FIRST_ENV = "SGL_ASCEND_KV_CACHE_KEEP_FIRST"


def _to_environment(name: str):
    class ToEnvironment(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            setattr(namespace, self.dest, values)
            os.environ[name] = str(values)

    return ToEnvironment


def add_kv_cache_server_args(_result, parser, *args, **kwargs) -> None:
    """AFTER hook of ServerArgs.add_cli_args: `--kv-cache-dtype int8` (the online int8 KV cache),
    `--kv-cache-skip-layers` and `--kv-cache-keep-first`."""
    for action in parser._actions:
        if "--kv-cache-dtype" in action.option_strings and ONLINE_INT8 not in action.choices:
            action.choices = [*action.choices, ONLINE_INT8]
            action.help += f' "{ONLINE_INT8}" (sgl-ascend): int8 KV cache quantized per token as written.'
    if not any("--kv-cache-skip-layers" in a.option_strings for a in parser._actions):
        parser.add_argument("--kv-cache-skip-layers", dest="sgl_ascend_kv_cache_skip_layers", metavar="0,1,-1",
                            action=_to_environment(SKIP_LAYERS_ENV), default=None,
                            help="(sgl-ascend) with --kv-cache-dtype int8: these attention layers keep a KV cache "
                                 "in the model dtype (comma-separated layer indices, negative from the end).")
    if not any("--kv-cache-keep-first" in a.option_strings for a in parser._actions):
        parser.add_argument("--kv-cache-keep-first", dest="sgl_ascend_kv_cache_keep_first", metavar="N", type=int,
                            action=_to_environment(KEEP_FIRST_ENV), default=None,
                            help="(sgl-ascend) with an int8 KV cache (--kv-cache-dtype int8 or a C8 checkpoint): "
                                 "the first N positions of every request (attention sinks) keep K/V in the model "
                                 "dtype; 1 <= N <= page size.")


def skip_layers(text: Optional[str], num_layers: int) -> set:
    """`0,1,-1` -> {0, 1, num_layers - 1}; out-of-range or malformed entries are refused."""
    if not text:
        return set()
    out = set()
    for item in text.split(","):
        try:
            index = int(item)
        except ValueError:
            raise ValueError(f"--kv-cache-skip-layers {text!r}: {item!r} is not a layer index") from None
        if not -num_layers <= index < num_layers:
            raise ValueError(f"--kv-cache-skip-layers {text!r}: layer {index} does not exist (the model has "
                             f"{num_layers} attention layers; negative indices count from the end)")
        out.add(index % num_layers)
    return out


def online_kv_cache_dtype(original, *args, server_args_kv_cache_dtype: str, **kwargs):
    """AROUND hook of sglang's kv_cache_dtype.configure_kv_cache_dtype: SGLang has no int8 KV dtype, so
    `int8` resolves as the model dtype first; `int8_kv_cache_dtype` then stores int8."""
    if server_args_kv_cache_dtype != ONLINE_INT8:
        return original(*args, server_args_kv_cache_dtype=server_args_kv_cache_dtype, **kwargs)
    _resolved, dtype = original(*args, server_args_kv_cache_dtype="auto", **kwargs)
    return ONLINE_INT8, dtype


def attach_online_kv_cache(model: torch.nn.Module, skip: Optional[str] = None) -> KVCacheScheme:
    """`--kv-cache-dtype int8` on a checkpoint without KV scales: every RadixAttention quantizes its K/V
    per token as written (DynamicInt8KVCache), the `skip` layers (`--kv-cache-skip-layers`) keep float K/V
    (FloatKVCache); no weights, so it attaches after loading."""
    from sglang.srt.layers.radix_attention import RadixAttention

    scheme = create(SchemeKey.make(KV_CACHE, ONLINE, ONLINE_INT8), what="--kv-cache-dtype int8")
    layers = sorted(m.layer_id for m in model.modules() if isinstance(m, RadixAttention))
    kept = skip_layers(skip, len(layers))
    if kept and len(kept) == len(layers):
        raise ValueError(f"--kv-cache-skip-layers {skip!r} keeps every layer in float KV; drop "
                         "--kv-cache-dtype int8 instead")
    float_kv = create(SchemeKey.make(KV_CACHE, ONLINE, FLOAT_KV), what="--kv-cache-skip-layers")
    attach_kv_cache_methods(model, scheme, {layers[i]: float_kv for i in kept})
    if kept:
        logger.info("sgl-ascend: layers %s keep a float KV cache (--kv-cache-skip-layers %s)", sorted(kept), skip)
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, AscendKVCacheMethod):
            method.process_weights_after_loading(module)
    return scheme


def int8_kv_cache_dtype(_result, runner, *args, **kwargs):
    """AFTER hook of ModelRunner.configure_kv_cache_dtype."""
    scheme = model_kv_scheme(runner.model)
    if scheme is None and getattr(runner, "kv_cache_dtype_str", None) == ONLINE_INT8:
        if getattr(runner, "use_mla_backend", False):
            raise ValueError("--kv-cache-dtype int8: sgl-ascend serves the int8 KV cache for MHA/GQA attention "
                             "only; this is an MLA model. Drop the flag.")
        scheme = attach_online_kv_cache(runner.model, os.environ.get(SKIP_LAYERS_ENV))
    elif os.environ.get(SKIP_LAYERS_ENV):
        raise ValueError("--kv-cache-skip-layers selects layers of the online int8 KV cache: serve with "
                         "--kv-cache-dtype int8 (checkpoints with KV scales, C8, do not take it yet)")
    if scheme is None:
        if os.environ.get(KEEP_FIRST_ENV):
            raise ValueError("--kv-cache-keep-first keeps the first positions of an int8 KV cache in the model "
                             "dtype: serve with --kv-cache-dtype int8 or a C8 checkpoint, or drop the flag")
        return None
    if getattr(runner, "use_mla_backend", False):
        raise CheckpointError(
            f"the checkpoint's KV cache is quantized ({type(scheme).__name__}), but this is an MLA model, whose "
            "cache holds one compressed latent per token; sgl-ascend serves the int8 KV cache for MHA/GQA "
            "attention only. Quantize without the KV-cache step (C8 / FAQuant) to serve it.",
            file=DESCRIPTION_FILE, key="kv_cache_type")
    if runner.kv_cache_dtype_str not in ("auto", "int8"):
        raise ValueError(f"the checkpoint's KV cache is quantized ({type(scheme).__name__}, int8) but "
                         f"--kv-cache-dtype {runner.kv_cache_dtype_str} asks for another; drop the flag.")
    runner.kv_cache_dtype = scheme.cache_dtype
    runner.kv_cache_dtype_str = "int8"
    logger.info("sgl-ascend: KV cache stored as %s (%s)", scheme.cache_dtype, type(scheme).__name__)
    return None


def int8_kv_attention_backend(original, *args, model_runner, **kwargs):
    """AROUND hook of attention_backend_setup._build_full_attention_backend_from_str (every attention
    backend SGLang builds, prefill and decode)."""
    runner = model_runner
    if runner.kv_cache_dtype != torch.int8 or model_kv_scheme(runner.model) is None:
        return original(*args, model_runner=runner, **kwargs)
    from sgl_ascend.sglang.int8_kv_backend import AscendInt8KVBackend

    logger.info("sgl-ascend: attention backend AscendInt8KVBackend (int8 KV cache, page size %d)",
                runner.page_size)
    return AscendInt8KVBackend(runner)
