"""Linear schemes, one per file, and the table that maps checkpoint scheme names to them."""

from sgl_ascend.layers.schemes.base import LinearScheme, SchemeLinearMethod
from sgl_ascend.layers.schemes.unquantized import UnquantizedLinear
from sgl_ascend.layers.schemes.w4a4_dynamic import W4A4DynamicLinear
from sgl_ascend.layers.schemes.w4a8_dynamic import W4A8DynamicLinear
from sgl_ascend.layers.schemes.w8a8_dynamic import W8A8DynamicLinear
from sgl_ascend.layers.schemes.w8a8_static import W8A8StaticLinear
from sgl_ascend.layers.schemes.w8a16 import W8A16Linear

MODELSLIM_LINEAR_SCHEMES = {
    "FLOAT": UnquantizedLinear,
    "W8A8": W8A8StaticLinear,
    "W8A8_DYNAMIC": W8A8DynamicLinear,
    "W8A16": W8A16Linear,
    "W4A4_DYNAMIC": W4A4DynamicLinear,
    "W4A8_DYNAMIC": W4A8DynamicLinear,
}


def linear_scheme_for_modelslim(kind: str, config, prefix: str) -> LinearScheme:
    from sgl_ascend.errors import CheckpointError

    scheme_class = MODELSLIM_LINEAR_SCHEMES.get(kind)
    if scheme_class is None:
        raise CheckpointError(
            f"layer {prefix} is {kind}, which sgl-ascend does not serve as a linear layer; served: "
            f"{', '.join(MODELSLIM_LINEAR_SCHEMES)}.", file=config.source, tensor=f"{prefix}.weight")
    return scheme_class()


__all__ = ["LinearScheme", "SchemeLinearMethod", "MODELSLIM_LINEAR_SCHEMES", "linear_scheme_for_modelslim",
           "UnquantizedLinear", "W4A4DynamicLinear", "W4A8DynamicLinear", "W8A8DynamicLinear", "W8A8StaticLinear", "W8A16Linear"]
