"""Dense W4A8_DYNAMIC linears (msmodelslim fixture qwen3-tiny-w4a8-dynamic: MLP in W4A8_DYNAMIC),
through the single-group grouped matmul, for tp = 1 and 2.

Reference: the checkpoint's dequantization (int4 pairs * weight_scale) applied to the original input
with per-token int8 fake-quant of each rank's input, the rank's result rounded to bf16, partial
results of row-parallel ranks summed. Tolerance 2e-3 relative.
"""

import pytest
import torch

from conftest import msmodelslim_fixture, rel_err
from linear_helpers import write_modelslim
from moe_reference import fake_quant, modelslim_w4a8_dequant
from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.linear import ParallelLinear, load_linear
from sgl_ascend.layers.schemes import W4A8DynamicLinear
from sgl_ascend.ops.int4 import pack_int8_pairs
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


# -- group-wise and older (unpacked) dense W4A8 ---------------------------------------------------
# Reference, in float64 from the checkpoint tensors: per-token int8 fake-quant of each rank's input
# times the checkpoint's dequantization (q * weight_scale_second * weight_scale), plus what the
# stored scale_bias adds beyond 8 * sum_k deq_w over the rank's K, times the token's scale (zero when
# the writer computed it from the stored weights, ~0.2% for the real group-wise writer). fp32 inputs,
# so the tolerance is fp32 rounding: 1e-5 relative.
TIGHT = 1e-5
G64 = "qwen3moe-tiny-w4a8-dynamic-g64"


