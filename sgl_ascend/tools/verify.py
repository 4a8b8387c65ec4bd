"""`sgl-ascend verify`: load a checkpoint through the serving layers on CPU and measure its error.

The model runs one decoder layer at a time, so memory holds about one float layer, one served layer
(and one reference layer) besides the embeddings, whatever the model's size; hidden states carry the
prompts from layer to layer. Up to three streams run side by side:

- own: the checkpoint's own float model, transformers' decoder layer from config.json holding the
  checkpoint's dequantization (dequant.py) and its float tensors, anti-outlier norm biases added
  after their norms as the served model does;
- served: the same float layer with its Linear modules (fused q/k/v, gate/up, MLA's q_a + kv_a as
  SGLang fuses them) and its experts swapped for the layers built and loaded exactly as served
  (ParallelLinear + the checkpoint's scheme, `load_linear`; `build_moe` / `load_moe`), computing
  through the op surface;
- reference: the --reference bf16 model's layer (else the own stream is the reference).

Per layer: the own layer runs on its stream and each linear layer's (and MoE block's) inputs are
captured; the served layer's output on them is compared with what the checkpoint means, its own
dequantized layer on the same inputs (relative error). Against --reference weights a layer error
would also measure smoothing (smooth_quant, iter/flex smooth, anti-outlier move scales from the
weights into the norms), not quantization; the --reference weights and the reference layer's outputs
are compared separately (informative). With --tp N each layer is also built for the N ranks and their
outputs are put together as SGLang's all-gather / all-reduce would (tp_error: against tp=1). The
logits of the served stream are compared with the reference's (top-1 agreement): that is where a
smoothed checkpoint is judged against the original model.
"""

import copy
import os
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.linear import ParallelLinear, load_linear
from sgl_ascend.layers.moe import build_moe
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint
from sgl_ascend.tools.dequant import dequantize_compressed_tensors, dequantize_modelslim
from sgl_ascend.tools.model_layout import LinearSpec, ModelLayout, layer_index, layout_from_config, load_config
from sgl_ascend.tools.plan import (MSMODELSLIM, UNQUANTIZED, UnquantizedSource, build_linear,
                                   layer_theoretical_bytes, plan_checkpoint, resident_bytes, scheme_source)
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
    # --tp N: the N ranks' outputs put together (all-gather / all-reduce) vs the tp=1 layer's, same inputs
    tp_error: Optional[float] = None


