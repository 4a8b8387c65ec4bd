"""What a checkpoint folder holds and what serving it will cost, from the headers alone.

`plan_checkpoint(path, tp, ep)` reads config.json, the quantization description and the safetensors
headers (never tensor data), builds every linear layer on the meta device with the scheme the
checkpoint names, and feeds it meta tensors shaped like the checkpoint's through `load_linear`.
Shape, dtype, missing-tensor and scheme errors therefore come from the very code that loads the
model, and the resident bytes come from each scheme's `theoretical_bytes`.
"""

import itertools
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch

from sgl_ascend.errors import CheckpointError, shape_str
from sgl_ascend.layers.linear import ParallelLinear, QKVSizes, load_linear
from sgl_ascend.layers.moe import (FusedMoEMethod, UnquantizedExperts, check_moe_checkpoint,
                                   moe_method_for_compressed_tensors, moe_method_for_modelslim)
from sgl_ascend.layers.parameters import ShardedParameter
from sgl_ascend.layers.kv_cache.float_kv import FLOAT_KV
from sgl_ascend.layers.kv_cache.int8_dynamic import ONLINE_INT8
from sgl_ascend.layers.registry import (check_served, create, is_served, kv_cache_scheme, linear_scheme,
                                        scheme_class)
from sgl_ascend.layers.schemes import UnquantizedLinear
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint, TensorInfo
from sgl_ascend.quant.checks import check_int4_in_int8, check_layers_present
from sgl_ascend.quant.compressed_tensors import CompressedTensorsConfig, enum_str
from sgl_ascend.quant.modelslim import DESCRIPTION_FILE, ModelSlimConfig
from sgl_ascend.quant.scheme_key import EXPERTS, KV_CACHE, LINEAR, ONLINE, SchemeKey
from sgl_ascend.quant.scheme_key import MSMODELSLIM as MODELSLIM_FORMAT
from sgl_ascend.sglang.kv_cache import skip_layers
from sgl_ascend.tools.model_layout import (DecoderConfig, ExpertsSpec, FloatSpec, LinearSpec, ModelLayout,
                                           layout_from_config, load_config)

MSMODELSLIM, COMPRESSED_TENSORS, UNQUANTIZED = "msModelSlim", "compressed-tensors", "unquantized"


# -- where each layer's scheme comes from ------------------------------------------------------------

class UnquantizedSource:
    """A plain bf16/fp16 checkpoint: every linear layer is FLOAT."""

    format = UNQUANTIZED

    def scheme_name(self, prefix: str) -> str:
        return "FLOAT"

    def get_linear_scheme(self, prefix: str):
        return UnquantizedLinear()

    def has_float_bias(self, prefix: str) -> bool:
        return False

    def experts_scheme_name(self, spec: ExpertsSpec) -> str:
        return "FLOAT"

    def moe_method(self, mlp_prefix: str, params_dtype: torch.dtype):
        return FusedMoEMethod(UnquantizedExperts("w13", params_dtype), UnquantizedExperts("w2", params_dtype))

    def extra_float_tensors(self):
        return []

    def group_size(self, scheme_name: str, prefix: str, experts: Optional[ExpertsSpec] = None):
        return None


