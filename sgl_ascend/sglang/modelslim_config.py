"""SGLang QuantizationConfigs for msModelSlim checkpoints: `modelslim` and `w4a4_int4`.

Both read `quant_model_description.json` through `sgl_ascend.quant.modelslim` and hand every linear
layer one of our schemes. `w4a4_int4` is the explicit flag for W4A4_DYNAMIC checkpoints (int4
weights and int4 per-token activations); it refuses checkpoints of another scheme at start-up.
"""

import logging
import os
from typing import Any, Dict, List, Optional

import torch

from sgl_ascend.layers.moe import moe_method_for_modelslim
from sgl_ascend.layers.registry import check_served, kv_cache_scheme, linear_scheme, served_by
from sgl_ascend.models.norm_bias import enable_norm_bias, needs_norm_bias
from sgl_ascend.quant.modelslim import (DESCRIPTION_FILE, ModelSlimConfig, flatquant_left_sizes, group_wise_layers,
                                      parse_description)
from sgl_ascend.sglang.config_base import AscendQuantConfigBase

# the one msModelSlim type SGLang's `--quantization w4a4_int4` flag stands for: the flag's meaning, not
# scheme knowledge the registry holds (it maps names to classes, not flags to names)
W4A4_TYPE = "W4A4_DYNAMIC"

logger = logging.getLogger(__name__)


def is_modelslim(hf_quant_cfg) -> bool:
    # SGLang's ModelConfig tags the description it found with quant_method "modelslim".
    return isinstance(hf_quant_cfg, dict) and hf_quant_cfg.get("quant_method") == "modelslim"


class AscendModelSlimConfig(AscendQuantConfigBase):
    def __init__(self, description: Dict[str, Any]):
        super().__init__()
        raw = {k: v for k, v in description.items() if k not in ("quant_method", "packed_modules_mapping",
                                                                    "hf_config")}
        model_dir = _model_dir(description)
        self.modelslim = check_served(ModelSlimConfig(parse_description(raw), DESCRIPTION_FILE,
                                                      group_wise_layers(model_dir) if model_dir else None,
                                                      flatquant_left_sizes(model_dir) if model_dir else None))
        self.kv_scheme = kv_cache_scheme(self.modelslim)
        if needs_norm_bias(self.modelslim.types):
            enable_norm_bias()
        description = self.modelslim.description
        # Printed by the process that builds the model (SGLang's scheduler), so the log shows which
        # config served the checkpoint there.
        logger.info("sgl-ascend %s config: msModelSlim checkpoint, model_quant_type=%s, writer version %s%s; "
                    "served by %s", self.get_name(), description.model_quant_type, description.version,
                    ", anti-outlier norm biases" if needs_norm_bias(self.modelslim.types) else "",
                    served_by(key for key, _ in self.modelslim.tensor_keys()))

    @classmethod
    def get_name(cls) -> str:
        return "modelslim"

    @staticmethod
    def get_config_filenames() -> List[str]:
        return [DESCRIPTION_FILE]

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant) -> Optional[str]:
        if is_modelslim(hf_quant_cfg) and user_quant in (None, "modelslim"):
            return "modelslim"
        return None

    def linear_scheme(self, prefix: str, layer: torch.nn.Module):
        return linear_scheme(self.modelslim, prefix, decode_node=_decode_node())

    def shard_prefixes(self, prefix: str) -> List[str]:
        return self.modelslim.shard_prefixes(prefix)

    def has_float_bias(self, prefix: str) -> bool:
        return self.modelslim.has_float_bias(prefix)

    def moe_method(self, block_prefix: str, layer: torch.nn.Module):
        return moe_method_for_modelslim(self.modelslim, block_prefix, layer.params_dtype)


class W4A4Int4Config(AscendModelSlimConfig):
    """`--quantization w4a4_int4`: an msModelSlim checkpoint whose scheme is W4A4_DYNAMIC."""

    @classmethod
    def get_name(cls) -> str:
        return "w4a4_int4"

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant) -> Optional[str]:
        if user_quant != "w4a4_int4":
            return None
        if not is_modelslim(hf_quant_cfg):
            method = hf_quant_cfg.get("quant_method") if isinstance(hf_quant_cfg, dict) else None
            raise ValueError(
                f"--quantization w4a4_int4 serves msModelSlim W4A4_DYNAMIC checkpoints (with "
                f"{DESCRIPTION_FILE}); this checkpoint is quant_method={method!r}. Drop the flag to "
                "serve it with its own method.")
        check_w4a4(hf_quant_cfg)
        return "w4a4_int4"


def check_w4a4(description: Dict[str, Any]) -> None:
    kinds = {v for k, v in description.items() if isinstance(v, str) and k.endswith(".weight")}
    model_type = description.get("model_quant_type")
    if model_type != W4A4_TYPE and W4A4_TYPE not in kinds:
        found = ", ".join(sorted(kinds - {"FLOAT"})) or "no quantized layers"
        raise ValueError(
            f"--quantization w4a4_int4 needs a W4A4_DYNAMIC checkpoint, but {DESCRIPTION_FILE} says "
            f"model_quant_type={model_type!r} with layers {found}. Serve it without --quantization "
            "(sgl-ascend picks the scheme from the description) or with --quantization modelslim.")


def _decode_node() -> bool:
    """A PD-disaggregated decode server (`--disaggregation-mode decode`): W8A8_MIX serves its static path
    there, as vllm-ascend does on a KV consumer; every other server runs the dynamic one."""
    from sglang.srt.runtime_context import get_disagg

    try:
        return get_disagg().disaggregation_mode == "decode"
    except ValueError:  # not published: a model built outside a server (tests, tools) is not a decode node
        return False


def _model_dir(description: Dict[str, Any]) -> Optional[str]:
    """The checkpoint folder, whose safetensors headers tell per-group layers from per-channel ones (the
    description cannot): the hf_config SGLang hands along when the description came through config.json,
    else the server's model path (SGLang read the description file from that local folder)."""
    path = getattr(description.get("hf_config"), "_name_or_path", None)
    if not (path and os.path.isdir(path)):
        from sglang.srt.runtime_context import get_server_args

        try:
            path = get_server_args().model_path
        except ValueError:  # not published: a config built outside a server (tests, tools)
            path = None
    return path if path and os.path.isdir(path) else None
