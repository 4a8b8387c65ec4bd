"""msModelSlim checkpoints: `quant_model_description.json` -> one scheme per layer.

The description is a flat map "<tensor name>" -> "<type>" plus a few top-level keys. A layer's
scheme is the type of `<prefix>.weight`; fused layers (qkv_proj, gate_up_proj, MLA
fused_qkv_a_proj_with_mqa) are looked up through their checkpoint shards, which must agree.
"""

import os
import re
from typing import Dict, FrozenSet, Iterator, List, Optional, Tuple

from pydantic import BaseModel, ConfigDict, ValidationError

from sgl_ascend.errors import CheckpointError
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint
from sgl_ascend.quant.checks import read_json_object
from sgl_ascend.quant.scheme_key import EXPERTS, KV_CACHE, LINEAR, MSMODELSLIM, UNQUANTIZED, SchemeKey

DESCRIPTION_FILE = "quant_model_description.json"

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Per attention layer, the C8 saver writes <attn>.k_proj / v_proj + these (type "C8"); FAQuant writes
# <attn>.fa_q / fa_k / fa_v .scale / .offset. They belong to the KV-cache scheme, not to a linear layer.
KV_CACHE_SUFFIXES = (".kv_cache_scale", ".kv_cache_offset")
_FA_QUANT_TENSOR = re.compile(r"\.fa_[qkv]\.(scale|offset)$")
FA_QUANT = "FAQuant"
_EXPERT_TENSOR = re.compile(r"\.experts\.\d+\.")

# Type strings served as another scheme. W16A16S (float_sparse) is the float weight with some of its values
# zeroed for a sparse kernel SGLang 0.5.23 has no NPU method for; run densely it is FLOAT, exactly.
TYPE_ALIASES = {"W16A16S": UNQUANTIZED}

# Fused layer name -> the checkpoint shards it is built from (SGLang's and vLLM's naming).
PACKED_MODULES: Dict[str, List[str]] = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
    "fused_qkv_a_proj_with_mqa": ["q_a_proj", "kv_a_proj_with_mqa"],
}


class ModelSlimDescription(BaseModel):
    """The description file. Top-level settings are fields; every other key maps a tensor to a type."""

    model_config = ConfigDict(extra="allow", frozen=True)

    version: str = "0"  # absent in files of the older writer
    model_quant_type: Optional[str] = None
    group_size: int = 0
    kv_cache_type: Optional[str] = None
    kv_quant_type: Optional[str] = None  # msModelSlim 26.1.0 writes it beside kv_cache_type, same value
    fa_quant_type: Optional[str] = None
    metadata: dict = {}
    optional: dict = {}

    @property
    def tensor_types(self) -> Dict[str, str]:
        return {k: v for k, v in (self.model_extra or {}).items() if isinstance(v, str)}

    @property
    def is_legacy(self) -> bool:
        """Older writers (no version or "0") store W4A8 weights unpacked, one int4 per int8."""
        return self.version in ("0", "")


def load_description(model_dir: str) -> ModelSlimDescription:
    path = os.path.join(model_dir, DESCRIPTION_FILE)
    raw = read_json_object(path, "msModelSlim's quantization description",
                           f"{DESCRIPTION_FILE} is missing: this is not an msModelSlim checkpoint")
    return parse_description(raw, path)


def parse_description(raw: dict, path: str = DESCRIPTION_FILE) -> ModelSlimDescription:
    try:
        description = ModelSlimDescription.model_validate(raw)
    except ValidationError as exc:
        raise CheckpointError(f"malformed description: {exc}", file=path) from exc
    _refuse_what_is_not_applied(description, path)
    return description


# What msModelSlim 26.1.0's ascendv1 saver writes besides tensor types (modelslim_v1/save/ascendv1.py,
# post_run and the rotation wrappers):
# - metadata.quarot = {max_tp_size, heads_rotation: {layers}, kronecker_rotation: {layers}}: QuaRot's
#   online rotations; the activations of those layers must be rotated while serving, by the tensors
#   <prefix>.heads_rotation / <prefix>.kronecker_rotation_m / _n the saver adds to the weights;
# - optional.quarot = {rotation_map: {global_rotation: <file>}}: the offline rotation, already folded
#   into the weights (an export, not needed to serve).
# sgl-ascend applies no online rotation: such a checkpoint would compute wrong numbers, so it is refused.
ONLINE_ROTATION_SUFFIXES = (".heads_rotation", ".kronecker_rotation_m", ".kronecker_rotation_n")
KNOWN_METADATA = ("quarot",)