class ModelSlimSource:
    format = MSMODELSLIM

    def __init__(self, model_dir: str):
        self.config = check_served(ModelSlimConfig.from_dir(model_dir))

    def scheme_name(self, prefix: str) -> str:
        return self.config.weight_type(prefix)

    def get_linear_scheme(self, prefix: str):
        return linear_scheme(self.config, prefix)

    def has_float_bias(self, prefix: str) -> bool:
        return self.config.has_float_bias(prefix)

    def experts_scheme_name(self, spec: ExpertsSpec) -> str:
        """e.g. "W8A8_DYNAMIC"; a block mixing expert schemes: "W8A8_DYNAMIC x7 | FLOAT x1 (experts 1)"."""
        groups = self.config.expert_groups(spec.prefix.rpartition(".")[0])
        names = [w13.name if w13.name == w2.name else f"{w13.name} + {w2.name} (down)" for (w13, w2), _ in groups]
        if len(groups) == 1:
            return names[0]
        return " | ".join(f"{name} x{len(experts)}" + (f" (experts {', '.join(map(str, experts))})"
                                                        if len(experts) <= 3 else "")
                          for name, (_, experts) in zip(names, groups))

    def moe_method(self, mlp_prefix: str, params_dtype: torch.dtype):
        return moe_method_for_modelslim(self.config, mlp_prefix, params_dtype)

    def extra_float_tensors(self):
        """Norm biases anti-outlier smoothing adds: the model adds them after its norms."""
        return self.config.norm_bias_names()

    def kv_scheme(self):
        return kv_cache_scheme(self.config)

    def kv_tensor_names(self, attn_prefix: str) -> List[str]:
        return [f"{attn_prefix}.{p}_proj.kv_cache_{t}" for p in "kv" for t in ("scale", "offset")]

    def is_kv_tensor(self, name: str) -> bool:
        return ModelSlimConfig.is_kv_cache_tensor(name)

    def group_size(self, scheme_name: str, prefix: str, experts: Optional[ExpertsSpec] = None):
        """(group size, file, key) when the layer's scheme reads the description's top-level group_size
        (0: per channel): the scheme class says so (`reads_group_size`, e.g. W4A8_DYNAMIC)."""
        try:
            names = ({self.config.types.get(f"{experts.expert_prefix(0, p)}.weight") for p in experts.projections}
                     if experts else {self.config.weight_type(prefix)})
        except CheckpointError:  # reported by the layer's own pass
            return None
        keys = [SchemeKey(EXPERTS if experts else LINEAR, MODELSLIM_FORMAT, name) for name in names if name]
        if not any(is_served(key) and scheme_class(key).reads_group_size for key in keys):
            return None
        return self.config.description.group_size, self.config.source, "group_size"


class CompressedTensorsSource:
    format = COMPRESSED_TENSORS

    def __init__(self, model_dir: str):
        self.config = check_served(CompressedTensorsConfig.from_dir(model_dir))
        self.raw = load_config(model_dir).quantization_config

    @staticmethod
    def _name(args) -> str:
        # display only: the resolver's name (args.kind, the registry key's name) with the weight args
        if args is None:
            return "FLOAT"
        w = args.weights
        group = f" g{args.group_size}" if args.group_size else ""
        return f"{args.kind} ({getattr(w.type, 'value', w.type)}{w.num_bits}{group}, {args.format})"

    def scheme_name(self, prefix: str) -> str:
        return self._name(self.config.scheme_args(prefix))

    def scheme_args(self, shard_prefix: str):
        return self.config.scheme_args(shard_prefix)

    def get_linear_scheme(self, prefix: str):
        return linear_scheme(self.config, prefix)

    def has_float_bias(self, prefix: str) -> bool:
        return False

    def experts_scheme_name(self, spec: ExpertsSpec) -> str:
        return self._name(self.config.moe_scheme_args(spec.prefix, spec.num_experts, spec.projections))

    def moe_method(self, mlp_prefix: str, params_dtype: torch.dtype):
        return moe_method_for_compressed_tensors(self.raw, mlp_prefix, params_dtype)

    def extra_float_tensors(self):
        return []

    def kv_scheme(self):
        return kv_cache_scheme(self.config)

    def kv_tensor_names(self, attn_prefix: str) -> List[str]:
        return [f"{attn_prefix}.k_scale", f"{attn_prefix}.v_scale"]

    def is_kv_tensor(self, name: str) -> bool:
        return name.endswith((".self_attn.k_scale", ".self_attn.v_scale"))

    def group_size(self, scheme_name: str, prefix: str, experts: Optional[ExpertsSpec] = None):
        args = (self.config.scheme_args(prefix) if experts is None else
                self.config.moe_scheme_args(experts.prefix, experts.num_experts, experts.projections))
        if args is None or enum_str(args.weights.strategy) != "group":
            return None
        size = args.weights.group_size
        return (0 if size is None else size, self.config.source,
                f"quantization_config.config_groups.{args.group}.weights.group_size")


def detect_format(model_dir: str, config: DecoderConfig) -> str:
    if os.path.exists(os.path.join(model_dir, DESCRIPTION_FILE)):
        return MSMODELSLIM
    qc = config.quantization_config
    if qc is None:
        return UNQUANTIZED
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return COMPRESSED_TENSORS
    raise CheckpointError(
        f"quantization_config.quant_method is {method!r}; sgl-ascend serves msModelSlim "
        f"({DESCRIPTION_FILE}) and compressed-tensors checkpoints.", file=os.path.join(model_dir, "config.json"))


