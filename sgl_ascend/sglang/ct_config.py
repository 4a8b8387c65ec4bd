"""SGLang QuantizationConfig for compressed-tensors checkpoints on NPU and CPU.

Parsing and the scheme decision live in `sgl_ascend.quant.compressed_tensors` (the library's own
QuantizationConfig); here each SGLang layer gets our linear scheme or fused-MoE method.
"""

import logging
from typing import Any, Dict, List, Optional

import torch
from sglang.srt.layers.quantization.base_config import QuantizationConfig

from sgl_ascend.layers.moe import moe_method_for_compressed_tensors
from sgl_ascend.layers.schemes import UnquantizedLinear
from sgl_ascend.quant.compressed_tensors import QUANT_METHOD, CompressedTensorsConfig
from sgl_ascend.sglang.linear_method import AscendLinearMethod
from sgl_ascend.sglang.moe_method import AscendFusedMoEMethod

logger = logging.getLogger(__name__)

# Keys SGLang adds to the checkpoint's quantization_config before from_config.
_SGLANG_KEYS = ("packed_modules_mapping", "hf_config", "requantization_method")


class AscendCompressedTensorsConfig(QuantizationConfig):
    def __init__(self, raw: Dict[str, Any]):
        super().__init__()
        self.raw = {k: v for k, v in raw.items() if k not in _SGLANG_KEYS}
        self.ct = CompressedTensorsConfig.from_dict(self.raw)
        self.shard_schemes: Dict[str, Any] = {}
        logger.info("sgl-ascend compressed-tensors config: format %s, config groups %s",
                    self.raw.get("format"), ", ".join(sorted(self.ct.groups)))

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> List[torch.dtype]:
        return [torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> List[str]:
        return []

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "AscendCompressedTensorsConfig":
        return cls(config)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant) -> Optional[str]:
        is_ct = isinstance(hf_quant_cfg, dict) and hf_quant_cfg.get("quant_method") == QUANT_METHOD
        if is_ct and user_quant in (None, QUANT_METHOD, "compressed_tensors"):
            return QUANT_METHOD
        return None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from sglang.srt.layers.linear import LinearBase
        from sglang.srt.layers.moe.fused_moe_triton import FusedMoE
        from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

        if isinstance(layer, LinearBase):
            scheme = self.ct.get_linear_scheme(prefix, layer)
            if isinstance(scheme, UnquantizedLinear):
                return UnquantizedLinearMethod()
            layer.scheme = scheme
            for shard in self.ct.shard_prefixes(prefix):
                self.shard_schemes[shard] = scheme
            return AscendLinearMethod(scheme)
        if isinstance(layer, FusedMoE):
            block = prefix[: -len(".experts")] if prefix.endswith(".experts") else prefix
            return AscendFusedMoEMethod(moe_method_for_compressed_tensors(self.raw, block))
        return None

    def is_ignored_tensor(self, name: str) -> bool:
        prefix, _, suffix = name.rpartition(".")
        scheme = self.shard_schemes.get(prefix)
        return scheme is not None and suffix in scheme.ignored_suffixes

    def get_scaled_act_names(self) -> List[str]:
        return []
