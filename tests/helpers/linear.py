"""Building Qwen3-shaped linear layers from msModelSlim checkpoints, and their float references.

The reference is msModelSlim's own convention applied to the original input, computed in float64
straight from the checkpoint tensors (never through sgl_ascend.ops):
  weights      dq = (q - offset) * scale                 (per output channel)
  W8A8 static  x_fq = (sat8(round(x / s + o)) - o) * s    (input_scale s, input_offset o); the
               weight scale is deq_scale / s, and quant_bias carries -o * sum_k w (+ the float bias)
  dynamic      x_fq = round(x / t) * t per token, t = max|x| / 127 (int8) or / 7 (int4), t in fp32
The activation quantization step (x / scale) is computed in fp32 like the device; the rest in float64.
"""

import functools
from typing import Dict, Optional

import torch

from helpers.common import msmodelslim_fixture
from sgl_ascend.layers.registry import linear_scheme
from sgl_ascend.layers.linear import ParallelLinear, QKVSizes, load_linear
from sgl_ascend.ops.scales import decode_int64_scale
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint
from sgl_ascend.quant.modelslim import ModelSlimConfig
from sgl_ascend.testing import synthetic

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 128, 4, 2, 32, 256
KINDS = ("qkv_proj", "gate_up_proj", "o_proj", "down_proj")


@functools.lru_cache(maxsize=None)
def open_checkpoint(path: str):
    return ModelSlimConfig.from_dir(path), SafetensorsCheckpoint(path)


@functools.lru_cache(maxsize=None)
def open_plain_checkpoint(path: str):
    return SafetensorsCheckpoint(path)


def layer_spec(kind: str, layer: int = 0, tp_size: int = 1, hidden: int = HIDDEN, inter: int = INTER,
               heads: int = HEADS, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM):
    """(fused layer prefix, ParallelLinear keyword arguments, shard id -> checkpoint prefix)."""
    base = f"model.layers.{layer}"
    if kind == "qkv_proj":
        shards = {s: f"{base}.self_attn.{s}_proj" for s in "qkv"}
        qkv = QKVSizes(heads, kv_heads, head_dim, tp_size)
        return f"{base}.self_attn.qkv_proj", dict(input_size=hidden, output_sizes=qkv.full_sizes, qkv=qkv), shards
    if kind == "gate_up_proj":
        shards = {0: f"{base}.mlp.gate_proj", 1: f"{base}.mlp.up_proj"}
        return f"{base}.mlp.gate_up_proj", dict(input_size=hidden, output_sizes=[inter, inter]), shards
    if kind == "o_proj":
        return (f"{base}.self_attn.o_proj", dict(input_size=heads * head_dim, output_sizes=[hidden], parallel="row"),
                {None: f"{base}.self_attn.o_proj"})
    if kind == "down_proj":
        return f"{base}.mlp.down_proj", dict(input_size=inter, output_sizes=[hidden], parallel="row"), \
            {None: f"{base}.mlp.down_proj"}
    if kind == "column":  # a plain column-parallel layer (no fusion)
        return f"{base}.mlp.gate_proj", dict(input_size=hidden, output_sizes=[inter]), {None: f"{base}.mlp.gate_proj"}
    raise ValueError(kind)


def build_layer(path: str, kind: str, layer: int = 0, tp_rank: int = 0, tp_size: int = 1,
                params_dtype: torch.dtype = torch.bfloat16, process: bool = True, **dims):
    """The layer for rank tp_rank of tp_size, loaded from the checkpoint at `path` (and processed)."""
    config, checkpoint = open_checkpoint(path)
    prefix, kwargs, shards = layer_spec(kind, layer, tp_size, **dims)
    module = ParallelLinear(scheme=linear_scheme(config, prefix), prefix=prefix, tp_rank=tp_rank,
                            tp_size=tp_size, params_dtype=params_dtype, bias=config.has_float_bias(prefix),
                            **kwargs)
    if not process:
        module.scheme.process_weights_after_loading = lambda _layer: None
    load_linear(module, checkpoint, shards)
    return module


def fixture_layer(name: str, kind: str, **kw):
    return build_layer(msmodelslim_fixture(name), kind, **kw)