def scheme_source(model_dir: str, config: DecoderConfig):
    fmt = detect_format(model_dir, config)
    if fmt == MSMODELSLIM:
        return ModelSlimSource(model_dir)
    if fmt == UNQUANTIZED:
        return UnquantizedSource()
    return CompressedTensorsSource(model_dir)


# -- building layers -----------------------------------------------------------------------------------

def build_linear(spec: LinearSpec, source, config: DecoderConfig, *, tp_rank: int = 0, tp_size: int = 1,
                 device: str = "cpu") -> ParallelLinear:
    """The layer SGLang builds for `spec` on rank tp_rank, with the checkpoint's scheme. A replicated
    layer is every rank's copy of the tp=1 layer (fused shards, e.g. MLA's q_a + kv_a, load as merged
    columns)."""
    scheme = source.get_linear_scheme(spec.prefix)
    parallel = spec.parallel
    if parallel == "replicated":
        parallel, tp_rank, tp_size = "column", 0, 1
    qkv = QKVSizes(config.num_attention_heads, config.kv_heads, config.head_size, tp_size) if spec.qkv else None
    with torch.device(device):
        return ParallelLinear(spec.input_size, spec.output_sizes, scheme, parallel=parallel,
                              prefix=spec.prefix, tp_rank=tp_rank, tp_size=tp_size,
                              params_dtype=config.params_dtype, bias=spec.bias or source.has_float_bias(spec.prefix),
                              qkv=qkv)


def layer_theoretical_bytes(layer: ParallelLinear) -> int:
    n = sum(layer.output_partition_sizes)
    total = layer.scheme.theoretical_bytes(layer.input_size_per_partition, n)
    # a scheme that folds the float bias (W8A8 static: into quant_bias) releases it after loading
    if layer.bias is not None and not layer.scheme.folds_float_bias:
        total += layer.bias.numel() * layer.bias.element_size()
    return total


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes actually held by a module's parameters and buffers (each storage once)."""
    seen, total = set(), 0
    for p in itertools.chain(module.parameters(), module.buffers()):
        storage = p.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


class HeaderCheckpoint:
    """A checkpoint whose tensors are meta tensors shaped and typed like the file's: no weight data is
    read. Tensors of a few elements (weight_shape metadata, per-tensor scales) are read for real, since
    loaders may check their values while loading."""

    SMALL_BYTES = 64

    def __init__(self, checkpoint: SafetensorsCheckpoint):
        self._checkpoint = checkpoint
        self.path, self.index_file = checkpoint.path, checkpoint.index_file

    def with_prefix(self, prefix: str) -> Dict[str, TensorInfo]:
        return self._checkpoint.with_prefix(prefix)

    def get(self, name: str) -> torch.Tensor:
        info = self._checkpoint.info(name)
        if info.nbytes <= self.SMALL_BYTES:
            return self._checkpoint.get(name)
        return torch.empty(info.shape, dtype=info.dtype, device="meta")


# -- the report ---------------------------------------------------------------------------------------

@dataclass
class LayerEntry:
    prefix: str
    kind: str                      # linear / experts
    scheme: str
    bf16_bytes: int
    disk_bytes: int
    resident_bytes: Optional[int]
    resident_bytes_per_device: Optional[int]
    error: Optional[str] = None


