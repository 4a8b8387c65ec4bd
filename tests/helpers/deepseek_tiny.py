"""A tiny random DeepSeek-V3 checkpoint, and a small msModelSlim W8A8_DYNAMIC writer for it (tests).

Layer 0 is dense (first_k_dense_replace=1), layer 1 is MoE with 4 routed experts (top-2, sigmoid
scoring with e_score_correction_bias) and one shared expert; attention is MLA with q_lora.
V2_LITE_CONFIG is the DeepSeek-V2-Lite variant: no q_lora (q_proj), softmax greedy routing. The
writer quantizes every projection per-channel symmetric int8 (weight, weight_scale, weight_offset of
zeros), keeps norms, embeddings, the router and lm_head FLOAT, and writes
quant_model_description.json the way msModelSlim does.
"""

import os
import shutil
from typing import Dict

import torch

from helpers.common import QWEN3_BF16
from sgl_ascend.testing import synthetic

TOKENIZER_DIR = QWEN3_BF16
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json")

CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
    "q_lora_rank": 64, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "hidden_act": "silu",
    "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    # SGLang's CPU rotary embedding serves DeepSeek's yarn only; factor 1 keeps it plain RoPE.
    "rope_scaling": {"type": "yarn", "rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 512,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
    "torch_dtype": "bfloat16", "initializer_range": 0.02,
}


V2_LITE_CONFIG = {**CONFIG, "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
                  "q_lora_rank": None, "scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False}


def _mlp(prefix: str, hidden: int, inter: int, gen) -> Dict[str, torch.Tensor]:
    return {f"{prefix}.gate_proj.weight": torch.randn(inter, hidden, generator=gen) * hidden ** -0.5,
            f"{prefix}.up_proj.weight": torch.randn(inter, hidden, generator=gen) * hidden ** -0.5,
            f"{prefix}.down_proj.weight": torch.randn(hidden, inter, generator=gen) * inter ** -0.5}


def random_weights(seed: int = 0, config: dict = CONFIG) -> Dict[str, torch.Tensor]:
    c, gen = config, torch.Generator().manual_seed(seed)
    h, heads = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    w = {"model.embed_tokens.weight": torch.randn(c["vocab_size"], h, generator=gen),
         "model.norm.weight": torch.ones(h),
         "lm_head.weight": torch.randn(c["vocab_size"], h, generator=gen) * h ** -0.5}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        if c["q_lora_rank"]:
            w.update({
                f"{a}.q_a_proj.weight": torch.randn(c["q_lora_rank"], h, generator=gen) * h ** -0.5,
                f"{a}.q_a_layernorm.weight": torch.ones(c["q_lora_rank"]),
                f"{a}.q_b_proj.weight":
                    torch.randn(heads * qk, c["q_lora_rank"], generator=gen) * c["q_lora_rank"] ** -0.5})
        else:
            w[f"{a}.q_proj.weight"] = torch.randn(heads * qk, h, generator=gen) * h ** -0.5
        w.update({
            f"{p}.input_layernorm.weight": torch.ones(h), f"{p}.post_attention_layernorm.weight": torch.ones(h),
            f"{a}.kv_a_proj_with_mqa.weight":
                torch.randn(c["kv_lora_rank"] + c["qk_rope_head_dim"], h, generator=gen) * h ** -0.5,
            f"{a}.kv_a_layernorm.weight": torch.ones(c["kv_lora_rank"]),
            f"{a}.kv_b_proj.weight": torch.randn(heads * (c["qk_nope_head_dim"] + c["v_head_dim"]),
                                                 c["kv_lora_rank"], generator=gen) * c["kv_lora_rank"] ** -0.5,
            f"{a}.o_proj.weight": torch.randn(h, heads * c["v_head_dim"], generator=gen) * (heads * c["v_head_dim"]) ** -0.5,
        })
        if i < c["first_k_dense_replace"]:
            w.update(_mlp(f"{p}.mlp", h, c["intermediate_size"], gen))
            continue
        w[f"{p}.mlp.gate.weight"] = torch.randn(c["n_routed_experts"], h, generator=gen) * h ** -0.5
        if c["topk_method"] == "noaux_tc":
            w[f"{p}.mlp.gate.e_score_correction_bias"] = torch.zeros(c["n_routed_experts"])
        for e in range(c["n_routed_experts"]):
            w.update(_mlp(f"{p}.mlp.experts.{e}", h, c["moe_intermediate_size"], gen))
        w.update(_mlp(f"{p}.mlp.shared_experts", h, c["moe_intermediate_size"] * c["n_shared_experts"], gen))
    # The router's correction bias stays fp32, as DeepSeek-V3 ships it.
    return {k: v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16) for k, v in w.items()}


def _tokenizer(path: str) -> str:
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(TOKENIZER_DIR, name), path)
    return path


def write_bf16(path: str, weights: Dict[str, torch.Tensor], config: dict = CONFIG) -> str:
    return _tokenizer(synthetic.write_float_folder(path, weights, config))


def is_quantized_projection(name: str) -> bool:
    """Every linear projection (incl. MLA's kv_a_proj_with_mqa); not the router, norms, embeddings, lm_head."""
    module = name.rsplit(".", 2)[-2]
    return name.endswith(".weight") and "_proj" in module


def write_modelslim_w8a8_dynamic(path: str, weights: Dict[str, torch.Tensor], config: dict = CONFIG) -> str:
    """msModelSlim's W8A8_DYNAMIC layout: q = round(w / scale), scale = absmax / 127 per output row."""
    tensors, description = {}, {"model_quant_type": "W8A8_DYNAMIC", "version": "1.0.0", "group_size": 0}
    for name, w in weights.items():
        if not is_quantized_projection(name):
            tensors[name], description[name] = w, "FLOAT"
            continue
        prefix = name[: -len(".weight")]
        scale = w.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
        tensors[name] = torch.round(w.float() / scale).clamp(-128, 127).to(torch.int8)
        tensors[f"{prefix}.weight_scale"] = scale
        tensors[f"{prefix}.weight_offset"] = torch.zeros_like(scale)
        for suffix in ("weight", "weight_scale", "weight_offset"):
            description[f"{prefix}.{suffix}"] = "W8A8_DYNAMIC"
    return _tokenizer(synthetic.write_modelslim_folder(path, tensors, description, config, indexed=False))
