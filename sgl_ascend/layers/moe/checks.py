"""Checkpoint tensors that are validated while loading and never stored (zero offsets, a shape record,
a neutral w2_alpha). They get a zero-byte parameter so that loaders looking parameters up by name
(SGLang's) find one; `drop_check_only` removes them after loading."""

import torch

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
