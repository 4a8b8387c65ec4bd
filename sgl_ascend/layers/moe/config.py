"""Which expert schemes serve a checkpoint's MoE layer: the format resolvers in `sgl_ascend.quant` give
one SchemeKey for gate/up and one for down; the registry (`sgl_ascend.layers.registry`) builds them
(`cls.from_key(key, role=..., params_dtype=...)`). Each expert scheme class registers itself with a
decorator in its own file, as the linear schemes do.
"""

import torch

from sgl_ascend.layers.moe.method import FusedMoEMethod
from sgl_ascend.layers.moe.mixed import MixedExpertsMethod
from sgl_ascend.layers.registry import create
from sgl_ascend.quant import compressed_tensors as ct


def moe_method_for_modelslim(config, prefix: str, params_dtype: torch.dtype = torch.bfloat16):
    """config: sgl_ascend.quant.modelslim.ModelSlimConfig; prefix: the MoE block, e.g. model.layers.3.mlp.
    A FusedMoEMethod, or for a block whose experts mix schemes a MixedExpertsMethod over one per scheme."""
    groups = []
    for (w13, w2), experts in config.expert_groups(prefix):
        first = f"{prefix}.experts.{experts[0]}"
        method = FusedMoEMethod(
            create(w13, file=config.source, tensor=f"{first}.gate_proj.weight", what=f"experts {prefix}",
                   role="w13", params_dtype=params_dtype),
            create(w2, file=config.source, tensor=f"{first}.down_proj.weight", what=f"experts {prefix}",
                   role="w2", params_dtype=params_dtype))
        groups.append((method, experts, f"{w13.name}+{w2.name}" if w13.name != w2.name else w13.name))
    if len(groups) == 1:
        return groups[0][0]
    return MixedExpertsMethod(groups, block=prefix)


def moe_method_for_compressed_tensors(quantization_config: dict, prefix: str,
                                      params_dtype: torch.dtype = torch.bfloat16) -> FusedMoEMethod:
    """compressed-tensors experts (W4A8: int4 symmetric weights per channel or group, pack-quantized, with
    dynamic per-token int8 activations; W8A8 dynamic; or unquantized) in a model of `params_dtype`."""
    keys = ct.expert_keys(quantization_config, prefix)
    schemes = []
    for role, proj, key in (("w13", "gate_proj", keys[0]), ("w2", "down_proj", keys[1])):
        module = f"{prefix}.experts.0.{proj}"
        schemes.append(create(key, tensor=module, what=f"experts {module}", role=role, module=module,
                              params_dtype=params_dtype))
    return FusedMoEMethod(*schemes)
