"""Dense W4A8_DYNAMIC linears (msmodelslim fixtures: qwen3-tiny-w4a8-dynamic MLP, the g64 expert
tensors as dense layers, synthetic group-wise and older unpacked files), for tp = 1 and 2.

Kernel: weight-only int4 on npu_weight_quant_batchmatmul (as vllm-ascend serves dense W4A8; the
single-group grouped matmul is not legal on the NPU, see schemes/w4a8_kernel.py): activations are
not quantized, the dequantization scale (weight_scale_second * weight_scale) is rounded once to bf16.

Reference, in float64 from the checkpoint tensors, on bf16 inputs: x @ dequantized weight of each
rank's slice, partial results of row-parallel ranks summed.
- TIGHT (units of one bf16 rounding, helpers.linear.tight_error) against the reference whose scales
  are rounded to bf16 as the kernel holds them: the output is that product rounded once (per rank).
- SCALE_REL (norm-relative) against the checkpoint's exact fp32 scales: the bf16 scale rounding
  (<= 2^-9 relative per scale), measured <= 2.6e-3 (tight: <= 0.98 units).
"""

import pytest
import torch

from helpers.common import msmodelslim_fixture, rel_err
from helpers.linear import tight_error, write_modelslim
from sgl_ascend.layers.registry import linear_scheme
from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.linear import ParallelLinear, load_linear
from sgl_ascend.layers.schemes import W4A8DynamicLinear
from sgl_ascend.ops.int4 import pack_int4_to_int32, pack_int8_pairs, unpack_int8_pairs, unpack_int32_to_int4
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint
from sgl_ascend.quant.modelslim import ModelSlimConfig

MLP = "model.layers.0.mlp"
G64 = "qwen3moe-tiny-w4a8-dynamic-g64"
TIGHT, SCALE_REL = 1.1, 4e-3


