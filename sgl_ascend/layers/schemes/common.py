"""Steps every scheme shares, one helper each: kernel layout, int4 packing, scale shapes, offsets."""

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.ops import ACL_FORMAT_FRACTAL_NZ, ops

# int4 values packed per call when converting weights, so the int32 staging tensors stay small
# (rows of K per call = this / N; a fixed 1024 rows staged ~16 bytes per value of wide layers).
_INT4_PACK_CHUNK_VALUES = 1 << 20


def to_kernel_layout(weight_nk: torch.Tensor) -> torch.Tensor:
    """[.., N, K] checkpoint layout -> the kernels' [.., K, N] in FRACTAL_NZ.

    The transpose is a view; on the NPU the format cast materialises NZ once (the checkpoint copy is
    released when the parameter's data is replaced). The CPU twin keeps the view, so the bytes stay
    [N, K]-contiguous: zero copies, and torch's fast int8 kernels read them directly.
    """
    return ops.npu_format_cast(weight_nk.transpose(-2, -1), ACL_FORMAT_FRACTAL_NZ)


def pack_int4_for_kernel(values_nk: torch.Tensor) -> torch.Tensor:
    """int4 values stored one per int8, [N, K] -> [K, N/8] int32, eight per int32 (npu int4pack)."""
    values_kn = values_nk.transpose(0, 1)
    k, n = values_kn.shape
    if n % 8:
        raise CheckpointError(f"int4 weights need an output size divisible by 8 to pack, got {n}")
    packed = torch.empty(k, n // 8, dtype=torch.int32, device=values_nk.device)
    rows = max(1, _INT4_PACK_CHUNK_VALUES // n)
    for start in range(0, k, rows):
        chunk = values_kn[start:start + rows].to(torch.int32)
        packed[start:start + rows] = ops.npu_convert_weight_to_int4pack(chunk)
    return packed


def flatten_channel_scale(layer: torch.nn.Module, attr: str) -> None:
    """[N, 1] per-channel tensors -> [N] (a view, no copy)."""
    param = getattr(layer, attr)
    param.data = param.data.reshape(-1)


def drop_zero_offset(layer: torch.nn.Module, attr: str, why: str) -> None:
    """Symmetric kernels take no weight offset: check the checkpoint's is zero, then free it."""
    param = getattr(layer, attr)
    if torch.count_nonzero(param.data):
        raise CheckpointError(
            f"non-zero weight offset (max |offset| = {param.data.abs().max().item():g}) but {why} is "
            "symmetric; re-quantize with symmetric weights.", tensor=param.tensor_name)
    delattr(layer, attr)


def check_int_range(layer: torch.nn.Module, attr: str, low: int, high: int) -> None:
    param = getattr(layer, attr)
    lo, hi = int(param.data.min()), int(param.data.max())
    if lo < low or hi > high:
        raise CheckpointError(
            f"values span [{lo}, {hi}] but this scheme stores int4 values in [{low}, {high}] one per "
            "int8; the description's scheme does not match the tensor.", tensor=param.tensor_name)
