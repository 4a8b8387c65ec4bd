"""Every dense linear scheme as a buildable case, for the op-contract and graph-safety tests.

A case names a checkpoint (a real msmodelslim fixture, a synthetic msModelSlim file, or a
compressed-tensors file written by the library), a fused layer kind, and how to build rank r of tp
ranks of it in a model dtype. `float_reference` is the checkpoint's weights dequantized by its own
convention (float_reference.dequantize_modelslim / the library's decompress_model) applied to the
unquantized input in float64: activation quantization is not in it, so a case's tolerance
(`rel_tol`) covers its activation quantization noise.
"""

import functools
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

from helpers.common import msmodelslim_fixture
from helpers.ct import FORMATS, SCHEMES, Qwen3LayerLinears, quantize_with_library, write_checkpoint
from helpers.float_reference import dequantize_modelslim
from helpers.msmodelslim_run import quantized
from helpers.linear import (HEAD_DIM, HEADS, HIDDEN, INTER, KV_HEADS, build_layer, layer_spec,
                            synthetic_qwen3_tensors, write_modelslim)
from sgl_ascend.layers.registry import linear_scheme
from sgl_ascend.layers.linear import ParallelLinear, QKVSizes, load_linear
from sgl_ascend.ops.int4 import pack_int8_pairs
from sgl_ascend.quant import compressed_tensors as ct
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint

