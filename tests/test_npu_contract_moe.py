"""Every expert scheme (msModelSlim and compressed-tensors) at tp 1, tp 2 and ep 2, through both routing
versions, runs its forward with zero contract violations (every NpuContractError constructed is
recorded, so even a swallowed one fails) and matches the float reference (tests/helpers/moe_reference.py).

Inputs: bf16 activations and top-k weights (npu_dynamic_quant takes fp16/bf16 only; the quantized
grouped matmuls output bf16). Tolerance: relative error (Frobenius) <= 2e-3 against the reference,
which models the layer's bf16 hand-offs and per-token int8/int4 fake-quant; what remains is a rare
one-step difference of an int8 requant or a bf16 rounding (measured: 0 for most cases, <= 2e-5). v1 and v2 routing
compute every (token, expert) row the same way and sum the top-k in the same order: bit-identical.
"""

import pytest
import torch

from helpers.common import rel_err
from helpers.moe_cases import CASES, PARALLEL, build_case, inputs

TOL = 2e-3


@pytest.mark.parametrize("parallel", sorted(PARALLEL))
@pytest.mark.parametrize("name", CASES)
def test_scheme_forward_is_npu_true_and_matches_reference(cases, violations, gen, name, parallel):
    case = cases(name)
    tp, ep = PARALLEL[parallel]
    x, w, ids = inputs(gen)
    v2 = case.run(x, w, ids, tp, ep, routing="v2")
    v1 = case.run(x, w, ids, tp, ep, routing="v1")
    assert violations == []
    assert torch.isfinite(v2).all()
    err = rel_err(v2, case.reference(x, w, ids, tp, ep))
    assert err <= TOL, err
    assert torch.equal(v1, v2)


def test_w8a8_scale_is_bf16_for_bf16_models_fp32_for_fp16(tmp_path, violations, gen):
    """The per-token grouped matmul takes a bf16 scale for bf16 output and an fp32 one for fp16 output
    (torch_npu docs); the scale is held once, in that dtype."""
    x, w, ids = inputs(gen)
    bf16 = build_case("w8a8", str(tmp_path), gen)
    layer = bf16.layer()
    assert layer.w13_weight_scale.dtype == layer.w2_weight_scale.dtype == torch.bfloat16
    assert layer.resident_bytes() == layer.moe_method.theoretical_bytes(E := 4, 128, 64) == E * (128 * 130 + 128 * 66)
    fp16 = build_case("w8a8", str(tmp_path), gen, params_dtype=torch.float16)
    layer = fp16.layer()
    assert layer.w13_weight_scale.dtype == layer.w2_weight_scale.dtype == torch.float32
    assert layer.resident_bytes() == layer.moe_method.theoretical_bytes(4, 128, 64)
    out = layer(x.half(), w.half(), ids)
    assert out.dtype == torch.float16 and violations == []
    assert rel_err(out, fp16.reference(x.half(), w.half(), ids)) <= TOL  # fp16 hand-offs


@pytest.mark.parametrize("routing", ["v1", "v2"])
def test_expert_parallel_rank_without_routed_rows_adds_exact_zero(cases, violations, gen, routing):
    """Every pair goes to rank 0's experts: rank 1's grouped matmuls write no row (NaN in the twin, garbage
    on the NPU), and its partial result must still be exactly zero."""
    case = cases("w4a8")
    x, w, _ = inputs(gen)
    ids = torch.tensor([[0, 1], [1, 0]] * 8, dtype=torch.int32)
    rank1 = case.layer(ep=2, rank=1, routing=routing)(x, w, ids)
    assert violations == [] and torch.equal(rank1, torch.zeros_like(rank1))
    assert rel_err(case.run(x, w, ids, ep=2, routing=routing), case.reference(x, w, ids, ep=2)) <= TOL


@pytest.mark.parametrize("name", ["w4a8", "w8a8", "bf16"])
def test_one_local_expert_per_rank(cases, violations, gen, name):
    """ep 4 over 4 experts: one local expert, whose count is passed as its cumulative end
    (group_list_type=0): counts of length 1 are documented as illegal."""
    case = cases(name)
    x, w, ids = inputs(gen)
    v2 = case.run(x, w, ids, ep=4, routing="v2")
    assert violations == [] and rel_err(v2, case.reference(x, w, ids, ep=4)) <= TOL
    assert torch.equal(case.run(x, w, ids, ep=4, routing="v1"), v2)
