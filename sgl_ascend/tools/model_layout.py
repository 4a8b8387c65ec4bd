"""Which linear layers a decoder model has, from its config.json alone (no weights, no transformers).

The layout follows SGLang's module names: q/k/v fused into `qkv_proj`, gate/up into `gate_up_proj`,
MoE experts as one fused layer per decoder layer. Served families: Llama / Qwen2 / Qwen3 (dense)
and Qwen2-MoE / Qwen3-MoE.
"""

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from sgl_ascend.errors import CheckpointError
from sgl_ascend.quant.checks import check_decoder_config, read_json_object

DENSE_TYPES = ("llama", "qwen2", "qwen3")
MOE_TYPES = ("qwen2_moe", "qwen3_moe")
MLA_TYPES = ("deepseek_v2", "deepseek_v3")

ShardId = Union[int, str, None]


class DecoderConfig(BaseModel):
    """The config.json fields the layout needs; everything else is kept but not read."""

    model_config = ConfigDict(extra="allow", frozen=True)

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    intermediate_size: int
    vocab_size: int
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    torch_dtype: Optional[str] = None
    dtype: Optional[str] = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: List[int] = []
    shared_expert_intermediate_size: int = 0
    quantization_config: Optional[dict] = None
    # DeepSeek-V2/V3: MLA attention, routed + shared experts after the first dense layers
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    n_routed_experts: Optional[int] = None
    n_shared_experts: Optional[int] = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1

    @property
    def is_mla(self) -> bool:
        return self.model_type in MLA_TYPES

    @property
    def routed_experts(self) -> int:
        return (self.n_routed_experts or 0) if self.is_mla else self.num_experts

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def params_dtype(self) -> torch.dtype:
        """The dtype SGLang serves the model in by default (`--dtype auto`): the config's, except that
        float32 checkpoints run in float16 (sglang model_config._get_and_verify_dtype; the NPU's quantized
        kernels have no float32 path either)."""
        name = self.torch_dtype or self.dtype or "bfloat16"
        return torch.float16 if name in ("float16", "float32") else torch.bfloat16

    def is_moe_layer(self, index: int) -> bool:
        if self.is_mla:
            return bool(self.n_routed_experts) and index >= self.first_k_dense_replace \
                and index % self.moe_layer_freq == 0
        return (self.model_type in MOE_TYPES and self.num_experts > 0 and index not in self.mlp_only_layers
                and (index + 1) % self.decoder_sparse_step == 0)


def load_config(model_dir: str) -> DecoderConfig:
    path = os.path.join(model_dir, "config.json")
    raw = read_json_object(path, "the model's config.json", "config.json is missing; copy it from the original model")
    try:
        config = DecoderConfig.model_validate(raw)
    except ValidationError as exc:
        raise CheckpointError(f"config.json lacks fields a decoder model needs: {exc}", file=path) from exc
    if config.model_type not in DENSE_TYPES + MOE_TYPES + MLA_TYPES:
        raise CheckpointError(
            f"model_type {config.model_type!r} is not a layout sgl-ascend tools know; known: "
            f"{', '.join(DENSE_TYPES + MOE_TYPES + MLA_TYPES)}.", file=path, key="model_type")
    if config.is_mla and not (config.kv_lora_rank > 0 and config.qk_rope_head_dim > 0 and config.v_head_dim > 0):
        raise CheckpointError("an MLA model needs positive kv_lora_rank, qk_rope_head_dim and v_head_dim; fix "
                              "config.json (copy it from the original model).", file=path, key="kv_lora_rank")
    check_decoder_config(config, path)
    return config


@dataclass
class LinearSpec:
    """One (possibly fused) linear layer as SGLang builds it."""

    prefix: str                       # e.g. model.layers.0.self_attn.qkv_proj
    input_size: int
    output_sizes: List[int]
    parallel: str                     # column / row / replicated
    shards: Dict[ShardId, str]        # shard id -> checkpoint prefix
    qkv: bool = False
    bias: bool = False


@dataclass
class ExpertsSpec:
    """The routed experts of one MoE layer: gate/up [I, H] and down [H, I] per expert."""

    prefix: str                       # e.g. model.layers.0.mlp.experts
    num_experts: int
    hidden_size: int
    intermediate_size: int
    projections: tuple = ("gate_proj", "up_proj", "down_proj")

    def expert_prefix(self, e: int, proj: str) -> str:
        return f"{self.prefix}.{e}.{proj}"


@dataclass
class FloatSpec:
    """A tensor that stays in the model dtype (embeddings, norms, lm_head, router)."""

    name: str
    shape: tuple
    split: str = "replicated"         # replicated / vocab / heads (split over tp along dim 0)
    in_bf16_model: bool = True        # False: added by the quantizer (anti-outlier norm biases)
    dtype: Optional[torch.dtype] = None  # None: the model dtype
    # not in the checkpoint: made by the server from other tensors (MLA's float w_kc / w_vc)
    derived: bool = False


@dataclass
class ModelLayout:
    config: DecoderConfig
    linears: List[LinearSpec] = field(default_factory=list)
    experts: List[ExpertsSpec] = field(default_factory=list)
    floats: List[FloatSpec] = field(default_factory=list)


