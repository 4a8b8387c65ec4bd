"""compressed-tensors checkpoints: `config.json` -> `quantization_config` -> one scheme per layer.

The config is parsed by the library (`QuantizationConfig.model_validate`) and targets / ignore are
matched with the library's own helpers (`compressed_tensors.utils.match`), so names, `re:` regexes
and class names (`Linear`) mean what they mean to the tool that wrote the checkpoint. A fused layer
(qkv_proj, gate_up_proj) is resolved through its checkpoint shards, which must agree.

The scheme decision follows vLLM's order, which users of these checkpoints expect:
weight-only int channel/group -> WNA16; FP8 weights + FP8 activations -> W8A8-FP8 where the device
has an FP8 matmul, else weight-only FP8; int8 weights + static per-tensor int8 activations -> W8A8
static; + dynamic per-token -> W8A8 dynamic; int4 weights + dynamic per-token int8 -> W4A8.
Dynamic activations are quantized by the NPU's convention (absmax / 127 per token), not the
library's fake-quantization (absmax / 127.5): a 0.4% difference in scale, well inside the
activation rounding error, and nothing the checkpoint stores depends on it.
"""

import copy
import logging
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                             QuantizationStrategy, QuantizationType)
from compressed_tensors.utils import is_match, match_name
from pydantic import ValidationError

from sgl_ascend.errors import CheckpointError
from sgl_ascend.quant.checks import read_json_object
from sgl_ascend.quant.modelslim import PACKED_MODULES
from sgl_ascend.quant.scheme_key import COMPRESSED_TENSORS, EXPERTS, KV_CACHE, LINEAR, UNQUANTIZED, SchemeKey

logger = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
CONFIG_FILE = "config.json"

# Scheme kinds (what the layer computes), independent of how the checkpoint stores it.
WNA16 = "WNA16"
W8A8_STATIC = "W8A8_STATIC"
W8A8_DYNAMIC = "W8A8_DYNAMIC"
W4A8 = "W4A8"
W8A8_FP8 = "W8A8_FP8"
FP8_W8A16 = "FP8_W8A16"

_INT_STORAGE = (CompressionFormat.pack_quantized.value, CompressionFormat.int_quantized.value,
                CompressionFormat.naive_quantized.value)
_FLOAT_STORAGE = (CompressionFormat.float_quantized.value, CompressionFormat.naive_quantized.value)
# Where each kind's weights may come from (vLLM serves the same pairs).
_FORMATS = {
    WNA16: _INT_STORAGE,
    W4A8: _INT_STORAGE,
    W8A8_STATIC: _INT_STORAGE[1:],
    W8A8_DYNAMIC: _INT_STORAGE[1:],
    W8A8_FP8: _FLOAT_STORAGE,
    FP8_W8A16: _FLOAT_STORAGE,
}
_WEIGHT_STRATEGIES = (QuantizationStrategy.CHANNEL, QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR)

# Class matching (`Linear`) needs a module: a meta-device nn.Linear stands for "a linear layer"
# when the caller has no layer object at hand (SGLang's LinearBase matches `Linear` too).
_LINEAR_PROBE = torch.nn.Linear(1, 1, bias=False, device="meta")


def device_has_fp8_matmul() -> bool:
    """Whether the op surface has an FP8 x FP8 matmul.

    Atlas A2/A3 cube units have none (npu_quant_matmul / npu_weight_quant_batchmatmul take int8 and
    int4 only), and sgl-ascend's op surface carries no FP8 matmul, so FP8 W8A8 checkpoints run
    weight-only. When an FP8 kernel joins `sgl_ascend.ops`, this is where it gets chosen.
    """
    return False


@dataclass(frozen=True)
class CTSchemeArgs:
    """What a layer (or an MoE experts block) needs to know: kind, storage format and the args."""

    kind: str
    format: str
    weights: QuantizationArgs
    input_activations: Optional[QuantizationArgs]
    group: str  # config_groups key, for messages

    @property
    def group_size(self) -> int:
        """0 for per-channel / per-tensor weights."""
        return self.weights.group_size if self.weights.strategy == QuantizationStrategy.GROUP else 0


def _is_int(args, bits) -> bool:
    return args.type == QuantizationType.INT and args.num_bits in bits


def _is_fp8(args) -> bool:
    return args.type == QuantizationType.FLOAT and args.num_bits == 8


