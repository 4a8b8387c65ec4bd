"""The upstream oracle: SGLang 0.5.23's own NPU quantization methods (they have run on Ascend
hardware), run on CPU against the contract-checked torch.ops.npu twins, on the same checkpoints
and inputs as our layers.

Upstream's parameters are created by upstream's own scheme classes (create_weights: its dtypes
and shapes) and filled with the checkpoint tensors the way SGLang's loaders do (`param.copy_`,
fused shards / experts side by side); then upstream's process_weights_after_loading and apply
run unchanged. The MoE forward is the ascend_tp chain of SGLang's component classes
(layers/moe/token_dispatcher/ascend_tp.py + layers/moe/moe_runner/ascend.py):
NPUMoEInitRouting_v2 -> w13 method.apply -> NPUSwigluQuant / NPUSwiglu -> w2 method.apply ->
NPUFinalizeRouting(drop_pad_mode=2).

`NpuOpCounter` counts the torch.ops.npu calls a forward makes (ops whose namespace is "npu").
"""

import json
import os
import sys
from collections import Counter
from typing import Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers.linear import layer_spec, open_checkpoint
from helpers.moe_checkpoints import w4a4_checkpoint, w4a8_clip_copy
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint

MOE_PREFIX = "model.layers.0.mlp"
PROJS = ("gate_proj", "up_proj", "down_proj")


# -- counting npu ops ---------------------------------------------------------------------------

