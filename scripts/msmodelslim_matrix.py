#!/usr/bin/env python3
"""The msModelSlim conformance matrix: checkpoints written by the real msmodelslim 26.1.0 on CPU.

    python scripts/msmodelslim_matrix.py --list [--subset ci|full]    # the entries, what each is expected to do
    python scripts/msmodelslim_matrix.py --subset ci                  # build (or reuse) the CI subset
    python scripts/msmodelslim_matrix.py --subset full                # every entry (~15-25 min cold, 2 cores)
    python scripts/msmodelslim_matrix.py --only NAME [--only NAME2]   # some entries
    python scripts/msmodelslim_matrix.py --markdown                   # the docs/conformance.md table

Each entry is a tiny random base model (Qwen3 dense, Qwen3-MoE, DeepSeek-V3; bf16, fp16 or fp32) and an
msmodelslim recipe: the presets msmodelslim ships in `lab_practice/` shrunk to the tiny models (layer
lists cut to 2 layers, iterations to a few), each algorithm alone, and its compressed-tensors writer.
Outputs are cached under ~/.cache/sgl-ascend/msmodelslim/<key>/ (SGL_ASCEND_CACHE overrides the root),
key = sha256 of the msmodelslim / torch / transformers versions, the recipe and the base model's recipe;
a miss rebuilds. An entry msmodelslim cannot write on CPU is cached as such (its log tail kept).

Runs msmodelslim through scripts/msmodelslim_tool.py (its venv: .venv-msmodelslim or $SGL_ASCEND_MSMODELSLIM_VENV).
This file imports the standard library only, so any Python can run it; the base models are built by
this same file run under the msmodelslim venv's Python (`_base`, internal).

What the plugin does with each output (served, or refused with which error) is `expect` below; the tests
(tests/test_msmodelslim_matrix.py) hold every built entry to it and docs/conformance.md lists it.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import msmodelslim_tool  # noqa: E402  (a sibling script, not a package)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(ROOT, "tests", "fixtures", "msmodelslim", "qwen3-tiny-bf16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
CALIBRATION = ["The quick brown fox jumps over the lazy dog.", "Hello world, this is a tiny calibration sentence.",
               "Quantization maps floating point weights to integers.", "What is the capital of France? Paris."]
# Longer samples for recipes whose statistics need every expert to see tokens of every sample (the V0
# calibration and the fake quantizer of a MoE expert fail on an expert a sample routes nothing to).
MORE_CALIBRATION = [" ".join(CALIBRATION[i:] + CALIBRATION[:i]) * 3 for i in range(len(CALIBRATION))]
# FlatQuant trains on 4 samples concatenated along the batch dim (processor/flat_quant/trainer.py
# train_layer), so they must have the same token count: these four are 10 tokens each.
EQUAL_LENGTH_CALIBRATION = ["The quick brown fox jumps over the lazy dog.",
                            "The quick brown fox jumps over the lazy fox.",
                            "A quick brown fox jumps over the lazy dog.",
                            "The quick brown fox jumps the the lazy dog."]
# Bump when the way an entry is built changes without its recipe text changing.
BUILD_VERSION = 1

# -- base models ------------------------------------------------------------------------------------

COMMON = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=0,
              eos_token_id=0, pad_token_id=0)
FAMILIES = {
    # family: (transformers config class, model class, config kwargs, msmodelslim --model_type)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(intermediate_size=256, **COMMON), "Qwen3-8B"),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                 dict(intermediate_size=256, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      decoder_sparse_step=1, mlp_only_layers=[], **COMMON), "Qwen3-30B"),
}
# DeepSeek-V3 (MLA with q_lora, dense first layer, routed + shared experts), the shape of
# tests/helpers/deepseek_tiny.py, with the one MTP layer DeepSeek-V3 checkpoints carry.
FAMILIES["deepseek_v3"] = ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1,
    topk_group=1, first_k_dense_replace=1, routed_scaling_factor=1.0, norm_topk_prob=True,
    num_nextn_predict_layers=1, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=0,
    eos_token_id=0, pad_token_id=0), "DeepSeek-V3")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# where msmodelslim's DeepSeek-V3 adapter reads the MTP layer from (model/deepseek_v3/mtp_quant_module.py):
# the last shard of the 671B checkpoint, under layer 61's prefix
DEEPSEEK_MTP_FILE, DEEPSEEK_MTP_PREFIX = "model-00163-of-000163.safetensors", "model.layers.61."


def base_recipe(family: str, dtype: str) -> dict:
    cls, model_cls, kwargs, _ = FAMILIES[family]
    return {"family": family, "config_class": cls, "model_class": model_cls, "config": kwargs,
            "dtype": DTYPES[dtype], "seed": 0, "build_version": BUILD_VERSION}


def _build_base(recipe_json: str, out: str) -> None:
    """Runs under the msmodelslim venv: writes the random base model and the fixtures' tokenizer."""
    import torch
    import transformers

    recipe = json.loads(recipe_json)
    torch.manual_seed(recipe["seed"])
    config = getattr(transformers, recipe["config_class"])(**recipe["config"])
    if recipe["family"] == "deepseek_v3":
        _build_deepseek(config, getattr(torch, recipe["dtype"]), out)
    else:
        model = getattr(transformers, recipe["model_class"])(config).to(getattr(torch, recipe["dtype"]))
        model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(TOKENIZER_DIR, name), out)