def decide_kind(weights: Optional[QuantizationArgs], acts: Optional[QuantizationArgs],
                fp8_matmul: bool) -> Optional[str]:
    """vLLM's decision order; None when no scheme serves the combination."""
    if weights is None or weights.dynamic or weights.strategy not in _WEIGHT_STRATEGIES:
        return None
    if acts is None:
        if _is_int(weights, (4, 8)) and weights.strategy in (QuantizationStrategy.CHANNEL,
                                                              QuantizationStrategy.GROUP):
            return WNA16
        if _is_fp8(weights) and weights.strategy != QuantizationStrategy.GROUP:
            return FP8_W8A16
        return None
    if _is_fp8(weights) and _is_fp8(acts) and weights.strategy != QuantizationStrategy.GROUP:
        return W8A8_FP8 if fp8_matmul else FP8_W8A16
    int8_weights = _is_int(weights, (8,)) and weights.symmetric and weights.strategy in (
        QuantizationStrategy.CHANNEL, QuantizationStrategy.TENSOR)
    int8_acts = _is_int(acts, (8,))
    if int8_weights and int8_acts and not acts.dynamic and acts.strategy == QuantizationStrategy.TENSOR:
        return W8A8_STATIC
    if int8_weights and int8_acts and acts.dynamic and acts.symmetric and acts.strategy == QuantizationStrategy.TOKEN:
        return W8A8_DYNAMIC
    if (_is_int(weights, (4,)) and weights.symmetric and int8_acts and acts.dynamic and acts.symmetric
            and acts.strategy == QuantizationStrategy.TOKEN
            and weights.strategy in (QuantizationStrategy.CHANNEL, QuantizationStrategy.GROUP)):
        return W4A8
    return None


def enum_str(enum_or_str) -> str:
    """The library keeps enum values as plain strings in some versions; print either alike."""
    return str(getattr(enum_or_str, "value", enum_or_str))


def _describe(args: Optional[QuantizationArgs]) -> str:
    if args is None:
        return "none"
    extra = f" group_size={args.group_size}" if args.strategy == QuantizationStrategy.GROUP else ""
    sym = "symmetric" if args.symmetric else "asymmetric"
    dyn = "dynamic" if args.dynamic else "static"
    return f"{enum_str(args.type)}{args.num_bits} {enum_str(args.strategy)}{extra} {sym} {dyn}"


