"""The float reference for end-to-end tests: a checkpoint's weights dequantized by its own convention.

Written independently of sgl_ascend's loaders (plain json + safetensors): msModelSlim dequantizes
`(q - offset) * scale`; W8A8 static folds `input_offset * sum_k(q)` into `quant_bias`, so the float
bias left is `(quant_bias + input_offset * sum_k q) * deq_scale`; W4A8 stores two signed int4 per
byte along the output dim, low nibble first. The result is saved as a float32 Hugging Face checkpoint
and run with transformers, teacher-forced on the server's tokens.
"""

import glob
import json
import os
import shutil
from typing import Dict, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

QUANT_SUFFIXES = ("weight_scale", "weight_offset", "weight_scale_second", "weight_offset_second",
                  "input_scale", "input_offset", "quant_bias", "deq_scale", "scale_bias",
                  "left_trans", "right_trans", "clip_ratio")
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "vocab.json", "merges.txt", "special_tokens_map.json")


def read_tensors(model_dir: str) -> Dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def _unpack_int4_pairs_rows(packed: torch.Tensor, swap_nibbles: bool = False) -> torch.Tensor:
    b = packed.to(torch.int16)
    low = ((b & 0xF) ^ 0x8) - 0x8
    high = b >> 4  # arithmetic shift of a sign-extended byte = signed high nibble
    pair = [high, low] if swap_nibbles else [low, high]
    return torch.stack(pair, dim=1).reshape(-1, packed.shape[1])


def _deq_scale_fp32(deq: torch.Tensor) -> torch.Tensor:
    # fp16 models store the fp32 bit pattern in the low 32 bits of an int64.
    return deq.to(torch.int32).view(torch.float32) if deq.dtype == torch.int64 else deq.float()