@dataclass
class VerifyReport:
    path: str
    reference: Optional[str]
    layers: List[LayerError] = field(default_factory=list)
    prompts: List[dict] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    tp: int = 1
    ep: int = 1
    quality: Optional[QualityReport] = None  # verify(..., quality=True): perplexity and why (quality.py)

    @property
    def worst_layer_error(self) -> float:
        return max((e.rel_error for e in self.layers), default=0.0)

    @property
    def worst_ref_output_error(self) -> Optional[float]:
        errors = [e.ref_output_error for e in self.layers if e.ref_output_error is not None]
        return max(errors) if errors else None

    @property
    def worst_tp_error(self) -> Optional[float]:
        errors = [e.tp_error for e in self.layers if e.tp_error is not None]
        return max(errors) if errors else None

    @property
    def top1_agreement(self) -> float:
        total = sum(p["tokens"] for p in self.prompts)
        return sum(p["top1_agree"] for p in self.prompts) / total if total else 1.0

    @property
    def logit_rel_error(self) -> float:
        return max((p["logit_rel_error"] for p in self.prompts), default=0.0)

    def to_json(self) -> dict:
        return {"path": self.path, "reference": self.reference, "tp": self.tp, "ep": self.ep,
                "layers": [asdict(e) for e in sorted(self.layers, key=lambda e: -e.rel_error)],
                "worst_layer_error": self.worst_layer_error,
                "worst_ref_output_error": self.worst_ref_output_error, "worst_tp_error": self.worst_tp_error,
                "prompts": self.prompts, "top1_agreement": self.top1_agreement,
                "logit_rel_error": self.logit_rel_error, "notes": self.notes,
                "quality": self.quality.to_json() if self.quality else None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


class _FusedShard(torch.nn.Module):
    """Stands in for q_proj / k_proj / v_proj (or gate/up, MLA's q_a / kv_a): runs the fused served
    layer once per input and returns this shard's columns, so the fused layer computes as SGLang runs it."""

    def __init__(self, fused: ParallelLinear, start: int, end: int, cache: dict):
        super().__init__()
        self.fused, self.start, self.end, self.cache = fused, start, end, cache

    def forward(self, x):
        if self.cache.get("x") is not x:
            self.cache["x"], self.cache["y"] = x, self.fused(x)
        return self.cache["y"][..., self.start:self.end]


class _ServedExperts(torch.nn.Module):
    """Stands in for transformers' experts module (hidden, top_k_index, top_k_weights)."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return self.moe(hidden_states, top_k_weights, top_k_index)


def own_float_weight(source, checkpoint, prefix: str) -> torch.Tensor:
    """Float32 [N, K] weight of one checkpoint module by the producer's own dequantization."""
    if source.format == MSMODELSLIM:
        kind = source.config.types.get(f"{prefix}.weight", "FLOAT")
        return dequantize_modelslim(checkpoint, prefix, kind, source.config.description.is_legacy)
    if source.format == UNQUANTIZED:
        return checkpoint.get(f"{prefix}.weight").float()
    return dequantize_compressed_tensors(checkpoint, prefix, source.scheme_args(prefix))


_SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_heads", "head_size",
                 "intermediate_size", "vocab_size", "num_experts", "moe_intermediate_size", "n_routed_experts",
                 "q_lora_rank", "kv_lora_rank")


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


def _layer_parts(layout: ModelLayout) -> List[ModelLayout]:
    """The layout cut into one ModelLayout per decoder layer (linears, experts, float tensors)."""
    parts = [ModelLayout(layout.config) for _ in range(layout.config.num_hidden_layers)]
    for attr in ("linears", "experts", "floats"):
        for spec in getattr(layout, attr):
            index = layer_index(getattr(spec, "prefix", None) or spec.name)
            if index is not None and not getattr(spec, "derived", False):
                getattr(parts[index], attr).append(spec)
    return parts


