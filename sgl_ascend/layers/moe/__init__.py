"""Quantized fused-MoE layers: one expert scheme per file, paired into a FusedMoEMethod per layer."""

from sgl_ascend.layers.moe.base import ExpertScheme, TensorSpec
from sgl_ascend.layers.moe.config import moe_method_for_compressed_tensors, moe_method_for_modelslim
from sgl_ascend.layers.moe.layer import MoELayer, build_moe, check_moe_checkpoint, load_moe
from sgl_ascend.layers.moe.method import FusedMoEMethod, apply_moe
from sgl_ascend.layers.moe.unquantized import UnquantizedExperts
from sgl_ascend.layers.moe.w4a4_dynamic import W4A4DynamicExperts
from sgl_ascend.layers.moe.w4a8_dynamic import W4A8DynamicExperts
from sgl_ascend.layers.moe.w8a8_dynamic import W8A8DynamicExperts

__all__ = ["ExpertScheme", "TensorSpec", "FusedMoEMethod", "apply_moe", "MoELayer", "build_moe", "load_moe",
           "check_moe_checkpoint", "moe_method_for_modelslim", "moe_method_for_compressed_tensors",
           "UnquantizedExperts", "W4A4DynamicExperts", "W4A8DynamicExperts", "W8A8DynamicExperts"]


def _import_every_module() -> None:
    """Every module of this package, so a new expert scheme file registers itself without an edit here."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_import_every_module()