def _dense_reference(ckpt, name, x, rank, tp, row):
    deq = modelslim_w4a8_dequant(ckpt, name).double()
    n, k = deq.shape
    if row:
        part = slice(rank * k // tp, (rank + 1) * k // tp)
        x, w = x[:, part], deq[:, part]
    else:
        w = deq[rank * n // tp:(rank + 1) * n // tp]
    xq, scale = fake_quant(x, 8, with_scale=True)
    y = xq.double() @ w.t()
    if name + ".scale_bias" in ckpt:
        sb = ckpt.get(name + ".scale_bias").double()
        stored = sb[:, rank * 16 // tp:(rank + 1) * 16 // tp].sum(-1) if row else sb[rank * n // tp:(rank + 1) * n // tp, 0]
        y = y + (stored - 8 * w.sum(dim=1)) * scale.double()
    return y


def _check_mlp(path, prefix, hidden, inter, tp, gen, group_size, legacy):
    """gate_up (column, fused) and down (row) of `prefix` for every rank of tp, against the reference."""
    config, ckpt = ModelSlimConfig.from_dir(path), SafetensorsCheckpoint(path)
    gate_up_scheme = config.get_linear_scheme(f"{prefix}.gate_up_proj")
    assert isinstance(gate_up_scheme, W4A8DynamicLinear)
    assert (gate_up_scheme.group_size, gate_up_scheme.legacy) == (group_size, legacy)
    x = torch.randn(6, hidden, generator=gen)
    h = torch.randn(6, inter, generator=gen)
    down_out, down_ref = 0, 0
    for rank in range(tp):
        gate_up = ParallelLinear(hidden, [inter, inter], config.get_linear_scheme(f"{prefix}.gate_up_proj"),
                                 prefix=f"{prefix}.gate_up_proj", tp_rank=rank, tp_size=tp, params_dtype=torch.float32)
        load_linear(gate_up, ckpt, {0: f"{prefix}.gate_proj", 1: f"{prefix}.up_proj"})
        ref = torch.cat([_dense_reference(ckpt, f"{prefix}.{p}", x, rank, tp, False) for p in ("gate_proj", "up_proj")], 1)
        assert rel_err(gate_up(x), ref) <= TIGHT
        down = ParallelLinear(inter, [hidden], config.get_linear_scheme(f"{prefix}.down_proj"), parallel="row",
                              prefix=f"{prefix}.down_proj", tp_rank=rank, tp_size=tp, params_dtype=torch.float32)
        load_linear(down, ckpt, {None: f"{prefix}.down_proj"})
        down_out = down_out + down(h[:, rank * inter // tp:(rank + 1) * inter // tp]).double()
        down_ref = down_ref + _dense_reference(ckpt, f"{prefix}.down_proj", h, rank, tp, True)
        for layer, (k, n) in ((gate_up, (hidden, 2 * inter // tp)), (down, (inter // tp, hidden))):
            assert layer.weight.shape == (1, k, n // 8) and layer.weight_scale.dtype == torch.int64
            assert layer.weight_scale.shape == ((1, k // group_size, n) if group_size else (1, n))
            assert {name for name, _ in layer.named_parameters()} == {"weight", "weight_scale", "scale_bias"}
            storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in layer.parameters()}
            assert sum(storages.values()) == layer.scheme.theoretical_bytes(k, n)
    assert rel_err(down_out, down_ref) <= TIGHT


@pytest.mark.parametrize("tp", [1, 2])
def test_group_wise_tensors_of_the_real_tool_serve_as_dense_layers(tp, gen):
    """The real group-wise writer's tensors (g64 fixture, expert 0: [128, 128] each) loaded as dense
    gate_up / down linears: integer-valued fp32 weight_scale_second, int64 zero offsets, scale_bias."""
    _check_mlp(msmodelslim_fixture(G64), "model.layers.0.mlp.experts.0", 128, 128, tp, gen, 64, False)


def _w4a8_tensors(n, k, gen, group_size, legacy, row):
    """msModelSlim W4A8_DYNAMIC tensors of one [n, k] projection, in the real tool's conventions."""
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    scale = 3e-4 + 4e-4 * torch.rand(n, 1, generator=gen)
    deq = q.double() * scale.double()
    out = {"weight": q if legacy else pack_int8_pairs(q, 0), "weight_scale": scale, "weight_offset": torch.zeros(n, 1)}
    if group_size:
        second = torch.randint(1, 18, (n, k // group_size), generator=gen).float()  # integer-valued, as written
        deq = deq * second.double().repeat_interleave(group_size, dim=1)
        out.update(weight_scale_second=second, weight_offset_second=torch.zeros(n, k // group_size, dtype=torch.int64))
    if not legacy:  # older writers store no scale_bias
        out["scale_bias"] = (8 * deq.reshape(n, 16 if row else 1, -1).sum(-1)).float()
    return out


def write_w4a8_mlp(folder, gen, group_size=0, legacy=False, hidden=128, inter=256, edit=None):
    """Layer 0's MLP in W4A8_DYNAMIC, written as msModelSlim does (older writer: no version)."""
    tensors = {}
    for proj, (n, k) in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
        for suffix, t in _w4a8_tensors(n, k, gen, group_size, legacy, proj == "down_proj").items():
            tensors[f"{MLP}.{proj}.{suffix}"] = t
    if edit:
        edit(tensors)
    types = {name: "W4A8_DYNAMIC" for name in tensors}
    return write_modelslim(str(folder), tensors, {**types, "group_size": group_size}, version=None if legacy else "1.0.0")


@pytest.mark.parametrize("group_size,legacy", [(32, False), (0, True), (32, True)])
def test_group_wise_and_older_unpacked_files(tmp_path, gen, group_size, legacy):
    path = write_w4a8_mlp(tmp_path, gen, group_size, legacy)
    for tp in (1, 2):
        _check_mlp(path, MLP, 128, 256, tp, gen, group_size, legacy)


def test_dense_w4a8_break_proof(tmp_path, gen):
    """The tight check sees a wrong group-scale order and a missing derived correction."""
    path = write_w4a8_mlp(tmp_path, gen, 32, legacy=True)
    config, ckpt = ModelSlimConfig.from_dir(path), SafetensorsCheckpoint(path)
    h = torch.randn(6, 256, generator=gen)
    ref = _dense_reference(ckpt, f"{MLP}.down_proj", h, 0, 1, True)

    def down():
        layer = ParallelLinear(256, [128], config.get_linear_scheme(f"{MLP}.down_proj"), parallel="row",
                               prefix=f"{MLP}.down_proj", params_dtype=torch.float32)
        load_linear(layer, ckpt, {None: f"{MLP}.down_proj"})
        return layer
    layer = down()
    assert rel_err(layer(h), ref) <= TIGHT
    layer.weight_scale.data = layer.weight_scale.data.flip(1)
    assert rel_err(layer(h), ref) > 100 * TIGHT
    layer = down()
    layer.scale_bias.data.zero_()
    assert rel_err(layer(h), ref) > 100 * TIGHT


def _set(name, value):
    def edit(tensors):
        tensors[name] = value(tensors[name])
    return edit


@pytest.mark.parametrize("edit,legacy,match,tensor", [
    (_set(f"{MLP}.up_proj.weight_offset_second", lambda t: t + 1), False, "non-zero weight offset",
     f"{MLP}.up_proj.weight_offset_second"),
    (_set(f"{MLP}.gate_proj.weight_scale_second", lambda t: t[:, :2].clone()), False, "does not fit|slice",
     f"{MLP}.gate_proj.weight_scale_second"),
    (_set(f"{MLP}.gate_proj.weight_offset_second", lambda t: t.float()), False, "dtype torch.float32",
     f"{MLP}.gate_proj.weight_offset_second"),
    (_set(f"{MLP}.gate_proj.weight", lambda t: torch.where(t == 7, 9, t).to(torch.int8)), True, "values span",
     f"{MLP}.gate_proj.weight"),
])
def test_bad_dense_w4a8_files_are_checkpoint_errors(tmp_path, gen, edit, legacy, match, tensor):
    path = write_w4a8_mlp(tmp_path, gen, 32, legacy, edit=edit)
    config, ckpt = ModelSlimConfig.from_dir(path), SafetensorsCheckpoint(path)
    layer = ParallelLinear(128, [256, 256], config.get_linear_scheme(f"{MLP}.gate_up_proj"),
                           prefix=f"{MLP}.gate_up_proj")
    with pytest.raises(CheckpointError, match=match) as info:
        load_linear(layer, ckpt, {0: f"{MLP}.gate_proj", 1: f"{MLP}.up_proj"})
    assert tensor in str(info.value) and info.value.file


def test_tp_size_that_splits_a_group_is_refused(tmp_path, gen):
    config = ModelSlimConfig.from_dir(write_w4a8_mlp(tmp_path, gen, 32))
    with pytest.raises(CheckpointError, match="not a whole number of groups of 32"):
        ParallelLinear(256, [128], config.get_linear_scheme(f"{MLP}.down_proj"), parallel="row",
                       prefix=f"{MLP}.down_proj", tp_rank=0, tp_size=16)
