"""The twins are torch_npu's ops as far as a caller can tell: registered under torch.ops.npu with the
wheel's exact schemas, rejecting the calls the real ops reject (each with its rule and source), with
fake kernels of the real output shapes so torch.compile traces through them."""

import inspect
import sys

import pytest
import torch

from sgl_ascend import ops as op_surface
from sgl_ascend.ops import NpuContractError, library, twin
from sgl_ascend.ops.npu_schemas import SCHEMAS
from sgl_ascend.tools.selftest import OP_CASES

BF16 = torch.bfloat16


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_registered_with_the_wheels_schema(name):
    registered = getattr(torch.ops.npu, name).default._schema
    assert str(registered) == str(torch._C.parse_schema(f"npu::{SCHEMAS[name]}"))
    assert getattr(op_surface.ops, name) is getattr(torch.ops.npu, name)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_twin_signature_is_the_schema(name):
    """Names, order, keyword-only markers and defaults: a call that binds to the twin binds to the op."""
    schema = torch._C.parse_schema(SCHEMAS[name])
    params = list(inspect.signature(getattr(twin, name)).parameters.values())
    assert [p.name for p in params] == [a.name for a in schema.arguments]
    for p, a in zip(params, schema.arguments):
        assert (p.kind == p.KEYWORD_ONLY) == a.kwarg_only, a.name
        if a.has_default_value():
            default = a.default_value
            expected = list(default) if isinstance(default, (list, tuple)) else default
            actual = list(p.default) if isinstance(p.default, (list, tuple)) else p.default
            assert actual == expected, a.name
        else:
            assert p.default is p.empty, a.name


def test_torch_npu_stand_in_binds_to_the_same_ops():
    module = library.twin_torch_npu_module()
    for name in SCHEMAS:
        assert getattr(module, name) is getattr(torch.ops.npu, name)


def test_never_registered_beside_torch_npu_or_on_gpu_hosts(monkeypatch):
    monkeypatch.setattr(library, "_LIBRARY", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert library.register_twins() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "torch_npu", object())
    assert library.register_twins() is False


# -- the calls the real ops reject fail here, naming the rule --------------------------------------------

def _int8(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8)


def _rejects(fn, *args, match, **kwargs):
    with pytest.raises(NpuContractError, match=match) as info:
        fn(*args, **kwargs)
    assert "[rule: " in str(info.value)


def test_grouped_matmul_needs_split_item_and_group_type():
    x, w, counts = _int8(6, 32), _int8(2, 32, 16), torch.tensor([2, 4])
    kwargs = dict(scale=[torch.ones(2, 16, dtype=BF16)], per_token_scale=[torch.ones(6)], group_list=counts,
                  group_list_type=1, output_dtype=BF16)
    _rejects(torch.ops.npu.npu_grouped_matmul, [x], [w], match="group_type only supports", **kwargs)
    out = torch.ops.npu.npu_grouped_matmul([x], [w], split_item=2, group_type=0, **kwargs)[0]
    assert out.shape == (6, 16) and out.dtype == BF16


def test_grouped_matmul_per_token_scale_decides_the_output_dtype():
    x, w, counts = _int8(6, 32), _int8(2, 32, 16), torch.tensor([2, 4])
    common = dict(per_token_scale=[torch.ones(6)], group_list=counts, split_item=2, group_type=0, group_list_type=1)
    _rejects(torch.ops.npu.npu_grouped_matmul, [x], [w], scale=[torch.ones(2, 16)], output_dtype=BF16,
             match="scale torch.float32 with output_dtype torch.bfloat16", **common)
    torch.ops.npu.npu_grouped_matmul([x], [w], scale=[torch.ones(2, 16)], output_dtype=torch.float16, **common)


def test_grouped_matmul_counts_of_one_group_are_refused():
    x, w = _int8(6, 32), _int8(1, 32, 16)
    _rejects(torch.ops.npu.npu_grouped_matmul, [x], [w], scale=[torch.ones(1, 16, dtype=BF16)],
             per_token_scale=[torch.ones(6)], group_list=torch.tensor([6]), split_item=2, group_type=0,
             group_list_type=1, output_dtype=BF16, match="must not have length 1")


def test_grouped_matmul_leaves_rows_past_the_groups_unwritten():
    x, w = _int8(6, 32), _int8(2, 32, 16)
    out = torch.ops.npu.npu_grouped_matmul([x], [w], scale=[torch.ones(2, 16, dtype=BF16)],
                                           per_token_scale=[torch.ones(6)], group_list=torch.tensor([1, 3]),
                                           split_item=2, group_type=0, group_list_type=1, output_dtype=BF16)[0]
    assert out[:4].isfinite().all() and out[4:].isnan().all()


