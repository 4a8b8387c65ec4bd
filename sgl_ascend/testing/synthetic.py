"""Synthetic checkpoints of realistic proportions for the benchmarks, written to a temp folder; and the
one writer of each checkpoint folder layout (msModelSlim, compressed-tensors, plain float) that the
benchmarks, `sgl-ascend selftest` and the tests (tests/helpers) all write through.

The tensors carry random values in each format's layout (msModelSlim tensor names, dtypes and shapes
as the real tool writes them, see tests/fixtures/msmodelslim), so loading them exercises exactly the
code a real checkpoint does. Values are random: the benchmarks measure bytes and seconds, not accuracy.
"""

import json
import os

import torch
from safetensors.torch import save_file

# Qwen3-1.7B's layer proportions (hidden 2048, intermediate 6144, 16 q / 8 kv heads of 128), with
# fewer layers and a 32k vocabulary so one run stays within minutes on two cores.
SHAPE = dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8,
             head_dim=128, num_hidden_layers=4, vocab_size=32000)

MODELSLIM_SCHEMES = ("W8A8", "W8A8_DYNAMIC", "W8A16", "W4A4_DYNAMIC", "W4A8_DYNAMIC")
ROW_PARALLEL = ("o_proj", "down_proj")


MODELSLIM_DESCRIPTION = "quant_model_description.json"
MODELSLIM_INDEX = "quant_model_weights.safetensors.index.json"


def _save(tensors: dict, file: str) -> None:
    save_file({name: t.contiguous() for name, t in tensors.items()}, file, metadata={"format": "pt"})


def _write_config(path: str, config: dict) -> None:
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def write_modelslim_folder(path: str, tensors: dict, description: dict, config: dict = None, shards: int = 1,
                           indexed: bool = True) -> str:
    """Write an msModelSlim checkpoint folder as the tool does and return `path`: the description
    (name -> type, plus model_quant_type / version / group_size ... as given), the tensors in `shards`
    files quant_model_weights-0000i-of-0000n.safetensors (names sorted, dealt round-robin) with their
    index, or (indexed=False, as older msModelSlim versions write) one quant_model_weights.safetensors
    without index; and config.json when `config` is given."""
    os.makedirs(path, exist_ok=True)
    if config is not None:
        _write_config(path, config)
    with open(os.path.join(path, MODELSLIM_DESCRIPTION), "w") as f:
        json.dump(description, f, indent=1)
    if not indexed:
        if shards != 1:
            raise ValueError("an msModelSlim checkpoint of several shards needs its index")
        _save(tensors, os.path.join(path, "quant_model_weights.safetensors"))
        return path
    names, weight_map = sorted(tensors), {}
    for i in range(shards):
        file = f"quant_model_weights-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[i::shards]}
        _save(part, os.path.join(path, file))
        weight_map.update({name: file for name in part})
    with open(os.path.join(path, MODELSLIM_INDEX), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def write_ct_folder(path: str, tensors: dict, quant_config: dict, config: dict = None) -> str:
    """Write a compressed-tensors checkpoint folder and return `path`: model.safetensors and config.json
    (`config`, default empty, with `quant_config` as its quantization_config)."""
    os.makedirs(path, exist_ok=True)
    _save(tensors, os.path.join(path, "model.safetensors"))
    _write_config(path, {**(config or {}), "quantization_config": quant_config})
    return path


def write_float_folder(path: str, tensors: dict, config: dict = None) -> str:
    """Write an unquantized checkpoint folder (model.safetensors, config.json when given); return `path`."""
    os.makedirs(path, exist_ok=True)
    if config is not None:
        _write_config(path, config)
    _save(tensors, os.path.join(path, "model.safetensors"))
    return path


def hf_config(**overrides) -> dict:
    shape = {**SHAPE, **overrides}
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "torch_dtype": "bfloat16",
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 4096,
            "tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu", **shape}


def linear_shapes(config: dict):
    """checkpoint prefix -> (N, K) of every linear layer."""
    h, d = config["hidden_size"], config["head_dim"]
    q, kv, inter = config["num_attention_heads"] * d, config["num_key_value_heads"] * d, config["intermediate_size"]
    shapes = {}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.q_proj": (q, h), f"{p}.self_attn.k_proj": (kv, h),
                       f"{p}.self_attn.v_proj": (kv, h), f"{p}.self_attn.o_proj": (h, q),
                       f"{p}.mlp.gate_proj": (inter, h), f"{p}.mlp.up_proj": (inter, h),
                       f"{p}.mlp.down_proj": (h, inter)})
    return shapes