class NpuOpCounter(TorchDispatchMode):
    """Counts the torch.ops.npu.* calls made while active (not the aten ops inside the twins)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "npu":
            self.counts[func.name().split("::")[-1].split(".")[0]] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_npu_ops(fn, *args, **kwargs):
    """(fn's result, NpuOpCounter of its torch.ops.npu calls)."""
    counter = NpuOpCounter()
    with counter:
        out = fn(*args, **kwargs)
    return out, counter


def op_table(rows) -> str:
    """rows: (scheme, ours counter or None, upstream counter) -> a printable table."""
    lines = [f"{'scheme':40} {'ours':>5} {'upstream':>9}   ops (ours | upstream)"]
    for name, ours, up in rows:
        o = "-" if ours is None else str(ours.total)
        detail = ("-" if ours is None else ", ".join(f"{k} x{v}" for k, v in sorted(ours.counts.items())))
        lines.append(f"{name:40} {o:>5} {up.total:>9}   {detail} | "
                     + ", ".join(f"{k} x{v}" for k, v in sorted(up.counts.items())))
    return "\n".join(lines)


# -- running upstream code on CPU ---------------------------------------------------------------

def enter_upstream_env(monkeypatch) -> None:
    """Import SGLang's NPU modules on this CPU host and let their device moves be no-ops.

    - the plugin's CPU compatibility layer (sgl_kernel stand-ins), then sglang.srt.layers.quantization
      first: importing hardware_backend/npu/quantization/moe_methods.py on its own is a circular import;
    - `torch_npu` is the twins' stand-in module (for this test only);
    - Tensor.npu() and Tensor.to(device="npu") are identities (upstream's process_weights_after_loading
      moves scales to the NPU: linear_method_npu.py:77-86, moe_methods.py:507,808,826).
    """
    from sgl_ascend.sglang import cpu_compat

    cpu_compat.activate()
    from sgl_ascend.ops import library, ops  # noqa: F401  (twins registered before torch_npu is faked)

    import sglang.srt.layers.quantization  # noqa: F401

    monkeypatch.setitem(sys.modules, "torch_npu", library.twin_torch_npu_module())
    monkeypatch.setattr(torch.Tensor, "npu", lambda self, *args, **kwargs: self, raising=False)
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if str(kwargs.get("device", "")).startswith("npu"):
            kwargs.pop("device")
        args = tuple(a for a in args if not (isinstance(a, (str, torch.device)) and str(a).startswith("npu")))
        return real_to(self, *args, **kwargs) if args or kwargs else self

    monkeypatch.setattr(torch.Tensor, "to", to)


def _fill(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """What SGLang's weight loaders do: copy into the parameter (casting to its dtype)."""
    param.data.copy_(value.reshape(param.shape))


# -- dense linears --------------------------------------------------------------------------------

def upstream_modelslim_linear(path: str, kind: str, params_dtype=torch.bfloat16):
    """(upstream scheme, layer) for a Qwen3 linear (qkv_proj / gate_up_proj / o_proj / down_proj) of a
    msModelSlim checkpoint: ModelSlimW8A8Int8 (W8A8, W8A8_DYNAMIC) or ModelSlimW4A4Int4, created,
    filled and processed as SGLang does. Returns (scheme, layer, float bias or None)."""
    from sglang.srt.layers.quantization.modelslim.schemes.modelslim_w4a4_int4 import ModelSlimW4A4Int4
    from sglang.srt.layers.quantization.modelslim.schemes.modelslim_w8a8_int8 import ModelSlimW8A8Int8

    config, ckpt = open_checkpoint(path)
    _, kwargs, shards = layer_spec(kind)
    prefixes = list(shards.values())
    quant_type = config.types[f"{prefixes[0]}.weight"]
    scheme = (ModelSlimW4A4Int4 if quant_type == "W4A4_DYNAMIC" else ModelSlimW8A8Int8)(dict(config.types),
                                                                                         prefixes[0])
    sizes = kwargs["output_sizes"]
    k = kwargs["input_size"]
    layer = torch.nn.Module()
    scheme.create_weights(layer, input_size_per_partition=k, output_partition_sizes=sizes, input_size=k,
                          output_size=sum(sizes), params_dtype=params_dtype, weight_loader=None)
    for name, param in list(layer.named_parameters()):
        parts = [ckpt.get(f"{p}.{name}") for p in prefixes if f"{p}.{name}" in ckpt]
        if not parts:  # e.g. weight_scale / weight_offset a static W8A8 file does not carry
            param.data.zero_()
            continue
        if param.numel() == 1:  # per-tensor input_scale / input_offset: one value for the fused layer
            assert all(torch.equal(p, parts[0]) for p in parts), f"{name} differs across fused shards"
            _fill(param, parts[0])
        else:
            _fill(param, torch.cat([p.reshape(p.shape[0], -1) for p in parts]))
    biases = [ckpt.get(f"{p}.bias") for p in prefixes if f"{p}.bias" in ckpt]
    bias = torch.cat(biases).to(params_dtype) if biases else None
    scheme.process_weights_after_loading(layer)
    return scheme, layer, bias


def upstream_ct_w8a8_dynamic_linear(path: str, shards: Dict, input_size: int, output_sizes, strategy="channel",
                                    params_dtype=torch.bfloat16):
    """NPUCompressedTensorsW8A8Int8 (dynamic per-token activations) for the fused shards of a
    compressed-tensors checkpoint; returns (scheme, layer)."""
    from sglang.srt.layers.quantization.compressed_tensors.schemes.compressed_tensors_w8a8_int8 import (
        NPUCompressedTensorsW8A8Int8)

    ckpt = SafetensorsCheckpoint(path)
    scheme = NPUCompressedTensorsW8A8Int8(strategy, is_static_input_scheme=False, input_symmetric=True)
    layer = torch.nn.Module()
    scheme.create_weights(layer, output_partition_sizes=list(output_sizes), input_size_per_partition=input_size,
                          params_dtype=params_dtype, weight_loader=None)
    prefixes = list(shards.values())
    for name, param in list(layer.named_parameters()):
        _fill(param, torch.cat([ckpt.get(f"{p}.{name}").reshape(-1, *param.shape[1:]) for p in prefixes]))
    scheme.process_weights_after_loading(layer)
    return scheme, layer


# -- MoE --------------------------------------------------------------------------------------------

class _DispatcherRecorder:
    """Stands in for layer.dispatcher: records the dispatcher_output_dtype upstream's method sets
    (moe_methods.py _set_dispatcher_output_dtype), which picks the ascend_tp routing quant_mode."""

    def __init__(self):
        self.quant_config = None

    def set_quant_config(self, quant_config):
        self.quant_config = quant_config


class UpstreamMoE:
    """Upstream's w13 / w2 MoE kernels on a bare module holding upstream's parameters."""

    def __init__(self, layer, w13_kernel, w2_kernel, num_experts):
        self.layer, self.w13_kernel, self.w2_kernel, self.num_experts = layer, w13_kernel, w2_kernel, num_experts

    def __call__(self, x, topk_weights, topk_ids):
        """AscendTPDispatcher.dispatch -> AscendRunnerCore.run -> AscendTPDispatcher.combine, by their
        components (ascend_tp.py:76-143, ascend.py:172-278), tp = ep = 1."""
        from sglang.srt.hardware_backend.npu.moe.activation import NPUSwiglu, NPUSwigluQuant
        from sglang.srt.hardware_backend.npu.moe.finalize_routing import NPUFinalizeRouting
        from sglang.srt.hardware_backend.npu.moe.init_routing import NPUMoEInitRouting_v2
        from sglang.srt.hardware_backend.npu.quantization.moe_methods import (NPUW4A8Int8MoEMethod,
                                                                              NPUW8A8Int8MoEMethod)
        from sglang.srt.layers.moe.moe_runner.ascend import AscendQuantInfo
        from sglang.srt.layers.moe.utils import DispatcherOutputDtype, get_ascend_dispatcher_output_dtype

        layer = self.layer
        out_dtype = get_ascend_dispatcher_output_dtype(layer.dispatcher)
        quant_mode = {DispatcherOutputDtype.BF16: -1, DispatcherOutputDtype.INT8: 1}[out_dtype]
        topk_weights = topk_weights.to(x.dtype)
        topk_ids = topk_ids.to(torch.int32)
        rows, row_idx, expert_tokens, row_scale = NPUMoEInitRouting_v2(quant_mode=quant_mode)._init_routing(
            x, topk_ids, self.num_experts, topk_weights.shape[-1])
        quant_info = AscendQuantInfo(  # as ModelSlimFusedMoEMethod.apply builds it (modelslim.py:593)
            w13_weight=layer.w13_weight, w2_weight=layer.w2_weight,
            w13_weight_scale=layer.w13_weight_scale, w2_weight_scale=layer.w2_weight_scale,
            w13_weight_offset=getattr(layer, "w13_weight_offset", None),
            w2_weight_offset=getattr(layer, "w2_weight_offset", None),
            w13_scale_bias=getattr(layer, "w13_scale_bias", None), w2_scale_bias=getattr(layer, "w2_scale_bias", None),
            w13_weight_bias=getattr(layer, "w13_weight_bias", None),
            w2_weight_bias=getattr(layer, "w2_weight_bias", None))
        original_dtype = torch.float16 if x.dtype == torch.float16 else torch.bfloat16
        hidden = self.w13_kernel.apply(quant_info, rows, expert_tokens, pertoken_scale=row_scale,
                                       output_dtype=original_dtype, weight_prefix="w13", group_list_type=1)
        quantizing = isinstance(self.w2_kernel, (NPUW4A8Int8MoEMethod, NPUW8A8Int8MoEMethod))
        activation = NPUSwigluQuant() if quantizing else NPUSwiglu()  # ascend.py:175-197 (silu, no clamp)
        hidden, hidden_scale = activation._apply_activation(hidden)
        out = self.w2_kernel.apply(quant_info, hidden, expert_tokens, pertoken_scale=hidden_scale,
                                   output_dtype=original_dtype, weight_prefix="w2", group_list_type=1)
        return NPUFinalizeRouting(drop_pad_mode=2)._finalize_routing(out, topk_weights, row_idx, topk_ids)


def _fill_experts(layer, ckpt, prefix: str, num_experts: int) -> None:
    """Every `w13_<suffix>` / `w2_<suffix>` parameter from the experts' `<proj>.<suffix>` tensors:
    gate and up side by side along the output dim (w13), experts stacked (FusedMoE's weight_loader)."""
    for attr, param in list(layer.named_parameters()):
        role, _, suffix = attr.partition("_")
        per_expert = []
        for e in range(num_experts):
            projs = ("gate_proj", "up_proj") if role == "w13" else ("down_proj",)
            names = [f"{prefix}.experts.{e}.{p}.{suffix}" for p in projs]
            if not all(n in ckpt for n in names):
                per_expert = None
                break
            parts = [ckpt.get(n) for n in names]
            per_expert.append(torch.cat(parts) if parts[0].dim() else parts[0])
        if per_expert is None:
            param.data.zero_()  # created but absent from the file (e.g. offsets, unused scale_bias)
            continue
        _fill(param, torch.stack([t.reshape(param.shape[1:]) for t in per_expert]))


def upstream_modelslim_moe(path: str, num_experts: int = 4, hidden: int = 128, inter: int = 64,
                           params_dtype=torch.bfloat16) -> UpstreamMoE:
    """ModelSlim MoE schemes as SGLang picks them (modelslim.py:334-430: per-channel, no clip)."""
    from sglang.srt.layers.quantization.modelslim.schemes.modelslim_w4a4_int4_moe import ModelSlimW4A4Int4MoE
    from sglang.srt.layers.quantization.modelslim.schemes.modelslim_w4a8_int8_moe import ModelSlimW4A8Int8MoE
    from sglang.srt.layers.quantization.modelslim.schemes.modelslim_w8a8_int8_moe import ModelSlimW8A8Int8MoE

    with open(os.path.join(path, "quant_model_description.json")) as f:
        description = json.load(f)
    classes = {"W8A8_DYNAMIC": ModelSlimW8A8Int8MoE, "W4A8_DYNAMIC": ModelSlimW4A8Int8MoE,
               "W4A4_DYNAMIC": ModelSlimW4A4Int4MoE}
    layer = torch.nn.Module()
    layer.dispatcher = _DispatcherRecorder()
    schemes = {}
    for role, proj in (("w13", "gate_proj"), ("w2", "down_proj")):
        schemes[role] = classes[description[f"{MOE_PREFIX}.experts.0.{proj}.weight"]](description, role)
        schemes[role].create_weights(layer, num_experts=num_experts, hidden_size=hidden,
                                     intermediate_size_per_partition=inter)
    _fill_experts(layer, SafetensorsCheckpoint(path), MOE_PREFIX, num_experts)
    for role in ("w13", "w2"):
        schemes[role].process_weights_after_loading(layer)
    return UpstreamMoE(layer, schemes["w13"].kernel, schemes["w2"].kernel, num_experts)


def upstream_w4a8_clip_moe(path: str, num_experts: int = 4, hidden: int = 128, inter: int = 64,
                           params_dtype=torch.bfloat16) -> UpstreamMoE:
    """W4A8 experts with activation clip: upstream serves them through compressed-tensors only
    (NPUCompressedTensorsW4A8Int8DynamicMoE, config group_1.activation_use_clip; int64 weight scales,
    w13_bias / w2_bias / w2_alpha), on msModelSlim-layout tensors (int8 pairs along the output dim)."""
    from sglang.srt.layers.quantization.compressed_tensors.schemes.compressed_tensors_w4a8_int8_moe import (
        NPUCompressedTensorsW4A8Int8DynamicMoE)

    scheme = NPUCompressedTensorsW4A8Int8DynamicMoE({"config_groups": {"group_1": {"activation_use_clip": True}}})
    layer = torch.nn.Module()
    layer.dispatcher = _DispatcherRecorder()
    scheme.create_weights(layer, num_experts, hidden, inter, params_dtype)
    _fill_experts(layer, SafetensorsCheckpoint(path), MOE_PREFIX, num_experts)
    scheme.process_weights_after_loading(layer)
    return UpstreamMoE(layer, scheme.w13_kernel, scheme.w2_kernel, num_experts)


def w4a8_clip_checkpoint(src: str, dst: str) -> str:
    """The per-channel W4A8 fixture in activation-clip form as upstream's clip path loads it (int64 scales)."""
    return w4a8_clip_copy(src, dst, int64_scales=True)


def w4a4_moe_checkpoint(dst: str, gen: torch.Generator) -> str:
    """W4A4_DYNAMIC experts as msModelSlim writes them (the repo has no W4A4 MoE fixture): the writer of
    tests/test_moe_errors_w4a4.py."""
    w4a4_checkpoint(dst, gen)
    return dst


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