def _refuse_what_is_not_applied(description: ModelSlimDescription, path: str) -> None:
    metadata = description.metadata
    quarot = metadata.get("quarot") if isinstance(metadata.get("quarot"), dict) else {}
    layers = [name for part in ("heads_rotation", "kronecker_rotation")
              for name in ((quarot.get(part) or {}).get("layers") or [])]
    tensors = [name for name in description.tensor_types if name.endswith(ONLINE_ROTATION_SUFFIXES)]
    if layers or tensors:
        where = ", ".join((layers or tensors)[:3]) + (" ..." if len(layers or tensors) > 3 else "")
        raise CheckpointError(
            f"the checkpoint needs QuaRot online rotations ({len(layers)} layer(s) in metadata.quarot, "
            f"{len(tensors)} rotation tensor(s), e.g. {where}), which sgl-ascend does not apply: served without "
            "them it would compute wrong numbers. Quantize without QuaRot's online rotations (offline QuaRot "
            "folds into the weights and is served), or serve with a runtime that applies them.",
            file=path, key="metadata.quarot")
    unknown = sorted(set(metadata) - set(KNOWN_METADATA))
    if unknown:
        raise CheckpointError(
            f"description metadata {unknown} is unknown to sgl-ascend: the writer records there what the "
            "runtime must apply, so serving without knowing it could compute wrong numbers. Tell the "
            "sgl-ascend team which msModelSlim version and recipe wrote it.", file=path, key=f"metadata.{unknown[0]}")


def group_wise_layers(model_dir: str) -> Optional[FrozenSet[str]]:
    """Checkpoint prefixes whose weights carry per-group scales, from the safetensors headers only (no
    data is read); None when the folder has no weights to look at.

    The description cannot say it: its one top-level `group_size` is written by whichever layer was
    quantized per group, and the tool writes the same type string (W8A8_DYNAMIC, W8A16, W4A4_DYNAMIC) for
    a per-channel layer (weight_scale [N, 1]) and a per-group one (weight_scale [N, K / group_size]); a
    Qwen3 W4A8 recipe, for one, writes per-group W4A8 MLPs beside per-channel W8A8_DYNAMIC attention.
    """
    try:
        checkpoint = SafetensorsCheckpoint(model_dir)
    except CheckpointError:
        return None
    grouped = set()
    for info in checkpoint.infos():
        prefix, _, suffix = info.name.rpartition(".")
        if (suffix == "weight_scale" and len(info.shape) == 2 and info.shape[1] > 1) or \
                suffix == "weight_scale_second":
            grouped.add(prefix)
    return frozenset(grouped)


# FlatQuant (msModelSlim's flatquant processor + a W4A4 linear_quant / autoround_quant): per layer the
# activation is transformed online by two Kronecker factors before its int4 per-token quantization.
FLATQUANT = "W4A4_FLATQUANT_DYNAMIC"


def flatquant_left_sizes(model_dir: str) -> Optional[Dict[str, int]]:
    """Checkpoint prefix -> the size of its FlatQuant `left_trans` [L, L], from the safetensors headers
    only; None when the folder has no weights to look at. A layer without `right_trans` (o_proj: its
    head_dim factor is folded into v_proj's output by the tool) has L = its attention heads, which its
    input size alone does not tell."""
    try:
        checkpoint = SafetensorsCheckpoint(model_dir)
    except CheckpointError:
        return None
    return {info.name[:-len(".left_trans")]: info.shape[0] for info in checkpoint.infos()
            if info.name.endswith(".left_trans") and info.shape}


