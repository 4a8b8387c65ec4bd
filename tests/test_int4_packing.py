"""The loaders' int4 packing equals the op it stands for, and experts load through the linears'
parameter class (ShardedParameter, one writer signature)."""

import pytest
import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.moe import FusedMoEMethod, MoELayer, UnquantizedExperts
from sgl_ascend.layers.moe.w4a4_dynamic import W4A4DynamicExperts
from sgl_ascend.layers.moe.w4a8_dynamic import W4A8DynamicExperts
from sgl_ascend.layers.parameters import ShardedParameter
from sgl_ascend.layers.schemes.common import INT4_PACK_CHUNK_BYTES, pack_int4_for_kernel, write_int4_values
from sgl_ascend.ops import ops


@pytest.mark.parametrize("n, k", [(8, 1), (16, 3), (64, 40), (INT4_PACK_CHUNK_BYTES // 64 + 24, 64), (8, 70000)])
def test_pack_equals_the_op_into_slices(n, k):
    values = torch.randint(-8, 8, (n, k), generator=torch.Generator().manual_seed(n + k), dtype=torch.int8)
    expected = ops.npu_convert_weight_to_int4pack(values.t().contiguous().to(torch.int32))
    assert torch.equal(pack_int4_for_kernel(values), expected)
    wide = torch.full((k, n // 8 + 3), 7, dtype=torch.int32)
    write_int4_values(wide[:, 1:1 + n // 8], values)
    assert torch.equal(wide[:, 1:1 + n // 8], expected)
    assert (wide[:, 0] == 7).all() and (wide[:, 1 + n // 8:] == 7).all()  # neighbours untouched


def test_out_of_range_values_are_refused_before_packing():
    values = torch.zeros(8, 4, dtype=torch.int8)
    values[3, 2] = 9
    with pytest.raises(CheckpointError, match=r"values span \[0, 9\]"):
        write_int4_values(torch.empty(4, 1, dtype=torch.int32), values)


@pytest.mark.parametrize("w13, w2", [
    (UnquantizedExperts("w13"), UnquantizedExperts("w2")),
    (W4A4DynamicExperts("w13"), W4A4DynamicExperts("w2")),
    (W4A8DynamicExperts("w13", clip=True), W4A8DynamicExperts("w2", clip=True)),
])
def test_expert_parameters_are_sharded_parameters(w13, w2):
    layer = MoELayer(FusedMoEMethod(w13, w2), num_experts=4, hidden_size=64, intermediate_size=64, tp_rank=1,
                     tp_size=2, prefix="model.layers.0.mlp.experts")
    for name, param in layer.named_parameters():
        assert isinstance(param, ShardedParameter) and param.expert_layout is not None, name
        assert param.tensor_name == f"model.layers.0.mlp.experts.{name}"
        assert not [a for a in vars(param) if a.startswith("moe_")], name
