"""compressed-tensors W4A8 linears: int4 symmetric weights per channel or per group, declared with
dynamic per-token int8 activations.

Served as msModelSlim's dense W4A8 is (schemes/w4a8_kernel.py, w4a8_dynamic.py): weight-only int4 on
npu_weight_quant_batchmatmul, as vllm-ascend serves dense W4A8; the dense single-group grouped matmul
is not legal on the NPU. Accuracy consequence: the declared int8 activation quantization is not
applied (the layer is closer to the float model than the checkpoint's simulation), and the weight
scales are rounded once to the activation dtype, which the kernel takes.

Checkpoint tensors are WNA16's (ct_wna16.py: weight_packed + weight_shape, or int8 `weight` one value
per byte; weight_scale [N, 1] or [N, K/g]), packed into the kernel layout while they load, and after
loading the layer is a symmetric int4 WNA16 layer: weight int32 [K, N/8], weight_scale [N] or
[K/g, N] in the activation dtype.
"""

from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.layers.schemes.ct_wna16 import CTWNA16Linear
from sgl_ascend.layers.schemes.w4a8_kernel import log_weight_only
from sgl_ascend.quant.scheme_key import COMPRESSED_TENSORS, LINEAR


@register_scheme(LINEAR, COMPRESSED_TENSORS, "W4A8")
class CTW4A8Linear(CTWNA16Linear):
    @classmethod
    def from_key(cls, key, **context):
        return cls(key.param("group_size", 0), packed=key.param("packed", False))

    def __init__(self, group_size: int, packed: bool):
        super().__init__(4, group_size, symmetric=True, packed=packed)

    def create_weights(self, layer, *args, **kwargs):
        super().create_weights(layer, *args, **kwargs)
        log_weight_only(layer, "compressed-tensors")
