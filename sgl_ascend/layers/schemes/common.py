"""Steps every scheme shares, one helper each: kernel layout, int4 packing, scale shapes, offsets."""

import contextlib
import sys
from typing import Optional

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.parameters import CheckpointLayout, register
from sgl_ascend.ops import ops, to_nz
from sgl_ascend.ops.scales import encode_fp32_as_int64
from sgl_ascend.quant.checks import check_int4_in_int8

# Most bytes of int4 values (one per int8) converted per step while a weight loads. A step's staging
# is about as large as its values and never larger than the checkpoint tensor being loaded, so the
# load peak stays within final + largest tensor. Steps must be few: each is a handful of
# multi-threaded torch ops, and with the cores busy (a shared host) every op waits for its threads:
# at 256 KiB steps (hundreds per weight) W4A4 / CT W4A16 took 23-32 s to load in the real server
# against bf16's 1.5-1.9 s under two busy competitors; at 8 MiB W4A4 took 0.35x bf16 (bench/server_load.py;
# CT W4A16 is still 3.8-6x there, from a cause not yet found).
INT4_PACK_CHUNK_BYTES = 1 << 23


def to_kernel_layout(weight_nk: torch.Tensor) -> torch.Tensor:
    """[.., N, K] checkpoint layout -> the kernels' [.., K, N] in FRACTAL_NZ.

    The transpose is a view; on the NPU the format cast materialises NZ once (the checkpoint copy is
    released when the parameter's data is replaced). The CPU twin keeps the view, so the bytes stay
    [N, K]-contiguous: zero copies, and torch's fast int8 kernels read them directly.
    """
    return to_nz(weight_nk.transpose(-2, -1))


@contextlib.contextmanager
def one_intra_op_thread():
    """Runs the int4 repacking steps on one thread. They are memory-bound; with more threads each op
    ends in a barrier that waits for a descheduled thread when the host is busy: 8 Qwen3-1.7B-sized
    CT W4A16 layers took 23 s wall (9.4 s CPU, spinning) on 2 threads beside other work, 1.5 s on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _pack_rows_as_bytes(target_bytes: torch.Tensor, values: torch.Tensor) -> None:
    """int4 values [r, K] (r even) -> bytes [K, r/2] of the int4pack layout: byte j of a little-endian
    int32 holds values 2j (low nibble) and 2j+1 (high nibble), two's complement (sgl_ascend.ops.int4),
    i.e. the msModelSlim pair byte transposed. int8 ops only (the left shift wraps to the nibble)."""
    pairs = values[0::2] & 0x0F
    pairs |= values[1::2] << 4
    target_bytes.copy_(pairs.t())


@one_intra_op_thread()
def pack_int4_for_kernel(values_nk: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int4 values stored one per int8, [N, K] -> [K, N/8] int32, eight per int32 (npu int4pack),
    into `out` (e.g. a shard's slice of the kernel weight, on the kernel's device) when given.

    Whole rows of N at a time, INT4_PACK_CHUNK_BYTES per step, so staging stays bounded. On the CPU
    (little-endian) the bytes are built directly (what npu_convert_weight_to_int4pack computes, see
    sgl_ascend.ops.int4); elsewhere each step goes through the op on the kernel's device.
    """
    n, k = values_nk.shape
    if n % 8:
        raise CheckpointError(f"int4 weights need an output size divisible by 8 to pack, got {n}")
    packed = torch.empty(k, n // 8, dtype=torch.int32, device=values_nk.device) if out is None else out
    rows = max(8, INT4_PACK_CHUNK_BYTES // max(k, 1) // 8 * 8)
    as_bytes = (packed.device.type == "cpu" and values_nk.device.type == "cpu" and sys.byteorder == "little"
                and packed.stride(-1) == 1)
    for start in range(0, n, rows):
        chunk = values_nk[start:start + rows]
        cols = slice(start // 8, (start + chunk.shape[0]) // 8)
        if as_bytes:
            _pack_rows_as_bytes(packed[:, cols].view(torch.int8), chunk.to(torch.int8))
        else:
            chunk = chunk.t().contiguous().to(packed.device, torch.int32)
            packed[:, cols] = ops.npu_convert_weight_to_int4pack(chunk)
    return packed


def write_int4_values(target: torch.Tensor, values: torch.Tensor) -> None:
    """One int4 value per int8 byte, [n, K] -> the kernel's int32 [K, n/8] slice `target`, in place."""
    check_int4_values(values)
    pack_int4_for_kernel(values, out=target)


def write_int4_pairs(target: torch.Tensor, packed: torch.Tensor) -> None:
    """msModelSlim W4A8 int8 [n/2, K], two nibbles per byte along n (low = even row) -> int32 [K, n/8].

    Byte j of a kernel row holds columns 2j (low) and 2j+1 (high): the checkpoint byte transposed,
    so the int32 slice viewed as bytes takes the transposed checkpoint directly (no unpacking).
    """
    target.view(torch.int8).copy_(packed.t())


def write_fp32_bits(target: torch.Tensor, scale: torch.Tensor) -> None:
    """A float scale [n] / [n, 1] -> int64 holding its fp32 bits (the W4A8 kernels' scale format)."""
    target.copy_(encode_fp32_as_int64(scale.reshape(target.shape)))


def write_scale_or_bits(target: torch.Tensor, scale: torch.Tensor) -> None:
    """Like write_fp32_bits, but an int64 scale (already fp32 bits, activation-clip files) is kept."""
    if scale.dtype == torch.int64:
        target.copy_(scale.reshape(target.shape) & 0xFFFFFFFF)
    else:
        write_fp32_bits(target, scale)


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


def check_zero_offset(values: torch.Tensor, why: str, tensor: Optional[str] = None) -> None:
    """Symmetric kernels take no weight offset: the checkpoint's must be zero (linears and experts)."""
    if torch.count_nonzero(values):
        raise CheckpointError(
            f"non-zero weight offset (max |offset| = {values.float().abs().max().item():g}) but {why} is "
            "symmetric; re-quantize with symmetric weights.", tensor=tensor)


def drop_zero_offset(layer: torch.nn.Module, attr: str, why: str) -> None:
    """Check a loaded weight offset is zero (check_zero_offset), then free it."""
    param = getattr(layer, attr)
    check_zero_offset(param.data, why, tensor=param.tensor_name)
    delattr(layer, attr)


def check_int4_values(values: torch.Tensor, tensor: Optional[str] = None) -> None:
    """int4 values stored one per int8 byte lie in [-8, 7] (quant.checks, shared with inspect / verify)."""
    check_int4_in_int8(values, file=None, tensor=tensor, scheme="this scheme")


def check_int_range(layer: torch.nn.Module, attr: str, low: int = -8, high: int = 7) -> None:
    """check_int4_values on a loaded parameter (int4 one per byte is the only such range)."""
    if (low, high) != (-8, 7):
        raise ValueError(f"only the int4 range [-8, 7] is checked, got [{low}, {high}]")
    param = getattr(layer, attr)
    check_int4_values(param.data, tensor=param.tensor_name)


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
