"""compressed-tensors checkpoints written by the library itself, for the tests and end-to-end runs.

The library's lifecycle does the work: `apply_quantization_config` attaches the scheme and its
scale / zero-point parameters, a calibration-free min-max observer (below) fills them through the
library's `calculate_qparams`, and `ModelCompressor.compress_model` writes the checkpoint tensors
(weight_packed / weight_shape / weight ...). `decompress_model` then gives the library's own
dequantized weights, the float reference every test compares against.
"""

import json
import os
import shutil
from typing import Dict, Optional, Sequence

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationConfig, QuantizationStrategy, apply_quantization_config
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import load_file

from helpers.common import QWEN3_BF16, msmodelslim_fixture
from sgl_ascend.testing import synthetic

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                    "special_tokens_map.json", "generation_config.json")

# config_groups entries of the schemes under test (what llm-compressor's presets write).
INT8 = {"num_bits": 8, "type": "int", "symmetric": True}
SCHEMES = {
    "w8a8_static": {"weights": {**INT8, "strategy": "channel"},
                    "input_activations": {**INT8, "strategy": "tensor", "dynamic": False}},
    "w8a8_static_asym": {"weights": {**INT8, "strategy": "tensor"},
                         "input_activations": {**INT8, "symmetric": False, "strategy": "tensor", "dynamic": False}},
    "w8a8_dynamic": {"weights": {**INT8, "strategy": "channel"},
                     "input_activations": {**INT8, "strategy": "token", "dynamic": True}},
    "w8a8_dynamic_tensor": {"weights": {**INT8, "strategy": "tensor"},
                            "input_activations": {**INT8, "strategy": "token", "dynamic": True}},
    "w4a16_group": {"weights": {**INT8, "num_bits": 4, "strategy": "group", "group_size": 32}},
    "w4a16_group_asym": {"weights": {**INT8, "num_bits": 4, "symmetric": False, "strategy": "group",
                                     "group_size": 32}},
    "w8a16_channel": {"weights": {**INT8, "strategy": "channel"}},
    "w8a16_channel_unpacked": {"weights": {**INT8, "strategy": "channel"}},
    "w4a8": {"weights": {**INT8, "num_bits": 4, "strategy": "group", "group_size": 32},
             "input_activations": {**INT8, "strategy": "token", "dynamic": True}},
    "w4a8_channel": {"weights": {**INT8, "num_bits": 4, "strategy": "channel"},
                     "input_activations": {**INT8, "strategy": "token", "dynamic": True}},
    "fp8_dynamic": {"weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"},
                    "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                                          "strategy": "token", "dynamic": True}},
    "fp8_static": {"weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor"},
                   "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                                         "dynamic": False}},
}
# MoE experts (write_qwen3moe_ct_checkpoint): W4A16 per group and per channel asymmetric (pack-quantized).
EXPERT_SCHEMES = {"w4a16_group": SCHEMES["w4a16_group"],
                  "w4a16_channel_asym": {"weights": {**INT8, "num_bits": 4, "symmetric": False, "strategy": "channel"}}}
FORMATS = {"w4a16_group": "pack-quantized", "w4a16_group_asym": "pack-quantized",
           "w8a16_channel": "pack-quantized", "w8a16_channel_unpacked": "int-quantized",
           "w4a8": "int-quantized", "w4a8_channel": "pack-quantized"}

QWEN3_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _observe_weight(weight: torch.Tensor, args) -> tuple:
    """Min-max observer: the per-tensor / per-channel / per-group range the args ask for."""
    w = weight.detach().float()
    if args.strategy == QuantizationStrategy.TENSOR:
        return w.amin().reshape(1), w.amax().reshape(1)
    if args.strategy == QuantizationStrategy.CHANNEL:
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    grouped = w.reshape(w.shape[0], -1, args.group_size)
    return grouped.amin(dim=-1), grouped.amax(dim=-1)


def quantize_with_library(model: torch.nn.Module, scheme: dict, ignore: Sequence[str] = ("lm_head",),
                          fmt: Optional[str] = None, calib: Optional[Dict[str, torch.Tensor]] = None,
                          targets: Sequence[str] = ("Linear",)):
    """Quantize `model` in place with compressed-tensors. Returns (checkpoint tensors, quantization_config
    dict, {module name: the library's dequantized weight}). `calib` maps module names to inputs for
    static activation scales."""
    config = QuantizationConfig.model_validate(
        {"config_groups": {"group_0": {"targets": list(targets), **scheme}}, "ignore": list(ignore)})
    apply_quantization_config(model, config)
    for name, module in model.named_modules():
        qscheme = getattr(module, "quantization_scheme", None)
        if qscheme is None:
            continue
        lo, hi = _observe_weight(module.weight, qscheme.weights)
        scale, zero_point = calculate_qparams(lo, hi, qscheme.weights)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero_point.reshape(module.weight_zero_point.shape))
        acts = qscheme.input_activations
        if acts is not None and not acts.dynamic:
            x = calib[name].float()
            scale, zero_point = calculate_qparams(x.amin().reshape(1), x.amax().reshape(1), acts)
            module.input_scale.data.copy_(scale)
            if hasattr(module, "input_zero_point"):
                module.input_zero_point.data.copy_(zero_point)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    quant_config = json.loads(compressor.quantization_config.model_dump_json())
    compressor.decompress_model(model)
    dequantized = {name: m.weight.detach().clone() for name, m in model.named_modules()
                   if getattr(m, "quantization_scheme", None) is not None}
    return tensors, quant_config, dequantized


