"""The op surface: every quantized layer computes through `sgl_ascend.ops.ops`.

On an Ascend host (torch_npu imports and an NPU is present) these are torch_npu's own ops; anywhere
else they are the pure-PyTorch twins of `sgl_ascend.ops.twin`, which compute the same numbers.
`SGL_ASCEND_OPS=twin` forces the twins (to check a checkpoint on an NPU host's CPU);
`SGL_ASCEND_OPS=npu` demands torch_npu and fails loudly without it.
"""

import logging
import os
import types

from sgl_ascend.ops import twin
from sgl_ascend.ops.twin import ACL_FORMAT_FRACTAL_NZ

logger = logging.getLogger(__name__)

OP_NAMES = (
    "npu_dynamic_quant",
    "npu_quantize",
    "npu_quant_matmul",
    "npu_weight_quant_batchmatmul",
    "npu_convert_weight_to_int4pack",
    "npu_format_cast",
    "npu_grouped_matmul",
    "npu_swiglu",
    "npu_moe_init_routing_v2",
    "npu_moe_token_unpermute",
)


def _try_import_torch_npu():
    try:
        import torch
        import torch_npu  # noqa: F401  (registers torch.npu)

        return torch_npu if torch.npu.is_available() else None
    except Exception as exc:  # ImportError, or libhccl.so missing without CANN
        logger.debug("torch_npu unavailable: %s", exc)
        return None


# Upstream skips the NZ cast where the NPU kernels need aligned shapes (bf16: k and n % 16;
# int8: n % 32; int32/uint8: n % 64); the tensor then stays in ND and stays correct.
_NZ_ALIGN_LAST = {1: 32, 2: 16, 4: 64}


def _npu_format_cast(torch_npu):
    def cast(tensor, acl_format):
        align = _NZ_ALIGN_LAST.get(tensor.element_size(), 0)
        if acl_format == ACL_FORMAT_FRACTAL_NZ and (not align or tensor.shape[-1] % align
                                                   or (align == 16 and tensor.shape[-2] % 16)):
            return tensor.contiguous()
        return torch_npu.npu_format_cast(tensor.contiguous(), acl_format)

    return cast


def _select():
    choice = os.environ.get("SGL_ASCEND_OPS", "auto")
    if choice not in ("auto", "npu", "twin"):
        raise ValueError(f"SGL_ASCEND_OPS must be auto, npu or twin; got {choice!r}")
    torch_npu = None if choice == "twin" else _try_import_torch_npu()
    if torch_npu is None:
        if choice == "npu":
            raise RuntimeError("SGL_ASCEND_OPS=npu but torch_npu cannot be imported or no NPU is visible")
        return "twin", types.SimpleNamespace(**{name: getattr(twin, name) for name in OP_NAMES})
    bound = {name: getattr(torch_npu, name) for name in OP_NAMES}
    bound["npu_format_cast"] = _npu_format_cast(torch_npu)
    return "npu", types.SimpleNamespace(**bound)


backend, ops = _select()

__all__ = ["ops", "backend", "ACL_FORMAT_FRACTAL_NZ", "OP_NAMES"]