def static_input_scale(layer) -> Optional[float]:
    """A static-W8A8 layer's activation scale (it holds the reciprocal, npu_quantize's div_mode=False
    scale), None for the other schemes."""
    reciprocal = getattr(layer, "input_scale_reciprocal", None)
    return None if reciprocal is None else 1.0 / reciprocal.float().item()


def calibrated_input(layer, gen, rows=9, shape=None, dtype=torch.bfloat16):
    """Activations for `layer` (bf16 unless told): inside the calibrated range (mostly) of a static
    layer, else N(0, 1)."""
    scale = static_input_scale(layer)
    amplitude = 1.0 if scale is None else scale * 40
    return (torch.randn(*(shape or (rows, layer.input_size)), generator=gen) * amplitude).to(dtype)


# -- the float reference ------------------------------------------------------------------------

def _fake_quant_per_token(x: torch.Tensor, qmax: float) -> torch.Tensor:
    scale = x.float().abs().amax(-1, keepdim=True) / qmax  # fp32, as the NPU computes it
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x.float() / safe).clamp(-qmax - 1, qmax).double() * safe.double()


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """npu_quantize(div_mode=False)'s rounding (aclnnAscendQuantV3 round mode "round")."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def shard_reference(tensors: Dict[str, torch.Tensor], kind: str, x: torch.Tensor,
                    k_slices: int = 1, bias: bool = True, npu_reciprocal: bool = False) -> torch.Tensor:
    """One checkpoint shard's output under its own dequantization convention, in float64.

    `tensors` maps suffix -> checkpoint tensor. k_slices > 1 quantizes dynamic activations per K
    slice, as tp row-parallel ranks do. npu_reciprocal: W8A8 static activations quantized as the NPU
    kernel does, x * r + o with r = 1 / s rounded to x's dtype (npu_quantize, div_mode=False),
    instead of the checkpoint's x / s + o.
    """
    w = tensors["weight"].double()
    if kind == "W8A8":
        s, o = tensors["input_scale"].float(), tensors["input_offset"].float()
        # x / s + o in fp32, as the device computes it (float64 would round some near-ties the other way)
        if npu_reciprocal:  # npu_quantize(div_mode=False) rounds half away from zero
            xs = x.float() * (1.0 / s.double()).to(x.dtype).float() + o
            xq = round_half_away(xs).clamp(-128, 127).double()
        else:
            xq = torch.round(x.float() / s + o).clamp(-128, 127).double()
        s, o = s.double(), o.double()
        x_fq = (xq - o) * s
        w_dq = w * (decode_int64_scale(tensors["deq_scale"]).double() / s)[:, None]
    elif kind == "FLOAT":
        x_fq, w_dq = x.double(), w
    else:
        w_dq = (w - tensors["weight_offset"].double().reshape(-1, 1)) * tensors["weight_scale"].double().reshape(-1, 1)
        if kind == "W8A16":
            x_fq = x.double()
        else:
            qmax = 7.0 if kind == "W4A4_DYNAMIC" else 127.0
            x_fq = torch.cat([_fake_quant_per_token(c, qmax) for c in x.chunk(k_slices, dim=-1)], dim=-1)
    y = x_fq @ w_dq.t()
    if bias and "bias" in tensors:
        y = y + tensors["bias"].double()
    return y


def layer_reference(path: str, kind: str, x: torch.Tensor, layer: int = 0, k_slices: int = 1, bias: bool = True,
                    npu_reciprocal: bool = False, **dims):
    """The whole (tp=1) fused layer's reference output: shard outputs side by side."""
    config, checkpoint = open_checkpoint(path)
    _, _, shards = layer_spec(kind, layer, **dims)
    outs = []
    for prefix in shards.values():
        tensors = {s: checkpoint.get(i.name) for s, i in checkpoint.with_prefix(prefix).items()}
        outs.append(shard_reference(tensors, config.types[f"{prefix}.weight"], x, k_slices, bias, npu_reciprocal))
    return torch.cat(outs, dim=-1)


def original_reference(kind: str, x: torch.Tensor, layer: int = 0, original: str = "qwen3-tiny-bf16"):
    """The unquantized model's output for the same layer (bf16 weights, float64 math)."""
    checkpoint = open_plain_checkpoint(msmodelslim_fixture(original))
    _, _, shards = layer_spec(kind, layer)
    return torch.cat([x.double() @ checkpoint.get(f"{p}.weight").double().t() for p in shards.values()], dim=-1)


