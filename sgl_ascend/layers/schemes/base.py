"""The config -> method protocol every linear scheme follows (vLLM's compressed-tensors style).

A scheme owns one layer's tensors: `create_weights` registers them as ShardedParameters in the
checkpoint's layout, `process_weights_after_loading` turns them, once and in place, into the layout
the NPU op wants, and `apply_weights` computes through `sgl_ascend.ops.ops`.
"""

from abc import ABC, abstractmethod
from typing import List, Optional

import torch


class LinearScheme(ABC):
    # SGLang routes layers whose scheme sets this through weight_loader_v2, i.e. through the
    # load_* methods of our ShardedParameters.
    requires_weight_loader_v2 = True

    #: checkpoint tensor suffixes this scheme knowingly does not load (say why where set).
    ignored_suffixes: tuple = ()

    #: the checkpoint writer already folded a FLOAT bias of this layer into the scheme's own tensors
    folds_float_bias = False

    #: the scheme reads msModelSlim's top-level description group_size (inspect checks it against K)
    reads_group_size = False

    #: key param -> the class `from_key` hands such keys to (a layout the format writes under this
    #: class's name, e.g. per-group scales); listed by `sgl-ascend schemes`
    variants: dict = {}

    @classmethod
    def from_key(cls, key, **context) -> "LinearScheme":
        """The scheme for a resolved SchemeKey (sgl_ascend.quant.scheme_key); override to read its params."""
        return cls()

    @abstractmethod
    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: List[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None: ...

    @abstractmethod
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None: ...

    @abstractmethod
    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor,
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor: ...

    @abstractmethod
    def theoretical_bytes(self, input_size_per_partition: int, output_size_per_partition: int) -> int:
        """Bytes the processed layer should hold (values + scales), for memory checks and `inspect`."""


class SchemeLinearMethod:
    """The quant-method object a linear layer holds; it forwards to the layer's scheme.

    SGLang's LinearBase calls create_weights / apply / process_weights_after_loading on it and reads
    `layer.scheme` to pick weight_loader_v2.
    """

    def __init__(self, scheme: LinearScheme):
        self.scheme = scheme

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, **extra_weight_attrs):
        layer.scheme = self.scheme
        self.scheme.create_weights(layer, input_size_per_partition, output_partition_sizes, input_size,
                                   output_size, params_dtype, **extra_weight_attrs)

    def process_weights_after_loading(self, layer):
        self.scheme.process_weights_after_loading(layer)

    def apply(self, layer, x, bias=None):
        return self.scheme.apply_weights(layer, x, bias)
