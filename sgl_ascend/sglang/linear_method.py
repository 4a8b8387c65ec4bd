"""SGLang's LinearMethodBase around our scheme protocol (`SchemeLinearMethod`)."""

from typing import List, Optional

import torch
from sglang.srt.layers.quantization.base_config import LinearMethodBase

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.parameters import ShardedParameter
from sgl_ascend.quant.modelslim import DESCRIPTION_FILE
from sgl_ascend.layers.schemes.base import LinearScheme, SchemeLinearMethod


class AscendLinearMethod(LinearMethodBase):
    """Forwards to the layer's scheme; gives each of its ShardedParameters SGLang's weight loader.

    The layer's `scheme` attribute is set by the config's get_quant_method, before SGLang's
    LinearBase picks `weight_loader_v2`, which calls our parameters' load_* methods.
    """

    def __init__(self, scheme: LinearScheme):
        self.method = SchemeLinearMethod(scheme)

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: List[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        weight_loader = extra_weight_attrs.get("weight_loader")
        self.method.create_weights(layer, input_size_per_partition, output_partition_sizes, input_size,
                                   output_size, params_dtype)
        for param in layer.parameters(recurse=False):
            if isinstance(param, ShardedParameter):
                param.weight_loader = weight_loader

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        scheme = self.method.scheme
        if getattr(layer, "checkpoint_float_bias", False) and getattr(layer, "bias", None) is None \
                and not scheme.folds_float_bias:
            # The model built this layer without a bias, so its loader skipped the checkpoint's.
            raise CheckpointError(
                f"the checkpoint has a FLOAT bias for this {type(scheme).__name__} layer (anti-outlier "
                "smoothing) but SGLang's model has no bias on it, so it would be dropped silently. "
                "sgl-ascend serves such biases folded into W8A8 quant_bias only; re-export the "
                "checkpoint without smoothing biases on dynamic/weight-only layers.",
                file=DESCRIPTION_FILE, tensor=f"{layer.prefix}.bias")
        self.method.process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
        return self.method.apply(layer, x, bias)