@dataclass
class CheckpointPlan:
    path: str
    format: str
    model_type: str
    tp: int
    ep: int
    layers: List[LayerEntry] = field(default_factory=list)
    floats_bf16_bytes: int = 0
    floats_disk_bytes: int = 0
    floats_resident_bytes: int = 0
    floats_resident_bytes_per_device: int = 0
    kv_cache: dict = field(default_factory=dict)
    ignored: List[dict] = field(default_factory=list)
    missing: List[dict] = field(default_factory=list)
    unused: List[dict] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def memory(self) -> dict:
        def total(attr, floats):
            values = [getattr(e, attr) for e in self.layers]
            return None if any(v is None for v in values) else sum(values) + floats

        quantized = [e for e in self.layers if e.scheme != "FLOAT"]
        q_bf16 = sum(e.bf16_bytes for e in quantized)
        q_res = [e.resident_bytes for e in quantized]
        q_res = None if any(v is None for v in q_res) else sum(q_res)
        mem = {
            "bf16_bytes": total("bf16_bytes", self.floats_bf16_bytes),
            "disk_bytes": total("disk_bytes", self.floats_disk_bytes),
            "resident_bytes": total("resident_bytes", self.floats_resident_bytes),
            "resident_bytes_per_device": total("resident_bytes_per_device", self.floats_resident_bytes_per_device),
            "quantized_layers_bf16_bytes": q_bf16,
            "quantized_layers_resident_bytes": q_res,
        }
        mem["resident_over_bf16"] = _ratio(mem["resident_bytes"], mem["bf16_bytes"])
        mem["quantized_layers_resident_over_bf16"] = _ratio(q_res, q_bf16)
        return mem

    def groups(self) -> List[dict]:
        """Layers with the same module and scheme, over consecutive decoder layers, as one row."""
        rows: List[dict] = []
        for e in self.layers:
            index, module = _split_layer_prefix(e.prefix)
            last = next((r for r in reversed(rows) if r["module"] == module), None)
            if (last is not None and last["scheme"] == e.scheme and index is not None
                    and last["_last"] == index - 1 and (last["error"] is None) == (e.error is None)):
                last["_last"] = index
                last["count"] += 1
                for key in ("bf16_bytes", "disk_bytes", "resident_bytes", "resident_bytes_per_device"):
                    last[key] = None if last[key] is None or getattr(e, key) is None else last[key] + getattr(e, key)
                continue
            rows.append({"_first": index, "_last": index, "module": module, "scheme": e.scheme, "count": 1,
                         "bf16_bytes": e.bf16_bytes, "disk_bytes": e.disk_bytes,
                         "resident_bytes": e.resident_bytes,
                         "resident_bytes_per_device": e.resident_bytes_per_device, "error": e.error})
        for r in rows:
            first, last = r.pop("_first"), r.pop("_last")
            r["layers"] = "-" if first is None else (str(first) if first == last else f"{first}-{last}")
        return rows

    def to_json(self) -> dict:
        return {"path": self.path, "format": self.format, "model_type": self.model_type, "tp": self.tp,
                "ep": self.ep, "ok": self.ok, "groups": self.groups(),
                "layers": [asdict(e) for e in self.layers],
                "float_tensors": {"bf16_bytes": self.floats_bf16_bytes, "disk_bytes": self.floats_disk_bytes,
                                  "resident_bytes": self.floats_resident_bytes,
                                  "resident_bytes_per_device": self.floats_resident_bytes_per_device},
                "memory": self.memory(), "kv_cache": self.kv_cache, "ignored": self.ignored, "missing": self.missing,
                "unused": self.unused, "errors": self.errors, "notes": self.notes}


def _ratio(a, b):
    return None if a is None or not b else round(a / b, 4)


def _split_layer_prefix(prefix: str):
    parts = prefix.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2]), ".".join(parts[3:])
    return None, prefix



# -- planning ------------------------------------------------------------------------------------------

def plan_checkpoint(path: str, tp: int = 1, ep: int = 1, kv_cache_dtype: Optional[str] = None,
                    kv_cache_skip_layers: Optional[str] = None) -> CheckpointPlan:
    """Headers-only plan of a checkpoint. Raises CheckpointError when the folder cannot be read at all;
    per-layer problems are collected in `plan.errors`. kv_cache_dtype / kv_cache_skip_layers: the server's
    `--kv-cache-dtype` / `--kv-cache-skip-layers` (int8 on a checkpoint without KV scales: the online cache)."""
    if tp < 1 or ep < 1 or tp % ep:
        raise ValueError(f"need tp >= 1 and ep dividing tp (SGLang: moe_tp = tp / ep), got tp={tp} ep={ep}")
    config = load_config(path)
    if config.num_attention_heads % tp:
        raise ValueError(f"tp={tp} does not divide the {config.num_attention_heads} attention heads; "
                         "SGLang needs whole heads per rank")
    source = scheme_source(path, config)
    checkpoint = SafetensorsCheckpoint(path)
    check_layers_present(config.num_hidden_layers, checkpoint.names(), os.path.join(path, "config.json"))
    layout = layout_from_config(config)
    plan = CheckpointPlan(path=os.path.abspath(path), format=source.format, model_type=config.model_type,
                          tp=tp, ep=ep)
    _check_group_sizes(source, layout)
    claimed: set = set()
    for spec in layout.linears:
        plan.layers.append(_plan_linear(plan, spec, source, config, checkpoint, claimed))
    for spec in layout.experts:
        plan.layers.append(_plan_experts(plan, spec, source, config, checkpoint, claimed))
    layout.floats += [FloatSpec(name, tuple(checkpoint.info(name).shape), in_bf16_model=False)
                      for name in source.extra_float_tensors() if name in checkpoint]
    _plan_floats(plan, layout, config, checkpoint, claimed)
    _plan_kv_cache(plan, source, config, checkpoint, claimed, kv_cache_dtype, kv_cache_skip_layers)
    for info in checkpoint.infos():
        if info.name not in claimed:
            plan.unused.append({"tensor": info.name, "file": os.path.basename(info.file),
                                "reason": "no layer of the model takes it; it is not loaded"})
    return plan


