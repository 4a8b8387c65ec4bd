"""Checkpoint tensors that are validated while loading and never stored (zero offsets, a shape record,
a neutral w2_alpha). They get a zero-byte parameter so that loaders looking parameters up by name
(SGLang's) find one; `drop_check_only` removes them after loading."""

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.schemes.common import check_zero_offset


def CHECK_ONLY() -> torch.Tensor:
    return torch.empty(0)


def is_check_only(param: torch.Tensor) -> bool:
    return param.data.numel() == 0


def write_zero_check(target, loaded: torch.Tensor) -> None:
    """Symmetric kernels take no weight offset: the checkpoint's must be zero (the linears' check)."""
    check_zero_offset(loaded, "the expert kernel")


def drop_check_only(layer: torch.nn.Module, role: str) -> None:
    for name, param in list(layer.named_parameters(recurse=False)):
        if name.startswith(role + "_") and is_check_only(param):
            delattr(layer, name)


def write_shape_check(n: int, k: int):
    """compressed-tensors pack-quantized `weight_shape` (metadata): must be the projection's full [n, k]."""
    def check(target, loaded):
        if loaded.tolist() != [n, k]:
            raise CheckpointError(f"weight_shape {loaded.tolist()} where [{n}, {k}] is expected; the "
                                  "checkpoint does not match the model config.")
    return check
