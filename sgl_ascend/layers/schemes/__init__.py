"""Linear schemes, one per file; each registers itself with `sgl_ascend.layers.registry.register_scheme`.

Importing this package imports every built-in linear scheme, so the registry is complete."""

from sgl_ascend.layers.schemes.base import LinearScheme, SchemeLinearMethod
from sgl_ascend.layers.schemes.ct_fp8_w8a16 import CTFP8W8A16Linear
from sgl_ascend.layers.schemes.ct_w4a8 import CTW4A8Linear
from sgl_ascend.layers.schemes.ct_w8a8_dynamic import CTW8A8DynamicTensorLinear
from sgl_ascend.layers.schemes.ct_w8a8_static import CTW8A8StaticLinear
from sgl_ascend.layers.schemes.ct_wna16 import CTWNA16Linear
from sgl_ascend.layers.schemes.unquantized import UnquantizedLinear
from sgl_ascend.layers.schemes.w4a4_dynamic import W4A4DynamicLinear
from sgl_ascend.layers.schemes.w4a8_dynamic import W4A8DynamicLinear
from sgl_ascend.layers.schemes.w8a8_dynamic import W8A8DynamicLinear
from sgl_ascend.layers.schemes.w8a8_static import W8A8StaticLinear
from sgl_ascend.layers.schemes.w8a16 import W8A16Linear

__all__ = ["CTWNA16Linear", "CTW8A8DynamicTensorLinear",
           "CTW8A8StaticLinear", "CTFP8W8A16Linear", "CTW4A8Linear",
           "LinearScheme", "SchemeLinearMethod",
           "UnquantizedLinear", "W4A4DynamicLinear", "W4A8DynamicLinear", "W8A8DynamicLinear", "W8A8StaticLinear", "W8A16Linear"]


def _import_every_module() -> None:
    """Every module of this package, so a new linear scheme file registers itself without an edit here."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_import_every_module()
