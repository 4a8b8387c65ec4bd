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

Kernels, as SGLang / vllm-ascend call them: npu_quantize(x, 1 / input_scale, input_offset, qint8, -1,
div_mode=False) = sat8(round(x * (1 / s) + o)), then npu_quant_matmul(x_q, w, deq_scale,
bias=quant_bias, output_dtype=x.dtype). With div_mode=False the scale and zero point must share one
dtype (the activation dtype, as upstream), so after loading the layer holds `input_scale_reciprocal`
= 1 / input_scale rounded once to bf16/fp16 and `input_offset` in that dtype, one element each (the
op takes 1 or K elements; upstream repeats them to K, 4*K bytes per layer for nothing).
Numerics: the bf16 reciprocal is 1/s within a relative 2^-9, so x * r can differ from x / s by up to
|x / s| * 2^-9 (<= 0.25 of a step in the int8 range): an element near a rounding boundary may land one
step away from where x / s puts it (tests/test_linear_schemes.py states the tolerance). Integer
offsets (what msModelSlim writes) are exact in bf16.
deq_scale: npu_quant_matmul takes an fp32 (or bf16) scale with bf16 output and an int64 one (fp32 bits)
with fp16 output; msModelSlim writes fp32 for bf16 models and int64 for fp16 ones. Either encoding
loads, converted to the serving dtype's (fp32 for bf16, int64 for fp16) as it loads: one copy.
"""

from typing import List, Optional

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.parameters import register, replace_data
from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.layers.schemes.base import LinearScheme
from sgl_ascend.layers.schemes.common import kernel_act_dtype, to_kernel_layout
from sgl_ascend.ops import ops
from sgl_ascend.ops.scales import decode_int64_scale, encode_fp32_as_int64
from sgl_ascend.quant.scheme_key import LINEAR, MSMODELSLIM


def register_deq_scale(layer, n: int, act_dtype: torch.dtype, **rules):
    """deq_scale in the encoding npu_quant_matmul takes for the output dtype: int64 (fp32 bits) for
    fp16, fp32 for bf16; a checkpoint in the other encoding is converted as it loads."""
    if act_dtype == torch.float16:
        converters = {d: encode_fp32_as_int64 for d in (torch.float32, torch.bfloat16, torch.float16)}
        return register(layer, "deq_scale", torch.empty(n, dtype=torch.int64), converters=converters, **rules)
    return register(layer, "deq_scale", torch.empty(n, dtype=torch.float32),
                    converters={torch.int64: decode_int64_scale}, **rules)


@register_scheme(LINEAR, MSMODELSLIM, "W8A8")
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
        self.act_dtype = kernel_act_dtype(params_dtype, "W8A8")
        register(layer, "weight", torch.empty(n, k, dtype=torch.int8), output_dim=0, input_dim=1)
        register(layer, "input_scale", torch.empty(shards, dtype=torch.float32), per_shard=True)
        register(layer, "input_offset", torch.empty(shards, dtype=torch.float32), per_shard=True)
        register(layer, "quant_bias", torch.empty(n, dtype=torch.int32), output_dim=0, first_rank_only=True)
        self.deq_dtype = register_deq_scale(layer, n, self.act_dtype, output_dim=0).dtype

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
        if getattr(layer, "bias", None) is not None:
            _check_bias_folded(layer)
            layer.bias = None  # counted once, inside quant_bias
        replace_data(layer, "input_offset", layer.input_offset.data[:1].to(self.act_dtype))
        install_input_scale_reciprocal(layer, layer.input_scale.data[:1], self.act_dtype)
        replace_data(layer, "weight", to_kernel_layout(layer.weight.data))

    def apply_weights(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
        x_q = ops.npu_quantize(x, layer.input_scale_reciprocal, layer.input_offset, torch.qint8, -1, False)
        # `bias` is None: a float bias lives in quant_bias (see process_weights_after_loading).
        return ops.npu_quant_matmul(x_q, layer.weight, layer.deq_scale, bias=layer.quant_bias,
                                    output_dtype=x.dtype)

    def theoretical_bytes(self, input_size_per_partition: int, output_size_per_partition: int) -> int:
        # int8 weight + int32 quant_bias + fp32 (bf16 models) or int64 (fp16) deq_scale, and the
        # reciprocal input scale and the input offset, one element each in the activation dtype
        deq_bytes = torch.empty((), dtype=self.deq_dtype).element_size()
        act_bytes = torch.empty((), dtype=self.act_dtype).element_size()
        return output_size_per_partition * (input_size_per_partition + 4 + deq_bytes) + 2 * act_bytes


def install_input_scale_reciprocal(layer, input_scale: torch.Tensor, act_dtype: torch.dtype) -> None:
    """input_scale [1] -> `input_scale_reciprocal` [1] = 1 / input_scale in the activation dtype (npu_quantize's
    div_mode=False scale), computed in float64 and rounded once; input_scale itself is released."""
    reciprocal = (1.0 / input_scale.double()).to(act_dtype)
    delattr(layer, "input_scale")
    layer.register_parameter("input_scale_reciprocal", torch.nn.Parameter(reciprocal, requires_grad=False))


def _check_bias_folded(layer) -> None:
    """quant_bias - round(-input_offset * sum_k w) must equal round(bias / deq_scale), per channel.

    Only checkable where the rank holds the whole K (column-parallel, or tp=1); a row-parallel rank
    holds a K slice while quant_bias covers all of K.
    """
    weight = layer.weight.data
    if weight.shape[1] != getattr(layer, "input_size", weight.shape[1]):
        return
    deq = decode_int64_scale(layer.deq_scale.data).double()
    offset_term = torch.round(-layer.input_offset.data[0].double() * weight.sum(dim=1, dtype=torch.int64).double())
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