def _plan_linear(plan, spec: LinearSpec, source, config, checkpoint, claimed) -> LayerEntry:
    bf16 = spec.input_size * sum(spec.output_sizes) * 2
    present = {}
    for shard_prefix in spec.shards.values():
        for suffix, info in checkpoint.with_prefix(shard_prefix).items():
            if getattr(source, "is_kv_tensor", lambda _: False)(info.name):
                continue  # the KV-cache scheme's (msModelSlim stores C8 scales under k_proj / v_proj)
            present[info.name] = (suffix, info)
            claimed.add(info.name)
    disk = sum(info.nbytes for _, info in present.values())
    entry = LayerEntry(spec.prefix, "linear", "?", bf16, disk, None, None)
    try:
        entry.scheme = source.scheme_name(spec.prefix)
        layer = build_linear(spec, source, config, device="meta")
    except CheckpointError as exc:
        return _fail(plan, entry, exc)
    scheme = layer.scheme
    for name, (suffix, info) in sorted(present.items()):
        if suffix in scheme.ignored_suffixes:
            plan.ignored.append({"tensor": name, "layer": spec.prefix,
                                 "reason": f"{type(scheme).__name__} does not use it"})
    expected = sorted(n for n, p in layer.named_parameters(recurse=False) if isinstance(p, ShardedParameter))
    missing = [f"{shard}.{suffix}" for shard in spec.shards.values() for suffix in expected
               if f"{shard}.{suffix}" not in checkpoint]
    for name in missing:
        plan.missing.append({"tensor": name, "layer": spec.prefix, "scheme": entry.scheme})
    try:
        if missing:
            raise CheckpointError(f"{len(missing)} tensor(s) the {entry.scheme} layer needs are missing: "
                                  f"{', '.join(missing)}", file=checkpoint.path, tensor=missing[0])
        _check_stored_tensors(layer, spec, checkpoint, entry.scheme)
        load_linear(layer, HeaderCheckpoint(checkpoint), spec.shards, process=False)
        entry.resident_bytes = layer_theoretical_bytes(layer)
        entry.resident_bytes_per_device = layer_theoretical_bytes(
            build_linear(spec, source, config, tp_size=plan.tp, device="meta"))
    except CheckpointError as exc:
        return _fail(plan, entry, exc)
    return entry


def _check_group_sizes(source, layout: ModelLayout) -> None:
    """Group sizes against every layer's K, before the layers: a wrong group size is one error of the
    config, not one per layer. Layers whose scheme cannot be resolved are reported by their own pass."""
    for spec in layout.linears:
        try:
            name = source.scheme_name(spec.prefix)
        except CheckpointError:
            continue
        _check_group_size(source, name, spec.prefix, [("the weight", spec.input_size)])
    for spec in layout.experts:
        try:
            name = source.experts_scheme_name(spec)
        except CheckpointError:
            continue
        _check_group_size(source, name, spec.prefix, [("gate/up_proj", spec.hidden_size),
                                                      ("down_proj", spec.intermediate_size)], spec)