class CompressedTensorsConfig:
    """Scheme lookup for a compressed-tensors checkpoint, independent of SGLang."""

    def __init__(self, config: QuantizationConfig, source: str = CONFIG_FILE,
                 fp8_matmul: Optional[bool] = None):
        self.config = config
        self.source = source
        self.fp8_matmul = device_has_fp8_matmul() if fp8_matmul is None else fp8_matmul
        self.ignore: List[str] = list(config.ignore or [])
        self.clip_groups: Dict[str, bool] = {}  # activation_use_clip per group (from_dict reads it)
        self.groups: Dict[str, QuantizationScheme] = {}
        for name, scheme in config.config_groups.items():
            if not isinstance(scheme, QuantizationScheme):  # a bare list of targets: preset name
                raise CheckpointError(
                    f"config group {name} names a preset ({scheme}) instead of weights / activations; "
                    "sgl-ascend reads saved checkpoints, whose configs spell the scheme out.",
                    file=source, tensor=f"quantization_config.config_groups.{name}")
            self.groups[name] = scheme
        self._args = {name: self._resolve_group(name, s) for name, s in self.groups.items()}

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, source: str = CONFIG_FILE, fp8_matmul: Optional[bool] = None):
        where = "quantization_config"
        if raw.get("quant_method") != QUANT_METHOD:
            raise CheckpointError(
                f"quant_method is {raw.get('quant_method')!r}, not {QUANT_METHOD!r}; this is not a "
                "compressed-tensors checkpoint.", file=source, tensor=f"{where}.quant_method")
        for key in ("sparsity_config", "transform_config"):
            if raw.get(key):
                raise CheckpointError(
                    f"{key} is set; sgl-ascend serves quantized dense checkpoints only. Export the "
                    f"checkpoint without {key.split('_')[0]}.", file=source, tensor=f"{where}.{key}")
        raw, clip_groups = split_clip(raw)
        try:
            config = QuantizationConfig.model_validate(raw)
        except ValidationError as exc:
            raise CheckpointError(f"malformed quantization_config: {exc}", file=source, tensor=where) from exc
        parsed = cls(config, source, fp8_matmul)  # groups that inherit the top-level format check it there
        parsed.clip_groups = clip_groups
        known = [f.value for f in CompressionFormat]
        if "format" in raw and raw["format"] not in known:
            raise CheckpointError(
                f"format {raw['format']!r} is not a compressed-tensors format (known: {', '.join(known)}); the "
                "config was not written by compressed-tensors or is corrupt. Fix it or re-export the checkpoint.",
                file=source, key=f"{where}.format")
        return parsed

    @classmethod
    def from_dir(cls, model_dir: str, fp8_matmul: Optional[bool] = None) -> "CompressedTensorsConfig":
        path = os.path.join(model_dir, CONFIG_FILE)
        hf_config = read_json_object(path, "the model's config.json",
                                     f"{CONFIG_FILE} is missing from the checkpoint folder")
        raw = hf_config.get("quantization_config") or hf_config.get("compression_config")
        if raw is None:
            raise CheckpointError("config.json has no quantization_config; the checkpoint is not quantized",
                                  file=path, tensor="quantization_config")
        if not isinstance(raw, dict):
            raise CheckpointError(f"quantization_config is a {type(raw).__name__}, expected a JSON object; "
                                  "fix config.json.", file=path, key="quantization_config")
        return cls.from_dict(raw, path, fp8_matmul)

    def _resolve_group(self, name: str, scheme: QuantizationScheme) -> CTSchemeArgs:
        where = f"quantization_config.config_groups.{name}"
        weights, acts = scheme.weights, scheme.input_activations
        if scheme.output_activations is not None:
            raise CheckpointError("output activation quantization is not served by sgl-ascend",
                                  file=self.source, tensor=where)
        kind = decide_kind(weights, acts, self.fp8_matmul)
        if kind is None:
            raise CheckpointError(
                f"weights [{_describe(weights)}] with input activations [{_describe(acts)}] is not a "
                "scheme sgl-ascend recognizes (WNA16 int4/int8 channel|group, W8A8 int8 static|dynamic, "
                "W4A8 int4 + dynamic int8 tokens, FP8; `sgl-ascend schemes` lists what is served). "
                "Re-quantize with one of those.",
                file=self.source, tensor=where)
        fmt = scheme.format or self.config.format
        fmt = enum_str(fmt)
        if fmt not in _FORMATS[kind]:
            raise CheckpointError(
                f"format {fmt!r} does not store {kind} weights the way sgl-ascend reads them; expected "
                f"one of {', '.join(_FORMATS[kind])}.", file=self.source, tensor=f"{where}.format")
        if kind == FP8_W8A16 and acts is not None:
            logger.warning(
                "compressed-tensors group %s is W8A8-FP8 (weights %s, activations %s), but this device "
                "has no FP8 matmul in sgl-ascend's op surface: serving it as weight-only FP8 (W8A16), "
                "activations stay in bf16/fp16.", name, _describe(weights), _describe(acts))
        return CTSchemeArgs(kind, fmt, weights, acts, name)

    # -- lookup --------------------------------------------------------------------------------
    def _match_one(self, name: str, layer: Optional[torch.nn.Module]) -> Optional[str]:
        """The config group of one checkpoint module, or None when ignored / not targeted.

        Priority as in vLLM: an exact name beats a `re:` regex, which beats a class name.
        """
        module = layer if layer is not None else _LINEAR_PROBE
        if is_match(name, module, self.ignore):
            return None
        tiers = (
            lambda t: not t.startswith("re:") and match_name(name, t),
            lambda t: t.startswith("re:") and match_name(name, t),
            lambda t: not t.startswith("re:") and is_match(name, module, t),
        )
        for matches in tiers:
            for group, scheme in self.groups.items():
                if any(matches(t) for t in scheme.targets):
                    return group
        return None

    def shard_prefixes(self, prefix: str) -> List[str]:
        parent, _, name = prefix.rpartition(".")
        if name in PACKED_MODULES:
            return [f"{parent}.{shard}" if parent else shard for shard in PACKED_MODULES[name]]
        return [prefix]

    def _resolve(self, names: Sequence[str], what: str, layer=None) -> Optional[CTSchemeArgs]:
        found = {n: self._match_one(n, layer) for n in names}
        if len(set(found.values())) > 1:
            listing = ", ".join(f"{n}={g or 'unquantized'}" for n, g in found.items())
            raise CheckpointError(
                f"the parts of {what} resolve to different schemes ({listing}); one kernel serves the "
                "fused layer, so quantize (or ignore) all of them alike.", file=self.source,
                tensor="quantization_config")
        group = next(iter(found.values()))
        return None if group is None else self._args[group]

    def scheme_args(self, prefix: str, layer: Optional[torch.nn.Module] = None) -> Optional[CTSchemeArgs]:
        """The scheme of a (possibly fused) linear layer; None means unquantized (ignored/untargeted)."""
        return self._resolve(self.shard_prefixes(prefix), f"layer {prefix}", layer)

    def moe_scheme_args(self, prefix: str, num_experts: int,
                        expert_projections: Sequence[str] = ("gate_proj", "up_proj", "down_proj")
                        ) -> Optional[CTSchemeArgs]:
        """The scheme of an MoE experts block `prefix` (e.g. model.layers.0.mlp.experts).

        Every expert's projections (checkpoint names `prefix.<e>.<proj>`) must resolve alike, since
        one grouped kernel serves them all. None means the experts are unquantized.
        """
        names = [f"{prefix}.{e}.{p}" for e in range(num_experts) for p in expert_projections]
        return self._resolve(names, f"experts {prefix}")

    # -- the resolver: config -> SchemeKeys (the registry in sgl_ascend.layers maps them to classes) --
    def linear_key(self, prefix: str, layer: Optional[torch.nn.Module] = None) -> SchemeKey:
        """The key of a (possibly fused) linear layer; FLOAT when ignored / not targeted."""
        return args_key(LINEAR, self.scheme_args(prefix, layer))

    def group_keys(self) -> List[SchemeKey]:
        """The linear key of each config group (for logs: which class serves what)."""
        return [args_key(LINEAR, args) for args in self._args.values()]

    def kv_cache_key(self) -> Optional[SchemeKey]:
        kv = self.config.kv_cache_scheme
        if kv is None:
            return None
        return SchemeKey.make(KV_CACHE, COMPRESSED_TENSORS, f"{enum_str(kv.type)}{kv.num_bits}",
                              strategy=enum_str(kv.strategy), dynamic=kv.dynamic, symmetric=kv.symmetric)

    def tensor_keys(self) -> Iterator[Tuple[SchemeKey, str]]:
        """What `check_served` checks up front: the KV cache (config groups are checked while parsing)."""
        kv = self.kv_cache_key()
        if kv is not None:
            yield kv, "quantization_config.kv_cache_scheme"


