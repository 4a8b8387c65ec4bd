"""Which expert schemes serve a checkpoint's MoE layer: from the msModelSlim description, or from the
compressed-tensors `quantization_config` (parsed by the library)."""

import copy
import re

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.moe.method import FusedMoEMethod
from sgl_ascend.layers.moe.unquantized import UnquantizedExperts
from sgl_ascend.layers.moe.w4a4_dynamic import W4A4DynamicExperts
from sgl_ascend.layers.moe.w4a8_dynamic import W4A8DynamicExperts
from sgl_ascend.layers.moe.w8a8_dynamic import W8A8DynamicExperts

MODELSLIM_EXPERT_TYPES = ("FLOAT", "W8A8_DYNAMIC", "W4A8_DYNAMIC", "W4A4_DYNAMIC")


def moe_method_for_modelslim(config, prefix: str, params_dtype: torch.dtype = torch.bfloat16) -> FusedMoEMethod:
    """config: sgl_ascend.quant.modelslim.ModelSlimConfig; prefix: the MoE block, e.g. model.layers.3.mlp."""
    description, types = config.description, config.types
    kinds = {}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        name = f"{prefix}.experts.0.{proj}.weight"
        if name not in types:
            raise CheckpointError("the description has no entry for it, so the experts' scheme is unknown; "
                                  "the description does not match this model.", file=config.source, tensor=name)
        kinds[proj] = types[name]
        if kinds[proj] not in MODELSLIM_EXPERT_TYPES:
            raise CheckpointError(f"experts in {kinds[proj]} are not served; served: "
                                  f"{', '.join(MODELSLIM_EXPERT_TYPES)}.", file=config.source, tensor=name)
    if kinds["gate_proj"] != kinds["up_proj"]:
        raise CheckpointError(f"gate_proj is {kinds['gate_proj']} but up_proj is {kinds['up_proj']}; they are "
                              "fused into one grouped matmul and need one scheme.", file=config.source,
                              tensor=f"{prefix}.experts.0.up_proj.weight")
    clip_pattern = re.compile(re.escape(prefix) + r"\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.(bias|alpha)$")
    clip = any(clip_pattern.match(name) for name in types)

    def scheme(role, kind):
        if kind == "FLOAT":
            return UnquantizedExperts(role, params_dtype)
        if kind == "W8A8_DYNAMIC":
            return W8A8DynamicExperts(role, params_dtype)
        if kind == "W4A4_DYNAMIC":
            return W4A4DynamicExperts(role)
        return W4A8DynamicExperts(role, fmt="modelslim_legacy" if description.is_legacy else "modelslim",
                                  group_size=description.group_size, clip=clip)

    return FusedMoEMethod(scheme("w13", kinds["gate_proj"]), scheme("w2", kinds["down_proj"]))


def moe_method_for_compressed_tensors(quantization_config: dict, prefix: str) -> FusedMoEMethod:
    """W4A8 experts: int4 symmetric weights per channel or group (pack-quantized) with dynamic per-token int8
    activations. A config group may set `activation_use_clip` (read here, not a compressed-tensors
    field)."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils import match_name

    raw = copy.deepcopy(quantization_config)
    clip_groups = {name: bool(group.pop("activation_use_clip", False))
                   for name, group in raw.get("config_groups", {}).items()}
    try:
        config = QuantizationConfig.model_validate(raw)
    except Exception as exc:  # pydantic's ValidationError
        raise CheckpointError(f"malformed compressed-tensors quantization_config: {exc}",
                              file="config.json") from exc

    def scheme(role, proj):
        module = f"{prefix}.experts.0.{proj}"
        if any(match_name(module, target) for target in config.ignore or []):
            return UnquantizedExperts(role)
        for name, group in config.config_groups.items():
            if any(match_name(module, t) or t == "Linear" for t in group.targets):
                return _ct_scheme(role, group, config.format, clip_groups[name], module)
        return UnquantizedExperts(role)

    return FusedMoEMethod(scheme("w13", "gate_proj"), scheme("w2", "down_proj"))


def _ct_scheme(role, group, fmt, clip, module):
    w, a = group.weights, group.input_activations
    dynamic_int8 = (a is not None and a.num_bits == 8 and a.type == "int" and a.dynamic is True
                    and a.strategy == "token" and a.symmetric)
    int4 = w is not None and w.type == "int" and w.symmetric and w.num_bits == 4
    group_size = w.group_size if int4 and w.strategy == "group" else 0
    fmt = group.format or fmt
    if int4 and (w.strategy == "channel" or group_size) and dynamic_int8 and fmt == "pack-quantized":
        return W4A8DynamicExperts(role, fmt="compressed_tensors", group_size=group_size, clip=clip)
    raise CheckpointError(
        f"experts quantized as weights={w and w.model_dump(include={'num_bits', 'strategy', 'symmetric'})}, "
        f"input_activations={a and a.model_dump(include={'num_bits', 'strategy', 'dynamic'})}, format {fmt} "
        "are not served; served: int4 symmetric weights per channel or group (pack-quantized) with "
        "dynamic per-token int8 activations.", tensor=module)
