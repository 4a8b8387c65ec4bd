"""W8A8 (static): int8 weights, int8 activations with a calibrated per-tensor scale and offset.

msModelSlim tensors: weight int8 [N,K]; input_scale / input_offset [1]; quant_bias int32 [N]
(= -input_offset * sum_k w, plus any float bias folded in); deq_scale [N] = input_scale * weight_scale,
fp32 for bf16 models or int64 carrying fp32 bits for fp16 models.
A FLOAT `bias` beside a W8A8 layer (anti-outlier smoothing, description `<prefix>.bias: FLOAT`) is
already inside quant_bias: msModelSlim writes quant_bias = round(bias / deq_scale) - input_offset *
sum_k w (checked on the v0 fixture, where adding the bias again doubles it). The layer loads that
bias (so the checkpoint is consumed whole), checks it is folded, and releases it.
The activation is quantized once per fused layer, so every shard of a fused qkv / gate_up layer must
carry the same input_scale and input_offset.
ASSUMPTION: npu_quantize broadcasts a one-element scale and offset over K (we do not repeat them to
length K, which upstream does and which costs 8*K bytes per layer for nothing).
"""

from typing import List, Optional

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.parameters import register, replace_data
from sgl_ascend.layers.schemes.base import LinearScheme
from sgl_ascend.layers.schemes.common import to_kernel_layout
from sgl_ascend.ops import ops
from sgl_ascend.ops.scales import decode_int64_scale


class W8A8StaticLinear(LinearScheme):
    # deq_scale already carries input_scale * weight_scale; the per-channel weight scale and offset
    # some writers add beside it are not needed by the kernel, so they are not loaded.
    ignored_suffixes = ("weight_scale", "weight_offset")
    # msModelSlim writes quant_bias = round(bias / deq_scale) - input_offset * sum_k w.
    folds_float_bias = True

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: List[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **_):
        n, k = sum(output_partition_sizes), input_size_per_partition
        shards = len(output_partition_sizes)
        self.deq_dtype = deq_dtype = torch.int64 if params_dtype == torch.float16 else torch.float32
        register(layer, "weight", torch.empty(n, k, dtype=torch.int8), output_dim=0, input_dim=1)
        register(layer, "input_scale", torch.empty(shards, dtype=torch.float32), per_shard=True)
        register(layer, "input_offset", torch.empty(shards, dtype=torch.float32), per_shard=True)
        register(layer, "quant_bias", torch.empty(n, dtype=torch.int32), output_dim=0, first_rank_only=True)
        register(layer, "deq_scale", torch.empty(n, dtype=deq_dtype), output_dim=0)

    def process_weights_after_loading(self, layer):
        for attr in ("input_scale", "input_offset"):
            values = getattr(layer, attr).data
            if not torch.all(values == values[0]):
                shown = ", ".join(f"{v:.6g}" for v in values.tolist())
                raise CheckpointError(
                    f"the fused shards carry different values [{shown}]; one activation "
                    "quantization serves the whole fused layer, so they must agree. Re-calibrate "
                    "with the shards sharing one input, or serve the layer unfused.",
                    tensor=getattr(layer, attr).tensor_name)
            replace_data(layer, attr, values[:1].clone())
        if getattr(layer, "bias", None) is not None:
            _check_bias_folded(layer)
            layer.bias = None  # counted once, inside quant_bias
        replace_data(layer, "weight", to_kernel_layout(layer.weight.data))

    def apply_weights(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
        x_q = ops.npu_quantize(x, layer.input_scale, layer.input_offset, torch.qint8, -1, True)
        # `bias` is None: a float bias lives in quant_bias (see process_weights_after_loading).
        return ops.npu_quant_matmul(x_q, layer.weight, layer.deq_scale, bias=layer.quant_bias,
                                    output_dtype=x.dtype)

    def theoretical_bytes(self, input_size_per_partition: int, output_size_per_partition: int) -> int:
        # int8 weight + int32 quant_bias + fp32 (bf16 models) or int64 (fp16) deq_scale + two fp32 scalars
        deq_bytes = torch.empty((), dtype=self.deq_dtype).element_size()
        return output_size_per_partition * (input_size_per_partition + 4 + deq_bytes) + 8


def _check_bias_folded(layer) -> None:
    """quant_bias - round(-input_offset * sum_k w) must equal round(bias / deq_scale), per channel.

    Only checkable where the rank holds the whole K (column-parallel, or tp=1); a row-parallel rank
    holds a K slice while quant_bias covers all of K.
    """
    weight = layer.weight.data
    if weight.shape[1] != getattr(layer, "input_size", weight.shape[1]):
        return
    deq = decode_int64_scale(layer.deq_scale.data).double()
    offset_term = torch.round(-layer.input_offset.data.double() * weight.sum(dim=1, dtype=torch.int64).double())
    folded = (layer.quant_bias.data.double() - offset_term) * deq
    bias = layer.bias.data.double()
    # the writer's rounding to one accumulator step (deq_scale), plus the bias's own bf16 rounding
    slack = deq.abs() + bias.abs() * 2.0**-7
    worst = ((folded - bias).abs() - slack).max().item()
    if worst > 0:
        raise CheckpointError(
            f"the float bias is not inside quant_bias (off by up to {worst:g} beyond rounding); "
            "msModelSlim folds it there. Re-export the layer, or drop the bias from the description "
            "if the checkpoint does not need it.", tensor=layer.bias.tensor_name)
