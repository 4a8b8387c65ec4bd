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