def float_tensors(config: dict, gen) -> dict:
    h, d, v = config["hidden_size"], config["head_dim"], config["vocab_size"]
    out = {"model.embed_tokens.weight": torch.randn(v, h, generator=gen).to(torch.bfloat16) * 0.02,
           "lm_head.weight": torch.randn(v, h, generator=gen).to(torch.bfloat16) * 0.02,
           "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for name, size in (("input_layernorm", h), ("post_attention_layernorm", h),
                           ("self_attn.q_norm", d), ("self_attn.k_norm", d)):
            out[f"{p}.{name}.weight"] = torch.ones(size, dtype=torch.bfloat16)
    return out


def modelslim_layer(kind: str, n: int, k: int, gen, row_parallel: bool = False) -> dict:
    """One linear layer's tensors (suffix -> tensor) as msModelSlim writes them for `kind`."""
    if kind == "W4A8_DYNAMIC":
        return expert_tensors(kind, n, k, row_parallel, gen)
    if kind == "FLOAT":
        return {"weight": (torch.randn(n, k, generator=gen) / k ** 0.5).to(torch.bfloat16)}
    high = 8 if kind == "W4A4_DYNAMIC" else 128
    weight = torch.randint(-high + 1, high, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, 1, generator=gen) * 1e-3 + 1e-4
    if kind == "W8A8":
        # as msModelSlim writes them: quant_bias folds the input offset, -offset * sum_k w; deq_scale =
        # input_scale * weight_scale (bf16 models: fp32)
        input_scale, input_offset = 0.04, 3.0
        return {"weight": weight, "input_scale": torch.tensor([input_scale]),
                "input_offset": torch.tensor([input_offset]),
                "quant_bias": (-input_offset * weight.sum(1, dtype=torch.int32)).to(torch.int32),
                "deq_scale": scale.reshape(-1) * input_scale}
    return {"weight": weight, "weight_scale": scale, "weight_offset": torch.zeros(n, 1)}


def c8_kv_tensors(config: dict, gen) -> dict:
    """msModelSlim C8's per-attention-layer KV scales as the real tool writes them: `<attn>.k_proj` /
    `.v_proj` `.kv_cache_scale` and `.kv_cache_offset`, fp32 `[num_kv_heads * head_dim]`, offsets zero."""
    channels = config["num_key_value_heads"] * config["head_dim"]
    out = {}
    for i in range(config["num_hidden_layers"]):
        for proj in ("k_proj", "v_proj"):
            p = f"model.layers.{i}.self_attn.{proj}"
            out[f"{p}.kv_cache_scale"] = torch.rand(channels, generator=gen) * 0.02 + 0.01
            out[f"{p}.kv_cache_offset"] = torch.zeros(channels)
    return out


def write_modelslim(path: str, kind: str, seed: int = 0, c8: bool = False, **overrides) -> str:
    """A synthetic msModelSlim checkpoint whose every linear layer is `kind` ("FLOAT": plain bf16 model);
    `c8`: with msModelSlim C8 KV-cache scales (description `kv_cache_type` / `kv_quant_type` "C8")."""
    config = hf_config(**overrides)
    gen = torch.Generator().manual_seed(seed)
    tensors = float_tensors(config, gen)
    description = {"version": "1.0.0", "model_quant_type": kind, "group_size": 0, "metadata": {}}
    description.update({name: "FLOAT" for name in tensors})
    for prefix, (n, k) in linear_shapes(config).items():
        for suffix, tensor in modelslim_layer(kind, n, k, gen, prefix.endswith(ROW_PARALLEL)).items():
            tensors[f"{prefix}.{suffix}"] = tensor
            description[f"{prefix}.{suffix}"] = kind
    if c8:
        if kind == "FLOAT":
            raise ValueError("C8 KV scales come in an msModelSlim checkpoint: give a quantized kind")
        kv = c8_kv_tensors(config, gen)
        tensors.update(kv)
        description.update({name: "C8" for name in kv}, kv_cache_type="C8", kv_quant_type="C8")
    if kind == "FLOAT":
        return write_float_folder(path, tensors, config)
    return write_modelslim_folder(path, tensors, description, config)