def split_clip(raw: dict) -> Tuple[dict, Dict[str, bool]]:
    """(config without it, group -> activation_use_clip): the W4A8 experts' activation-clip flag a config
    group may carry, which is not a compressed-tensors field; both the linear and the expert path read
    the config through here, so both accept it."""
    raw = copy.deepcopy(raw)
    groups = raw.get("config_groups")
    clip = {}
    if isinstance(groups, dict):
        for name, group in groups.items():
            if isinstance(group, dict):
                clip[name] = bool(group.pop("activation_use_clip", False))
    return raw, clip


def args_key(kind: str, args: Optional[CTSchemeArgs]) -> SchemeKey:
    """The SchemeKey of resolved args (None: unquantized)."""
    if args is None:
        return SchemeKey(kind, COMPRESSED_TENSORS, UNQUANTIZED)
    w, a = args.weights, args.input_activations
    return SchemeKey.make(
        kind, COMPRESSED_TENSORS, args.kind, num_bits=w.num_bits, strategy=enum_str(w.strategy),
        group_size=args.group_size, symmetric=w.symmetric, storage=args.format,
        packed=args.format == CompressionFormat.pack_quantized.value, config_group=args.group,
        act_dynamic=None if a is None else a.dynamic, act_symmetric=None if a is None else a.symmetric,
        act_strategy=None if a is None else enum_str(a.strategy))


def expert_keys(quantization_config: dict, prefix: str) -> Tuple[SchemeKey, SchemeKey]:
    """(gate/up, down) keys of the MoE block `prefix` (e.g. model.layers.0.mlp), from expert 0's
    projections. A config group may set `activation_use_clip` (read here, not a compressed-tensors
    field): the keys carry it as `clip`. A combination vLLM's order does not recognise keeps a
    descriptive name, which the registry then refuses with what it serves."""
    raw, clip_groups = split_clip(quantization_config)
    try:
        config = QuantizationConfig.model_validate(raw)
    except Exception as exc:  # pydantic's ValidationError
        raise CheckpointError(f"malformed compressed-tensors quantization_config: {exc}",
                              file=CONFIG_FILE) from exc

    def key(proj) -> SchemeKey:
        module = f"{prefix}.experts.0.{proj}"
        if any(match_name(module, target) for target in config.ignore or []):
            return SchemeKey(EXPERTS, COMPRESSED_TENSORS, UNQUANTIZED)
        for name, group in config.config_groups.items():
            if any(match_name(module, t) or t == "Linear" for t in group.targets):
                w, a = group.weights, group.input_activations
                fmt = enum_str(group.format or config.format)
                kind = decide_kind(w, a, device_has_fp8_matmul())
                if kind is None:
                    kind = f"weights [{_describe(w)}] with input activations [{_describe(a)}]"
                    return SchemeKey.make(EXPERTS, COMPRESSED_TENSORS, kind, storage=fmt, config_group=name)
                key = args_key(EXPERTS, CTSchemeArgs(kind, fmt, w, a, name))
                return SchemeKey(EXPERTS, COMPRESSED_TENSORS, key.name, key.params + (("clip", clip_groups.get(name, False)),))
        return SchemeKey(EXPERTS, COMPRESSED_TENSORS, UNQUANTIZED)

    return key("gate_proj"), key("down_proj")