def dequant(ckpt, name: str, kernel_dtype=None) -> torch.Tensor:
    """q * (weight_scale_second * weight_scale) [N, K] in float64; kernel_dtype: that product rounded as the
    kernel holds it."""
    w = ckpt.get(name + ".weight")
    scale = ckpt.get(name + ".weight_scale").double().reshape(-1, 1)
    q = (w if w.shape[0] == scale.shape[0] else unpack_int8_pairs(w, 0)).double()
    if name + ".weight_scale_second" in ckpt:
        s2 = ckpt.get(name + ".weight_scale_second").float()
        scale = (s2 * scale.float()).double()  # the scheme's product, in fp32
        scale = scale.repeat_interleave(q.shape[1] // s2.shape[1], dim=1)
    if kernel_dtype is not None:
        scale = scale.float().to(kernel_dtype).double()
    return q * scale


def _slice(w, rank, tp, row):
    n, k = w.shape
    return w[:, rank * k // tp:(rank + 1) * k // tp] if row else w[rank * n // tp:(rank + 1) * n // tp]


def _check_mlp(path, prefix, hidden, inter, tp, gen, group_size, legacy):
    """gate_up (column, fused) and down (row) of `prefix` for every rank of tp, against the reference."""
    config, ckpt = ModelSlimConfig.from_dir(path), SafetensorsCheckpoint(path)
    gate_up_scheme = linear_scheme(config, f"{prefix}.gate_up_proj")
    assert isinstance(gate_up_scheme, W4A8DynamicLinear)
    assert (gate_up_scheme.group_size, gate_up_scheme.legacy) == (group_size, legacy)
    x = torch.randn(6, hidden, generator=gen).to(torch.bfloat16)
    h = torch.randn(6, inter, generator=gen).to(torch.bfloat16)
    deq = {p: (dequant(ckpt, f"{prefix}.{p}", torch.bfloat16), dequant(ckpt, f"{prefix}.{p}"))
           for p in ("gate_proj", "up_proj", "down_proj")}
    down_out, down_ref, down_exact, down_magnitude = 0, 0, 0, 0
    for rank in range(tp):
        gate_up = ParallelLinear(hidden, [inter, inter], linear_scheme(config, f"{prefix}.gate_up_proj"),
                                 prefix=f"{prefix}.gate_up_proj", tp_rank=rank, tp_size=tp)
        load_linear(gate_up, ckpt, {0: f"{prefix}.gate_proj", 1: f"{prefix}.up_proj"})
        out = gate_up(x)
        kernel, exact = (torch.cat([x.double() @ _slice(deq[p][i], rank, tp, False).t()
                                    for p in ("gate_proj", "up_proj")], 1) for i in (0, 1))
        assert tight_error(out, kernel) <= TIGHT  # the kernel's bf16 scales
        assert rel_err(out, exact) <= SCALE_REL  # the checkpoint's fp32 scales
        down = ParallelLinear(inter, [hidden], linear_scheme(config, f"{prefix}.down_proj"), parallel="row",
                              prefix=f"{prefix}.down_proj", tp_rank=rank, tp_size=tp)
        load_linear(down, ckpt, {None: f"{prefix}.down_proj"})
        part = down(h[:, rank * inter // tp:(rank + 1) * inter // tp]).double()
        down_out, down_magnitude = down_out + part, down_magnitude + part.abs()
        hs = h[:, rank * inter // tp:(rank + 1) * inter // tp].double()
        down_ref = down_ref + hs @ _slice(deq["down_proj"][0], rank, tp, True).t()
        down_exact = down_exact + hs @ _slice(deq["down_proj"][1], rank, tp, True).t()
        for layer, (k, n) in ((gate_up, (hidden, 2 * inter // tp)), (down, (inter // tp, hidden))):
            groups = k // group_size if group_size else 1
            assert layer.weight.shape == (k, n // 8) and layer.weight.dtype == torch.int32
            assert layer.weight_scale.dtype == torch.bfloat16
            assert layer.weight_scale.shape == ((groups, n) if groups > 1 else (n,))
            assert {name for name, _ in layer.named_parameters()} == {"weight", "weight_scale"}
            storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in layer.parameters()}
            assert sum(storages.values()) == layer.scheme.theoretical_bytes(k, n) == n * (k // 2 + 2 * groups)
    assert tight_error(down_out, down_ref, down_magnitude + down_ref.abs()) <= TIGHT
    assert rel_err(down_out, down_exact) <= SCALE_REL


@pytest.mark.parametrize("tp", [1, 2])
def test_gate_up_and_down_match_reference(tp, gen):
    path = msmodelslim_fixture("qwen3-tiny-w4a8-dynamic")
    assert isinstance(linear_scheme(ModelSlimConfig.from_dir(path), f"{MLP}.gate_up_proj"), W4A8DynamicLinear)
    _check_mlp(path, MLP, 128, 256, tp, gen, 0, False)


@pytest.mark.parametrize("tp", [1, 2])
def test_group_wise_tensors_of_the_real_tool_serve_as_dense_layers(tp, gen):
    """The real group-wise writer's tensors (g64 fixture, expert 0: [128, 128] each) loaded as dense
    gate_up / down linears: integer-valued fp32 weight_scale_second, int64 zero offsets; scale_bias is
    not loaded (the weight-only kernel needs no activation correction). At tp=2 a row rank holds one
    group of 64: it runs per channel."""
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
    """The tight check sees a wrong group-scale order, a wrong nibble order and a scale off by 1%."""
    path = write_w4a8_mlp(tmp_path, gen, 32, legacy=False)
    config, ckpt = ModelSlimConfig.from_dir(path), SafetensorsCheckpoint(path)
    h = torch.randn(6, 256, generator=gen).to(torch.bfloat16)
    ref = h.double() @ dequant(ckpt, f"{MLP}.down_proj", torch.bfloat16).t()

    def down():
        layer = ParallelLinear(256, [128], linear_scheme(config, f"{MLP}.down_proj"), parallel="row",
                               prefix=f"{MLP}.down_proj")
        load_linear(layer, ckpt, {None: f"{MLP}.down_proj"})
        return layer
    layer = down()
    assert layer.scheme.kernel_group_size == 32 and layer.weight_scale.shape == (8, 128)
    assert tight_error(layer(h), ref) <= TIGHT
    layer.weight_scale.data = layer.weight_scale.data.flip(0)  # groups of K in the wrong order
    assert tight_error(layer(h), ref) > 10 * TIGHT
    layer = down()
    values = unpack_int32_to_int4(layer.weight.data)  # [K, N]: swap the two nibbles of every byte
    layer.weight.data = pack_int4_to_int32(values.reshape(values.shape[0], -1, 2).flip(-1).flatten(1))
    assert tight_error(layer(h), ref) > 10 * TIGHT
    layer = down()
    layer.weight_scale.data[:, 3] *= 1.01
    assert tight_error(layer(h), ref) > 2 * TIGHT


def test_group_size_the_kernel_cannot_take_is_refused(tmp_path, gen):
    """npu_weight_quant_batchmatmul takes per-group scales for group sizes that are multiples of 32."""
    config = ModelSlimConfig.from_dir(write_w4a8_mlp(tmp_path, gen, 16))
    with pytest.raises(CheckpointError, match="group size 16 is not a multiple of 32"):
        ParallelLinear(256, [128], linear_scheme(config, f"{MLP}.down_proj"), parallel="row",
                       prefix=f"{MLP}.down_proj")


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
    layer = ParallelLinear(128, [256, 256], linear_scheme(config, f"{MLP}.gate_up_proj"),
                           prefix=f"{MLP}.gate_up_proj")
    with pytest.raises(CheckpointError, match=match) as info:
        load_linear(layer, ckpt, {0: f"{MLP}.gate_proj", 1: f"{MLP}.up_proj"})
    assert tensor in str(info.value) and info.value.file


def test_tp_size_that_splits_a_group_is_refused(tmp_path, gen):
    config = ModelSlimConfig.from_dir(write_w4a8_mlp(tmp_path, gen, 32))
    with pytest.raises(CheckpointError, match="not a whole number of groups of 32"):
        ParallelLinear(256, [128], linear_scheme(config, f"{MLP}.down_proj"), parallel="row",
                       prefix=f"{MLP}.down_proj", tp_rank=0, tp_size=16)


def test_weight_only_kernel_is_said_in_the_log(caplog):
    """Dense W4A8 runs weight-only on the NPU: the server log says so (no scheme runs as another silently)."""
    import logging

    with caplog.at_level(logging.DEBUG, logger="sgl_ascend.layers.schemes.w4a8_kernel"):
        ParallelLinear(128, [64], W4A8DynamicLinear(0), prefix="model.layers.0.mlp.gate_proj")
    assert any("msModelSlim W4A8 runs weight-only int4" in r.getMessage() for r in caplog.records)
