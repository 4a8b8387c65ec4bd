"""The op surface: every quantized layer computes through `sgl_ascend.ops.ops`.

On an Ascend host (torch_npu imports and an NPU is present) `ops.npu_x` is torch_npu's own
`torch.ops.npu.npu_x`. Anywhere else it is the pure-PyTorch twin (`sgl_ascend.ops.twin`), registered
as `torch.ops.npu.npu_x` with torch_npu's exact schema and checked against the real op's contract
(`sgl_ascend.ops.contract`), so a call the NPU would reject fails here too (on CUDA/ROCm hosts the
twins are called directly, still checked, and the `npu` namespace is left alone).
`SGL_ASCEND_OPS=twin` forces the twins (to check a checkpoint on an NPU host's CPU);
`SGL_ASCEND_OPS=npu` demands torch_npu and fails loudly without it.
"""

import logging
import os
import types

from sgl_ascend.ops import twin
from sgl_ascend.ops.contract import ACL_FORMAT_FRACTAL_NZ, NpuContractError, nz_aligned
from sgl_ascend.ops.npu_schemas import SCHEMAS

logger = logging.getLogger(__name__)

OP_NAMES = tuple(SCHEMAS)


def _try_import_torch_npu():
    try:
        import torch
        import torch_npu  # noqa: F401  (registers torch.npu and torch.ops.npu)

        return torch_npu if torch.npu.is_available() else None
    except Exception as exc:  # ImportError, or libhccl.so missing without CANN
        logger.debug("torch_npu unavailable: %s", exc)
        return None


def _namespace():
    """torch.ops.npu's ops by name; an op an older torch_npu build lacks is left out (hasattr(ops, name)
    is False), so callers with a fallback (MoE routing v1) can take it."""
    import torch

    bound = {}
    for name in OP_NAMES:
        try:
            bound[name] = getattr(torch.ops.npu, name)
        except (AttributeError, RuntimeError):
            logger.warning("torch_npu has no %s", name)
    return types.SimpleNamespace(**bound)


def _select():
    choice = os.environ.get("SGL_ASCEND_OPS", "auto")
    if choice not in ("auto", "npu", "twin"):
        raise ValueError(f"SGL_ASCEND_OPS must be auto, npu or twin; got {choice!r}")
    torch_npu = None if choice == "twin" else _try_import_torch_npu()
    if torch_npu is not None:
        return "npu", _namespace()
    if choice == "npu":
        raise RuntimeError("SGL_ASCEND_OPS=npu but torch_npu cannot be imported or no NPU is visible")
    from sgl_ascend.ops.library import register_twins

    if register_twins():
        return "twin", _namespace()
    return "twin", types.SimpleNamespace(**{name: getattr(twin, name) for name in OP_NAMES})


backend, ops = _select()


def to_nz(weight):
    """The FRACTAL_NZ cast where the shape is NZ-aligned; unaligned weights stay ND (as upstream)."""
    if nz_aligned(weight.shape, weight.dtype):
        return ops.npu_format_cast(weight, ACL_FORMAT_FRACTAL_NZ)
    return weight


__all__ = ["ops", "backend", "to_nz", "use_twins", "ACL_FORMAT_FRACTAL_NZ", "OP_NAMES", "NpuContractError"]


class use_twins:
    """Within the block, `ops` computes through the checked CPU twins even on an NPU host (selftest runs
    each layer both ways); restores the previous binding on exit."""

    def __enter__(self):
        self._saved = dict(vars(ops))
        for name in OP_NAMES:
            setattr(ops, name, getattr(twin, name))
        return ops

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(ops, name, fn)
        return False