def test_weight_quant_batchmatmul_fifth_argument_is_quant_scale_and_bias_dtype():
    x, w = torch.randn(4, 32, dtype=BF16), _int8(32, 16)
    scale, offset, bias = torch.ones(16, dtype=BF16), torch.zeros(16, dtype=BF16), torch.zeros(16)
    _rejects(torch.ops.npu.npu_weight_quant_batchmatmul, x, w, scale, offset, bias, match="quant_scale")
    _rejects(torch.ops.npu.npu_weight_quant_batchmatmul, x, w, scale, offset, bias=bias.to(BF16),
             match="bias must be torch.float32")
    _rejects(torch.ops.npu.npu_weight_quant_batchmatmul, x, w, scale.float(), match="antiquant_scale must have")
    assert torch.ops.npu.npu_weight_quant_batchmatmul(x, w, scale, offset, bias=bias).dtype == BF16


def test_quantize_div_mode_true_takes_no_float32_zero_points():
    x = torch.randn(4, 32, dtype=BF16)
    _rejects(torch.ops.npu.npu_quantize, x, torch.tensor([0.1]), torch.tensor([3.0]), torch.qint8, -1, True,
             match="zero_points")
    q = torch.ops.npu.npu_quantize(x, torch.tensor([10.0], dtype=BF16), torch.tensor([3.0], dtype=BF16),
                                   torch.qint8, -1, False)
    assert q.dtype == torch.int8


def test_quant_matmul_has_no_float32_output_and_checks_the_dtype_table():
    a, w = _int8(4, 32), _int8(32, 16)
    _rejects(torch.ops.npu.npu_quant_matmul, a, w, torch.ones(16), output_dtype=torch.float32,
             match="output_dtype must be")
    _rejects(torch.ops.npu.npu_quant_matmul, a, w, torch.ones(16, dtype=torch.int64), output_dtype=BF16,
             match="no supported combination")
    assert torch.ops.npu.npu_quant_matmul(a, w, torch.ones(16), output_dtype=BF16).dtype == BF16


def test_dynamic_quant_takes_half_precision_only():
    _rejects(torch.ops.npu.npu_dynamic_quant, torch.randn(4, 32), match="float16/bfloat16")
    _rejects(torch.ops.npu.npu_dynamic_quant, torch.randn(4, 12, dtype=BF16), dst_type=torch.quint4x2,
             match="% 8")


def test_nz_cast_needs_aligned_shapes():
    _rejects(torch.ops.npu.npu_format_cast, _int8(24, 64), 29, match="FRACTAL_NZ")
    cast = torch.ops.npu.npu_format_cast(_int8(32, 64), 29)
    assert cast.dtype == torch.int8 and cast.shape == (32, 64)
    weight_nk = _int8(64, 32)
    kept = op_surface.to_nz(weight_nk.t())  # a transposed view stays [N, K] in memory on CPU
    assert torch.equal(kept, weight_nk.t()) and kept.t().is_contiguous()
    assert op_surface.to_nz(_int8(24, 64)).shape == (24, 64)  # unaligned: kept ND, not cast


# -- fake kernels: the real op's output shapes, so compiled graphs are checked too ----------------------------

def _meta(value):
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _meta(v) for k, v in value.items()}
    return value


def _flat(out):
    return [t for t in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("label", sorted(OP_CASES))
def test_fake_kernel_matches_the_twin(label):
    name, make, _ = OP_CASES[label]
    args, kwargs, _ = make(torch.Generator().manual_seed(0))
    real = _flat(getattr(torch.ops.npu, name)(*args, **kwargs))
    fake = _flat(getattr(torch.ops.npu, name)(*_meta(args), **_meta(kwargs)))
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]


def test_compiled_graph_checks_the_contract():
    w, scale = _int8(32, 16), torch.rand(16, dtype=BF16)

    def forward(x):
        q, s = torch.ops.npu.npu_dynamic_quant(x)
        return torch.ops.npu.npu_quant_matmul(q, w, scale, pertoken_scale=s, output_dtype=BF16)

    x = torch.randn(4, 32, dtype=BF16)
    compiled = torch.compile(forward, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), forward(x))
    with pytest.raises(Exception, match="float16/bfloat16"):
        torch.compile(forward, fullgraph=True, backend="eager")(x.float())


def test_moe_routing_falls_back_to_v1_where_the_build_lacks_v2(monkeypatch):
    from sgl_ascend.layers.moe.routing import ROUTING_ENV, routing_version

    monkeypatch.delenv(ROUTING_ENV, raising=False)
    assert routing_version() == "v2"
    monkeypatch.delattr(op_surface.ops, "npu_moe_init_routing_v2")  # what _namespace leaves out on such a build
    assert routing_version() == "v1"