def _layer_state(part: ModelLayout, index: int, source, checkpoint, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """One decoder layer's float weights (names relative to the layer) from `checkpoint`: its float
    tensors and the producer's dequantization of its linear layers and experts."""
    strip = len(f"model.layers.{index}.")
    state = {}
    for spec in part.floats:
        tensor = checkpoint.get(spec.name)
        state[spec.name[strip:]] = tensor if spec.dtype == torch.float32 else tensor.to(dtype)
    for spec in part.linears:
        for shard in spec.shards.values():
            state[f"{shard[strip:]}.weight"] = own_float_weight(source, checkpoint, shard).to(dtype)
            if f"{shard}.bias" in checkpoint:
                state[f"{shard[strip:]}.bias"] = checkpoint.get(f"{shard}.bias").to(dtype)
    for spec in part.experts:
        def dq(e, proj):
            return own_float_weight(source, checkpoint, spec.expert_prefix(e, proj)).to(dtype)

        experts = range(spec.num_experts)
        state[f"{spec.prefix[strip:]}.gate_up_proj"] = torch.stack(
            [torch.cat([dq(e, "gate_proj"), dq(e, "up_proj")]) for e in experts])
        state[f"{spec.prefix[strip:]}.down_proj"] = torch.stack([dq(e, "down_proj") for e in experts])
    return state


class _FloatModel:
    """transformers' model for config.json, built on the meta device: module classes and names only.
    Each decoder layer is materialized on its own with the weights given, run over the prompts and
    dropped; the rotary embedding is the model's own."""

    def __init__(self, path: str, dtype: torch.dtype):
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_config = AutoConfig.from_pretrained(path)
        if hasattr(hf_config, "quantization_config"):
            del hf_config.quantization_config
        with torch.device("meta"):
            self.meta = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="eager")
        self.path, self.dtype = path, dtype
        self.rotary = type(self.meta.model.rotary_emb)(config=self.meta.config)

    def context(self, tokens: int) -> dict:
        """Positions, rotary cos/sin and the causal mask of one prompt."""
        positions = torch.arange(tokens).unsqueeze(0)
        cos_sin = self.rotary(torch.empty(1, tokens, dtype=self.dtype), positions)
        mask = torch.full((tokens, tokens), torch.finfo(self.dtype).min, dtype=self.dtype).triu(1)
        return {"position_ids": positions, "position_embeddings": cos_sin, "attention_mask": mask[None, None]}

    def layer(self, index: int, state: Dict[str, torch.Tensor]) -> torch.nn.Module:
        layer = copy.deepcopy(self.meta.model.layers[index])
        for name, tensor in state.items():
            module_name, _, attr = name.rpartition(".")
            module = layer.get_submodule(module_name)
            if attr == "bias" and getattr(module, "bias", False) is None:
                # anti-outlier smoothing leaves a bias on projections that had none
                module.bias = torch.nn.Parameter(torch.empty(tensor.shape, device="meta"), requires_grad=False)
        missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise CheckpointError(f"the float layer {index} does not match the checkpoint: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}", file=self.path)
        return layer.eval()

    @staticmethod
    def run(layer: torch.nn.Module, hidden: List[torch.Tensor], contexts: List[dict]) -> List[torch.Tensor]:
        with torch.no_grad():
            return [layer(h, **ctx) for h, ctx in zip(hidden, contexts)]

    def embed(self, checkpoint, ids: List[torch.Tensor]) -> List[torch.Tensor]:
        weight = checkpoint.get("model.embed_tokens.weight").to(self.dtype)
        return [F.embedding(t, weight) for t in ids]

    def logits(self, checkpoint, hidden: List[torch.Tensor]) -> List[torch.Tensor]:
        norm = copy.deepcopy(self.meta.model.norm)
        norm.load_state_dict({"weight": checkpoint.get("model.norm.weight").to(self.dtype)}, assign=True)
        name = "lm_head.weight" if "lm_head.weight" in checkpoint else "model.embed_tokens.weight"
        head = checkpoint.get(name).to(self.dtype)
        with torch.no_grad():
            return [F.linear(norm(h), head)[0].float() for h in hidden]


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


def _tp_linear_output(spec: LinearSpec, source, config, checkpoint, x: torch.Tensor, tp: int) -> torch.Tensor:
    """The layer as `tp` ranks compute it, one rank's layer at a time, put together as SGLang does:
    column ranks' shards all-gathered (kv heads replicated over ranks taken once), row ranks (each
    on its slice of K) summed by the all-reduce."""
    outputs = []
    for rank in range(tp):
        layer = build_linear(spec, source, config, tp_rank=rank, tp_size=tp)
        load_linear(layer, checkpoint, spec.shards)
        if spec.parallel == "row":
            k = layer.input_size_per_partition
            outputs.append(layer(x[..., rank * k:(rank + 1) * k]).float())
            continue
        columns = layer(x).split(layer.output_partition_sizes, dim=-1)
        replicas = layer.qkv.kv_head_replicas if layer.qkv is not None else 1
        outputs.append([c if j == 0 or rank % replicas == 0 else None for j, c in enumerate(columns)])
    if spec.parallel == "row":
        return torch.stack(outputs).sum(0)
    shards = zip(*outputs)
    return torch.cat([torch.cat([c for c in pieces if c is not None], -1) for pieces in shards], -1)


