"""Every dense linear scheme (msModelSlim and compressed-tensors; tests/helpers/dense_cases.py) at tp 1 and 2,
driven through the op surface (`sgl_ascend.ops.ops`, the contract-checked twins off-NPU): a call the
real torch_npu op would reject raises NpuContractError, so running every rank's forward is the test.
The ranks' outputs put together (column: side by side, row: summed as the all-reduce does) are
compared with the float reference (the checkpoint's dequantized weights on the unquantized input,
float64) within the case's activation-quantization tolerance, and each scheme must reach the NPU
through the ops upstream uses for it (and only those).
"""

import pytest
import torch

from helpers.common import rel_err
from helpers.dense_cases import CASE_KINDS, EXPECTED_OPS, put_together
from helpers.linear import build_layer, calibrated_input, synthetic_qwen3_tensors, write_modelslim
from sgl_ascend.ops import ops

@pytest.fixture
def op_calls(monkeypatch):
    """The names of the ops called through the surface, in order."""
    calls = []
    for name in vars(ops):
        op = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _op=op, _name=name, **k: (calls.append(_name), _op(*a, **k))[1])
    return calls


def _run(case, kind, tp, dtype, gen, op_calls):
    layers = [case.build(kind, tp_rank=r, tp_size=tp, dtype=dtype) for r in range(tp)]
    op_calls.clear()  # loading's calls (format cast, int4 packing) are not the forward's
    x = calibrated_input(layers[0], gen, rows=7, dtype=dtype)
    if layers[0].parallel == "row":
        parts = [layer(part) for layer, part in zip(layers, x.chunk(tp, dim=-1))]
        assert all(p.dtype == dtype for p in parts)
        out = sum(p.double() for p in parts)
    else:
        parts = [layer(x) for layer in layers]
        assert all(p.dtype == dtype for p in parts)
        out = put_together(parts, layers[0].output_partition_sizes, tp)
    return layers[0], x, out


@pytest.mark.parametrize("tp,dtype", [(1, torch.bfloat16), (2, torch.bfloat16), (1, torch.float16)],
                         ids=["tp1-bf16", "tp2-bf16", "tp1-fp16"])
@pytest.mark.parametrize("case,kind", CASE_KINDS, ids=[f"{c.id}-{k}" for c, k in CASE_KINDS])
def test_dense_layer_runs_within_the_npu_contract(case, kind, tp, dtype, gen, op_calls):
    layer, x, out = _run(case, kind, tp, dtype, gen, op_calls)
    assert set(op_calls) == EXPECTED_OPS[case.scheme], op_calls
    assert "npu_grouped_matmul" not in op_calls  # a dense layer is not a one-group grouped matmul
    assert rel_err(out, case.float_reference(kind, x)) <= case.rel_tol


def test_a_contract_violation_raises_through_the_surface():
    """The surface is the checked one: an old-style W8A16 call (bias as the 5th positional argument,
    which is quant_scale) is refused, naming the rule."""
    from sgl_ascend.ops import NpuContractError

    x = torch.randn(3, 64).to(torch.bfloat16)
    w = torch.randint(-128, 128, (64, 32), dtype=torch.int8)
    scale = torch.rand(32).to(torch.bfloat16)
    with pytest.raises(NpuContractError, match="quant_scale"):
        ops.npu_weight_quant_batchmatmul(x, w, scale, None, torch.zeros(32, dtype=torch.bfloat16))


@pytest.mark.parametrize("kind", ["W8A8", "W8A8_DYNAMIC", "W8A16"])
def test_unaligned_weights_stay_nd(tmp_path, gen, op_calls, kind):
    """The FRACTAL_NZ cast only where the shape is NZ-aligned (int8: K % 16, N % 32), as SGLang's
    pre-filter does: an intermediate size of 40 leaves gate_up (N = 80) and down (K = 40) ND, and the
    layers still run within the contract; qkv (K = N = 128) is cast."""
    folder = write_modelslim(str(tmp_path), *synthetic_qwen3_tensors(kind, gen, inter=40))
    casts = {}
    for name in ("gate_up_proj", "down_proj", "qkv_proj"):
        op_calls.clear()
        layer = build_layer(folder, name, inter=40)
        casts[name] = op_calls.count("npu_format_cast")
        x = calibrated_input(layer, gen, rows=3)
        assert layer(x).shape == (3, sum(layer.output_partition_sizes))
    assert casts == {"gate_up_proj": 0, "down_proj": 0, "qkv_proj": 1}
