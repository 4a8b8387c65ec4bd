"""What a format resolver returns for a linear layer, an expert group or the KV cache: a frozen key.

The resolvers (`quant/modelslim.py`, `quant/compressed_tensors.py`) turn a checkpoint's description
into `SchemeKey`s and nothing else; `sgl_ascend.layers.registry` maps keys to the scheme classes that
registered for them. Keys are plain, hashable data, so `inspect`, the SGLang configs and the tests
can compare, print and group them without building a layer.
"""

from dataclasses import dataclass
from typing import Any, Tuple

LINEAR, EXPERTS, KV_CACHE = "linear", "experts", "kv_cache"
KINDS = (LINEAR, EXPERTS, KV_CACHE)
MSMODELSLIM, COMPRESSED_TENSORS = "msmodelslim", "compressed-tensors"
#: not a checkpoint format: what the server quantizes itself (`--kv-cache-dtype int8` on any checkpoint)
ONLINE = "online"
FORMATS = (MSMODELSLIM, COMPRESSED_TENSORS, ONLINE)
UNQUANTIZED = "FLOAT"  # the name every format uses for a layer it leaves in bf16/fp16


@dataclass(frozen=True)
class SchemeKey:
    """kind: linear | experts | kv_cache; format: msmodelslim | compressed-tensors; name: the scheme as
    the format names it (msModelSlim's type string, compressed-tensors' decided kind); params: the
    format's settings a scheme may need, as sorted (name, value) pairs."""

    kind: str
    format: str
    name: str
    params: Tuple[Tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"scheme kind {self.kind!r} is not one of {KINDS}")
        object.__setattr__(self, "params", tuple(sorted(self.params)))

    @classmethod
    def make(cls, kind: str, format: str, name: str, **params) -> "SchemeKey":
        return cls(kind, format, name, tuple(params.items()))

    def param(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)

    def __str__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.format} {self.kind} {self.name}" + (f" ({extra})" if extra else "")