def layout_from_config(config: DecoderConfig) -> ModelLayout:
    c = config
    layout = ModelLayout(config)
    h, d = c.hidden_size, c.head_size
    layout.floats.append(FloatSpec("model.embed_tokens.weight", (c.vocab_size, h), "vocab"))
    layout.floats.append(FloatSpec("model.norm.weight", (h,)))
    if not c.tie_word_embeddings:
        layout.floats.append(FloatSpec("lm_head.weight", (c.vocab_size, h), "vocab"))
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        layout.floats += [FloatSpec(f"{p}.input_layernorm.weight", (h,)),
                          FloatSpec(f"{p}.post_attention_layernorm.weight", (h,))]
        attn = f"{p}.self_attn"
        if c.is_mla:
            _add_mla(layout, attn, c)
        else:
            if c.model_type == "qwen3" or c.model_type == "qwen3_moe":
                layout.floats += [FloatSpec(f"{attn}.q_norm.weight", (d,)), FloatSpec(f"{attn}.k_norm.weight", (d,))]
            layout.linears.append(LinearSpec(
                f"{attn}.qkv_proj", h, [c.num_attention_heads * d, c.kv_heads * d, c.kv_heads * d], "column",
                {s: f"{attn}.{s}_proj" for s in "qkv"}, qkv=True, bias=c.attention_bias))
            layout.linears.append(LinearSpec(f"{attn}.o_proj", c.num_attention_heads * d, [h], "row",
                                             {None: f"{attn}.o_proj"}))
        mlp = f"{p}.mlp"
        if not c.is_moe_layer(i):
            _add_mlp(layout, mlp, h, c.intermediate_size)
        elif c.is_mla:
            layout.floats.append(FloatSpec(f"{mlp}.gate.weight", (c.routed_experts, h)))
            if c.model_extra.get("topk_method") == "noaux_tc":  # V3's routing bias, kept in fp32
                layout.floats.append(FloatSpec(f"{mlp}.gate.e_score_correction_bias", (c.routed_experts,),
                                               dtype=torch.float32))
            layout.experts.append(ExpertsSpec(f"{mlp}.experts", c.routed_experts, h, c.moe_intermediate_size))
            if c.n_shared_experts:
                _add_mlp(layout, f"{mlp}.shared_experts", h, c.moe_intermediate_size * c.n_shared_experts)
        else:
            layout.floats.append(FloatSpec(f"{mlp}.gate.weight", (c.num_experts, h)))
            layout.experts.append(ExpertsSpec(f"{mlp}.experts", c.num_experts, h, c.moe_intermediate_size))
            if c.shared_expert_intermediate_size:
                _add_mlp(layout, f"{mlp}.shared_expert", h, c.shared_expert_intermediate_size)
                layout.floats.append(FloatSpec(f"{mlp}.shared_expert_gate.weight", (1, h)))
    return layout


def _add_mla(layout: ModelLayout, attn: str, c: DecoderConfig) -> None:
    """DeepSeek MLA as SGLang builds it: the latent projections replicated, the per-head ones split."""
    h, heads, rope = c.hidden_size, c.num_attention_heads, c.qk_rope_head_dim
    qk = c.qk_nope_head_dim + rope
    latent = c.kv_lora_rank + rope
    if c.q_lora_rank:
        layout.linears.append(LinearSpec(f"{attn}.fused_qkv_a_proj_with_mqa", h, [c.q_lora_rank, latent],
                                         "replicated", {0: f"{attn}.q_a_proj", 1: f"{attn}.kv_a_proj_with_mqa"}))
        layout.floats.append(FloatSpec(f"{attn}.q_a_layernorm.weight", (c.q_lora_rank,)))
        layout.linears.append(LinearSpec(f"{attn}.q_b_proj", c.q_lora_rank, [heads * qk], "column",
                                         {None: f"{attn}.q_b_proj"}))
    else:
        layout.linears.append(LinearSpec(f"{attn}.q_proj", h, [heads * qk], "column", {None: f"{attn}.q_proj"}))
        layout.linears.append(LinearSpec(f"{attn}.kv_a_proj_with_mqa", h, [latent], "replicated",
                                         {None: f"{attn}.kv_a_proj_with_mqa"}))
    layout.floats.append(FloatSpec(f"{attn}.kv_a_layernorm.weight", (c.kv_lora_rank,)))
    kv_b = heads * (c.qk_nope_head_dim + c.v_head_dim)
    layout.linears.append(LinearSpec(f"{attn}.kv_b_proj", c.kv_lora_rank, [kv_b], "column",
                                     {None: f"{attn}.kv_b_proj"}))
    # absorbed attention multiplies by float slices of kv_b_proj (w_kc, w_vc) that the server cuts
    # from it after loading and holds beside the quantized layer (sgl_ascend/models/deepseek.py)
    layout.floats.append(FloatSpec(f"{attn}.w_kc+w_vc", (kv_b, c.kv_lora_rank), "heads", in_bf16_model=False,
                                   derived=True))
    layout.linears.append(LinearSpec(f"{attn}.o_proj", heads * c.v_head_dim, [h], "row", {None: f"{attn}.o_proj"}))


def _add_mlp(layout: ModelLayout, mlp: str, hidden: int, inter: int) -> None:
    layout.linears.append(LinearSpec(f"{mlp}.gate_up_proj", hidden, [inter, inter], "column",
                                     {0: f"{mlp}.gate_proj", 1: f"{mlp}.up_proj"}))
    layout.linears.append(LinearSpec(f"{mlp}.down_proj", inter, [hidden], "row", {None: f"{mlp}.down_proj"}))


def layer_index(name: str) -> Optional[int]:
    """The decoder layer a tensor / module name belongs to (model.layers.<i>.…), None outside the layers."""
    parts = name.split(".", 3)
    return int(parts[2]) if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit() else None