KINDS = ("qkv_proj", "gate_up_proj", "o_proj", "down_proj")
MLP_KINDS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class DenseCase:
    id: str
    scheme: str                 # the scheme class the layer must get
    kinds: tuple                # fused layer kinds the checkpoint has
    make: Callable[[], str]     # -> checkpoint dir (cached)
    source: str                 # "modelslim" or "ct"
    rel_tol: float              # norm-relative vs the float reference (activation quantization noise)

    def build(self, kind: str, tp_rank: int = 0, tp_size: int = 1, dtype=torch.bfloat16):
        path = self.make()
        if self.source == "modelslim":
            layer = build_layer(path, kind, tp_rank=tp_rank, tp_size=tp_size, params_dtype=dtype)
        else:
            layer = _build_ct(path, kind, tp_rank, tp_size, dtype)
        assert type(layer.scheme).__name__ == self.scheme, (self.id, kind, type(layer.scheme).__name__)
        return layer

    def float_reference(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        weights = _dequantized(self.make(), self.source)
        _, _, shards = layer_spec(kind)
        w = torch.cat([weights[f"{p}.weight"] for p in shards.values()]).double()
        y = x.double() @ w.t()
        biases = [weights.get(f"{p}.bias") for p in shards.values()]
        if any(b is not None for b in biases):
            y = y + torch.cat([torch.zeros(weights[f"{p}.weight"].shape[0]) if b is None else b.float()
                               for p, b in zip(shards.values(), biases)]).double()
        return y


def _cached_dir(name: str) -> str:
    return os.path.join(_root(), name)


@functools.lru_cache(maxsize=None)
def _root() -> str:
    return tempfile.mkdtemp(prefix="sgl_ascend_dense_cases_")


# -- msModelSlim --------------------------------------------------------------------------------------

def _fixture(name):
    return lambda: msmodelslim_fixture(name)


@functools.lru_cache(maxsize=None)
def _synthetic(kind: str, float_bias: bool, asymmetric: bool = False) -> str:
    gen = torch.Generator().manual_seed(11)
    tensors, types = synthetic_qwen3_tensors(kind, gen, float_bias=float_bias, asymmetric=asymmetric)
    return write_modelslim(_cached_dir(f"ms-{kind}-{float_bias}-{asymmetric}"), tensors, types)


@functools.lru_cache(maxsize=None)
def _synthetic_w4a8_group(group_size: int = 32) -> str:
    """Layer 0's MLP in group-wise W4A8_DYNAMIC, as the real tool writes it (int4 pairs along N,
    integer-valued fp32 weight_scale_second, int64 zero offsets, scale_bias)."""
    gen = torch.Generator().manual_seed(12)
    tensors = {}
    for proj, (n, k) in (("gate_proj", (INTER, HIDDEN)), ("up_proj", (INTER, HIDDEN)), ("down_proj", (HIDDEN, INTER))):
        q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
        scale = 3e-4 + 4e-4 * torch.rand(n, 1, generator=gen)
        second = torch.randint(1, 18, (n, k // group_size), generator=gen).float()
        deq = q.double() * scale.double() * second.double().repeat_interleave(group_size, dim=1)
        row = proj == "down_proj"
        for suffix, t in {"weight": pack_int8_pairs(q, 0), "weight_scale": scale, "weight_offset": torch.zeros(n, 1),
                          "weight_scale_second": second,
                          "weight_offset_second": torch.zeros(n, k // group_size, dtype=torch.int64),
                          "scale_bias": (8 * deq.reshape(n, 16 if row else 1, -1).sum(-1)).float()}.items():
            tensors[f"model.layers.0.mlp.{proj}.{suffix}"] = t
    types = {name: "W4A8_DYNAMIC" for name in tensors}
    return write_modelslim(_cached_dir(f"ms-w4a8-g{group_size}"), tensors, {**types, "group_size": group_size})


# -- compressed-tensors ---------------------------------------------------------------------------------

CT_LAYERS = {  # kind -> (parallel, shard id -> checkpoint prefix, input size, output sizes)
    "qkv_proj": ("column", {s: f"model.layers.0.self_attn.{s}_proj" for s in "qkv"}, HIDDEN, None),
    "o_proj": ("row", {None: "model.layers.0.self_attn.o_proj"}, HEADS * HEAD_DIM, [HIDDEN]),
    "gate_up_proj": ("column", {0: "model.layers.0.mlp.gate_proj", 1: "model.layers.0.mlp.up_proj"}, HIDDEN,
                     [INTER, INTER]),
    "down_proj": ("row", {None: "model.layers.0.mlp.down_proj"}, INTER, [HIDDEN]),
}
_CT_DEQ: Dict[str, Dict[str, torch.Tensor]] = {}


@functools.lru_cache(maxsize=None)
def _ct(name: str) -> str:
    gen = torch.Generator().manual_seed(1)
    x = {HIDDEN: torch.randn(16, HIDDEN, generator=gen), INTER: torch.randn(16, INTER, generator=gen)}
    model = Qwen3LayerLinears(HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(0))
    calib = {n: x[m.in_features] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    tensors, qconfig, deq = quantize_with_library(model, SCHEMES[name], fmt=FORMATS.get(name), calib=calib)
    path = write_checkpoint(_cached_dir(f"ct-{name}"), tensors, qconfig)
    _CT_DEQ[path] = {f"{prefix}.weight": w.float() for prefix, w in deq.items()}
    return path


def _build_ct(path, kind, tp_rank, tp_size, dtype):
    config = ct.CompressedTensorsConfig.from_dir(path)
    parallel, shards, k, sizes = CT_LAYERS[kind]
    qkv = QKVSizes(HEADS, KV_HEADS, HEAD_DIM, tp_size) if kind == "qkv_proj" else None
    prefix = f"model.layers.0.{'self_attn' if kind in ('qkv_proj', 'o_proj') else 'mlp'}.{kind}"
    layer = ParallelLinear(k, qkv.full_sizes if qkv else sizes, linear_scheme(config, prefix), parallel=parallel,
                           prefix=prefix, tp_rank=tp_rank, tp_size=tp_size, params_dtype=dtype, qkv=qkv)
    load_linear(layer, SafetensorsCheckpoint(path), shards)
    return layer


@functools.lru_cache(maxsize=None)
def _dequantized_modelslim(path: str) -> Dict[str, torch.Tensor]:
    return dequantize_modelslim(path)


def _dequantized(path: str, source: str) -> Dict[str, torch.Tensor]:
    return _dequantized_modelslim(path) if source == "modelslim" else _CT_DEQ[path]


# -- the cases ------------------------------------------------------------------------------------------
# rel_tol: about twice the worst measured over kinds, tp 1 / 2, bf16 / fp16 (measured in brackets):
# weight-only, FLOAT and FP8 0.006 (0.0017-0.0035: bf16 output, scales and weights); int8 dynamic
# 0.015 (0.008, per-token int8); int8 static 0.08 (0.03-0.06, mostly clipping: the inputs reach ~160
# steps of the calibrated scale); int4 dynamic activations 0.2 (0.13, int4 per token).
WEIGHT_ONLY, DYNAMIC, STATIC, INT4_ACT = 0.006, 0.015, 0.08, 0.2
CASES: List[DenseCase] = [
    DenseCase("ms-W8A8", "W8A8StaticLinear", KINDS, _fixture("qwen3-tiny-w8a8"), "modelslim", STATIC),
    DenseCase("ms-W8A8-bias", "W8A8StaticLinear", KINDS, lambda: _synthetic("W8A8", True), "modelslim", STATIC),
    DenseCase("ms-W8A8_DYNAMIC", "W8A8DynamicLinear", KINDS, _fixture("qwen3-tiny-w8a8-dynamic"), "modelslim",
              DYNAMIC),
    DenseCase("ms-W8A8_DYNAMIC-bias", "W8A8DynamicLinear", KINDS, lambda: _synthetic("W8A8_DYNAMIC", True),
              "modelslim", DYNAMIC),
    DenseCase("ms-W8A8_MIX", "W8A8MixLinear", KINDS, lambda: quantized("w8a8_mix"), "modelslim", DYNAMIC),
    DenseCase("ms-W8A16", "W8A16Linear", KINDS, _fixture("qwen3-tiny-w8a16"), "modelslim", WEIGHT_ONLY),
    DenseCase("ms-W8A16-asym-bias", "W8A16Linear", KINDS, lambda: _synthetic("W8A16", True, True), "modelslim",
              WEIGHT_ONLY),
    DenseCase("ms-W4A4_DYNAMIC", "W4A4DynamicLinear", MLP_KINDS[:1], _fixture("qwen3-tiny-w4a4-dynamic"),
              "modelslim", INT4_ACT),
    DenseCase("ms-W4A4_DYNAMIC-bias", "W4A4DynamicLinear", KINDS, lambda: _synthetic("W4A4_DYNAMIC", True),
              "modelslim", INT4_ACT),
    DenseCase("ms-W4A8_DYNAMIC-channel", "W4A8DynamicLinear", MLP_KINDS, _fixture("qwen3-tiny-w4a8-dynamic"),
              "modelslim", WEIGHT_ONLY),
    DenseCase("ms-W4A8_DYNAMIC-group", "W4A8DynamicLinear", MLP_KINDS, _synthetic_w4a8_group, "modelslim",
              WEIGHT_ONLY),
    DenseCase("ms-FLOAT-bias", "UnquantizedLinear", KINDS, lambda: _synthetic("FLOAT", True), "modelslim",
              WEIGHT_ONLY),
    DenseCase("ct-int8-static", "CTW8A8StaticLinear", KINDS, lambda: _ct("w8a8_static"), "ct", STATIC),
    DenseCase("ct-int8-static-asym", "CTW8A8StaticLinear", KINDS, lambda: _ct("w8a8_static_asym"), "ct", STATIC),
    DenseCase("ct-int8-dynamic", "W8A8DynamicLinear", KINDS, lambda: _ct("w8a8_dynamic"), "ct", DYNAMIC),
    DenseCase("ct-int8-dynamic-tensor", "CTW8A8DynamicTensorLinear", KINDS, lambda: _ct("w8a8_dynamic_tensor"), "ct",
              DYNAMIC),
    DenseCase("ct-wna16-int4-group", "CTWNA16Linear", KINDS, lambda: _ct("w4a16_group"), "ct", WEIGHT_ONLY),
    DenseCase("ct-wna16-int4-group-asym", "CTWNA16Linear", KINDS, lambda: _ct("w4a16_group_asym"), "ct",
              WEIGHT_ONLY),
    DenseCase("ct-wna16-int8-channel", "CTWNA16Linear", KINDS, lambda: _ct("w8a16_channel"), "ct", WEIGHT_ONLY),
    DenseCase("ct-wna16-int8-channel-unpacked", "CTWNA16Linear", KINDS, lambda: _ct("w8a16_channel_unpacked"), "ct",
              WEIGHT_ONLY),
    DenseCase("ct-w4a8-group", "CTW4A8Linear", KINDS, lambda: _ct("w4a8"), "ct", WEIGHT_ONLY),
    DenseCase("ct-w4a8-channel", "CTW4A8Linear", KINDS, lambda: _ct("w4a8_channel"), "ct", WEIGHT_ONLY),
    DenseCase("ct-fp8-weight-only", "CTFP8W8A16Linear", KINDS, lambda: _ct("fp8_dynamic"), "ct", WEIGHT_ONLY),
    DenseCase("ct-fp8-weight-only-static-scale", "CTFP8W8A16Linear", KINDS, lambda: _ct("fp8_static"), "ct",
              WEIGHT_ONLY),
]
# The op calls each scheme's forward makes (SGLang 0.5.23 / vllm-ascend call the same ones).
EXPECTED_OPS = {
    "W8A8StaticLinear": {"npu_quantize", "npu_quant_matmul"},
    "CTW8A8StaticLinear": {"npu_quantize", "npu_quant_matmul"},
    "W8A8DynamicLinear": {"npu_dynamic_quant", "npu_quant_matmul"},
    "W8A8MixLinear": {"npu_dynamic_quant", "npu_quant_matmul"},  # the dynamic path: every server but a decode node
    "CTW8A8DynamicTensorLinear": {"npu_dynamic_quant", "npu_quant_matmul"},
    "W4A4DynamicLinear": {"npu_dynamic_quant", "npu_quant_matmul"},
    "W8A16Linear": {"npu_weight_quant_batchmatmul"},
    "CTWNA16Linear": {"npu_weight_quant_batchmatmul"},
    "W4A8DynamicLinear": {"npu_weight_quant_batchmatmul"},
    "CTW4A8Linear": {"npu_weight_quant_batchmatmul"},
    "UnquantizedLinear": set(),
    "CTFP8W8A16Linear": set(),
}
CASE_KINDS = [(case, kind) for case in CASES for kind in case.kinds]


def put_together(outputs, partition_sizes, tp):
    """Column ranks' outputs -> the tp=1 layout (per fused shard, ranks side by side); tp <= kv heads."""
    per_rank = [o.split(partition_sizes, dim=-1) for o in outputs]
    return torch.cat([torch.cat([p[i] for p in per_rank], dim=-1) for i in range(len(partition_sizes))], dim=-1)