def dequantize_modelslim(model_dir: str, swap_nibbles: bool = False) -> Dict[str, torch.Tensor]:
    """swap_nibbles: the wrong W4A8 nibble order, for the test that proves the comparison catches it."""
    with open(os.path.join(model_dir, "quant_model_description.json")) as f:
        description = json.load(f)
    legacy = description.get("version", "0") in ("0", "")
    tensors = read_tensors(model_dir)
    out = {}
    for name, tensor in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        if suffix in QUANT_SUFFIXES:
            continue
        kind = description.get(name, "FLOAT") if suffix == "weight" else "FLOAT"
        if suffix == "bias" and description.get(f"{prefix}.weight") == "W8A8":
            continue  # W8A8 folds the float bias into quant_bias; the W8A8 branch below recovers it
        if kind == "FLOAT":
            out[name] = tensor.float()
            continue
        get = lambda s: tensors[f"{prefix}.{s}"].float()  # noqa: E731
        if kind in ("W8A8_DYNAMIC", "W8A8_MIX", "W8A16", "W4A4_DYNAMIC"):
            scale, offset = get("weight_scale"), get("weight_offset")
            group = tensor.shape[1] // scale.shape[1]  # per channel: [N, 1]; per group: [N, K / g]
            out[name] = (tensor.float() - offset.repeat_interleave(group, 1)) * scale.repeat_interleave(group, 1)
        elif kind == "W4A4_FLATQUANT_DYNAMIC":
            # served: x -> x @ kron(left, right) (right: identity where absent, o_proj), then the W4A4 weight
            w = (tensor.double() - get("weight_offset").double()) * get("weight_scale").double()
            left = get("left_trans").double()
            right = get("right_trans").double() if f"{prefix}.right_trans" in tensors else \
                torch.eye(w.shape[1] // left.shape[0], dtype=torch.float64)
            out[name] = (w @ torch.kron(left, right).t()).float()
        elif kind == "W4A8_DYNAMIC":
            q = tensor.to(torch.int16) if legacy else _unpack_int4_pairs_rows(tensor, swap_nibbles)
            q = q.float() - get("weight_offset")
            if f"{prefix}.weight_scale_second" in tensors:  # group-wise: q * scale_second * scale
                second = get("weight_scale_second")
                q = q * second.repeat_interleave(q.shape[1] // second.shape[1], dim=1)
            out[name] = q * get("weight_scale")
        elif kind == "W8A8":
            deq = _deq_scale_fp32(tensors[f"{prefix}.deq_scale"])
            input_scale, input_offset = get("input_scale").reshape(()), get("input_offset").reshape(())
            q = tensor.float()
            out[name] = q * (deq / input_scale)[:, None]
            residual = (tensors[f"{prefix}.quant_bias"].double() + input_offset.double() * q.double().sum(1))
            bias = (residual * deq.double()).float()
            out[f"{prefix}.bias"] = bias
        else:
            raise NotImplementedError(f"{name}: {kind}")
    return out


def write_float_checkpoint(src_dir: str, tensors: Dict[str, torch.Tensor], dst_dir: str,
                           config_updates: Dict = None) -> str:
    os.makedirs(dst_dir, exist_ok=True)
    for file in COPIED_FILES:
        if os.path.exists(os.path.join(src_dir, file)):
            shutil.copy(os.path.join(src_dir, file), dst_dir)
    with open(os.path.join(dst_dir, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    config.update(config_updates or {})
    config["torch_dtype"] = config["dtype"] = "float32"
    with open(os.path.join(dst_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(dst_dir, "model.safetensors"))
    return dst_dir


def drop_zero_biases(tensors: Dict[str, torch.Tensor], atol: float = 1e-6) -> Dict[str, torch.Tensor]:
    """W8A8 layers of models without projection biases leave a (numerically) zero residual bias."""
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(".bias") and ("proj" in name) and tensor.abs().max() <= atol:
            continue
        out[name] = tensor
    return out


def norm_biases(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Anti-outlier norm biases (rmsnorm(x) * weight + bias), which transformers' RMSNorm lacks."""
    return {name: t for name, t in tensors.items() if name.endswith("norm.bias")}


KV_CACHE_SUFFIXES = (".kv_cache_scale", ".kv_cache_offset")


def split_kv_cache_scales(tensors: Dict[str, torch.Tensor]):
    """(tensors without msModelSlim C8 KV scales, {layer index: (k scale, v scale)} as fp32 [KV_N*D])."""
    kept, scales = {}, {}
    for name, tensor in tensors.items():
        if not name.endswith(KV_CACHE_SUFFIXES):
            kept[name] = tensor
        elif name.endswith(".k_proj.kv_cache_scale") or name.endswith(".v_proj.kv_cache_scale"):
            layer = int(name.split(".layers.")[1].split(".")[0])
            pair = scales.setdefault(layer, [None, None])
            pair[0 if ".k_proj." in name else 1] = tensor.float()
    return kept, {layer: tuple(pair) for layer, pair in scales.items()}


def fake_quant_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric static int8 per channel: round(x / scale) (half to even), saturated, times scale."""
    return torch.round(x / scale).clamp(-128, 127) * scale


def fake_quant_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, D]: each token's row over all heads rounded to int8 with scale max|row| / 127, as
    npu_dynamic_quant does on write in the online int8 KV cache."""
    b, heads, s, d = x.shape
    rows = x.transpose(1, 2).reshape(b, s, heads * d)
    scale = rows.abs().amax(-1, keepdim=True) / 127
    return fake_quant_int8(rows, scale).reshape(b, s, heads, d).transpose(1, 2)


def per_token_kv_quant(skip=(), keep_first: int = 0):
    """The online int8 KV cache's quantization (`kv_quant` of teacher_forced_logprobs); `skip`: layer
    indices kept in float KV; `keep_first`: the first positions left in float (`--kv-cache-keep-first`,
    the whole sequence goes through one update, positions 0..S-1)."""
    def quant(layer_idx, k, v):
        if layer_idx in skip:
            return k, v
        return tuple(torch.cat([x[:, :, :keep_first], fake_quant_int8_per_token(x[:, :, keep_first:])], dim=2)
                     for x in (k, v))

    return quant


def _kv_fake_quant_cache(model, kv_scales=None, kv_quant=None):
    """A transformers cache whose stored K/V (after RoPE, as the KV cache holds them) are int8 fake-quantized
    with the checkpoint's per-channel scales (or by `kv_quant(layer_idx, k, v)`): every attention reads the
    quantized values."""
    from transformers import DynamicCache

    def per_channel(layer_idx, key_states, value_states):
        k_scale, v_scale = kv_scales[layer_idx]
        heads, dim = key_states.shape[1], key_states.shape[-1]
        return (fake_quant_int8(key_states, k_scale.reshape(heads, 1, dim)),
                fake_quant_int8(value_states, v_scale.reshape(heads, 1, dim)))

    quant = kv_quant or per_channel

    class FakeQuantKVCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            key_states, value_states = quant(layer_idx, key_states, value_states)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return FakeQuantKVCache(config=model.config)


def teacher_forced_logprobs(model_dir: str, prompt_ids: Sequence[int], output_ids: Sequence[int],
                            norm_bias: Dict[str, torch.Tensor] = None, kv_scales=None, kv_quant=None):
    """Per output step: (log p(output token), argmax token, log p(argmax)) under the float model;
    kv_scales ({layer: (k, v)}): its KV cache quantized to int8 as the served int8 KV cache is;
    kv_quant (layer_idx, k, v) -> (k, v): another KV quantization (per_token_kv_quant)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    for name, bias in (norm_bias or {}).items():
        norm = model.get_submodule(name[: -len(".bias")])
        norm.register_forward_hook(lambda _m, _a, out, b=bias: out + b.to(out.dtype))
    ids = torch.tensor([list(prompt_ids) + list(output_ids)])
    extra = ({"past_key_values": _kv_fake_quant_cache(model, kv_scales, kv_quant), "use_cache": True}
             if kv_scales or kv_quant else {})
    with torch.no_grad():
        logits = model(ids, **extra).logits[0, len(prompt_ids) - 1: -1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, torch.tensor(output_ids)[:, None])[:, 0]
    best = logprobs.max(dim=-1)
    return chosen.tolist(), best.indices.tolist(), best.values.tolist()


def compare(served: Dict, reference, tolerance: float) -> Dict:
    """Greedy agreement: equal tokens, or a flip between tokens whose float logprobs differ by less
    than `tolerance`; and every served logprob within `tolerance` of the float model's."""
    chosen, best_ids, best_lp = reference
    served_ids, served_lp = served["token_ids"], served["token_logprobs"]
    lp_diff = [abs(a - b) for a, b in zip(served_lp, chosen)]
    flips = [i for i, (s, b) in enumerate(zip(served_ids, best_ids)) if s != b]
    flip_margins = [best_lp[i] - chosen[i] for i in flips]
    return {"tokens": len(served_ids), "exact": len(served_ids) - len(flips), "flips": flips,
            "flip_margins": flip_margins, "max_logprob_diff": max(lp_diff),
            "ok": max(lp_diff) <= tolerance and all(m <= tolerance for m in flip_margins)}