def _build_deepseek(config, dtype, out: str) -> None:
    """DeepSeek-V3 as published: layers 0..n-1, then the MTP layer n (a decoder layer plus enorm, hnorm,
    eh_proj, embed_tokens, shared_head), sharded with an index; the MTP extras also where msmodelslim's
    adapter looks for them."""
    import torch
    import transformers
    from safetensors.torch import save_file

    n = config.num_hidden_layers
    config.num_hidden_layers = n + 1
    model = transformers.DeepseekV3ForCausalLM(config).to(dtype)
    config.num_hidden_layers = n
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    h, std = config.hidden_size, config.initializer_range
    mtp = {"enorm.weight": torch.ones(h, dtype=dtype), "hnorm.weight": torch.ones(h, dtype=dtype),
           "eh_proj.weight": (torch.randn(h, 2 * h) * std).to(dtype),
           "embed_tokens.weight": state["model.embed_tokens.weight"].clone(),
           "shared_head.norm.weight": torch.ones(h, dtype=dtype),
           "shared_head.head.weight": state["lm_head.weight"].clone()}
    state.update({f"model.layers.{n}.{k}": v for k, v in mtp.items()})
    last = {k: v for k, v in state.items() if k.startswith(f"model.layers.{n}.")}
    last.update({DEEPSEEK_MTP_PREFIX + k: v.clone() for k, v in mtp.items()})
    first = {k: v for k, v in state.items() if not k.startswith(f"model.layers.{n}.")}
    os.makedirs(out, exist_ok=True)
    first_file = "model-00001-of-000163.safetensors"
    save_file(first, os.path.join(out, first_file), metadata={"format": "pt"})
    save_file(last, os.path.join(out, DEEPSEEK_MTP_FILE), metadata={"format": "pt"})
    weight_map = {**{k: first_file for k in first}, **{k: DEEPSEEK_MTP_FILE for k in last}}
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    config.torch_dtype = dtype
    config.save_pretrained(out)


# -- recipes ----------------------------------------------------------------------------------------

W8A8_DYN = ('{act: {scope: "per_token", dtype: "int8", symmetric: True, method: "minmax"}, '
            'weight: {scope: "per_channel", dtype: "int8", symmetric: True, method: "minmax"}}')
W8A8_STATIC = ('{act: {scope: "per_tensor", dtype: "int8", symmetric: False, method: "minmax"}, '
               'weight: {scope: "per_channel", dtype: "int8", symmetric: True, method: "minmax"}}')
W8A16 = '{weight: {scope: "per_channel", dtype: "int8", symmetric: True, method: "minmax"}}'
W4A8_DYN = ('{act: {scope: "per_token", dtype: "int8", symmetric: True, method: "minmax"}, '
            'weight: {scope: "per_channel", dtype: "int4", symmetric: True, method: "ssz"}}')
AUTOROUND_W8A8 = ('{weight: {scope: "per_channel", dtype: "int8", symmetric: true, method: "autoround", '
                  'ext: {scale_dtype: "bfloat16"}}, act: {scope: "per_token", dtype: "int8", symmetric: true, '
                  'method: "minmax", ext: {scale_dtype: "bfloat16"}}}')
AUTOROUND_W4A4 = AUTOROUND_W8A8.replace('"int8"', '"int4"')
PD_MIX_W8A8 = ('{act: {scope: "pd_mix", dtype: "int8", symmetric: False, method: "minmax"}, '
               'weight: {scope: "per_channel", dtype: "int8", symmetric: True, method: "minmax"}}')
