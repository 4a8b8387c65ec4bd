"""`sgl-ascend inspect`'s per-device memory for a Qwen3-235B-A22B-class model at --tp 8 --ep 8.

Writes Qwen3-235B-A22B-shaped msModelSlim checkpoints (94 layers, hidden 4096, 64 / 4 heads of 128,
128 experts of 1536, vocab 151936; attention W8A8_DYNAMIC, experts W4A8_DYNAMIC or W8A8_DYNAMIC,
router / norms / embeddings / lm_head bf16) whose safetensors files hold real headers and no data:
each file is extended to its full size as a sparse file, so nothing is written to disk and
`inspect`, which reads headers only, sees the real checkpoint. Tensor names, dtypes and shapes are
those `sgl_ascend.testing.synthetic` writes (the msModelSlim layout), scaled from small calls.
Prints inspect's table per scheme and the per-device bytes (weights only: no KV cache, activations
or runtime buffers).

    PYTHONPATH=. python bench/parallel_inspect.py [--tp 8] [--ep 8]
"""

import argparse
import json
import os
import struct
import tempfile

import torch

from sgl_ascend.testing import synthetic
from sgl_ascend.tools.cli import format_plan
from sgl_ascend.tools.plan import plan_checkpoint

CONFIG = dict(num_hidden_layers=94, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
              num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_experts=128,
              num_experts_per_tok=8, vocab_size=151936, max_position_embeddings=40960)
DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int8: "I8",
          torch.int32: "I32", torch.int64: "I64"}
GiB = 1024 ** 3


def _layout(make, down: bool):
    """suffix -> (dtype, shape as a function of (n, k)) of what `make(n, k, down)` writes: each dim is
    read off three small calls as constant, proportional to n, or proportional to k."""
    base, wider_n, wider_k = make(32, 64, down), make(64, 64, down), make(32, 128, down)
    out = {}
    for suffix, t in base.items():
        rules = []
        for d, size in enumerate(t.shape):
            if wider_n[suffix].shape[d] != size:
                rules.append(("n", size / 32))
            elif wider_k[suffix].shape[d] != size:
                rules.append(("k", size / 64))
            else:
                rules.append(("const", size))
        out[suffix] = (t.dtype, rules)
    return out


def _shape(rules, n, k):
    return [int(v * (n if kind == "n" else k if kind == "k" else 1)) if kind != "const" else v
            for kind, v in rules]


def _write_sparse_safetensors(file, specs):
    """specs: name -> (dtype, shape). The header for real, the data as a hole."""
    header, offset = {}, 0
    for name, (dtype, shape) in specs.items():
        size = torch.tensor([], dtype=dtype).element_size()
        for dim in shape:
            size *= dim
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return offset


def write_shape_only(path, expert_kind):
    gen = torch.Generator().manual_seed(0)
    config = synthetic.hf_config(**CONFIG)
    config.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", decoder_sparse_step=1,
                  mlp_only_layers=[], norm_topk_prob=True)
    h, i, e, v = CONFIG["hidden_size"], CONFIG["moe_intermediate_size"], CONFIG["num_experts"], CONFIG["vocab_size"]
    attn = {down: _layout(lambda n, k, d: synthetic.modelslim_layer("W8A8_DYNAMIC", n, k, gen, d), down)
            for down in (False, True)}
    experts = {down: _layout(lambda n, k, d: synthetic.expert_tensors(expert_kind, n, k, d, gen), down)
               for down in (False, True)}
    description = {"version": "1.0.0", "model_quant_type": expert_kind, "group_size": 0, "metadata": {}}
    os.makedirs(path, exist_ok=True)
    weight_map, total = {}, 0

    def shard(name, specs, kinds):
        nonlocal total
        total += _write_sparse_safetensors(os.path.join(path, name), specs)
        weight_map.update({tensor: name for tensor in specs})
        description.update(kinds)

    floats = {"model.embed_tokens.weight": (torch.bfloat16, [v, h]), "lm_head.weight": (torch.bfloat16, [v, h]),
              "model.norm.weight": (torch.bfloat16, [h])}
    shard("model-float.safetensors", floats, {name: "FLOAT" for name in floats})
    shapes = synthetic.linear_shapes(config)
    for layer in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        specs, kinds = {}, {}
        for name, size in (("input_layernorm", h), ("post_attention_layernorm", h),
                           ("self_attn.q_norm", CONFIG["head_dim"]), ("self_attn.k_norm", CONFIG["head_dim"])):
            specs[f"{p}.{name}.weight"], kinds[f"{p}.{name}.weight"] = (torch.bfloat16, [size]), "FLOAT"
        specs[f"{p}.mlp.gate.weight"], kinds[f"{p}.mlp.gate.weight"] = (torch.bfloat16, [e, h]), "FLOAT"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            n, k = shapes[f"{p}.self_attn.{proj}"]
            for suffix, (dtype, rules) in attn[proj == "o_proj"].items():
                name = f"{p}.self_attn.{proj}.{suffix}"
                specs[name], kinds[name] = (dtype, _shape(rules, n, k)), "W8A8_DYNAMIC"
        for expert in range(e):
            for proj, (n, k) in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
                for suffix, (dtype, rules) in experts[proj == "down_proj"].items():
                    name = f"{p}.mlp.experts.{expert}.{proj}.{suffix}"
                    specs[name], kinds[name] = (dtype, _shape(rules, n, k)), expert_kind
        shard(f"model-{layer:05d}.safetensors", specs, kinds)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "quant_model_description.json"), "w") as f:
        json.dump(description, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--ep", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qwen3-235b-shapes-") as tmp:
        for kind in ("W4A8_DYNAMIC", "W8A8_DYNAMIC"):
            path = os.path.join(tmp, kind.lower())
            disk = write_shape_only(path, kind)
            plan = plan_checkpoint(path, tp=args.tp, ep=args.ep)
            memory = plan.memory()
            print(format_plan(plan))
            print(f"== Qwen3-235B-A22B shapes, experts {kind}, attention W8A8_DYNAMIC: checkpoint "
                  f"{disk / GiB:.1f} GiB, resident {memory['resident_bytes'] / GiB:.1f} GiB in all, "
                  f"{memory['resident_bytes_per_device'] / GiB:.2f} GiB per device at tp={args.tp} ep={args.ep} "
                  f"(bf16: {memory['bf16_bytes'] / GiB:.1f} GiB)\n")


if __name__ == "__main__":
    main()
