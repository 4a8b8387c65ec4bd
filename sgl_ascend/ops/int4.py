"""Int4 packing shared by the twin ops and the schemes.

Layout (the one `npu_convert_weight_to_int4pack` and `npu_dynamic_quant(dst_type=quint4x2)` use):
eight signed int4 values per int32 along the last dim, element j of a group in bits [4j, 4j+4),
two's-complement nibbles, no +8 offset. ASSUMPTION (not verifiable without an NPU): little-endian
nibble order inside the int32, the same order compressed-tensors uses for its int32 packing.
compressed-tensors (`pack_to_int32`) stores v + 8 in each nibble instead, which flips exactly the
nibble's top bit: its int32 words are ours XOR 0x88888888 (tests/test_ops_twin.py checks this).
msModelSlim W4A8 pairs (`unpack_int8_pairs`) are checked against the real tool's output there too.
"""

import sys

import torch

NIBBLES_PER_INT32 = 8
#: compressed-tensors int32 words XOR this (0x88888888 as an int32) are ours: every nibble's top bit flips
CT_OFFSET_BITS = 0x88888888 - 2**32
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def pack_int4_to_int32(values: torch.Tensor) -> torch.Tensor:
    """int4 values in [-8, 7] (any integer dtype) -> int32 with 8 per element along the last dim."""
    if values.shape[-1] % NIBBLES_PER_INT32:
        raise ValueError(
            f"int4 packing needs the last dim to be a multiple of {NIBBLES_PER_INT32}, "
            f"got shape {tuple(values.shape)}"
        )
    nibbles = (values.to(torch.int32) & 0xF).reshape(*values.shape[:-1], -1, NIBBLES_PER_INT32)
    packed = (nibbles << _SHIFTS.to(values.device)).sum(dim=-1, dtype=torch.int64)
    # Bit 31 set -> the int64 sum exceeds int32's range; wrap it to the same bit pattern.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int32_to_int4(packed: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of `pack_int4_to_int32`: int32 [..., n] -> signed values [..., 8n]."""
    if packed.dtype != torch.int32:
        raise TypeError(f"expected int32 packed int4, got {packed.dtype}")
    if sys.byteorder == "little":
        # Bits [4j, 4j+4) of a little-endian int32 are byte j // 2, low nibble first: sign-extend
        # each nibble with int8 shifts (5x faster than int32 shifts; the twins unpack on every call).
        b = packed.contiguous().view(torch.int8)
        low = torch.bitwise_right_shift(torch.bitwise_left_shift(b, 4), 4)
        signed = torch.stack([low, torch.bitwise_right_shift(b, 4)], dim=-1)
    else:
        nibbles = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF
        signed = nibbles - ((nibbles & 0x8) << 1)
    return signed.reshape(*packed.shape[:-1], -1).to(dtype)


def unpack_int8_pairs(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """msModelSlim W4A8: two signed int4 per int8 byte along `dim`; low nibble = element 2j."""
    as_int = packed.to(torch.int16)
    low = ((as_int & 0x0F) ^ 0x8) - 0x8
    high = as_int >> 4
    dim = dim % packed.dim()
    stacked = torch.stack([low, high], dim=dim + 1)
    shape = list(packed.shape)
    shape[dim] *= 2
    return stacked.reshape(shape).to(torch.int8)


def pack_int8_pairs(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of `unpack_int8_pairs` (what older msModelSlim writers leave to the loader)."""
    dim = dim % values.dim()
    if values.shape[dim] % 2:
        raise ValueError(f"int4 pair packing needs an even size on dim {dim}, got {tuple(values.shape)}")
    pairs = values.to(torch.int16).unflatten(dim, (-1, 2))
    low, high = pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)
    return ((low & 0x0F) | ((high & 0x0F) << 4)).to(torch.uint8).view(torch.int8)
