"""Dense W4A8_DYNAMIC linears (msmodelslim fixture qwen3-tiny-w4a8-dynamic: MLP in W4A8_DYNAMIC),
through the single-group grouped matmul, for tp = 1 and 2.

Reference: the checkpoint's dequantization (int4 pairs * weight_scale) applied to the original input
with per-token int8 fake-quant of each rank's input, the rank's result rounded to bf16, partial
results of row-parallel ranks summed. Tolerance 2e-3 relative.
"""

import pytest
import torch

from conftest import msmodelslim_fixture, rel_err
from moe_reference import fake_quant, modelslim_w4a8_dequant
from sgl_ascend.layers.linear import ParallelLinear, load_linear
from sgl_ascend.layers.schemes import W4A8DynamicLinear
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint
from sgl_ascend.quant.modelslim import ModelSlimConfig

MLP = "model.layers.0.mlp"


@pytest.mark.parametrize("tp", [1, 2])
def test_gate_up_and_down_match_reference(tp, gen):
    path = msmodelslim_fixture("qwen3-tiny-w4a8-dynamic")
    ckpt = SafetensorsCheckpoint(path)
    config = ModelSlimConfig.from_dir(path)
    assert isinstance(config.get_linear_scheme(f"{MLP}.gate_up_proj"), W4A8DynamicLinear)
    gate, up, down = (modelslim_w4a8_dequant(ckpt, f"{MLP}.{p}") for p in ("gate_proj", "up_proj", "down_proj"))
    x = torch.randn(5, 128, generator=gen).to(torch.bfloat16)
    h = torch.randn(5, 256, generator=gen).to(torch.bfloat16)
    gate_up_out, down_out, down_ref = [], torch.zeros(5, 128), torch.zeros(5, 128)
    for rank in range(tp):
        gate_up = ParallelLinear(128, [256, 256], W4A8DynamicLinear(), prefix=f"{MLP}.gate_up_proj",
                                 tp_rank=rank, tp_size=tp)
        load_linear(gate_up, ckpt, {0: f"{MLP}.gate_proj", 1: f"{MLP}.up_proj"})
        gate_up_out.append(gate_up(x).float())
        row = ParallelLinear(256, [128], W4A8DynamicLinear(), parallel="row", prefix=f"{MLP}.down_proj",
                             tp_rank=rank, tp_size=tp)
        load_linear(row, ckpt, {None: f"{MLP}.down_proj"})
        cols = slice(rank * 256 // tp, (rank + 1) * 256 // tp)
        down_out += row(h[:, cols]).float()
        down_ref += (fake_quant(h[:, cols], 8) @ down[:, cols].T).to(torch.bfloat16).float()
        assert row.weight.dtype == torch.int32 and not hasattr(row, "weight_offset")
    part = 256 // tp
    ref = torch.cat([torch.cat([fake_quant(x, 8) @ gate[r * part:(r + 1) * part].T,
                                fake_quant(x, 8) @ up[r * part:(r + 1) * part].T], dim=1) for r in range(tp)], dim=1)
    assert rel_err(torch.cat(gate_up_out, dim=1), ref.to(torch.bfloat16).float()) <= 2e-3
    assert rel_err(down_out, down_ref) <= 2e-3
    scheme = W4A8DynamicLinear()
    assert sum(p.data.nbytes for p in gate_up.parameters()) == scheme.theoretical_bytes(128, 512 // tp)