W4A8_DYN_G64 = ('{act: {scope: "per_token", dtype: "int8", symmetric: True, method: "minmax"}, '
                'weight: {scope: "per_channel", dtype: "int4", symmetric: True, method: "ssz", ext: {group_size: 64}}}')


def v1(config_id: str, process: str, save: str = "ascendv1_saver", runner: str = "model_wise") -> str:
    """A modelslim_v1 recipe: `process` is the YAML list of processors (indented 4)."""
    return f"""apiversion: modelslim_v1
metadata:
  config_id: {config_id}
  score: 50
  verified_model_types: []
  label: {{w_bit: 8, a_bit: 8, is_sparse: False, kv_cache: False}}
spec:
  process:
{process.rstrip()}
  dataset: CALIB_PATH
  runner: {runner}
  save:
    - type: "{save}"
      part_file_size: 4
"""


def linear(qconfig: str, include: str = '["*"]', exclude: Optional[str] = None, indent: int = 4) -> str:
    pad = " " * indent
    text = f'{pad}- type: "linear_quant"\n{pad}  qconfig: {qconfig}\n{pad}  include: {include}\n'
    return text + (f"{pad}  exclude: {exclude}\n" if exclude else "")


def v0(config_id: str, spec: str) -> str:
    """A modelslim_v0 recipe (the older writer); `spec` is the YAML under spec: (indented 2)."""
    return f"""apiversion: modelslim_v0
metadata:
  config_id: {config_id}
  score: 50
  verified_model_types: []
  label: {{w_bit: 8, a_bit: 8, is_sparse: False, kv_cache: False}}
spec:
{spec.rstrip()}
  calib_dataset: CALIB_PATH
  calib_save_params:
    part_file_size: 4
"""


# -- the matrix -------------------------------------------------------------------------------------

SERVED = "served"
REFUSED = "refused"              # the plugin refuses it with a CheckpointError containing `message`
NOT_WRITTEN = "not-written"      # msmodelslim 26.1.0 does not write it on CPU (the log says why)


@dataclass
class Entry:
    name: str
    family: str
    dtype: str
    recipe: str
    what: str                        # one line: which preset / algorithm, shrunk how
    expect: str = SERVED
    message: str = ""                # REFUSED*: a substring of the CheckpointError; NOT_WRITTEN: of the log
    reason: str = ""                 # REFUSED* / NOT_WRITTEN: why, for the docs table
    subsets: tuple = ("full",)
    serve: bool = False              # the SGLang end-to-end test serves this one (one per family)
    # verify compares with the base model; False: with the checkpoint's own float weights, for a recipe that
    # changes the model by design (float_sparse prunes 40% of each weight: that is not sgl-ascend's error)
    against_base: bool = True
    sglang_args: List[str] = field(default_factory=list)
    calibration: List[str] = field(default_factory=lambda: list(CALIBRATION))

    def __post_init__(self):
        # recipes name the long shared qconfigs by placeholder
        for name in ("AUTOROUND_W8A8", "AUTOROUND_W4A4", "PD_MIX_W8A8"):
            self.recipe = self.recipe.replace(f"qconfig: {name}", f"qconfig: {globals()[name]}")

    @property
    def model_type(self) -> str:
        return FAMILIES[self.family][3]

    def base(self) -> dict:
        return base_recipe(self.family, self.dtype)


CI = ("ci", "full")
SMOOTH_QUANT_W8A8 = v1("smooth-quant-w8a8", '    - type: "smooth_quant"\n      alpha: 0.5\n      include: ["*"]\n'
                       + linear(W8A8_STATIC))
DEFAULT_W8A8 = v1("default-w8a8", '    - type: "iter_smooth"\n      include: ["*"]\n' + linear(W8A8_DYN))
MOE_CT_W8A8_DYN = v1("moe-ct-w8a8-dynamic", linear(W8A8_DYN, exclude='["*mlp.gate"]'), save="compressed_tensors")
CPU_NORM_DTYPE = "expected m1 and m2 to have the same dtype, but got: float != c10::BFloat16"
CPU_NORM_REASON = ("msmodelslim: smooth_quant / iter_smooth swap the norms for its ir.RMSNorm, whose forward "
                   "returns float32; the next bf16 linear fails on CPU. The same recipe on an fp32 base is served")

