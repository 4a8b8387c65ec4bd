"""Lets SGLang's CPU engine start on a CPU-only host where the PyPI `sglang-kernel` wheel cannot load.

The `sglang-kernel` wheel ships CUDA builds only: `import sgl_kernel` fails without libcuda. SGLang's
CPU path still imports a few `sgl_kernel` names at start-up (`copy_all_layer_kv_cache_cpu`,
`assign_req_to_token_pool_cpu`, ...) and, for the models we serve at tp=1 with the torch_native
attention backend, calls none of them. On such a host only, `activate()` puts `cpu_shim/` first on
`sys.path`; its `sgl_kernel` package resolves every name to a function that raises
`CpuCompatError` naming the kernel when called, so a path that really needs a kernel fails loudly
instead of computing something wrong. `multiprocessing` spawn hands `sys.path` to SGLang's
scheduler and detokenizer processes, so they see the same package before importing SGLang.

Never active where CUDA or torch_npu is present, or where the real `sgl_kernel` imports.

`hooks()` lists the patches that let SGLang's multi-process CPU engine (--tp/--ep-size/--dp on
gloo) start on a CPU-only host; the plugin registers them there only, each logs once per process
when it first changes something:
- `bind_threads_per_rank`: without SGLANG_CPU_OMP_THREADS_BIND SGLang wants one NUMA node per rank
  and asserts otherwise. With more ranks than nodes, the cores this process may use are split
  between the ranks (wrapping when there are fewer cores than ranks), and the rank's threads are
  pinned to its share (SGLang's own pinning needs sgl_kernel's AMX/arm64 build).
- `no_pynccl_on_gloo`: `init_model_parallel_group` asks for PyNccl whenever the host is neither NPU
  nor XPU; on a gloo (CPU) group that fails with "Expected a cuda device, but got: cpu". Gloo
  groups get SGLang's torch.distributed path instead.
- `cpu_graph_fill_value`: DP attention asks the attention backend for
  `get_cpu_graph_seq_len_fill_value`, which torch_native lacks; 1, as SGLang's CPU graph runner uses.
- `refuse_padded_heads`: where --tp does not divide the attention or KV head counts, SGLang's CPU
  engine pads the heads (and the weights, in its own loaders); sgl-ascend's quantized loaders slice
  the checkpoint as it is, so such a --tp is refused before the model is built. (On NPU, SGLang
  replicates KV heads instead, which our loaders do.)
The env var SGL_ASCEND_DISABLE_CPU_COMPAT=1 turns the shim and these hooks off.
"""

import importlib
import importlib.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

SHIM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_shim")
ENV_DISABLE = "SGL_ASCEND_DISABLE_CPU_COMPAT"


class CpuCompatError(RuntimeError):
    pass


def missing_kernel(name: str):
    """The stand-in for `sgl_kernel.<name>`: importable, raises when called."""

    def kernel(*args, **kwargs):
        raise CpuCompatError(
            f"sgl_kernel.{name} was called, but sgl_kernel could not load on this CPU-only host and "
            "sgl-ascend's CPU compatibility layer only lets SGLang import it. This model/flag "
            "combination needs the real kernel: serve with --attention-backend torch_native, "
            "tp=1, or install an sgl-kernel build for CPU.")

    kernel.__name__ = kernel.__qualname__ = name
    kernel.__module__ = "sgl_kernel"
    return kernel


def _cpu_only_host() -> bool:
    import torch

    if torch.cuda.is_available() or importlib.util.find_spec("torch_npu") is not None:
        return False
    return not (hasattr(torch, "xpu") and torch.xpu.is_available())


def _real_kernel_error():
    """None when the real sgl_kernel imports, else the reason it does not."""
    if importlib.util.find_spec("sgl_kernel") is None:
        return "sgl_kernel is not installed"
    try:
        importlib.import_module("sgl_kernel")
        return None
    except (ImportError, OSError) as exc:
        # A failed package import can leave its submodules behind; the shim must own the name.
        for name in [m for m in sys.modules if m == "sgl_kernel" or m.startswith("sgl_kernel.")]:
            del sys.modules[name]
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def enabled() -> bool:
    """The hooks below apply: a CPU-only host, not turned off."""
    return os.environ.get(ENV_DISABLE) != "1" and _cpu_only_host()


_logged = set()


