"""sgl-ascend's stand-in for sgl_kernel on CPU-only hosts (see sgl_ascend/sglang/cpu_compat.py).

Every attribute is a function that raises CpuCompatError when called.
"""

from sgl_ascend.sglang.cpu_compat import missing_kernel

SGL_ASCEND_CPU_COMPAT = True
__version__ = "0.0.0+sgl-ascend-cpu-compat"


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    kernel = missing_kernel(name)
    globals()[name] = kernel
    return kernel
