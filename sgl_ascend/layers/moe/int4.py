"""Int4 expert weights straight into the grouped matmul's layout, one checkpoint tensor at a time.

Kernel layout (all int4 schemes): [K, N/8] int32 per expert, eight signed nibbles per int32 along N,
little-endian (sgl_ascend.ops.int4). Each writer fills the (possibly column-narrowed) slice of one
expert and one shard in place; the only temporary is what the conversion itself needs.
"""

import torch

from sgl_ascend.ops.scales import encode_fp32_as_int64


def write_modelslim_pairs(target: torch.Tensor, packed: torch.Tensor) -> None:
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