class ModelSlimConfig:
    """Scheme lookup for an msModelSlim checkpoint, independent of SGLang.

    `group_wise`: the checkpoint prefixes with per-group scales (`group_wise_layers`), when the weights'
    headers were read; their keys carry `group_wise=True`. Without it (None) no key does, and only the
    schemes that read the description's group_size themselves (W4A8_DYNAMIC) are group-wise.
    """

    def __init__(self, description: ModelSlimDescription, source: str = DESCRIPTION_FILE,
                 group_wise: Optional[FrozenSet[str]] = None, flat_left: Optional[Dict[str, int]] = None):
        self.description = description
        self.types = {name: TYPE_ALIASES.get(kind, kind) for name, kind in description.tensor_types.items()}
        self.source = source
        self.group_wise = group_wise
        self.flat_left = flat_left

    @classmethod
    def from_dir(cls, model_dir: str) -> "ModelSlimConfig":
        return cls(load_description(model_dir), os.path.join(model_dir, DESCRIPTION_FILE),
                   group_wise_layers(model_dir), flatquant_left_sizes(model_dir))

    def is_group_wise(self, prefix: str) -> bool:
        """Whether the (possibly fused) layer's weights carry per-group scales; its shards must agree."""
        if self.group_wise is None:
            return False
        shards = {shard: shard in self.group_wise for shard in self.shard_prefixes(prefix)}
        if len(set(shards.values())) > 1:
            listing = ", ".join(f"{s} {'per group' if g else 'per channel'}" for s, g in shards.items())
            raise CheckpointError(
                f"the shards of fused layer {prefix} are quantized differently ({listing}); one kernel serves "
                "the fused layer, so re-export them alike.", file=self.source, tensor=f"{prefix}.weight_scale")
        return any(shards.values())

    def shard_prefixes(self, prefix: str) -> List[str]:
        """Checkpoint prefixes a layer is built from: itself, or the shards of a fused layer."""
        parent, _, name = prefix.rpartition(".")
        if name in PACKED_MODULES and f"{prefix}.weight" not in self.types:
            return [f"{parent}.{shard}" if parent else shard for shard in PACKED_MODULES[name]]
        return [prefix]

    def weight_type(self, prefix: str) -> str:
        """The scheme string of a (possibly fused) layer; all of its shards must carry the same."""
        kinds = {}
        for shard in self.shard_prefixes(prefix):
            kind = self.types.get(f"{shard}.weight")
            if kind is None:
                raise CheckpointError(
                    f"the description has no entry for {shard}.weight, so the scheme of layer {prefix} "
                    "is unknown; the description does not match this model.", file=self.source,
                    tensor=f"{shard}.weight")
            kinds[shard] = kind
        if len(set(kinds.values())) > 1:
            listing = ", ".join(f"{k}.weight={v}" for k, v in kinds.items())
            raise CheckpointError(
                f"the shards of fused layer {prefix} use different schemes ({listing}); one kernel "
                "serves the fused layer, so re-export them with one scheme.", file=self.source,
                tensor=f"{prefix}.weight")
        return next(iter(kinds.values()))

    def has_float_bias(self, prefix: str) -> bool:
        """Anti-outlier smoothing leaves a float bias on projections that had none."""
        return all(self.types.get(f"{s}.bias") == "FLOAT" for s in self.shard_prefixes(prefix))

    def norm_bias_names(self) -> List[str]:
        """The FLOAT `*norm.bias` tensors anti-outlier smoothing adds; the model adds them after its norms."""
        return sorted(name for name, kind in self.types.items() if kind == "FLOAT" and name.endswith("norm.bias"))

    # -- the resolver: description -> SchemeKeys (the registry in sgl_ascend.layers maps them to classes) --
    def _key(self, kind: str, name: str, **extra) -> SchemeKey:
        d = self.description
        return SchemeKey.make(kind, MSMODELSLIM, name, group_size=d.group_size, legacy=d.is_legacy, **extra)

    def linear_key(self, prefix: str) -> SchemeKey:
        """The key of a (possibly fused) linear layer; `group_wise` is set where its weights carry per-group
        scales (known from the headers, see group_wise_layers)."""
        name = self.weight_type(prefix)
        if name == FLATQUANT:
            return self._key(LINEAR, name, **self.flatquant_params(prefix))
        if self.is_group_wise(prefix):
            return self._key(LINEAR, name, group_wise=True)
        return self._key(LINEAR, name)

    def flatquant_params(self, prefix: str) -> Dict[str, object]:
        """right_trans: whether the layer's shards carry a right Kronecker factor (they must agree); left:
        the left factor's size from the headers (None without them)."""
        shards = self.shard_prefixes(prefix)
        has_right = {s: f"{s}.right_trans" in self.types for s in shards}
        if len(set(has_right.values())) > 1:
            listing = ", ".join(f"{s} {'with' if r else 'without'} right_trans" for s, r in has_right.items())
            raise CheckpointError(f"the shards of fused layer {prefix} carry different FlatQuant transforms "
                                  f"({listing}); one transform serves the fused layer's shared input.",
                                  file=self.source, tensor=f"{shards[0]}.right_trans")
        left = None if self.flat_left is None else self.flat_left.get(shards[0])
        return {"right_trans": has_right[shards[0]], "left": left}

    def expert_groups(self, prefix: str) -> List[Tuple[Tuple[SchemeKey, SchemeKey], List[int]]]:
        """The experts of the MoE block `prefix` (e.g. model.layers.3.mlp) grouped by scheme: ((gate/up key,
        down key), expert ids), groups in order of their first expert. A block quantized alike is one group;
        partial quantization (a FLOAT expert left by disable_names / exclude, as DeepSeek MTP / NextN
        layers come out) gives one group per scheme (layers/moe/mixed.py serves it). gate_proj and up_proj
        are fused into one grouped matmul and must agree."""
        pattern = re.compile(re.escape(prefix) + r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
        kinds: Dict[int, Dict[str, str]] = {}
        for name, kind in self.types.items():
            match = pattern.match(name)
            if match:
                kinds.setdefault(int(match.group(1)), {})[match.group(2)] = kind
        if 0 not in kinds:
            raise CheckpointError("the description has no entry for it, so the experts' scheme is unknown; the "
                                  "description does not match this model.", file=self.source,
                                  tensor=f"{prefix}.experts.0.gate_proj.weight")
        groups: Dict[Tuple[str, str], List[int]] = {}
        for expert in sorted(kinds):
            projs = kinds[expert]
            for proj in EXPERT_PROJECTIONS:
                if proj not in projs:
                    raise CheckpointError("the description has no entry for it, so this expert's scheme is "
                                          "unknown; the description does not match this model.", file=self.source,
                                          tensor=f"{prefix}.experts.{expert}.{proj}.weight")
            if projs["gate_proj"] != projs["up_proj"]:
                raise CheckpointError(f"gate_proj is {projs['gate_proj']} but up_proj is {projs['up_proj']}; they are "
                                      "fused into one grouped matmul and need one scheme.", file=self.source,
                                      tensor=f"{prefix}.experts.{expert}.up_proj.weight")
            groups.setdefault((projs["gate_proj"], projs["down_proj"]), []).append(expert)
        clip_pattern = re.compile(re.escape(prefix) + r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(bias|alpha)$")
        clip_experts = {int(m.group(1)) for m in map(clip_pattern.match, self.types) if m}
        out = []
        for (w13, w2), experts in groups.items():
            clip = any(e in clip_experts for e in experts)
            out.append(((self._key(EXPERTS, w13, clip=clip), self._key(EXPERTS, w2, clip=clip)), experts))
        return out

    def kv_cache_key(self) -> Optional[SchemeKey]:
        """KV-cache / attention quantization, None when absent: kv_cache_type (C8: static per-channel
        int8 K and V) or, for MLA models, fa_quant_type (FAQuant: quantized attention, which wins)."""
        d = self.description
        if d.fa_quant_type:
            return SchemeKey.make(KV_CACHE, MSMODELSLIM, FA_QUANT, fa_quant_type=d.fa_quant_type)
        if not d.kv_cache_type:
            return None
        return SchemeKey.make(KV_CACHE, MSMODELSLIM, d.kv_cache_type)

    @staticmethod
    def is_kv_cache_tensor(name: str) -> bool:
        return name.endswith(KV_CACHE_SUFFIXES) or bool(_FA_QUANT_TENSOR.search(name))

    def tensor_keys(self) -> Iterator[Tuple[SchemeKey, str]]:
        """(key, description entry) for every typed tensor and the KV cache: what `check_served` checks
        up front, so an unknown type string fails at start-up naming its entry."""
        kv = self.kv_cache_key()
        if kv is not None:
            yield kv, "fa_quant_type" if self.description.fa_quant_type else "kv_cache_type"
        kv_tensors = [name for name in self.types if self.is_kv_cache_tensor(name)]
        if kv_tensors and kv is None:
            raise CheckpointError("the description types KV-cache tensors but has no kv_cache_type (or "
                                  "fa_quant_type), so how to serve them is unknown; the description is incomplete.",
                                  file=self.source, tensor=kv_tensors[0])
        for name, kind in self.types.items():
            if not self.is_kv_cache_tensor(name):
                yield self._key(EXPERTS if _EXPERT_TENSOR.search(name) else LINEAR, kind), name
