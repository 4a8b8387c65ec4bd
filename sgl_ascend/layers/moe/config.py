"""Which expert schemes serve a checkpoint's MoE layer: the format resolvers in `sgl_ascend.quant` give
one SchemeKey for gate/up and one for down; the registry (`sgl_ascend.layers.registry`) builds them.

The expert scheme classes are registered here, in one place, with the factory that reads their key.
(After the loading rework lands, these registrations move onto the classes as decorators, like the
linear schemes'.)
"""

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.moe.method import FusedMoEMethod
from sgl_ascend.layers.moe.unquantized import UnquantizedExperts
from sgl_ascend.layers.moe.w4a4_dynamic import W4A4DynamicExperts
from sgl_ascend.layers.moe.w4a8_dynamic import W4A8DynamicExperts
from sgl_ascend.layers.moe.w8a8_dynamic import W8A8DynamicExperts
from sgl_ascend.layers.registry import create, register_scheme
from sgl_ascend.quant import compressed_tensors as ct
from sgl_ascend.quant.scheme_key import COMPRESSED_TENSORS, EXPERTS, MSMODELSLIM, SchemeKey


def _with_dtype(cls):
    return lambda key, role, params_dtype=torch.bfloat16, **_: cls(role, params_dtype)


def _w4a8_modelslim(key: SchemeKey, role: str, **_):
    return W4A8DynamicExperts(role, fmt="modelslim_legacy" if key.param("legacy") else "modelslim",
                              group_size=key.param("group_size", 0), clip=key.param("clip", False))


def _w4a8_compressed_tensors(key: SchemeKey, role: str, module: str = "", **_):
    group_size = key.param("group_size") or 0
    if not (key.param("packed") and (key.param("strategy") == "channel" or group_size)):
        raise CheckpointError(
            f"experts quantized as W4A8 with {key.param('strategy')} weights (group_size {key.param('group_size')}), "
            f"format {key.param('storage')} are not served; served: int4 symmetric weights per channel or group "
            "(pack-quantized) with dynamic per-token int8 activations.", tensor=module)
    return W4A8DynamicExperts(role, fmt="compressed_tensors", group_size=group_size, clip=key.param("clip", False))


register_scheme(EXPERTS, COMPRESSED_TENSORS, "FLOAT",
                factory=lambda key, role, **_: UnquantizedExperts(role))(UnquantizedExperts)
register_scheme(EXPERTS, MSMODELSLIM, "FLOAT", factory=_with_dtype(UnquantizedExperts))(UnquantizedExperts)
register_scheme(EXPERTS, MSMODELSLIM, "W8A8_DYNAMIC", factory=_with_dtype(W8A8DynamicExperts))(W8A8DynamicExperts)
register_scheme(EXPERTS, MSMODELSLIM, "W4A8_DYNAMIC", factory=_w4a8_modelslim)(W4A8DynamicExperts)
register_scheme(EXPERTS, MSMODELSLIM, "W4A4_DYNAMIC",
                factory=lambda key, role, **_: W4A4DynamicExperts(role))(W4A4DynamicExperts)
register_scheme(EXPERTS, COMPRESSED_TENSORS, ct.W4A8, factory=_w4a8_compressed_tensors)(W4A8DynamicExperts)


def moe_method_for_modelslim(config, prefix: str, params_dtype: torch.dtype = torch.bfloat16) -> FusedMoEMethod:
    """config: sgl_ascend.quant.modelslim.ModelSlimConfig; prefix: the MoE block, e.g. model.layers.3.mlp."""
    w13, w2 = config.expert_keys(prefix)
    return FusedMoEMethod(
        create(w13, file=config.source, tensor=f"{prefix}.experts.0.gate_proj.weight", what=f"experts {prefix}",
               role="w13", params_dtype=params_dtype),
        create(w2, file=config.source, tensor=f"{prefix}.experts.0.down_proj.weight", what=f"experts {prefix}",
               role="w2", params_dtype=params_dtype))


def moe_method_for_compressed_tensors(quantization_config: dict, prefix: str) -> FusedMoEMethod:
    """compressed-tensors experts (W4A8: int4 symmetric weights per channel or group, pack-quantized, with
    dynamic per-token int8 activations; or unquantized)."""
    keys = ct.expert_keys(quantization_config, prefix)
    schemes = []
    for role, proj, key in (("w13", "gate_proj", keys[0]), ("w2", "down_proj", keys[1])):
        module = f"{prefix}.experts.0.{proj}"
        schemes.append(create(key, tensor=module, what=f"experts {module}", role=role, module=module))
    return FusedMoEMethod(*schemes)