def tight_error(out: torch.Tensor, ref: torch.Tensor, magnitude: Optional[torch.Tensor] = None) -> float:
    """Largest |out - ref| in units of one bf16 rounding of the element (plus 1% of the rms as floor).

    `magnitude` (default |ref|) is what a rounding is relative to; pass the terms' own sizes where
    they cancel (a bias added after a product whose scale the kernel holds in bf16).
    """
    ref = ref.double()
    magnitude = ref.abs() if magnitude is None else magnitude.double()
    floor = 0.01 * ref.pow(2).mean().sqrt()
    return ((out.double() - ref).abs() / ((magnitude + floor) * 2.0**-8)).max().item()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


# -- tiny synthetic msModelSlim checkpoints ------------------------------------------------------

def write_modelslim(folder: str, tensors: Dict[str, torch.Tensor], types: Dict[str, str],
                    version: Optional[str] = "1.0.0", shards: int = 1) -> str:
    """Write `tensors` as an msModelSlim checkpoint (description + safetensors + index) and return `folder`."""
    description = {} if version is None else {"version": version}
    description.update({"model_quant_type": "W8A8", **types})
    return synthetic.write_modelslim_folder(folder, tensors, description, shards=shards)


def quantize_linear(w: torch.Tensor, kind: str, gen: torch.Generator, asymmetric: bool = False,
                    float_bias: bool = False, input_scale: float = 0.02, input_offset: float = 3.0):
    """msModelSlim-style tensors (suffix -> tensor) for a float weight [N, K] under `kind`."""
    n = w.shape[0]
    if kind == "FLOAT":
        out = {"weight": w.to(torch.bfloat16)}
    elif asymmetric:
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        scale = (hi - lo) / 255
        offset = -128 - torch.round(lo / scale)
        q = torch.clamp(torch.round(w / scale + offset), -128, 127)
        out = {"weight": q.to(torch.int8), "weight_scale": scale.float(), "weight_offset": offset.float()}
    else:
        qmax = 7 if kind == "W4A4_DYNAMIC" else 127
        scale = w.abs().amax(1, keepdim=True) / qmax
        q = torch.round(w / scale).clamp(-qmax, qmax)
        out = {"weight": q.to(torch.int8), "weight_scale": scale.float(), "weight_offset": torch.zeros(n, 1)}
    if kind == "W8A8":
        q, ws = out.pop("weight"), out.pop("weight_scale")
        out.pop("weight_offset")
        deq = (ws.reshape(-1) * input_scale).float()
        qbias = -torch.round(input_offset * q.long().sum(1).double())
        bias = torch.randn(n, generator=gen).to(torch.bfloat16) if float_bias else None
        if bias is not None:
            qbias = qbias + torch.round(bias.double() / deq.double())
        out.update(weight=q, input_scale=torch.tensor([input_scale]), input_offset=torch.tensor([input_offset]),
                   quant_bias=qbias.to(torch.int32), deq_scale=deq)
        if bias is not None:
            out["bias"] = bias
    elif float_bias:
        out["bias"] = torch.randn(n, generator=gen).to(torch.bfloat16)
    return out


def synthetic_qwen3(folder: str, kind: str, gen: torch.Generator, version: Optional[str] = "1.0.0", **kw) -> str:
    """Layer 0 of a Qwen3-shaped model, every linear under `kind`, written as msModelSlim would."""
    return write_modelslim(folder, *synthetic_qwen3_tensors(kind, gen, **kw), version=version)


def synthetic_qwen3_tensors(kind: str, gen: torch.Generator, hidden: int = HIDDEN, inter: int = INTER,
                            heads: int = HEADS, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM,
                            float_bias: bool = False, asymmetric: bool = False):
    """(tensors, description types) of `synthetic_qwen3`, to edit before writing."""
    shapes = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
              "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    tensors, types = {}, {}
    for name, shape in shapes.items():
        w = torch.randn(*shape, generator=gen) / shape[1] ** 0.5
        attn = name.startswith("self_attn")
        for suffix, t in quantize_linear(w, kind, gen, asymmetric, float_bias,
                                         input_offset=3.0 if attn else -2.0).items():
            tensors[f"model.layers.0.{name}.{suffix}"] = t
            types[f"model.layers.0.{name}.{suffix}"] = "FLOAT" if suffix == "bias" else kind
    return tensors, types