class Qwen3LayerLinears(torch.nn.Module):
    """The linear layers of Qwen3 decoder layers, under their checkpoint names (no forward)."""

    def __init__(self, hidden=128, intermediate=256, heads=4, kv_heads=2, head_dim=32, layers=1,
                 vocab=0, dtype=torch.float32, generator=None):
        super().__init__()
        shapes = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
                  "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
                  "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
                  "mlp.down_proj": (hidden, intermediate)}
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList()
        for _ in range(layers):
            layer = torch.nn.Module()
            layer.self_attn, layer.mlp = torch.nn.Module(), torch.nn.Module()
            for path, (n, k) in shapes.items():
                parent, child = path.split(".")
                linear = torch.nn.Linear(k, n, bias=False, dtype=dtype)
                linear.weight.data = torch.randn(n, k, generator=generator, dtype=torch.float32).to(dtype) / k ** 0.5
                setattr(getattr(layer, parent), child, linear)
            self.model.layers.append(layer)
        if vocab:
            self.lm_head = torch.nn.Linear(hidden, vocab, bias=False, dtype=dtype)


def write_checkpoint(path: str, tensors: Dict[str, torch.Tensor], quant_config: dict,
                     hf_config: Optional[dict] = None) -> str:
    return synthetic.write_ct_folder(path, tensors, quant_config, hf_config)


def write_qwen3_ct_checkpoint(path: str, scheme: str = "w4a16_group", calib_tokens: int = 16) -> str:
    """A tiny full Qwen3 compressed-tensors checkpoint quantized from tests/fixtures' bf16 weights.

    Loadable by HF-style loaders: model.safetensors with `model.layers.N.self_attn.q_proj.weight_packed`
    etc., config.json carrying `quantization_config`, and the tokenizer files. lm_head stays bf16
    (ignored), as llm-compressor recipes do. Static activation scales are calibrated on random
    normalised inputs (the tiny model has no meaningful activations to calibrate on).
    """
    with open(os.path.join(QWEN3_BF16, "config.json")) as f:
        hf_config = json.load(f)
    bf16 = load_file(os.path.join(QWEN3_BF16, "model.safetensors"))
    c = hf_config
    model = Qwen3LayerLinears(c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                              c["num_key_value_heads"], c["head_dim"], c["num_hidden_layers"],
                              vocab=c["vocab_size"], dtype=torch.bfloat16)
    linear_names = set(model.state_dict())
    model.load_state_dict({k: v for k, v in bf16.items() if k in linear_names}, strict=True)
    gen = torch.Generator().manual_seed(0)
    # q/k/v and gate/up read one input in the model: they must share one calibration input.
    inputs = {}
    calib = {name: inputs.setdefault((name.rsplit(".", 2)[0], m.in_features),
                                     torch.randn(calib_tokens, m.in_features, generator=gen))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    tensors, quant_config, _ = quantize_with_library(model, SCHEMES[scheme], fmt=FORMATS.get(scheme), calib=calib)
    # Norms and embeddings are not Linear layers: they come over from the bf16 checkpoint as they are.
    tensors.update({name: t for name, t in bf16.items() if name not in linear_names})
    write_checkpoint(path, tensors, quant_config, hf_config)
    for name in _TOKENIZER_FILES:
        shutil.copy(os.path.join(QWEN3_BF16, name), path)
    return path


class CheckpointLinears(torch.nn.Module):
    """nn.Linear modules under the checkpoint names of `weights` (name -> [out, in] weight), no forward: what
    the library quantizes when only some linears (e.g. the MoE experts) are targeted."""

    def __init__(self, weights: Dict[str, torch.Tensor]):
        super().__init__()
        for name, weight in weights.items():
            parent = self
            *path, leaf = name[: -len(".weight")].split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
            linear.weight.data = weight.clone()
            parent.add_module(leaf, linear)


EXPERTS_TARGET = "re:.*mlp\\.experts\\..*"


def write_qwen3moe_ct_checkpoint(path: str, scheme: dict, reference_dir: Optional[str] = None) -> str:
    """The tiny Qwen3-MoE of tests/fixtures (bf16) with its experts quantized by the compressed-tensors
    library (targets the experts only, as llm-compressor MoE recipes that keep attention in bf16 do; the
    router `mlp.gate` and lm_head stay bf16). `scheme`: a config group's weights / input_activations.
    `reference_dir`: also write the float32 model of the library's own decompressed experts there."""
    source = msmodelslim_fixture("qwen3moe-tiny-bf16")
    with open(os.path.join(source, "config.json")) as f:
        hf_config = json.load(f)
    bf16 = load_file(os.path.join(source, "model.safetensors"))
    experts = {name: t for name, t in bf16.items() if ".mlp.experts." in name}
    model = CheckpointLinears(experts)
    tensors, quant_config, dequantized = quantize_with_library(model, scheme, fmt="pack-quantized",
                                                               targets=(EXPERTS_TARGET,))
    tensors.update({name: t for name, t in bf16.items() if name not in experts})
    write_checkpoint(path, tensors, quant_config, hf_config)
    for name in _TOKENIZER_FILES:
        shutil.copy(os.path.join(source, name), path)
    if reference_dir:
        from helpers.float_reference import write_float_checkpoint

        floats = {name: t.float() for name, t in bf16.items() if name not in experts}
        floats.update({f"{module}.weight": w.float() for module, w in dequantized.items()})
        write_float_checkpoint(path, floats, reference_dir)
    return path


def library_decompressed_logprobs(model_dir, prompt_ids, output_ids):
    """teacher_forced_logprobs's result for a CT checkpoint decompressed by the library (float32)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False))
    ids = torch.tensor([list(prompt_ids) + list(output_ids)])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, len(prompt_ids) - 1: -1].float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(output_ids)[:, None])[:, 0]
    best = logprobs.max(dim=-1)
    return chosen.tolist(), best.indices.tolist(), best.values.tolist()
