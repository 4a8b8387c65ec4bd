"""`sgl-ascend verify`: load a checkpoint through the serving layers on CPU and measure its error.

1. Every linear layer is built and loaded exactly as served (ParallelLinear + the checkpoint's scheme,
   `load_linear`, tp=1; MoE experts through `build_moe` / `load_moe`), computing through the op surface.
2. A float model is built with transformers from config.json, holding the checkpoint's own
   dequantization (dequant.py) and its float tensors; the reference is the --reference bf16 model,
   or that float model.
3. The prompts run through the reference; each linear layer's (and MoE block's) real inputs are
   captured, and the served layer's output on them is compared with what the checkpoint means: its
   own dequantized layer on the same inputs (relative error). Against --reference weights a layer
   error would also measure smoothing (smooth_quant, iter/flex smooth, anti-outlier move scales from
   the weights into the norms), not quantization; the --reference weights are compared separately
   ("weight err vs ref", informative).
4. The float model's Linear modules (and MoE experts) are swapped for the served layers and the
   prompts run again: logits and top-1 tokens are compared with the reference's: that is where a
   smoothed checkpoint is judged against the original model.
"""

import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.linear import ParallelLinear, load_linear
from sgl_ascend.layers.moe import build_moe
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint
from sgl_ascend.tools.dequant import dequantize_compressed_tensors, dequantize_modelslim
from sgl_ascend.tools.model_layout import LinearSpec, layout_from_config, load_config
from sgl_ascend.tools.plan import (MSMODELSLIM, UNQUANTIZED, build_linear, layer_theoretical_bytes,
                                   plan_checkpoint, resident_bytes, scheme_source)
from sgl_ascend.tools.quality import PassageProbe, QualityReport

DEFAULT_PROMPTS = ("The capital of France is", "def fibonacci(n):\n    return",
                   "Quantization stores each weight in eight bits, so")


@dataclass
class LayerError:
    prefix: str
    scheme: str
    rel_error: float               # served output vs the checkpoint's own dequantized layer, same inputs
    weight_rel_error: Optional[float]  # own dequantization vs --reference weights (smoothing shows here too)
    resident_bytes: int
    theoretical_bytes: int
    # served output (inputs of the checkpoint's float model) vs the --reference model's layer output (its
    # own inputs): equal under smoothing, which only moves scales; includes the drift of earlier layers
    ref_output_error: Optional[float] = None


@dataclass
class VerifyReport:
    path: str
    reference: Optional[str]
    layers: List[LayerError] = field(default_factory=list)
    prompts: List[dict] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    quality: Optional[QualityReport] = None  # verify(..., quality=True): perplexity and why (quality.py)

    @property
    def worst_layer_error(self) -> float:
        return max((e.rel_error for e in self.layers), default=0.0)

    @property
    def worst_ref_output_error(self) -> Optional[float]:
        errors = [e.ref_output_error for e in self.layers if e.ref_output_error is not None]
        return max(errors) if errors else None

    @property
    def top1_agreement(self) -> float:
        total = sum(p["tokens"] for p in self.prompts)
        return sum(p["top1_agree"] for p in self.prompts) / total if total else 1.0

    @property
    def logit_rel_error(self) -> float:
        return max((p["logit_rel_error"] for p in self.prompts), default=0.0)

    def to_json(self) -> dict:
        return {"path": self.path, "reference": self.reference,
                "layers": [asdict(e) for e in sorted(self.layers, key=lambda e: -e.rel_error)],
                "worst_layer_error": self.worst_layer_error,
                "worst_ref_output_error": self.worst_ref_output_error, "prompts": self.prompts,
                "top1_agreement": self.top1_agreement, "logit_rel_error": self.logit_rel_error,
                "notes": self.notes, "quality": self.quality.to_json() if self.quality else None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


class _FusedShard(torch.nn.Module):
    """Stands in for q_proj / k_proj / v_proj (or gate/up): runs the fused served layer once per
    input and returns this shard's columns, so the fused layer computes as SGLang runs it."""

    def __init__(self, fused: ParallelLinear, start: int, end: int, cache: dict):
        super().__init__()
        self.fused, self.start, self.end, self.cache = fused, start, end, cache

    def forward(self, x):
        if self.cache.get("x") is not x:
            self.cache["x"], self.cache["y"] = x, self.fused(x)
        return self.cache["y"][..., self.start:self.end]


def own_float_weight(source, checkpoint, prefix: str) -> torch.Tensor:
    """Float32 [N, K] weight of one checkpoint module by the producer's own dequantization."""
    if source.format == MSMODELSLIM:
        kind = source.config.types.get(f"{prefix}.weight", "FLOAT")
        return dequantize_modelslim(checkpoint, prefix, kind, source.config.description.is_legacy)
    if source.format == UNQUANTIZED:
        return checkpoint.get(f"{prefix}.weight").float()
    return dequantize_compressed_tensors(checkpoint, prefix, source.scheme_args(prefix))


def _float_weights(spec: LinearSpec, source, checkpoint, reference) -> Dict[str, torch.Tensor]:
    """checkpoint shard prefix -> float32 [N, K] weight to compare against."""
    if reference is not None:
        return {shard: reference.get(f"{shard}.weight").float() for shard in spec.shards.values()}
    return {shard: own_float_weight(source, checkpoint, shard) for shard in spec.shards.values()}


_SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_heads", "head_size",
                 "intermediate_size", "vocab_size", "num_experts", "moe_intermediate_size")