ENTRIES: List[Entry] = [
    # -- Qwen3 dense: each algorithm alone ------------------------------------------------------------
    Entry("qwen3-bf16-none-w8a8-dynamic", "qwen3", "bf16",
          v1("none-w8a8-dynamic", linear(W8A8_DYN)),
          "no algorithm: min-max W8A8_DYNAMIC on every linear"),
    Entry("qwen3-fp32-smooth-quant-w8a8", "qwen3", "fp32", SMOOTH_QUANT_W8A8,
          "smooth_quant (norm-linear, alpha 0.5), then W8A8 static"),
    Entry("qwen3-bf16-smooth-quant-w8a8", "qwen3", "bf16", SMOOTH_QUANT_W8A8,
          "smooth_quant on a bf16 model", expect=NOT_WRITTEN, message=CPU_NORM_DTYPE, reason=CPU_NORM_REASON),
    Entry("qwen3-fp32-default-w8a8", "qwen3", "fp32", DEFAULT_W8A8,
          "iter_smooth alone: lab_practice/default/default-w8a8.yaml as shipped (iter_smooth + W8A8_DYNAMIC)",
          subsets=CI, serve=True),
    Entry("qwen3-bf16-default-w8a8", "qwen3", "bf16", DEFAULT_W8A8,
          "lab_practice/default/default-w8a8.yaml on a bf16 model", expect=NOT_WRITTEN, message=CPU_NORM_DTYPE,
          reason=CPU_NORM_REASON),
    Entry("qwen3-bf16-flex-smooth-w8a8-dynamic", "qwen3", "bf16",
          v1("flex-smooth-w8a8-dynamic", '    - type: "flex_smooth_quant"\n      include: ["*"]\n'
             + linear(W8A8_DYN)),
          "flex_smooth_quant (its default subgraphs), then W8A8_DYNAMIC"),
    Entry("qwen3-bf16-autoround-w8a8-dynamic", "qwen3", "bf16",
          v1("autoround-w8a8-dynamic", """    - type: "autoround_quant"
      iters: 2
      enable_round_tuning: true
      strategies:
        - qconfig: AUTOROUND_W8A8
          include: ["*"]
""", runner="auto"),
          "autoround alone (2 iterations), W8A8_DYNAMIC"),
    Entry("qwen3-bf16-v0-anti-outlier-w8a8", "qwen3", "bf16",
          v0("v0-w8a8", """  anti_cfg:
    anti_method: m4
  calib_cfg:
    w_bit: 8
    a_bit: 8
    mm_tensor: False
    disable_names: ['lm_head']
"""),
          "V0 writer, anti-outlier m4, W8A8 static"),
    # -- Qwen3 dense: base dtypes ---------------------------------------------------------------------
    Entry("qwen3-fp16-w8a8", "qwen3", "fp16", v1("fp16-w8a8", linear(W8A8_STATIC)),
          "fp16 base, W8A8 static (deq_scale int64 in the file)", subsets=CI),
    Entry("qwen3-fp32-w8a8", "qwen3", "fp32", v1("fp32-w8a8", linear(W8A8_STATIC)),
          "fp32 base, W8A8 static"),
    Entry("qwen3-fp32-w8a8-dynamic", "qwen3", "fp32", v1("fp32-w8a8-dynamic", linear(W8A8_DYN)),
          "fp32 base, W8A8_DYNAMIC"),
    Entry("qwen3-fp16-w8a16", "qwen3", "fp16", v1("fp16-w8a16", linear(W8A16)),
          "fp16 base, W8A16 (lab_practice/default/default-w8a16.yaml)"),
    Entry("qwen3-fp32-w4a8-dynamic", "qwen3", "fp32",
          v1("fp32-w4a8-dynamic", linear(W8A8_DYN, '["*self_attn*"]') + linear(W4A8_DYN, '["*mlp*"]')),
          "fp32 base, attention W8A8_DYNAMIC, MLP W4A8_DYNAMIC"),
    # -- Qwen3 dense: the shipped presets, shrunk -----------------------------------------------------
    Entry("qwen3-bf16-preset-qwen3-32b-dense-w8a8", "qwen3", "bf16",
          v0("qwen3-32b-dense-w8a8", """  anti_cfg:
    anti_method: m4
  calib_cfg:
    w_bit: 8
    a_bit: 8
    mm_tensor: False
    pdmix: True
    disable_names: ['lm_head', 'model.layers.1.mlp.down_proj']
"""),
          "lab_practice/qwen3/qwen3-32b-dense-w8a8.yaml (V0, m4, pdmix; disabled down_proj list cut to layer 1)"),
    Entry("qwen3-bf16-preset-qwen3-32b-dense-w4a4", "qwen3", "bf16",
          """apiversion: modelslim_v1
metadata:
  config_id: qwen3-32b-dense-w4a4
  score: 50
  verified_model_types: []
  label: {w_bit: 4, a_bit: 4, is_sparse: False, kv_cache: False}
spec:
  prior:
    - process:
      - type: "adapt_rotation"
        stage: 1
        steps: 2
        layer_type: ["up_proj"]
  process:
    - type: "adapt_rotation"
      stage: 2
      online: false
      block_size: -1
      max_tp_size: 1
    - type: "autoround_quant"
      iters: 2
      enable_round_tuning: true
      strategies:
        - qconfig: AUTOROUND_W8A8
          include: ["*self_attn*", "*.down_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.gate_proj"]
        - qconfig: AUTOROUND_W4A4
          include: ["*.up_proj", "*.gate_proj"]
          exclude: ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.gate_proj"]
  dataset: CALIB_PATH
  save:
    - type: "ascendv1_saver"
      part_file_size: 4
""",
          "lab_practice/qwen3/qwen3-32b-dense-w4a4.yaml (offline adapt_rotation 2 steps, autoround 2 iterations; "
          "W8A8_DYNAMIC layer list cut to layer 1)"),
    Entry("qwen3-fp32-preset-qwen3-32b-dense-w8a8c8", "qwen3", "fp32",
          v1("qwen3-32b-dense-w8a8c8", """    - type: "iter_smooth"
      alpha: 0.5
      scale_min: 1e-5
      enable_subgraph_type: ['norm-linear', 'linear-linear', 'ov', 'up-down']
      include: ["*"]
    - type: "linear_quant"
      qconfig: PD_MIX_W8A8
      include: ["*"]
      exclude: ['model.layers.1.mlp.down_proj']
    - type: "dynamic_cache"
      qconfig: {scope: "per_channel", dtype: "int8", symmetric: True, method: "minmax"}
      include: ["*"]
"""),
          "lab_practice/qwen3/qwen3-32b-dense-w8a8c8.yaml (iter_smooth, pd_mix W8A8, int8 KV cache; excluded "
          "down_proj list cut to layer 1; fp32 base: iter_smooth fails on bf16 on CPU)"),
    Entry("qwen3-bf16-preset-qwen3-8b-w8a8s", "qwen3", "bf16",
          v0("qwen3-8b-w8a8s", """  anti_cfg:
    anti_method: m6
  calib_cfg:
    w_bit: 4
    a_bit: 8
    mm_tensor: False
    is_lowbit: True
    fraction: 0.012
  calib_params:
    mix_cfg:
      "model.layers.1.mlp.gate_proj": "float"
      "model.layers.1.mlp.up_proj": "float"
      "model.layers.*.mlp.down_proj": "float"
"""),
          "lab_practice/qwen3/qwen3-8b-w8a8s.yaml (V0 sparse low-bit, m6; float layer list cut to layer 1)",
          expect=REFUSED, message="unknown scheme 'W8A8S'",
          reason="W8A8S (msModelSlim's sparse low-bit weights) has no NPU method in SGLang 0.5.23 nor here; "
                 "the error lists the served schemes"),
    Entry("qwen3-bf16-preset-qwen3-32b-dense-w16a16s", "qwen3", "bf16",
          v1("qwen3-32b-dense-w16a16s", '    - type: "float_sparse"\n      sparse_ratio: 0.4\n'
             '      include: ["*"]\n      exclude: []\n'),
          "lab_practice/qwen3/qwen3-32b-dense-w16a16s.yaml (float sparse, ratio 0.4) as shipped; served as FLOAT "
          "(dense: no NPU sparse kernel in SGLang 0.5.23; verified against its own pruned weights)", subsets=CI,
          against_base=False),
    # -- Qwen3 dense: FlatQuant (no shipped preset; the processor's defaults, trained 10 epochs per layer) -
    Entry("qwen3-bf16-flatquant-w4a4-mlp", "qwen3", "bf16",
          v1("flatquant-w4a4-mlp", """    - type: "flatquant"
      include: ["*mlp*"]
    - type: "autoround_quant"
      iters: 2
      enable_round_tuning: true
      strategies:
        - qconfig: AUTOROUND_W4A4
          include: ["*mlp*"]
"""),
          "flatquant (learned Kronecker transforms, activation clip) + autoround W4A4 on the MLP: "
          "W4A4_FLATQUANT_DYNAMIC gate/up/down, attention FLOAT (all-W4A4 on the random tiny model: "
          "see tests/test_w4a4_flatquant.py)", calibration=EQUAL_LENGTH_CALIBRATION),
    # -- Qwen3 dense: the compressed-tensors writer -------------------------------------------------
    Entry("qwen3-bf16-ct-w8a8-dynamic", "qwen3", "bf16",
          v1("ct-w8a8-dynamic", linear(W8A8_DYN), save="compressed_tensors"),
          "compressed-tensors writer, W8A8 dynamic per-channel"),
    Entry("qwen3-bf16-ct-w8a8", "qwen3", "bf16",
          v1("ct-w8a8", linear(W8A8_STATIC), save="compressed_tensors"),
          "compressed-tensors writer, W8A8 static (asymmetric per-tensor activations; zero point in bf16)",
          subsets=CI),
    # -- Qwen3-MoE: the shipped presets, shrunk -----------------------------------------------------
    Entry("qwen3moe-bf16-preset-qwen3-30b-w4a8-v1", "qwen3moe", "bf16",
          v1("qwen3-30b-w4a8-v1", """    - type: "flex_smooth_quant"
      enable_subgraph_type: ['norm-linear', 'ov']
      include: ["*"]
    - type: "group"
      configs:
""" + linear(W8A8_DYN, '["*self_attn*"]', indent=8)
             + linear(W8A8_DYN, '["*mlp*"]', '["*gate*", "*mlp.experts.*"]', indent=8)
             + linear(W8A8_DYN, '["*model.layers.1.mlp.experts*"]', indent=8)
             + linear(W4A8_DYN_G64, '["*mlp.experts*"]', '["model.layers.1.*"]', indent=8)),
          "lab_practice/qwen3_moe/qwen3-30b-w4a8-v1.yaml (flex smooth norm-linear + ov; W4A8 g64 experts; the "
          "W8A8_DYNAMIC expert layers 41-47 become layer 1)", subsets=CI, serve=True),
    Entry("qwen3moe-bf16-preset-qwen3-235b-w4a8-v1", "qwen3moe", "bf16",
          v1("qwen3-235b-w4a8-v1", """    - type: "flex_smooth_quant"
      enable_subgraph_type: ['norm-linear']
      include: ["*"]
    - type: "group"
      configs:
""" + linear(W8A8_DYN, '["*self_attn*"]', indent=8) + linear(W4A8_DYN, '["*mlp.experts*"]', indent=8)),
          "lab_practice/qwen3_moe/qwen3-235B-w4a8-v1.yaml as shipped (flex smooth, W4A8 per-channel experts)"),
    Entry("qwen3moe-bf16-preset-qwen3-30b-a3b-w8a8", "qwen3moe", "bf16",
          v0("qwen3-30b-a3b-w8a8", """  anti_cfg:
    anti_method: m4
  calib_cfg:
    w_bit: 8
    a_bit: 8
    mm_tensor: False
    w_sym: True
    act_method: 1
    pr: 1.0
    disable_names: ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
  calib_params:
    disable_level: L0
    mix_cfg:
      "*.mlp.*": "w8a8_dynamic"
      "*": "w8a8"
"""),
          "lab_practice/qwen3_moe/qwen3-30b-a3b-w8a8.yaml (V0, m4; router list cut to 2 layers; longer calibration "
          "samples: V0 fails on an expert a sample routes no token to)", calibration=MORE_CALIBRATION),
    Entry("qwen3moe-bf16-preset-qwen3-coder-480b-w4a8", "qwen3moe", "bf16",
          v1("qwen3-coder-480b-w4a8", """    - type: "quarot"
    - type: "flex_smooth_quant"
      enable_subgraph_type: ['norm-linear']
      include: ["*"]
    - type: "group"
      configs:
""" + linear(W8A8_STATIC, '["*self_attn*"]', indent=8)
             + linear(W4A8_DYN, '["*mlp.experts*"]', '["model.layers.0.*"]', indent=8)),
          "lab_practice/qwen3_moe/qwen3-coder-480b-w4a8.yaml (QuaRot, flex smooth, W8A8 static attention, W4A8 "
          "experts; the FLOAT expert layers 0-4, 57-61 become layer 0; longer calibration samples)",
          calibration=MORE_CALIBRATION),
    # -- Qwen3-MoE: base dtypes and the compressed-tensors writer -------------------------------------
    Entry("qwen3moe-fp16-w8a8-dynamic", "qwen3moe", "fp16",
          v1("moe-fp16-w8a8-dynamic", linear(W8A8_DYN, exclude='["*mlp.gate"]')),
          "fp16 base, W8A8_DYNAMIC attention and experts"),
    Entry("qwen3moe-fp32-w4a8-dynamic", "qwen3moe", "fp32",
          v1("moe-fp32-w4a8-dynamic", """    - type: "group"
      configs:
""" + linear(W8A8_DYN, '["*self_attn*"]', indent=8) + linear(W4A8_DYN, '["*mlp.experts*"]', indent=8)),
          "fp32 base, W8A8_DYNAMIC attention, W4A8_DYNAMIC experts"),
    Entry("qwen3moe-fp32-ct-w8a8-dynamic", "qwen3moe", "fp32", MOE_CT_W8A8_DYN,
          "compressed-tensors writer, W8A8 dynamic attention and experts (longer calibration samples)",
          calibration=MORE_CALIBRATION),
    Entry("qwen3moe-bf16-ct-w8a8-dynamic", "qwen3moe", "bf16", MOE_CT_W8A8_DYN,
          "compressed-tensors writer on a bf16 MoE", expect=NOT_WRITTEN, message=CPU_NORM_DTYPE,
          reason="msmodelslim: after its compressed-tensors writer converts layer 0, a float32 activation "
                 "reaches the bf16 router (mlp.gate) and the layer forward fails on CPU; the dense model and an "
                 "fp32 MoE are written"),
    # -- DeepSeek-V3 ---------------------------------------------------------------------------------
    Entry("deepseek-bf16-preset-deepseek-w4a8-per-channel", "deepseek_v3", "bf16",
          v1("deepseek-w4a8-per-channel", """    - type: "flex_smooth_quant"
      enable_subgraph_type: ['norm-linear', 'ov']
      include: ["*"]
    - type: "group"
      configs:
""" + linear(W8A8_DYN, '["*self_attn*"]', '["*kv_b_proj"]', indent=8)
             + linear(W8A8_DYN, '["*mlp*"]', '["*gate", "*mlp.experts.*"]', indent=8)
             + linear(W8A8_DYN, '["model.layers.2.mlp.experts*"]', indent=8)
             + linear(W4A8_DYN, '["*mlp.experts*"]', '["model.layers.2.*"]', indent=8)),
          "lab_practice/deepseek_v3/deepseek_w4a8_per_channel.yaml (flex smooth, W8A8_DYNAMIC attention and "
          "shared experts, W4A8 routed experts; the MTP layer 61 becomes layer 2)",
          expect=NOT_WRITTEN, message='Missing key(s) in state_dict: "mlp.gate.e_score_correction_bias"',
          reason="msmodelslim's DeepSeek-V3 adapter loads each decoder layer's parameters only, and transformers "
                 "4.51's DeepseekV3 keeps the router's e_score_correction_bias as a buffer: layer 1 fails to load "
                 "(the tool asks for transformers 4.48.2, which has no DeepseekV3, i.e. the checkpoint's own "
                 "modeling code). Past that, its MTP step moves lm_head to 'npu' unconditionally "
                 "(DeepSeekV3ModelAdapter.mtp_preprocess): no DeepSeek-V3 is quantized on CPU. SGLang serving "
                 "of DeepSeek-V3 is tested on tests/helpers/deepseek_tiny.py's checkpoint"),
]
BY_NAME: Dict[str, Entry] = {e.name: e for e in ENTRIES}


