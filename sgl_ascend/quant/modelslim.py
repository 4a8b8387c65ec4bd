"""msModelSlim checkpoints: `quant_model_description.json` -> one scheme per layer.

The description is a flat map "<tensor name>" -> "<type>" plus a few top-level keys. A layer's
scheme is the type of `<prefix>.weight`; fused layers (qkv_proj, gate_up_proj, MLA
fused_qkv_a_proj_with_mqa) are looked up through their checkpoint shards, which must agree.
"""

import os
from typing import Dict, List, Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from sgl_ascend.errors import CheckpointError
from sgl_ascend.quant.checks import read_json_object

DESCRIPTION_FILE = "quant_model_description.json"

LINEAR_TYPES = ("FLOAT", "W8A8", "W8A8_DYNAMIC", "W8A16", "W4A4_DYNAMIC", "W4A8_DYNAMIC")

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
    if description.kv_cache_type or description.fa_quant_type:
        raise CheckpointError(
            f"KV-cache / attention quantization (kv_cache_type={description.kv_cache_type}, "
            f"fa_quant_type={description.fa_quant_type}) is not supported by sgl-ascend yet; "
            "export the checkpoint without it.", file=path)
    for name, kind in description.tensor_types.items():
        if kind not in LINEAR_TYPES:
            raise CheckpointError(
                f"unknown scheme '{kind}'; sgl-ascend serves {', '.join(LINEAR_TYPES)}. "
                "Re-export with one of those or file an issue for the scheme.", file=path, tensor=name)
    return description


class ModelSlimConfig:
    """Scheme lookup for an msModelSlim checkpoint, independent of SGLang."""

    def __init__(self, description: ModelSlimDescription, source: str = DESCRIPTION_FILE):
        self.description = description
        self.types = description.tensor_types
        self.source = source

    @classmethod
    def from_dir(cls, model_dir: str) -> "ModelSlimConfig":
        return cls(load_description(model_dir), os.path.join(model_dir, DESCRIPTION_FILE))

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

    def get_linear_scheme(self, prefix: str):
        from sgl_ascend.layers.schemes import linear_scheme_for_modelslim

        return linear_scheme_for_modelslim(self.weight_type(prefix), self, prefix)