def _check_group_size(source, scheme_name: str, prefix: str, inputs, experts: Optional[ExpertsSpec] = None):
    """A group-wise scheme's group size is positive and divides every input size (K) of the layer."""
    found = source.group_size(scheme_name, prefix, experts)
    if found is None:
        return
    size, file, key = found
    if size < 0 or (size == 0 and not isinstance(source, ModelSlimSource)):
        raise CheckpointError(f"group size {size} for layer {prefix}; a group-wise scheme needs a positive group "
                              "size. Fix it to the size the weights were quantized with.", file=file, key=key)
    for what, k in inputs:
        if size and k % size:
            raise CheckpointError(
                f"group size {size} does not divide the {k} input channels of {what} of layer {prefix} "
                f"({scheme_name}); it is not the group size the weights were quantized with. Fix it (the "
                "per-group scale, [N, K / group size], tells the real one) or re-export the checkpoint.",
                file=file, key=key)


def _check_stored_tensors(layer: ParallelLinear, spec: LinearSpec, checkpoint: SafetensorsCheckpoint,
                          scheme_name: str) -> None:
    """Tensors the layer stores in another layout than the checkpoint's (int4 packed while loading):
    the checkpoint shape must be the one that layout expects for this shard, and int4 values stored one
    per int8 must lie in [-8, 7]. The loader converts them without a check of its own, and inspect
    sees no values otherwise, so a transposed `weight_packed` or a W8A8 weight under a W4A4 label is
    caught here: from the header, and from the tensor's first row (a few KiB, per-channel int8 weights
    reach +-127 in every row).
    """
    for index, (shard_id, prefix) in enumerate(spec.shards.items()):
        for suffix, info in sorted(checkpoint.with_prefix(prefix).items()):
            param = getattr(layer, suffix, None)
            layout = getattr(param, "checkpoint_layout", None)
            if not isinstance(param, ShardedParameter) or layout is None or suffix in layer.scheme.ignored_suffixes:
                continue
            expected = list(layout.shape)
            if len(spec.shards) > 1 and param.output_dim is not None:
                expected[param.output_dim] = spec.output_sizes[index] // param.output_pack_factor
            if list(info.shape) != expected:
                hint = " (it looks transposed)" if sorted(info.shape) == sorted(expected) else ""
                raise CheckpointError(
                    f"shape {shape_str(info.shape)} where the {scheme_name} layer {spec.prefix} expects "
                    f"{shape_str(expected)} {layout.dtype} as the checkpoint stores it{hint}; the checkpoint does "
                    "not match config.json or was packed another way. Re-export it from this model.",
                    file=info.file, tensor=info.name)
            if layout.dtype == torch.int8 and info.dtype == torch.int8 and expected and expected[0]:
                check_int4_in_int8(checkpoint.get_rows(info.name), file=info.file, tensor=info.name,
                                   scheme=scheme_name, sampled=True)


