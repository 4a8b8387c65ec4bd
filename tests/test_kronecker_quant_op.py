"""npu_kronecker_quant (FlatQuant's activation transform + int4 per-token quant): the twin's numbers
against an independent formulation, and the contract's refusals."""

import pytest
import torch

from sgl_ascend.ops import NpuContractError, ops
from sgl_ascend.ops.int4 import unpack_int32_to_int4


def _random_orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_twin_is_the_kronecker_product_transform_then_int4_per_token(dtype):
    tokens, m, n, clip = 6, 4, 16, 0.85
    x = torch.randn(tokens, m * n, generator=torch.Generator().manual_seed(0)).to(dtype)
    p1, p2 = _random_orthogonal(m, 1).to(dtype), _random_orthogonal(n, 2).to(dtype)
    out, scale = ops.npu_kronecker_quant(x.view(tokens, m, n), p1, p2, clip_ratio=clip, dst_dtype=torch.int32)
    assert out.shape == (tokens, m, n // 8) and out.dtype == torch.int32
    assert scale.shape == (tokens,) and scale.dtype == torch.float32

    # independent: p1 @ X @ p2 on a row-major [M, N] token is the token times kron(p1^T, p2)
    y = x.double() @ torch.kron(p1.double().t().contiguous(), p2.double())
    want_scale = y.abs().amax(dim=1) * clip / 7
    assert torch.allclose(scale.double(), want_scale, rtol=2e-2)
    values = unpack_int32_to_int4(out).reshape(tokens, m * n).double()
    assert values.min() >= -8 and values.max() <= 7
    # the clip saturates the largest values at the int4 limits; the rest are y / scale rounded
    # (off by one where the twin's bf16/fp16 intermediate rounding moves a value across a .5)
    want = torch.round(y / want_scale.unsqueeze(1)).clamp(-8, 7)
    assert (values - want).abs().max() <= 1
    assert (values == want).double().mean() > 0.9
    dq = values * scale.double().unsqueeze(1)
    assert (dq - y).norm() / y.norm() < 0.15  # int4 per-token error, plus the clip


def test_clip_ratio_defaults_to_one():
    x = torch.randn(3, 2, 8, dtype=torch.bfloat16)
    eye2, eye8 = torch.eye(2, dtype=torch.bfloat16), torch.eye(8, dtype=torch.bfloat16)
    _, scale = ops.npu_kronecker_quant(x, eye2, eye8)
    assert torch.allclose(scale, x.float().abs().amax(dim=(1, 2)) / 7)


@pytest.mark.parametrize("case, rule", [
    (dict(x=torch.randn(2, 2, 8)), "x must be float16/bfloat16"),
    (dict(x=torch.randn(4, 16, dtype=torch.bfloat16)), "x must be 3-D"),
    (dict(x=torch.randn(2, 2, 12, dtype=torch.bfloat16), p2=torch.eye(12, dtype=torch.bfloat16)), "multiple of 8"),
    (dict(p1=torch.eye(2, dtype=torch.float16)), "kronecker_p1 must have x's dtype"),
    (dict(p2=torch.eye(16, dtype=torch.bfloat16)), "kronecker_p2 must be [8, 8]"),
    (dict(clip_ratio=1.5), "clip_ratio must lie in (0, 1]"),
    (dict(clip_ratio=0.0), "clip_ratio must lie in (0, 1]"),
    (dict(dst_dtype=torch.int8), "dst_dtype must be int32"),
    (dict(x=torch.randn(2, 2, 256, dtype=torch.bfloat16), p2=torch.eye(256, dtype=torch.bfloat16)), "N <= 128"),
])
def test_contract_refusals(case, rule):
    args = dict(x=torch.randn(2, 2, 8, dtype=torch.bfloat16), p1=torch.eye(2, dtype=torch.bfloat16),
                p2=torch.eye(8, dtype=torch.bfloat16), clip_ratio=None, dst_dtype=None)
    args.update(case)
    with pytest.raises(NpuContractError, match=rule.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        ops.npu_kronecker_quant(args["x"], args["p1"], args["p2"], clip_ratio=args["clip_ratio"],
                                dst_dtype=args["dst_dtype"])


def test_fake_kernel_matches_the_twin_and_checks_the_contract():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, p1, p2 = torch.randn(5, 4, 16, dtype=torch.bfloat16), torch.eye(4, dtype=torch.bfloat16), \
        torch.eye(16, dtype=torch.bfloat16)
    real = torch.ops.npu.npu_kronecker_quant(x, p1, p2, 0.9)
    with FakeTensorMode() as mode:
        fake = torch.ops.npu.npu_kronecker_quant(mode.from_tensor(x), mode.from_tensor(p1), mode.from_tensor(p2), 0.9)
        with pytest.raises(NpuContractError):
            torch.ops.npu.npu_kronecker_quant(mode.from_tensor(x), mode.from_tensor(p2), mode.from_tensor(p2), 0.9)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]