def _tp_experts_output(spec, source, config, checkpoint, args, tp: int, ep: int) -> torch.Tensor:
    """The experts as the tp ranks compute them (experts split over ep, the rest over moe tp = tp / ep),
    their partial sums added by the all-reduce."""
    mlp = spec.prefix.rpartition(".")[0]
    moe_tp = tp // ep
    total = 0
    for rank in range(tp):
        moe = build_moe(source.moe_method(mlp, config.params_dtype), checkpoint, mlp,
                        num_experts=spec.num_experts, hidden_size=spec.hidden_size,
                        intermediate_size=spec.intermediate_size, tp_rank=rank % moe_tp, tp_size=moe_tp,
                        ep_rank=rank // moe_tp, ep_size=ep, params_dtype=config.params_dtype)
        total = total + torch.cat([moe(a[0], a[2], a[1]).float().reshape(-1) for a in args])
    return total


def verify_checkpoint(path: str, reference: Optional[str] = None, prompts=DEFAULT_PROMPTS,
                      progress: Optional[bool] = None, tp: int = 1, ep: int = 1,
                      quality: bool = False) -> VerifyReport:
    """quality: also the passage report of quality.py, on whole models made of the layers the stream
    keeps for it (so that mode holds the model three times over: own float, served, reference)."""
    plan = plan_checkpoint(path, tp=tp, ep=ep)
    if plan.errors:
        raise CheckpointError(f"{len(plan.errors)} problem(s), first: {plan.errors[0]}")
    config = load_config(path)
    source = scheme_source(path, config)
    checkpoint = SafetensorsCheckpoint(path)
    ref_checkpoint = SafetensorsCheckpoint(reference) if reference else None
    if reference:
        _check_same_model(config, load_config(reference), reference)
    layout = layout_from_config(config)
    report = VerifyReport(os.path.abspath(path), os.path.abspath(reference) if reference else None, tp=tp, ep=ep)
    if reference and source.extra_float_tensors():
        report.notes.append("anti-outlier smoothing (norm biases) rescaled the weights: the weight error vs "
                            "--reference measures smoothing too; layer errors are against the checkpoint's own "
                            "dequantization, the logits against --reference")
    disable = None if progress is None else not progress

    dtype = config.params_dtype
    model = _FloatModel(path, dtype)
    ids = _prompt_ids(path, prompts)
    contexts = [model.context(t.shape[1]) for t in ids]
    own = model.embed(checkpoint, ids)
    served = own
    ref = model.embed(ref_checkpoint, ids) if reference else None
    norm_biases = source.extra_float_tensors()
    kept = {"reference": [], "weight_only": [], "served": []} if quality else None
    for index, part in enumerate(tqdm(_layer_parts(layout), desc="layers", disable=disable)):
        ref_outputs: Dict[tuple, list] = {}
        if reference:
            layer = model.layer(index, _layer_state(part, index, UnquantizedSource(), ref_checkpoint, dtype))
            hooks = _hook_outputs(layer, part, index, ref_outputs)
            ref = model.run(layer, ref, contexts)
            for h in hooks:
                h.remove()
            if kept is not None:
                kept["reference"].append(layer)
            del layer
        layer = model.layer(index, _layer_state(part, index, source, checkpoint, dtype))
        strip = len(f"model.layers.{index}.")
        for name in norm_biases:
            if layer_index(name) == index:
                bias = checkpoint.get(name).to(dtype)
                layer.get_submodule(name[strip:].rpartition(".")[0]).register_forward_hook(
                    lambda _m, _args, out, bias=bias: out + bias)
        captured: Dict[str, list] = {}
        hooks = _hook_inputs(layer, part, index, captured)
        own = model.run(layer, own, contexts)
        for h in hooks:
            h.remove()
        if kept is not None:
            kept["weight_only"].append(copy.deepcopy(layer))
        for spec in part.linears:
            served_layer = build_linear(spec, source, config)
            load_linear(served_layer, checkpoint, spec.shards)
            report.layers.append(_linear_error(spec, served_layer, torch.cat(captured.pop(spec.prefix)), source,
                                               config, checkpoint, ref_checkpoint, ref_outputs, plan, tp))
            _swap_linear(layer, spec, served_layer, strip)
        for spec in part.experts:
            mlp = spec.prefix.rpartition(".")[0]
            moe = build_moe(source.moe_method(mlp, dtype), checkpoint, mlp, num_experts=spec.num_experts,
                            hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size, params_dtype=dtype)
            report.layers.append(_experts_error(spec, moe, captured.pop(spec.prefix), source, config, checkpoint,
                                                ref_outputs, plan, tp, ep))
            _set_module(layer, spec.prefix[strip:], _ServedExperts(moe))
        served = model.run(layer, served, contexts)
        if kept is not None:
            kept["served"].append(layer)
        del layer

    ref_logits = model.logits(ref_checkpoint, ref) if reference else model.logits(checkpoint, own)
    for text, t, logits, expected in zip(prompts, ids, model.logits(checkpoint, served), ref_logits):
        report.prompts.append({"prompt": text, "tokens": int(t.shape[1]),
                               "top1_agree": int((logits.argmax(-1) == expected.argmax(-1)).sum()),
                               "logit_rel_error": _rel(logits, expected)})
    if kept is not None:
        report.quality = _passage_quality(path, model, checkpoint, ref_checkpoint, kept, layout, report)
    return report


class _Stack(torch.nn.Module):
    """A whole causal LM over kept decoder layers, named as transformers names them (model.layers.N....),
    with the embeddings, final norm and head of `checkpoint`: what quality.py's probe runs."""

    def __init__(self, float_model: "_FloatModel", checkpoint, layers: List[torch.nn.Module]):
        super().__init__()
        self.float_model, self.checkpoint = float_model, checkpoint
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(layers)

    def forward(self, input_ids: torch.Tensor):
        hidden = self.float_model.embed(self.checkpoint, [input_ids])
        context = [self.float_model.context(input_ids.shape[1])]
        for layer in self.model.layers:
            hidden = self.float_model.run(layer, hidden, context)
        return SimpleNamespace(logits=self.float_model.logits(self.checkpoint, hidden)[0][None])


def _passage_quality(path: str, model: "_FloatModel", checkpoint, ref_checkpoint, kept: Dict[str, list],
                     layout: ModelLayout, report: VerifyReport) -> QualityReport:
    probe = PassageProbe(path)
    probe.run("weight_only", _Stack(model, checkpoint, kept["weight_only"]),
              {spec.prefix: next(iter(spec.shards.values())) for spec in layout.linears})
    if ref_checkpoint is not None:
        probe.run("reference", _Stack(model, ref_checkpoint, kept["reference"]))
    probe.run("served", _Stack(model, checkpoint, kept["served"]))
    return probe.report({e.prefix: e.scheme for e in report.layers}, ref_checkpoint is not None)


def _hook_inputs(layer, part: ModelLayout, index: int, captured: Dict[str, list]) -> list:
    """Capture each linear layer's input (at its first shard) and each experts block's (args, output)."""
    strip = len(f"model.layers.{index}.")
    hooks = []
    for spec in part.linears:
        first = next(iter(spec.shards.values()))[strip:]
        hooks.append(layer.get_submodule(first).register_forward_pre_hook(
            lambda _m, args, key=spec.prefix: captured.setdefault(key, []).append(
                args[0].detach().reshape(-1, args[0].shape[-1]))))
    for spec in part.experts:
        hooks.append(layer.get_submodule(spec.prefix[strip:]).register_forward_hook(
            lambda _m, args, out, key=spec.prefix: captured.setdefault(key, []).append((args, out))))
    return hooks


def _hook_outputs(layer, part: ModelLayout, index: int, outputs: Dict[tuple, list]) -> list:
    """Record each linear shard's and experts block's output (the reference layer's)."""
    strip = len(f"model.layers.{index}.")
    hooks = []
    for spec in part.linears:
        for shard in spec.shards.values():
            hooks.append(layer.get_submodule(shard[strip:]).register_forward_hook(
                lambda _m, _args, out, key=(spec.prefix, shard): outputs.setdefault(key, []).append(
                    out.detach().reshape(-1, out.shape[-1]))))
    for spec in part.experts:
        hooks.append(layer.get_submodule(spec.prefix[strip:]).register_forward_hook(
            lambda _m, _args, out, key=(spec.prefix, None): outputs.setdefault(key, []).append(out)))
    return hooks


def _linear_error(spec: LinearSpec, layer: ParallelLinear, x: torch.Tensor, source, config, checkpoint,
                  ref_checkpoint, ref_outputs, plan, tp: int) -> LayerError:
    # one shard's fp32 weight at a time: a fused layer's whole fp32 weight would be its largest transient
    expected, weight_diff, weight_norm = [], 0.0, 0.0
    with torch.no_grad():
        for shard in spec.shards.values():
            w = own_float_weight(source, checkpoint, shard)
            expected.append(F.linear(x.float(), w))
            if ref_checkpoint is not None:
                ref_w = own_float_weight(UnquantizedSource(), ref_checkpoint, shard)
                weight_diff += (w - ref_w).norm().item() ** 2
                weight_norm += ref_w.norm().item() ** 2
            del w
        expected = torch.cat(expected, -1)
        bias = _float_bias(spec, checkpoint)
        if bias is not None:
            expected += bias
        actual = layer(x)
        tp_err = None
        if tp > 1 and spec.parallel != "replicated":
            tp_err = _rel(_tp_linear_output(spec, source, config, checkpoint, x, tp), actual)
    weight_err = ref_err = None
    if ref_checkpoint is not None:
        weight_err = (weight_diff / max(weight_norm, 1e-24)) ** 0.5
        ref_out = torch.cat([torch.cat(ref_outputs[(spec.prefix, shard)]) for shard in spec.shards.values()], -1)
        ref_err = _rel(actual, ref_out)
    return LayerError(spec.prefix, plan_scheme(plan, spec.prefix), _rel(actual, expected), weight_err,
                      resident_bytes(layer), layer_theoretical_bytes(layer), ref_err, tp_err)


def _experts_error(spec, moe, captured: list, source, config, checkpoint, ref_outputs, plan, tp: int,
                   ep: int) -> LayerError:
    with torch.no_grad():
        pairs = [(moe(args[0], args[2], args[1]), out) for args, out in captured]
        expected = torch.cat([out.reshape(-1) for _, out in pairs])
        actual = torch.cat([got.reshape(-1) for got, _ in pairs])
        tp_err = None
        if tp > 1:
            tp_err = _rel(_tp_experts_output(spec, source, config, checkpoint, [a for a, _ in captured], tp, ep),
                          actual)
    theoretical = moe.moe_method.theoretical_bytes(moe.num_local_experts, moe.hidden_size,
                                                   moe.intermediate_size_per_partition)
    ref_err = None
    if (spec.prefix, None) in ref_outputs:
        ref_err = _rel(actual, torch.cat([out.reshape(-1) for out in ref_outputs[(spec.prefix, None)]]))
    return LayerError(spec.prefix, plan_scheme(plan, spec.prefix), _rel(actual, expected), None,
                      resident_bytes(moe), theoretical, ref_err, tp_err)


def _swap_linear(layer: torch.nn.Module, spec: LinearSpec, served: ParallelLinear, strip: int) -> None:
    shards = [shard[strip:] for shard in spec.shards.values()]
    if len(shards) == 1:
        _set_module(layer, shards[0], served)
        return
    cache, start = {}, 0
    for shard, size in zip(shards, served.output_partition_sizes):
        _set_module(layer, shard, _FusedShard(served, start, start + size, cache))
        start += size


def plan_scheme(plan, prefix: str) -> str:
    return next(e.scheme for e in plan.layers if e.prefix == prefix)


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)
