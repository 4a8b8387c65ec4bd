"""What every expert scheme shares: the per-expert checkpoint tensor specs, the scheme protocol, and
the parameter registration that carries the loading rules.

One `ExpertScheme` serves one weight group of a fused-MoE layer: "w13" (gate_proj and up_proj fused
along the output dim, column-parallel) or "w2" (down_proj, row-parallel). A layer holds one of each,
so gate/up and down may use different schemes (mixed checkpoints).

Loading rule of a parameter (`register_expert`): a `ShardedParameter`, the class the linears use,
whose `ExpertLayout` holds the `TensorSpec` and a writer with `CheckpointLayout.write`'s signature
`write(stored slice, checkpoint slice)`. `ShardedParameter.load_expert_weight` validates one expert's
checkpoint tensor of one shard against the spec, narrows it to this rank's tensor-parallel slice
along `spec.tp_dim`, and hands it to the writer, which converts it straight into the parameter's
(final) layout inside the slice of that expert (and of that shard: gate is the first half of
`n_dim`, up the second). Nothing is staged beside the parameter.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from sgl_ascend.errors import CheckpointError, shape_str
from sgl_ascend.layers.parameters import EXPERT_SHARD_INDEX, ExpertLayout, ShardedParameter, check_dtype
from sgl_ascend.ops import ops

#: checkpoint projection names -> (weight group, SGLang FusedMoE shard id)
PROJECTIONS = {"gate_proj": ("w13", "w1"), "up_proj": ("w13", "w3"), "down_proj": ("w2", "w2")}
SHARD_INDEX = EXPERT_SHARD_INDEX

@dataclass(frozen=True)
class TensorSpec:
    """One per-expert checkpoint tensor: full (unsharded) shape, accepted dtypes, how tp splits it."""

    shape: Tuple[int, ...]
    kind: str
    tp_dim: Optional[int] = None

    def check(self, dtype: torch.dtype, shape, name: str, file: Optional[str] = None):
        check_dtype(dtype, self.kind, tensor=name, file=file)
        if tuple(shape) != self.shape and not (_numel(shape) == _numel(self.shape) == 1):
            raise CheckpointError(
                f"shape {shape_str(shape)} where {shape_str(self.shape)} is expected for this expert "
                "(model config sizes); the checkpoint does not match the model config.", file=file, tensor=name)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def copy_write(target: torch.Tensor, loaded: torch.Tensor) -> None:
    """Default conversion: same values, the target's dtype and shape ([N, 1] and [N] are one layout)."""
    target.copy_(loaded.reshape(target.shape))


def transposed_write(target: torch.Tensor, loaded: torch.Tensor) -> None:
    """[n, k] checkpoint rows into the kernel's [k, n] slice (a strided copy, no staging tensor)."""
    target.copy_(loaded.t())


def register_expert(layer: torch.nn.Module, attr: str, data: torch.Tensor, spec: TensorSpec, *,
                    n_dim: Optional[int] = 0, write: Callable = copy_write,
                    record_full: Optional[Callable] = None, **extra_weight_attrs) -> ShardedParameter:
    """Attach a fused expert parameter [E_local, ...]: a ShardedParameter whose ExpertLayout carries
    its loading rule (see module docstring; writers have CheckpointLayout's signature).

    n_dim: the dim of one expert's slice that holds output channels (gate/up halves), None when
    the tensor has none (a per-expert scalar).
    """
    prefix = getattr(layer, "prefix", "") or type(layer).__name__
    param = ShardedParameter(data, name=f"{prefix}.{attr}",
                             expert_layout=ExpertLayout(spec, write, n_dim, record_full))
    for key, value in extra_weight_attrs.items():  # SGLang's set_weight_attrs (weight_loader, ...)
        setattr(param, key, value)
    layer.register_parameter(attr, param)
    return param


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, group_list: torch.Tensor, group_list_type: int,
                   output_dtype: torch.dtype, **scale_args) -> torch.Tensor:
    """The experts' grouped matmul as upstream calls it (SGL hardware_backend/npu/moe/matmul.py): one x,
    one stacked weight [E, K, N], one output, grouped on M (split_item=2, group_type=0; the op's
    defaults split_item=0, group_type=None reject a Tensor group_list)."""
    return ops.npu_grouped_matmul([x], [weight], **scale_args, split_item=2, group_type=0, group_list=group_list,
                                  group_list_type=group_list_type, output_dtype=output_dtype)[0]


