"""Steps every scheme shares, one helper each: kernel layout, int4 packing, scale shapes, offsets."""

from typing import Optional

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.parameters import CheckpointLayout, register
from sgl_ascend.ops import ops, to_nz

# int4 values packed per call when converting weights, so the staging tensors stay small: ~12
# bytes per value (int32 temporaries of the conversion), ~400 KiB per call. Weights are packed
# while they load, when everything else is already resident, so this is all the headroom there is
# (about as fast on CPU as 1M-value calls were: each chunk is a block of whole checkpoint rows).
INT4_PACK_CHUNK_VALUES = 1 << 15


def to_kernel_layout(weight_nk: torch.Tensor) -> torch.Tensor:
    """[.., N, K] checkpoint layout -> the kernels' [.., K, N] in FRACTAL_NZ.

    The transpose is a view; on the NPU the format cast materialises NZ once (the checkpoint copy is
    released when the parameter's data is replaced). The CPU twin keeps the view, so the bytes stay
    [N, K]-contiguous: zero copies, and torch's fast int8 kernels read them directly.
    """
    return to_nz(weight_nk.transpose(-2, -1))


def pack_int4_for_kernel(values_nk: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int4 values stored one per int8, [N, K] -> [K, N/8] int32, eight per int32 (npu int4pack),
    into `out` (e.g. a shard's slice of the kernel weight, on the kernel's device) when given.

    A few whole rows of N at a time: each chunk is a small contiguous block of the checkpoint,
    transposed in cache, and its staging tensors stay bounded.
    """
    n, k = values_nk.shape
    if n % 8:
        raise CheckpointError(f"int4 weights need an output size divisible by 8 to pack, got {n}")
    packed = torch.empty(k, n // 8, dtype=torch.int32, device=values_nk.device) if out is None else out
    rows = max(8, INT4_PACK_CHUNK_VALUES // max(k, 1) // 8 * 8)
    for start in range(0, n, rows):
        chunk = values_nk[start:start + rows].t().contiguous().to(packed.device, torch.int32)
        packed[:, start // 8:(start + chunk.shape[1]) // 8] = ops.npu_convert_weight_to_int4pack(chunk)
    return packed


def write_int4_values(target: torch.Tensor, values: torch.Tensor) -> None:
    """One int4 value per int8 byte, [n, K] -> the kernel's int32 [K, n/8] slice `target`, in place."""
    lo, hi = int(values.min()), int(values.max())
    if lo < -8 or hi > 7:
        raise CheckpointError(f"values span [{lo}, {hi}] but int4 weights stored one per byte must lie in "
                              "[-8, 7]; the description's scheme (or version) does not match the tensor.")
    pack_int4_for_kernel(values, out=target)


def register_int4_weight(layer: torch.nn.Module, attr: str, n: int, k: int, *, checkpoint_shape=None,
                         checkpoint_dtype: torch.dtype = torch.int8, write=write_int4_values):
    """An int4 weight held in the kernel layout int32 [K, N/8] from creation on: each checkpoint shard
    is packed into its slice while it loads (default: int8 [N, K], one value per byte), so no
    unpacked copy of the layer's weight exists while the other layers load."""
    if n % 8:
        raise CheckpointError(f"int4 weights need an output size divisible by 8 to pack, got {n}")
    layout = CheckpointLayout(tuple(checkpoint_shape or (n, k)), checkpoint_dtype, write,
                              stored_output_dim=1, outputs_per_element=8)
    return register(layer, attr, torch.empty(k, n // 8, dtype=torch.int32), output_dim=0, input_dim=1,
                    checkpoint_layout=layout)


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


# -- the activation dtype and the weight-only kernel ------------------------------------------------

KERNEL_ACT_DTYPES = (torch.bfloat16, torch.float16)


def kernel_act_dtype(params_dtype: torch.dtype, scheme: str) -> torch.dtype:
    """The model dtype a quantized kernel computes in: bf16 or fp16 (the NPU kernels have no fp32
    activations / outputs: npu_quant_matmul, npu_dynamic_quant, npu_weight_quant_batchmatmul)."""
    if params_dtype not in KERNEL_ACT_DTYPES:
        raise ValueError(f"{scheme} computes in bfloat16 or float16 on the NPU (its kernels take no {params_dtype} "
                         "activations); serve the model in bfloat16 (--dtype bfloat16) or float16.")
    return params_dtype


def weight_only_group_size(group_size: int, k: int, prefix: str = "") -> int:
    """The antiquant_group_size npu_weight_quant_batchmatmul gets for groups of `group_size` over the
    rank's K: 0 (per channel) without groups or when the rank holds a single group (the kernel takes
    group sizes in [32, K-1] only, and one group is a per-channel scale); else the group size, which
    must be a multiple of 32 (torch_npu docs, npu_weight_quant_batchmatmul antiquant_group_size)."""
    if not group_size or k // group_size <= 1:
        return 0
    if group_size % 32:
        raise CheckpointError(f"layer {prefix}: group size {group_size} is not a multiple of 32, which the NPU's "
                              "weight-only kernel (npu_weight_quant_batchmatmul) requires for per-group scales; "
                              "re-quantize with group size 32, 64, 128 ...")
    return group_size


def weight_only_bias(bias: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """npu_weight_quant_batchmatmul takes an fp32 bias with bf16 x and an fp16 bias with fp16 x (the
    layer's bias is in the model dtype: a cast of N values per call, as SGLang's GPTQ method does)."""
    if bias is None:
        return None
    return bias.to(torch.float32 if x.dtype == torch.bfloat16 else x.dtype)


def weight_only_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], group_size: int = 0) -> torch.Tensor:
    """y = x @ ((weight + offset) * scale) + bias on npu_weight_quant_batchmatmul: x [..., K] flattened to
    the kernel's 2-D [M, K] and restored; scale / offset already in x's dtype (converted at load)."""
    lead = x.shape[:-1]
    out = ops.npu_weight_quant_batchmatmul(x.reshape(-1, x.shape[-1]), weight, scale, antiquant_offset=offset,
                                           bias=weight_only_bias(bias, x), antiquant_group_size=group_size)
    return out.reshape(*lead, out.shape[-1])
