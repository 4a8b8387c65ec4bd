"""The one scheme registry: SchemeKey (kind, format, name) -> the scheme class that serves it.

Scheme classes fill it themselves with a class decorator, in their own file:

    @register_scheme(LINEAR, MSMODELSLIM, "W8A8_DYNAMIC")
    class W8A8DynamicLinear(LinearScheme): ...

`create(key, **context)` builds a scheme for a key the format resolvers in `sgl_ascend.quant` return
(`cls.from_key(key, **context)`); a key no class registered
for is refused with a CheckpointError that lists what is served, built from the registry. Everything
that names served schemes (the resolvers' "served: ..." messages, `sgl-ascend schemes`, the SGLang
configs' "served by" log lines) reads `served_names` / `served_table`.
"""

from typing import Dict, List, Optional, Tuple

from sgl_ascend.errors import CheckpointError
from sgl_ascend.quant.modelslim import FA_QUANT
from sgl_ascend.quant.scheme_key import COMPRESSED_TENSORS, EXPERTS, FORMATS, KINDS, KV_CACHE, LINEAR, SchemeKey

_REGISTRY: Dict[Tuple[str, str, str], type] = {}

_WHAT = {LINEAR: "linear layers", EXPERTS: "fused-MoE experts", KV_CACHE: "KV caches"}


def register_scheme(kind: str, format: str, *names: str):
    """Class decorator: `cls` serves `names` of `format` for layers of `kind`; the scheme is built with
    `cls.from_key(key, **context)`."""
    if kind not in KINDS or format not in FORMATS or not names:
        raise ValueError(f"register_scheme({kind!r}, {format!r}, {names}): kind is one of {KINDS}, "
                         f"format one of {FORMATS}, and at least one name is needed")

    def decorate(cls):
        for name in names:
            slot = (kind, format, name)
            if slot in _REGISTRY and _REGISTRY[slot] is not cls:
                raise ValueError(f"{format} {kind} {name} is served by {_REGISTRY[slot].__name__} already; "
                                 f"{cls.__name__} cannot serve it too")
            _REGISTRY[slot] = cls
        return cls

    return decorate


def unregister_scheme(kind: str, format: str, *names: str) -> None:
    """For tests that register a toy scheme."""
    for name in names:
        _REGISTRY.pop((kind, format, name), None)


def served_names(kind: str, format: str) -> List[str]:
    load_builtin_schemes()
    return sorted(name for (k, f, name) in _REGISTRY if k == kind and f == format)


def served_table() -> List[Tuple[str, str, str, str]]:
    """(format, kind, name, class name) for every registered scheme, by format, kind and name."""
    load_builtin_schemes()
    rows = [(f, k, name, cls.__name__) for (k, f, name), cls in _REGISTRY.items()]
    return sorted(rows, key=lambda r: (FORMATS.index(r[0]), KINDS.index(r[1]), r[2]))


def served_variants() -> List[Tuple[str, str, str, str, str]]:
    """(format, kind, name, key param, class name): the classes a registered class hands the keys carrying
    that param to (its `variants`, e.g. msModelSlim W8A16 with group_wise -> GroupWeightOnlyLinear)."""
    load_builtin_schemes()
    rows = [(f, k, name, param, variant.__name__) for (k, f, name), cls in _REGISTRY.items()
            for param, variant in vars(cls).get("variants", {}).items()]  # declared, not inherited
    return sorted(rows, key=lambda r: (FORMATS.index(r[0]), KINDS.index(r[1]), r[2], r[3]))


def served_by(keys) -> str:
    """"W8A8_DYNAMIC linear -> W8A8DynamicLinear, ..." for the distinct served keys among `keys`: what the
    SGLang configs log, so the log says which class serves each scheme of the checkpoint."""
    load_builtin_schemes()
    seen = {}
    for key in keys:
        cls = _REGISTRY.get((key.kind, key.format, key.name))
        if cls is not None:
            seen.setdefault(f"{key.name} {key.kind}", cls.__name__)
    return ", ".join(f"{what} -> {cls}" for what, cls in sorted(seen.items())) or "none"


def served_text(kind: str, format: str) -> str:
    names = served_names(kind, format)
    return ", ".join(names) if names else "none yet"


def is_served(key: SchemeKey) -> bool:
    load_builtin_schemes()
    return (key.kind, key.format, key.name) in _REGISTRY


def scheme_class(key: SchemeKey, *, file: Optional[str] = None, tensor: Optional[str] = None,
                 what: Optional[str] = None) -> type:
    """The class registered for `key`, or a CheckpointError naming file/tensor and what is served."""
    load_builtin_schemes()
    cls = _REGISTRY.get((key.kind, key.format, key.name))
    if cls is None:
        raise CheckpointError(refusal(key, what), file=file, tensor=tensor)
    return cls


