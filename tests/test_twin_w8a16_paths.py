"""The three routes of the W8A16 twin's fast path (bf16 kernel, fp32 kernel, dequantized fp32 matmul)
compute the same numbers as the generic path, rounded once."""

import pytest
import torch

from sgl_ascend.ops import twin


@pytest.mark.parametrize("m, offset, bias", [(1, False, False), (24, False, False), (3, True, False),
                                             (24, True, True), (24, False, True)])
def test_w8a16_fast_routes_equal_exact_product(gen, m, offset, bias):
    n, k = 48, 256
    w_nk = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, generator=gen) / 50).to(torch.bfloat16)
    off = torch.randint(-9, 9, (n,), generator=gen).to(torch.bfloat16) if offset else None
    b = torch.randn(n, generator=gen).to(torch.bfloat16) if bias else None
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    # bias by keyword (the 5th positional parameter is quant_scale), fp32 for bf16 x (the op's rule)
    out = twin.npu_weight_quant_batchmatmul(x, w_nk.t(), scale, off, bias=None if b is None else b.float())
    w = (w_nk.double() + (off.double()[:, None] if offset else 0)) * scale.double()[:, None]
    exact = x.double() @ w.t() + (b.double() if bias else 0)
    # one rounding to bf16 of an fp32-accumulated result: at most a few last-bit flips
    assert out.dtype == torch.bfloat16
    assert (out != exact.to(torch.bfloat16)).float().mean() < 0.02
    torch.testing.assert_close(out.double(), exact, rtol=2**-7, atol=2**-7 * exact.abs().mean().item())