class ExpertScheme(ABC):
    """One weight group ("w13" or "w2") of a fused-MoE layer in one quantization scheme."""

    #: activation quantization the grouped matmul consumes: torch.int8, torch.quint4x2 or None
    act_dtype: Optional[torch.dtype] = None

    #: the scheme reads msModelSlim's top-level description group_size (inspect checks it against K)
    reads_group_size = False

    def __init__(self, role: str, params_dtype: torch.dtype = torch.bfloat16):
        if role not in ("w13", "w2"):
            raise ValueError(f"role must be w13 or w2, got {role!r}")
        self.role, self.params_dtype = role, params_dtype

    @classmethod
    def from_key(cls, key, *, role: str, params_dtype: torch.dtype = torch.bfloat16, **context) -> "ExpertScheme":
        """The scheme of weight group `role` ("w13" / "w2") for a resolved SchemeKey
        (sgl_ascend.quant.scheme_key), in a model of `params_dtype`; `context` may also hold `module`
        (the checkpoint module, for messages). Override to read the key's params."""
        return cls(role, params_dtype)

    def a(self, name: str) -> str:
        """Layer attribute of this group's tensor, e.g. w13_weight_scale."""
        return f"{self.role}_{name}"

    @abstractmethod
    def checkpoint_tensors(self, n: int, k: int, tp_size: int) -> Dict[str, TensorSpec]:
        """Suffix -> spec of the per-expert tensors of one checkpoint projection [n out, k in] (full sizes)."""

    @abstractmethod
    def create_weights(self, layer: torch.nn.Module, num_experts: int, n: int, k: int, tp_size: int,
                       **extra_weight_attrs) -> None:
        """Register this group's parameters for num_experts local experts; n, k are this rank's sizes."""

    @abstractmethod
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None: ...

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, token_scale: Optional[torch.Tensor],
              group_list: torch.Tensor, group_list_type: int, output_dtype: torch.dtype) -> torch.Tensor:
        """Grouped matmul of the routed rows x (quantized as act_dtype says) with this group's experts;
        group_list: int64 per local expert, counts (group_list_type 1) or cumulative ends (0)."""

    @abstractmethod
    def theoretical_bytes(self, num_experts: int, n: int, k: int) -> int:
        """Bytes the processed group should hold (values + scales + biases), for memory checks."""

    # -- helpers shared by the schemes ----------------------------------------------------------
    def per_channel_specs(self, n: int, k: int) -> Dict[str, TensorSpec]:
        """weight int8 [n, k] with per-channel weight_scale / weight_offset [n, 1] (W8A8, W4A4 files)."""
        out = 0 if self.role == "w13" else None
        return {"weight": TensorSpec((n, k), "int8", tp_dim=self.tp_split_dim()),
                "weight_scale": TensorSpec((n, 1), "float", tp_dim=out),
                "weight_offset": TensorSpec((n, 1), "float", tp_dim=out)}

    def scaled_grouped_matmul(self, layer, x, token_scale, group_list, group_list_type, output_dtype):
        """Grouped matmul with this group's per-channel weight scale and the tokens' scales, no bias."""
        return grouped_matmul(x, getattr(layer, self.a("weight")), group_list, group_list_type, output_dtype,
                              scale=[getattr(layer, self.a("weight_scale"))], per_token_scale=[token_scale])

    def full_sizes(self, n: int, k: int, tp_size: int) -> Tuple[int, int]:
        """Checkpoint projection sizes (one shard for w13) from this rank's sizes."""
        return (n // 2 * tp_size, k) if self.role == "w13" else (n, k * tp_size)

    def tp_split_dim(self) -> int:
        """Checkpoint dim tp splits: w13 the output dim (0), w2 the input dim (1)."""
        return 0 if self.role == "w13" else 1