def refusal(key: SchemeKey, what: Optional[str] = None) -> str:
    subject = what or f"the checkpoint's {key.kind.replace('_', ' ')}"
    details = ", ".join(f"{k}={v}" for k, v in key.params if v is not None)
    if key.kind == KV_CACHE:
        return kv_cache_refusal(key, subject, details)
    fmt = "compressed-tensors" if key.format == COMPRESSED_TENSORS else "msModelSlim"
    return (f"{subject} is {key.name}{f' ({details})' if details else ''}, which sgl-ascend does not serve "
            f"for {_WHAT[key.kind]}; served {fmt} schemes for {_WHAT[key.kind]}: "
            f"{served_text(key.kind, key.format)}. Re-export with one of those or file an issue for the scheme.")


# What to do instead, for the KV-cache schemes writers produce that sgl-ascend does not serve.
_KV_ADVICE = {
    FA_QUANT: "msModelSlim FAQuant (MLA models: DeepSeek-V3/V3.2, GLM-5, Kimi-K2.5) quantizes the attention "
               "inputs (<attn>.fa_q / fa_k / fa_v scales), which sgl-ascend does not serve yet; quantize without "
               "the FA-quant step (C8 KV or no KV quantization), or serve the checkpoint with vllm-ascend",
    "float8": "an FP8 KV cache needs FP8 attention kernels, which Ascend A2/A3 NPUs lack; re-export with an int8 "
              "kv_cache_scheme (static, symmetric, strategy 'tensor') or without kv_cache_scheme",
}


def kv_cache_refusal(key: SchemeKey, subject: str, details: str) -> str:
    advice = _KV_ADVICE.get(key.name, "re-export with one of those or without KV-cache quantization")
    return (f"{subject} is quantized as {key.name}{f' ({details})' if details else ''}, a KV-cache scheme "
            f"sgl-ascend does not serve (served {key.format} KV-cache schemes: "
            f"{served_text(key.kind, key.format)}): {advice}.")


def kv_cache_scheme(config):
    """The KV-cache scheme of a resolved checkpoint config, None when its KV cache is not quantized."""
    key = config.kv_cache_key()
    if key is None:
        return None
    return create(key, file=config.source, what="the checkpoint's KV cache")


def create(key: SchemeKey, *, file: Optional[str] = None, tensor: Optional[str] = None,
           what: Optional[str] = None, **context):
    """A scheme object for `key` (context: e.g. role and params_dtype for experts)."""
    return scheme_class(key, file=file, tensor=tensor, what=what).from_key(key, **context)


def load_builtin_schemes() -> None:
    """Import every built-in scheme module, so that the registry is complete."""
    import sgl_ascend.layers.kv_cache  # noqa: F401  (KV-cache schemes)
    import sgl_ascend.layers.moe  # noqa: F401  (expert schemes)
    import sgl_ascend.layers.schemes  # noqa: F401  (linear schemes)


def check_served(config):
    """Refuse, up front, a resolved checkpoint config (quant.modelslim.ModelSlimConfig,
    quant.compressed_tensors.CompressedTensorsConfig) that names a scheme nothing registered for:
    every `(key, entry)` of `config.tensor_keys()`. Returns the config."""
    for key, entry in config.tensor_keys():
        if is_served(key):
            continue
        if key.kind != KV_CACHE and not any(is_served(SchemeKey(k, key.format, key.name)) for k in (LINEAR, EXPERTS)):
            fmt = "compressed-tensors" if key.format == COMPRESSED_TENSORS else "msModelSlim"
            served = "; ".join(f"{_WHAT[k]}: {served_text(k, key.format)}" for k in (LINEAR, EXPERTS))
            raise CheckpointError(
                f"unknown scheme '{key.name}'; sgl-ascend serves these {fmt} schemes: {served}. "
                "Re-export with one of those or file an issue for the scheme.", file=config.source, tensor=entry)
        raise CheckpointError(refusal(key, "this entry"), file=config.source, tensor=entry)
    return config


def linear_scheme(config, prefix: str, layer=None, **context):
    """The linear scheme of layer `prefix` of a resolved checkpoint config; `context` goes to the class's
    `from_key` (e.g. `decode_node`, a PD-disaggregated decode server, for W8A8_MIX)."""
    key = config.linear_key(prefix) if layer is None else config.linear_key(prefix, layer)
    return create(key, file=config.source, tensor=f"{prefix}.weight", what=f"layer {prefix}", **context)