# -- building ---------------------------------------------------------------------------------------

def cache_root() -> str:
    return os.path.join(os.environ.get("SGL_ASCEND_CACHE", os.path.expanduser("~/.cache/sgl-ascend")),
                        "msmodelslim")


def tool_versions() -> Dict[str, str]:
    return msmodelslim_tool.versions()


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def base_key(entry: Entry) -> str:
    return f"base-{entry.family}-{entry.dtype}-{_digest([tool_versions(), entry.base()])}"


def entry_key(entry: Entry) -> str:
    return f"{entry.name}-{_digest([tool_versions(), entry.base(), entry.recipe, entry.calibration, BUILD_VERSION])}"


def ensure_base(entry: Entry, log=print) -> str:
    path = os.path.join(cache_root(), base_key(entry))
    if not os.path.exists(os.path.join(path, "model", "config.json")):
        log(f"  building base model {entry.family} {entry.dtype}")

        def build(tmp):
            subprocess.run([msmodelslim_tool.python(), os.path.abspath(__file__), "_base", json.dumps(entry.base()),
                            os.path.join(tmp, "model")], check=True, stdout=subprocess.DEVNULL,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if not os.path.exists(path):
            msmodelslim_tool.atomic_build(path, build)
    return os.path.join(path, "model")


@dataclass
class Built:
    entry: Entry
    path: Optional[str]       # the quantized model folder; None when msmodelslim wrote nothing
    base: str                 # the base model folder
    record: dict              # what the build recorded (seconds, versions, returncode, log tail)


def build_entry(entry: Entry, log=print) -> Built:
    base = ensure_base(entry, log)
    path = os.path.join(cache_root(), entry_key(entry))
    if not os.path.exists(os.path.join(path, "entry.json")):
        log(f"  running msmodelslim for {entry.name}")

        def build(tmp):
            calib = os.path.join(tmp, "calib.jsonl")
            with open(calib, "w") as f:
                f.writelines(json.dumps({"inputs_pretokenized": s}) + "\n" for s in entry.calibration)
            config = os.path.join(tmp, "recipe.yaml")
            with open(config, "w") as f:
                f.write(entry.recipe.replace("CALIB_PATH", calib))
            out = os.path.join(tmp, "model")
            tool_log = os.path.join(tmp, "msmodelslim.log")
            start = time.monotonic()
            code = msmodelslim_tool.quant(base, out, config, entry.model_type, tool_log)
            written = code == 0 and os.path.exists(os.path.join(out, "config.json"))
            if not written:
                shutil.rmtree(out, ignore_errors=True)
            record = {"name": entry.name, "versions": tool_versions(), "base": entry.base(),
                      "seconds": round(time.monotonic() - start, 1), "returncode": code,
                      "written": written, "log_tail": msmodelslim_tool.log_tail(tool_log)}
            with open(os.path.join(tmp, "entry.json"), "w") as f:
                json.dump(record, f, indent=1)
        msmodelslim_tool.atomic_build(path, build)
    with open(os.path.join(path, "entry.json")) as f:
        record = json.load(f)
    model = os.path.join(path, "model")
    return Built(entry, model if record["written"] else None, base, record)


def select(subset: Optional[str] = None, only: Optional[List[str]] = None) -> List[Entry]:
    if only:
        unknown = [n for n in only if n not in BY_NAME]
        if unknown:
            raise SystemExit(f"unknown entries {unknown}; see --list")
        return [BY_NAME[n] for n in only]
    return [e for e in ENTRIES if (subset or "full") in e.subsets]


def build_all(entries: List[Entry], log=print) -> List[Built]:
    if not msmodelslim_tool.ready():
        raise SystemExit(msmodelslim_tool.missing())
    built = []
    for i, entry in enumerate(entries):
        start = time.monotonic()
        log(f"[{i + 1}/{len(entries)}] {entry.name}")
        b = build_entry(entry, log)
        state = "written" if b.path else f"NOT written (exit {b.record['returncode']})"
        log(f"  {state}; {time.monotonic() - start:.1f}s here, msmodelslim took {b.record['seconds']}s when built")
        built.append(b)
    return built


FAMILY_NAMES = {"qwen3": "Qwen3", "qwen3moe": "Qwen3-MoE", "deepseek_v3": "DeepSeek-V3"}


def markdown_table(entries: List[Entry]) -> str:
    rows = ["| entry | base | what msmodelslim was asked for | sgl-ascend | why |", "|---|---|---|---|---|"]
    for e in entries:
        base = f"{FAMILY_NAMES[e.family]} {e.dtype}"
        outcome = e.expect + (" (ci)" if "ci" in e.subsets else "") + (" + SGLang" if e.serve else "")
        rows.append(f"| `{e.name}` | {base} | {e.what} | {outcome} | {e.reason or '-'} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_base":
        _build_base(sys.argv[2], sys.argv[3])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", choices=("ci", "full"), default="full")
    parser.add_argument("--only", action="append", help="an entry name (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the entries and exit")
    parser.add_argument("--markdown", action="store_true", help="print the docs table and exit")
    parser.add_argument("--json", action="store_true", help="print name -> model folder (or null) as JSON")
    args = parser.parse_args(argv)
    entries = select(args.subset, args.only)
    if args.markdown:
        print(markdown_table(entries))
        return 0
    if args.list:
        for e in entries:
            print(f"{e.name:48s} {e.expect:16s} {','.join(e.subsets):8s} {e.what}")
        return 0
    start = time.monotonic()
    built = build_all(entries, log=(lambda *a: print(*a, file=sys.stderr)) if args.json else print)
    total = time.monotonic() - start
    if args.json:
        print(json.dumps({b.entry.name: b.path for b in built}, indent=1))
    else:
        print(f"{len(built)} entries in {total:.1f}s; cache {cache_root()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