def _plan_experts(plan, spec: ExpertsSpec, source, config, checkpoint, claimed) -> LayerEntry:
    bf16 = spec.num_experts * 3 * spec.hidden_size * spec.intermediate_size * 2
    disk = 0
    missing = []
    for e in range(spec.num_experts):
        for proj in spec.projections:
            prefix = spec.expert_prefix(e, proj)
            present = checkpoint.with_prefix(prefix)
            if "weight" not in present and "weight_packed" not in present:  # compressed-tensors pack-quantized
                missing.append(f"{prefix}.weight")
            for info in present.values():
                claimed.add(info.name)
                disk += info.nbytes
    entry = LayerEntry(spec.prefix, "experts", "?", bf16, disk, None, None)
    for name in missing:
        plan.missing.append({"tensor": name, "layer": spec.prefix})
    mlp_prefix = spec.prefix.rpartition(".")[0]
    try:
        entry.scheme = source.experts_scheme_name(spec)
        if missing:
            raise CheckpointError(f"{len(missing)} expert weight(s) missing, e.g. {missing[0]}",
                                  file=checkpoint.path, tensor=missing[0])
        method = source.moe_method(mlp_prefix, config.params_dtype)
        sizes = dict(num_experts=spec.num_experts, hidden_size=spec.hidden_size,
                     intermediate_size=spec.intermediate_size)
        check_moe_checkpoint(method, checkpoint, mlp_prefix, **sizes)
        moe_tp = plan.tp // plan.ep
        if spec.num_experts % plan.ep or spec.intermediate_size % moe_tp:
            raise CheckpointError(f"{spec.num_experts} experts / intermediate {spec.intermediate_size} do not "
                                  f"divide by ep {plan.ep} / moe tp {moe_tp}", tensor=spec.prefix)
        entry.resident_bytes = method.theoretical_bytes(spec.num_experts, spec.hidden_size, spec.intermediate_size)
        # a block mixing expert schemes refuses ep > 1 here (MixedExpertsMethod)
        entry.resident_bytes_per_device = method.theoretical_bytes(
            spec.num_experts // plan.ep, spec.hidden_size, spec.intermediate_size // moe_tp)
    except CheckpointError as exc:
        return _fail(plan, entry, exc)
    return entry


def _plan_floats(plan, layout: ModelLayout, config: DecoderConfig, checkpoint, claimed) -> None:
    for spec in layout.floats:
        elem = torch.empty((), dtype=spec.dtype or config.params_dtype).element_size()
        numel = 1
        for s in spec.shape:
            numel *= s
        plan.floats_bf16_bytes += numel * (4 if spec.dtype == torch.float32 else 2) if spec.in_bf16_model else 0
        if spec.derived:
            plan.floats_resident_bytes += numel * elem
            plan.floats_resident_bytes_per_device += numel // (plan.tp if spec.split == "heads" else 1) * elem
            continue
        if spec.name not in checkpoint:
            plan.missing.append({"tensor": spec.name, "layer": spec.name.rsplit(".", 1)[0]})
            plan.errors.append(str(CheckpointError("the model needs this tensor but the checkpoint lacks it",
                                                   file=checkpoint.path, tensor=spec.name)))
            continue
        info = checkpoint.info(spec.name)
        claimed.add(spec.name)
        if tuple(info.shape) != tuple(spec.shape):
            plan.errors.append(str(CheckpointError(
                f"shape {list(info.shape)} where config.json implies {list(spec.shape)}",
                file=info.file, tensor=spec.name)))
        plan.floats_disk_bytes += info.nbytes
        plan.floats_resident_bytes += numel * elem
        if spec.split == "vocab":
            rows = -(-spec.shape[0] // plan.tp)
            plan.floats_resident_bytes_per_device += rows * (numel // spec.shape[0]) * elem
        else:
            plan.floats_resident_bytes_per_device += numel * elem


def kv_bytes_per_token(config: DecoderConfig, elem_bytes: int, tp: int = 1) -> int:
    """KV-cache bytes one token takes over all layers on one device: K and V of the rank's KV heads (SGLang
    replicates KV heads when tp exceeds them); MLA models cache one latent (kv_lora_rank + rope dims)."""
    extra = config.model_extra or {}
    if extra.get("kv_lora_rank"):
        return config.num_hidden_layers * (extra["kv_lora_rank"] + extra.get("qk_rope_head_dim", 0)) * elem_bytes
    heads = max(1, config.kv_heads // tp)
    return config.num_hidden_layers * 2 * heads * config.head_size * elem_bytes


def _plan_kv_cache(plan, source, config: DecoderConfig, checkpoint, claimed, kv_cache_dtype=None,
                   skip_text=None) -> None:
    scheme = source.kv_scheme() if hasattr(source, "kv_scheme") else None
    bf16 = kv_bytes_per_token(config, 2, plan.tp)
    if kv_cache_dtype not in (None, "auto", ONLINE_INT8):
        raise ValueError(f"--kv-cache-dtype {kv_cache_dtype}: inspect models auto and {ONLINE_INT8}")
    if skip_text and (scheme is not None or kv_cache_dtype != ONLINE_INT8):
        raise ValueError("--kv-cache-skip-layers selects layers of the online int8 KV cache: add --kv-cache-dtype "
                         "int8 (checkpoints with KV scales, C8, do not take it yet)")
    plan.kv_cache = {"scheme": "bf16" if scheme is None else type(scheme).__name__,
                     "cache_dtype": "bfloat16" if scheme is None else str(scheme.cache_dtype).replace("torch.", ""),
                     "bytes_per_token_per_device": bf16, "pool_bytes_per_token_per_device": bf16,
                     "bf16_bytes_per_token_per_device": bf16}
    if scheme is None:
        if kv_cache_dtype == ONLINE_INT8:
            _plan_online_kv_cache(plan, config, skip_text)
        return
    plan.kv_cache["bytes_per_token_per_device"] = plan.kv_cache["pool_bytes_per_token_per_device"] = \
        kv_bytes_per_token(config, scheme.cache_dtype.itemsize, plan.tp)
    channels = config.kv_heads * config.head_size
    for layer in range(config.num_hidden_layers):
        for name in source.kv_tensor_names(f"model.layers.{layer}.self_attn"):
            if name not in checkpoint:
                if name.endswith("offset"):
                    continue  # offsets are zero when present; absent is the same
                plan.missing.append({"tensor": name, "layer": f"model.layers.{layer}.self_attn"})
                plan.errors.append(str(CheckpointError("the KV-cache scheme needs this scale but the checkpoint "
                                                       "lacks it", file=checkpoint.path, tensor=name)))
                continue
            claimed.add(name)
            info = checkpoint.info(name)
            numel = 1
            for size in info.shape:
                numel *= size
            if numel not in (1, channels) or not info.dtype.is_floating_point:
                plan.errors.append(str(CheckpointError(
                    f"{info.dtype}{list(info.shape)} where a float [{channels}] (num_kv_heads * head_dim) or [1] "
                    "scale is expected", file=info.file, tensor=name)))


def _plan_online_kv_cache(plan, config: DecoderConfig, skip_text: Optional[str]) -> None:
    """`--kv-cache-dtype int8` on a checkpoint without KV scales, as the plugin allocates it: SGLang's pool
    holds int8 K/V rows for every layer (one dtype for all); beside it, the backend keeps per layer a [2, slots]
    fp32 buffer of per-token scales (DynamicInt8KVCache) or, for a `--kv-cache-skip-layers` layer, K/V buffers
    in the model dtype (FloatKVCache), whose int8 rows in the pool stay unused. SGLang sizes its pool by the
    pool bytes only."""
    if (config.model_extra or {}).get("kv_lora_rank"):
        raise ValueError("--kv-cache-dtype int8: sgl-ascend serves the int8 KV cache for MHA/GQA attention only; "
                         "this is an MLA model")
    layers = config.num_hidden_layers
    kept = skip_layers(skip_text, layers)
    if kept and len(kept) == layers:
        raise ValueError(f"--kv-cache-skip-layers {skip_text!r} keeps every layer in float KV; drop "
                         "--kv-cache-dtype int8 instead")
    int8_kv = create(SchemeKey.make(KV_CACHE, ONLINE, ONLINE_INT8), what="--kv-cache-dtype int8")
    float_kv = create(SchemeKey.make(KV_CACHE, ONLINE, FLOAT_KV), what="--kv-cache-skip-layers")
    heads, dim = max(1, config.kv_heads // plan.tp), config.head_size
    pool = kv_bytes_per_token(config, 1, plan.tp)
    unused_pool_rows = len(kept) * 2 * heads * dim
    total = ((layers - len(kept)) * int8_kv.bytes_per_token(heads, dim)
             + len(kept) * float_kv.bytes_per_token(heads, dim) + unused_pool_rows)
    plan.kv_cache.update({"scheme": type(int8_kv).__name__, "cache_dtype": "int8", "online": True,
                          "skip_layers": sorted(kept), "bytes_per_token_per_device": total,
                          "pool_bytes_per_token_per_device": pool})


def tokens_that_fit(plan, device_bytes: int, mem_fraction: float) -> dict:
    """KV tokens a device of `device_bytes` holds after the weights, with SGLang's static fraction, for a
    bf16 KV cache and for the served one (int8 for C8 and the online mode: every KV byte counted, the online
    mode's scales and skipped layers' float buffers too). `sglang_pool_tokens`: the pool SGLang allocates,
    sized by its pool bytes alone (the online mode's side buffers then come on top of the fraction)."""
    weights = plan.memory()["resident_bytes_per_device"] or 0
    budget = max(int(device_bytes * mem_fraction) - weights, 0)
    kv = plan.kv_cache
    return {"device_bytes": device_bytes, "mem_fraction": mem_fraction, "weight_bytes": weights,
            "kv_budget_bytes": budget, "tokens_bf16_kv": budget // kv["bf16_bytes_per_token_per_device"],
            "tokens": budget // kv["bytes_per_token_per_device"],
            "sglang_pool_tokens": budget // kv["pool_bytes_per_token_per_device"]}


def _fail(plan, entry: LayerEntry, exc: CheckpointError) -> LayerEntry:
    entry.error = str(exc)
    plan.errors.append(str(exc))
    return entry