def _check_same_model(config, ref_config, reference: str) -> None:
    diff = {f: (getattr(config, f), getattr(ref_config, f)) for f in _SHAPE_FIELDS
            if getattr(config, f) != getattr(ref_config, f)}
    if diff:
        listing = ", ".join(f"{f} {a} vs {b}" for f, (a, b) in diff.items())
        raise CheckpointError(f"the reference is not the model this checkpoint was quantized from ({listing}); "
                              "pass the original bf16 model.", file=os.path.join(reference, "config.json"))


def _float_bias(spec: LinearSpec, checkpoint) -> Optional[torch.Tensor]:
    """The float bias of the (fused) layer as the checkpoint stores it, None when it has none."""
    names = [f"{shard}.bias" for shard in spec.shards.values()]
    if not all(name in checkpoint for name in names):
        return None
    return torch.cat([checkpoint.get(name).float() for name in names])


def _own_float_state_dict(source, checkpoint, layout) -> Dict[str, torch.Tensor]:
    """The float model's weights from the checkpoint itself (float tensors + dequantized layers)."""
    state = {}
    for spec in layout.floats:
        state[spec.name] = checkpoint.get(spec.name)
    for spec in layout.linears:
        for shard, w in _float_weights(spec, source, checkpoint, None).items():
            state[f"{shard}.weight"] = w
            if f"{shard}.bias" in checkpoint:
                state[f"{shard}.bias"] = checkpoint.get(f"{shard}.bias")
    for spec in layout.experts:
        def dq(e, proj):
            return own_float_weight(source, checkpoint, spec.expert_prefix(e, proj))

        experts = range(spec.num_experts)
        state[f"{spec.prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([dq(e, "gate_proj"), dq(e, "up_proj")]) for e in experts])
        state[f"{spec.prefix}.down_proj"] = torch.stack([dq(e, "down_proj") for e in experts])
    return state


def _build_own_float_model(path: str, source, checkpoint, layout):
    """transformers' model from config.json, holding the checkpoint's own float weights. Norm biases
    (anti-outlier smoothing) are added after their norms, as the served model does."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(path)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16, attn_implementation="eager")
    state = _own_float_state_dict(source, checkpoint, layout)
    for name, tensor in state.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr == "bias" and getattr(module, "bias", None) is None:
            # anti-outlier smoothing leaves a bias on projections that had none
            module.bias = torch.nn.Parameter(torch.empty(tensor.shape[0], dtype=torch.bfloat16), requires_grad=False)
    missing, unexpected = model.load_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()}, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight") or not hf_config.tie_word_embeddings]
    if missing or unexpected:
        raise CheckpointError(f"the float model does not match the checkpoint: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}", file=path)
    for name in source.extra_float_tensors():
        bias = checkpoint.get(name).to(torch.bfloat16)
        model.get_submodule(name.rpartition(".")[0]).register_forward_hook(
            lambda _m, _args, out, bias=bias: out + bias)
    return model.eval()


class _ServedExperts(torch.nn.Module):
    """Stands in for transformers' experts module (hidden, top_k_index, top_k_weights)."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return self.moe(hidden_states, top_k_weights, top_k_index)


def _prompt_ids(path: str, prompts) -> List[torch.Tensor]:
    """Token ids of the prompts by the checkpoint's tokenizer; fixed pseudo-random ids when it ships
    none (or it yields no tokens), so the logit comparison still runs."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = [tokenizer(p)["input_ids"] for p in prompts]
        if all(ids):
            return [torch.tensor([i], dtype=torch.long) for i in ids]
    except Exception:  # noqa: BLE001 - any tokenizer failure means: use the fallback ids
        pass
    gen = torch.Generator().manual_seed(0)
    vocab = load_config(path).vocab_size
    return [torch.randint(0, vocab, (1, 8 + i), generator=gen) for i, _ in enumerate(prompts)]


def verify_checkpoint(path: str, reference: Optional[str] = None, prompts=DEFAULT_PROMPTS,
                      progress: Optional[bool] = None, quality: bool = False) -> VerifyReport:
    plan = plan_checkpoint(path)
    if plan.errors:
        raise CheckpointError(f"{len(plan.errors)} problem(s), first: {plan.errors[0]}")
    config = load_config(path)
    source = scheme_source(path, config)
    checkpoint = SafetensorsCheckpoint(path)
    ref_checkpoint = SafetensorsCheckpoint(reference) if reference else None
    if reference:
        _check_same_model(config, load_config(reference), reference)
    layout = layout_from_config(config)
    report = VerifyReport(os.path.abspath(path), os.path.abspath(reference) if reference else None)
    if reference and source.extra_float_tensors():
        report.notes.append("anti-outlier smoothing (norm biases) rescaled the weights: the weight error vs "
                            "--reference measures smoothing too; layer errors are against the checkpoint's own "
                            "dequantization, the logits against --reference")
    disable = None if progress is None else not progress

    served: Dict[str, torch.nn.Module] = {}
    for spec in tqdm(layout.linears, desc="load layers", disable=disable):
        layer = build_linear(spec, source, config)
        load_linear(layer, checkpoint, spec.shards)
        served[spec.prefix] = layer
    for spec in tqdm(layout.experts, desc="load experts", disable=disable):
        mlp = spec.prefix.rpartition(".")[0]
        served[spec.prefix] = build_moe(source.moe_method(mlp, config.params_dtype), checkpoint, mlp,
                                        num_experts=spec.num_experts, hidden_size=spec.hidden_size,
                                        intermediate_size=spec.intermediate_size, params_dtype=config.params_dtype)

    # The served model is the checkpoint's own float model with its layers swapped. Each layer is judged
    # on the inputs that float model feeds it (smoothed checkpoints calibrate their activation scales
    # for those, not for the original model's); the logits are judged against the --reference model, or
    # the same float model before the swap.
    model = _build_own_float_model(path, source, checkpoint, layout)
    captured: Dict[str, list] = {prefix: [] for prefix in served}
    hooks = []
    for spec in layout.linears:
        first = next(iter(spec.shards.values()))
        hooks.append(model.get_submodule(first).register_forward_pre_hook(
            lambda _m, args, key=spec.prefix: captured[key].append(args[0].detach().reshape(-1, args[0].shape[-1]))))
    for spec in layout.experts:
        hooks.append(model.get_submodule(spec.prefix).register_forward_hook(
            lambda _m, args, out, key=spec.prefix: captured[key].append((args, out))))
    ids = _prompt_ids(path, prompts)
    with torch.no_grad():
        own_logits = [model(input_ids=t).logits[0].float() for t in tqdm(ids, desc="float model", disable=disable)]
    for h in hooks:
        h.remove()
    probe = PassageProbe(path) if quality else None
    if probe:
        probe.run("weight_only", model, {spec.prefix: next(iter(spec.shards.values())) for spec in layout.linears})
    ref_logits, ref_outputs, hooks = own_logits, {}, []
    if reference is not None:
        from transformers import AutoModelForCausalLM

        ref_model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.bfloat16,
                                                         attn_implementation="eager").eval()
        for spec in layout.linears:
            for shard in spec.shards.values():
                hooks.append(ref_model.get_submodule(shard).register_forward_hook(
                    lambda _m, _args, out, key=(spec.prefix, shard): ref_outputs.setdefault(key, []).append(
                        out.detach().reshape(-1, out.shape[-1]))))
        for spec in layout.experts:
            hooks.append(ref_model.get_submodule(spec.prefix).register_forward_hook(
                lambda _m, _args, out, key=(spec.prefix, None): ref_outputs.setdefault(key, []).append(out)))
        with torch.no_grad():
            ref_logits = [ref_model(input_ids=t).logits[0].float()
                          for t in tqdm(ids, desc="reference model", disable=disable)]
        for h in hooks:
            h.remove()
        if probe:
            probe.run("reference", ref_model)
        del ref_model

    for spec in tqdm(layout.linears, desc="layer errors", disable=disable):
        layer = served[spec.prefix]
        x = torch.cat(captured.pop(spec.prefix))
        w = torch.cat(list(_float_weights(spec, source, checkpoint, None).values()))
        with torch.no_grad():
            expected = F.linear(x.float(), w, _float_bias(spec, checkpoint))
            actual = layer(x)
        weight_err = ref_err = None
        if ref_checkpoint is not None:
            weight_err = _rel(w, torch.cat(list(_float_weights(spec, source, checkpoint, ref_checkpoint).values())))
            ref_out = torch.cat([torch.cat(ref_outputs[(spec.prefix, shard)]) for shard in spec.shards.values()], -1)
            ref_err = _rel(actual, ref_out)
        report.layers.append(LayerError(spec.prefix, plan_scheme(plan, spec.prefix), _rel(actual, expected),
                                        weight_err, resident_bytes(layer), layer_theoretical_bytes(layer), ref_err))
    for spec in layout.experts:
        moe = served[spec.prefix]
        with torch.no_grad():
            pairs = [(moe(args[0], args[2], args[1]), out) for args, out in captured.pop(spec.prefix)]
        expected = torch.cat([out.reshape(-1) for _, out in pairs])
        actual = torch.cat([got.reshape(-1) for got, _ in pairs])
        theoretical = moe.moe_method.theoretical_bytes(moe.num_local_experts, moe.hidden_size,
                                                       moe.intermediate_size_per_partition)
        ref_err = None
        if reference is not None:
            ref_err = _rel(actual, torch.cat([out.reshape(-1) for out in ref_outputs[(spec.prefix, None)]]))
        report.layers.append(LayerError(spec.prefix, plan_scheme(plan, spec.prefix), _rel(actual, expected),
                                        None, resident_bytes(moe), theoretical, ref_err))

    for spec in layout.linears:
        layer = served[spec.prefix]
        shards = list(spec.shards.values())
        if len(shards) == 1:
            _set_module(model, shards[0], layer)
            continue
        cache, start = {}, 0
        for shard, size in zip(shards, layer.output_partition_sizes):
            _set_module(model, shard, _FusedShard(layer, start, start + size, cache))
            start += size
    for spec in layout.experts:
        _set_module(model, spec.prefix, _ServedExperts(served[spec.prefix]))
    with torch.no_grad():
        for text, t, ref in tqdm(list(zip(prompts, ids, ref_logits)), desc="served model", disable=disable):
            logits = model(input_ids=t).logits[0].float()
            report.prompts.append({"prompt": text, "tokens": int(t.shape[1]),
                                   "top1_agree": int((logits.argmax(-1) == ref.argmax(-1)).sum()),
                                   "logit_rel_error": _rel(logits, ref)})
    if probe:
        probe.run("served", model)
        report.quality = probe.report({e.prefix: e.scheme for e in report.layers}, reference is not None)
    return report


def plan_scheme(plan, prefix: str) -> str:
    return next(e.scheme for e in plan.layers if e.prefix == prefix)


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)
