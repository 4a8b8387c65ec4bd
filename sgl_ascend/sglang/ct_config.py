"""SGLang QuantizationConfig for compressed-tensors checkpoints on NPU and CPU.

Parsing and the scheme decision live in `sgl_ascend.quant.compressed_tensors` (the library's own
QuantizationConfig); here each SGLang layer gets our linear scheme or fused-MoE method.
"""

import logging
from typing import Any, Dict, List, Optional

import torch

from sgl_ascend.layers.moe import moe_method_for_compressed_tensors
from sgl_ascend.layers.registry import check_served, kv_cache_scheme, linear_scheme, served_by
from sgl_ascend.quant.compressed_tensors import QUANT_METHOD, CompressedTensorsConfig
from sgl_ascend.sglang.config_base import AscendQuantConfigBase

logger = logging.getLogger(__name__)

# Keys SGLang adds to the checkpoint's quantization_config before from_config.
_SGLANG_KEYS = ("packed_modules_mapping", "hf_config", "requantization_method")


class AscendCompressedTensorsConfig(AscendQuantConfigBase):
    def __init__(self, raw: Dict[str, Any]):
        super().__init__()
        self.raw = {k: v for k, v in raw.items() if k not in _SGLANG_KEYS}
        self.ct = check_served(CompressedTensorsConfig.from_dict(self.raw))
        self.kv_scheme = kv_cache_scheme(self.ct)
        logger.info("sgl-ascend compressed-tensors config: format %s, config groups %s; served by %s",
                    self.raw.get("format"), ", ".join(sorted(self.ct.groups)), served_by(self.ct.group_keys()))

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @staticmethod
    def get_config_filenames() -> List[str]:
        return []

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant) -> Optional[str]:
        is_ct = isinstance(hf_quant_cfg, dict) and hf_quant_cfg.get("quant_method") == QUANT_METHOD
        if is_ct and user_quant in (None, QUANT_METHOD, "compressed_tensors"):
            return QUANT_METHOD
        return None

    def linear_scheme(self, prefix: str, layer: torch.nn.Module):
        return linear_scheme(self.ct, prefix, layer)

    def shard_prefixes(self, prefix: str) -> List[str]:
        return self.ct.shard_prefixes(prefix)

    def moe_method(self, block_prefix: str, layer: torch.nn.Module):
        return moe_method_for_compressed_tensors(self.raw, block_prefix, layer.params_dtype)