def _log_once(key: str, message: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.warning("sgl-ascend CPU compatibility: " + message, *args)


def rank_cores(cores, world_size: int):
    """`world_size` '|'-separated core lists splitting `cores` evenly (SGLANG_CPU_OMP_THREADS_BIND form);
    with fewer cores than ranks, ranks share cores round-robin."""
    cores = sorted(cores)
    if len(cores) < world_size:
        return "|".join(str(cores[i % len(cores)]) for i in range(world_size))
    per, extra = divmod(len(cores), world_size)
    groups, start = [], 0
    for rank in range(world_size):
        size = per + (rank < extra)
        groups.append(",".join(map(str, cores[start:start + size])))
        start += size
    return "|".join(groups)


def bind_threads_per_rank(original, *args, numa_index: int, world_size: int, **kwargs):
    """AROUND sglang.srt.utils.numa_utils.init_threads_binding (see the module docstring)."""
    from sglang.srt.utils.numa_utils import get_cpu_ids_by_node

    if "SGLANG_CPU_OMP_THREADS_BIND" in os.environ or world_size <= len(get_cpu_ids_by_node()):
        return original(*args, numa_index=numa_index, world_size=world_size, **kwargs)
    import torch

    bind = rank_cores(os.sched_getaffinity(0), world_size)
    # Set for this process only: every rank computes the same split from the same cores.
    os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = bind
    _log_once("bind", "SGLANG_CPU_OMP_THREADS_BIND unset and %d ranks on fewer NUMA nodes; using %s "
              "(set it to choose the cores yourself)", world_size, bind)
    cpuid = original(*args, numa_index=numa_index, world_size=world_size, **kwargs)
    mine = sorted({int(c) for c in cpuid.split(",")})
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))
    return cpuid


def no_pynccl_on_gloo(original, *args, **kwargs):
    """AROUND sglang.srt.distributed.parallel_state.init_model_parallel_group (see the module docstring)."""
    backend = kwargs.get("backend", args[2] if len(args) > 2 else None)
    if str(backend) == "gloo" and kwargs.get("use_pynccl") is not False:
        _log_once("pynccl", "process groups on gloo (CPU) use torch.distributed, not PyNccl")
        if len(args) > 3:  # use_pynccl given positionally
            args = (*args[:3], False, *args[4:])
        else:
            kwargs["use_pynccl"] = False
    return original(*args, **kwargs)


def cpu_graph_fill_value(result, backend, *args, **kwargs):
    """AFTER TorchNativeAttnBackend.__init__ (see the module docstring)."""
    if not hasattr(backend, "get_cpu_graph_seq_len_fill_value"):
        _log_once("fill", "torch_native attention: get_cpu_graph_seq_len_fill_value = 1 (DP attention pads batches with it)")
        backend.get_cpu_graph_seq_len_fill_value = lambda: 1
    return result


OUR_QUANTIZATION = ("modelslim", "w4a4_int4", "compressed-tensors")


def refuse_padded_heads(original, model_config, load_config, tp_size, *args, **kwargs):
    """AROUND sglang.srt.configs.update_config.adjust_config_with_unaligned_cpu_tp (see the module docstring)."""
    heads, kv_heads = model_config.num_attention_heads, model_config.get_total_num_kv_heads()
    if getattr(model_config, "quantization", None) in OUR_QUANTIZATION and (heads % tp_size or kv_heads % tp_size):
        raise ValueError(
            f"--tp {tp_size} does not divide this model's {heads} attention / {kv_heads} KV heads. SGLang's CPU "
            f"engine would pad the heads, which sgl-ascend's {model_config.quantization} loaders do not do. On CPU "
            f"use a --tp dividing both (here: {', '.join(str(t) for t in range(1, kv_heads + 1) if heads % t == 0 and kv_heads % t == 0)}); "
            "on NPU, SGLang replicates KV heads instead and any --tp dividing the attention heads is served.")
    return original(model_config, load_config, tp_size, *args, **kwargs)


def hooks():
    """(target, hook, hook type name) of the CPU patches, for the plugin to register."""
    return [("sglang.srt.utils.numa_utils.init_threads_binding", bind_threads_per_rank, "AROUND"),
            ("sglang.srt.distributed.parallel_state.init_model_parallel_group", no_pynccl_on_gloo, "AROUND"),
            ("sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.__init__",
             cpu_graph_fill_value, "AFTER"),
            ("sglang.srt.configs.update_config.adjust_config_with_unaligned_cpu_tp", refuse_padded_heads, "AROUND")]


def is_active() -> bool:
    return SHIM_DIR in sys.path


def activate() -> bool:
    """Install the shim if (and only if) this is a CPU-only host whose sgl_kernel cannot load."""
    if is_active():
        return True
    if os.environ.get(ENV_DISABLE) == "1" or not _cpu_only_host():
        return False
    reason = _real_kernel_error()
    if reason is None:
        return False
    sys.path.insert(0, SHIM_DIR)
    logger.warning("sgl-ascend CPU compatibility active: the real sgl_kernel cannot load here (%s); "
                   "SGLang imports stand-ins that raise if called (see sgl_ascend/sglang/cpu_compat.py). "
                   "Set %s=1 to turn this off.", reason, ENV_DISABLE)
    return True
