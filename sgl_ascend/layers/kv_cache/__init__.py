"""KV-cache schemes: how an attention layer's K and V are stored in the paged cache and read back.

A third scheme kind beside linear layers and fused-MoE experts (SchemeKey kind "kv_cache"). Each
scheme registers itself with `sgl_ascend.layers.registry.register_scheme` in its own file; importing
this package imports them all.
"""

import importlib
import pkgutil

from sgl_ascend.layers.kv_cache.base import KVCacheScheme
from sgl_ascend.layers.kv_cache.int8_static import StaticInt8KVCache

__all__ = ["KVCacheScheme", "StaticInt8KVCache"]


def _import_every_module() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_import_every_module()