def write_ct_w4a16(path: str, group_size: int = 128, seed: int = 0, **overrides) -> str:
    """A synthetic compressed-tensors pack-quantized int4 (W4A16, symmetric groups) checkpoint."""
    from compressed_tensors.compressors import pack_to_int32

    config = hf_config(**overrides)
    gen = torch.Generator().manual_seed(seed)
    tensors = float_tensors(config, gen)
    for prefix, (n, k) in linear_shapes(config).items():
        values = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
        tensors[f"{prefix}.weight_packed"] = pack_to_int32(values, 4)
        tensors[f"{prefix}.weight_scale"] = (torch.rand(n, k // group_size, generator=gen) * 1e-2).to(torch.bfloat16)
        tensors[f"{prefix}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size}
    quant_config = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
                    "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    return write_ct_folder(path, tensors, quant_config, config)


# Qwen3-30B-A3B's expert proportions (hidden 2048, moe_intermediate 768), 16 of its 128 experts.
MOE_SHAPE = dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=768, num_hidden_layers=2)
MOE_EXPERT_SCHEMES = ("W8A8_DYNAMIC", "W4A8_DYNAMIC", "W4A4_DYNAMIC")


def expert_tensors(kind: str, n: int, k: int, down: bool, gen) -> dict:
    """One expert projection's tensors as msModelSlim writes them (W4A8: two int4 per byte along n)."""
    if kind == "FLOAT":
        return {"weight": (torch.randn(n, k, generator=gen) / k ** 0.5).to(torch.bfloat16)}
    high = 8 if kind.startswith("W4") else 128
    q = torch.randint(-high + 1, high, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, 1, generator=gen) * 1e-3 + 1e-4
    out = {"weight_scale": scale, "weight_offset": torch.zeros(n, 1)}
    if kind != "W4A8_DYNAMIC":
        return {"weight": q, **out}
    from sgl_ascend.ops.int4 import pack_int8_pairs

    deq = q.float() * scale
    # the kernel's correction term: 8 * sum_k of the dequantized weight (over 16 K-slices for down)
    scale_bias = 8 * (deq.reshape(n, 16, k // 16).sum(-1) if down else deq.sum(1, keepdim=True))
    return {"weight": pack_int8_pairs(q, dim=0), "scale_bias": scale_bias, **out}


def write_modelslim_moe(path: str, kind: str, seed: int = 0, **overrides) -> str:
    """A synthetic Qwen3-MoE msModelSlim checkpoint: experts in `kind`, attention W8A8_DYNAMIC
    ("FLOAT": the plain bf16 model)."""
    config = hf_config(**{**MOE_SHAPE, **overrides})
    config.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", decoder_sparse_step=1,
                  mlp_only_layers=[], norm_topk_prob=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = float_tensors(config, gen)
    h, i, e = config["hidden_size"], config["moe_intermediate_size"], config["num_experts"]
    attn_kind = "FLOAT" if kind == "FLOAT" else "W8A8_DYNAMIC"
    description = {"version": "1.0.0", "model_quant_type": kind, "group_size": 0, "metadata": {}}
    description.update({name: "FLOAT" for name in tensors})
    for prefix, (n, k) in linear_shapes(config).items():
        if ".mlp." in prefix:
            continue
        for suffix, tensor in modelslim_layer(attn_kind, n, k, gen).items():
            tensors[f"{prefix}.{suffix}"], description[f"{prefix}.{suffix}"] = tensor, attn_kind
    for layer in range(config["num_hidden_layers"]):
        mlp = f"model.layers.{layer}.mlp"
        tensors[f"{mlp}.gate.weight"] = torch.randn(e, h, generator=gen).to(torch.bfloat16)
        description[f"{mlp}.gate.weight"] = "FLOAT"
        for expert in range(e):
            for proj, (n, k) in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
                for suffix, tensor in expert_tensors(kind, n, k, proj == "down_proj", gen).items():
                    name = f"{mlp}.experts.{expert}.{proj}.{suffix}"
                    tensors[name], description[name] = tensor, kind
    if kind == "FLOAT":
        return write_float_folder(path, tensors, config)
    return write_modelslim_folder(path, tensors, description, config, indexed=False)
