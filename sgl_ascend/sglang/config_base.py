"""What our SGLang QuantizationConfigs share: SGLang's class-level answers, and handing each layer
our linear scheme or fused-MoE method."""

from typing import Dict, List

import torch
from sglang.srt.layers.quantization.base_config import QuantizationConfig

from sgl_ascend.layers.schemes import UnquantizedLinear
from sgl_ascend.sglang.kv_cache import attach_kv_cache_methods, attention_tensor_name
from sgl_ascend.sglang.linear_method import AscendLinearMethod
from sgl_ascend.sglang.moe_method import AscendFusedMoEMethod


class AscendQuantConfigBase(QuantizationConfig):
    """Subclasses provide `linear_scheme(prefix, layer)`, `shard_prefixes(prefix)` and
    `moe_method(block_prefix, layer)`; `has_float_bias(prefix)` where a format can carry one, and set
    `kv_scheme` (sgl_ascend.layers.kv_cache) where the checkpoint quantizes its KV cache."""

    def __init__(self):
        super().__init__()
        self.kv_scheme = None
        # checkpoint shard prefix -> scheme, filled as SGLang builds the layers; the weight filter
        # uses it to drop tensors a scheme knowingly ignores.
        self.shard_schemes: Dict[str, object] = {}

    @classmethod
    def get_supported_act_dtypes(cls) -> List[torch.dtype]:
        return [torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @classmethod
    def from_config(cls, config):
        return cls(config)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from sglang.srt.layers.linear import LinearBase
        from sglang.srt.layers.moe.fused_moe_triton import FusedMoE
        from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

        if isinstance(layer, LinearBase):
            scheme = self.linear_scheme(prefix, layer)
            if isinstance(scheme, UnquantizedLinear):
                return UnquantizedLinearMethod()
            layer.scheme = scheme
            layer.prefix = prefix  # names the layer's tensors in CheckpointErrors
            layer.checkpoint_float_bias = self.has_float_bias(prefix)
            for shard in self.shard_prefixes(prefix):
                self.shard_schemes[shard] = scheme
            return AscendLinearMethod(scheme)
        if isinstance(layer, FusedMoE):
            block = prefix[: -len(".experts")] if prefix.endswith(".experts") else prefix
            return AscendFusedMoEMethod(self.moe_method(block, layer))
        return None

    def has_float_bias(self, prefix: str) -> bool:
        return False

    def is_ignored_tensor(self, name: str) -> bool:
        """A checkpoint tensor the layer's scheme knowingly does not load (see LinearScheme)."""
        prefix, _, suffix = name.rpartition(".")
        scheme = self.shard_schemes.get(prefix)
        return scheme is not None and suffix in scheme.ignored_suffixes

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Before the weights load: attention layers get the KV-cache scheme's scales."""
        if self.kv_scheme is not None:
            attach_kv_cache_methods(model, self.kv_scheme)

    def checkpoint_to_model_name(self, name: str) -> str:
        """KV-cache scales are stored under k_proj / v_proj or the attention module; the model takes them
        on its RadixAttention."""
        return attention_tensor_name(name) if self.kv_scheme is not None else name

    def get_scaled_act_names(self) -> List[str]:
        return []
