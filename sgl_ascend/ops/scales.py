"""Scale encodings the NPU matmul kernels accept.

Some kernels take a per-channel fp32 scale packed into int64: the low 32 bits carry the fp32 bit
pattern, the high 32 bits are zero (msModelSlim writes fp16 models' `deq_scale` this way, and the
W4A8 grouped matmul wants its weight scale so).
"""

import torch


def encode_fp32_as_int64(scale: torch.Tensor) -> torch.Tensor:
    bits = scale.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    return bits & 0xFFFFFFFF


def decode_int64_scale(scale: torch.Tensor) -> torch.Tensor:
    """int64 scale -> fp32; other dtypes are returned as fp32 unchanged in value."""
    if scale.dtype != torch.int64:
        return scale.to(torch.float32)
    low_bits = (scale & 0xFFFFFFFF).to(torch.int64)
    low_bits = torch.where(low_bits >= 2**31, low_bits - 2**32, low_bits)
    return low_bits.to(torch.int32).view(torch.float32)
