"""W4A4_FLATQUANT_DYNAMIC on the checkpoint the real msmodelslim 26.1.0 writes (flatquant + autoround W4A4,
tests/fixtures/msmodelslim/configs/w4a4_flatquant.yaml): every linear carries left_trans / right_trans /
clip_ratio, o_proj left_trans only.

The float reference is computed in float64 from the checkpoint tensors, never through sgl_ascend.ops: per
token x'' = x @ kron(left, right) (msModelSlim's FlatQuantOnlineWrapper: x @ right, then left^T on the [L, R]
view), int4 with scale max|x''| * clip / 7 (fp32), then @ ((q - offset) * scale)^T.
"""

import pytest
import torch

from helpers.common import msmodelslim_fixture, rewrite_modelslim
from helpers.linear import KINDS, build_layer, layer_spec, open_checkpoint
from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.registry import check_served, served_names
from sgl_ascend.quant.modelslim import FLATQUANT, ModelSlimConfig, load_description
from sgl_ascend.quant.scheme_key import LINEAR, MSMODELSLIM
from sgl_ascend.tools.plan import plan_checkpoint

FIXTURE = msmodelslim_fixture("qwen3-tiny-w4a4-flatquant")
# served vs the float64 simulation: npu_kronecker_quant takes the transforms in the activation dtype (bf16)
# and its products come out in it, which moves some int4 values by one step: measured 0.021-0.048 over the
# 4 kinds and 8 seeds. The same simulation with those bf16 roundings: 0.0017 (the bf16 output).
LOOSE, TIGHT = 0.06, 0.005
# the int4 activation error alone (float64 simulation vs the unquantized transformed input): 0.10-0.12
INT4_ACT_ERROR = 0.08


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _transform(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, kernel_rounding: bool) -> torch.Tensor:
    if not kernel_rounding:
        return x.double() @ torch.kron(left, right)
    bf = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
    rows = x.double().view(x.shape[0], left.shape[0], right.shape[0])
    return bf(bf(left).t() @ bf(rows @ bf(right))).reshape(x.shape)


def _reference(kind: str, x: torch.Tensor, quantize_act: bool = True, kernel_rounding: bool = False) -> torch.Tensor:
    _, checkpoint = open_checkpoint(FIXTURE)
    _, _, shards = layer_spec(kind)
    outs, clips = [], []
    for prefix in shards.values():
        weight = checkpoint.get(f"{prefix}.weight").double()
        weight = (weight - checkpoint.get(f"{prefix}.weight_offset").double()) * \
            checkpoint.get(f"{prefix}.weight_scale").double()
        left = checkpoint.get(f"{prefix}.left_trans").double()
        right = checkpoint.get(f"{prefix}.right_trans").double() if f"{prefix}.right_trans" in checkpoint else \
            torch.eye(weight.shape[1] // left.shape[0], dtype=torch.float64)
        clips.append(float(checkpoint.get(f"{prefix}.clip_ratio")))
        outs.append((weight, left, right))
    clip = max(clips)  # the fused shards share one activation quantization (see the scheme)
    result = []
    for weight, left, right in outs:
        y = _transform(x, left, right, kernel_rounding)
        if quantize_act:
            scale = (y.abs().amax(dim=1, keepdim=True) * clip / 7).float().double()
            y = torch.round(y / scale).clamp(-8, 7) * scale
        result.append(y @ weight.t())
    return torch.cat(result, dim=1)


def _input(layer, seed: int) -> torch.Tensor:
    return torch.randn(7, layer.input_size, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_the_real_tool_writes_it_as_described():
    description = load_description(FIXTURE)
    _, checkpoint = open_checkpoint(FIXTURE)
    assert description.tensor_types["model.layers.0.self_attn.q_proj.weight"] == FLATQUANT
    assert checkpoint.get("model.layers.0.self_attn.q_proj.left_trans").shape == (8, 8)
    assert checkpoint.get("model.layers.0.self_attn.q_proj.right_trans").shape == (16, 16)
    assert checkpoint.get("model.layers.0.mlp.down_proj.left_trans").shape == (16, 16)
    # o_proj: a transform over the 4 heads only; its head_dim factor went into v_proj's weights
    assert checkpoint.get("model.layers.0.self_attn.o_proj.left_trans").shape == (4, 4)
    assert "model.layers.0.self_attn.o_proj.right_trans" not in checkpoint
    clip = checkpoint.get("model.layers.0.self_attn.q_proj.clip_ratio")
    assert clip.dtype == torch.float32 and clip.shape == (1,) and 0 < float(clip) < 1
    assert checkpoint.get("model.layers.0.self_attn.q_proj.weight").dtype == torch.int8


def test_registered_and_resolved_with_its_transform_shape():
    assert FLATQUANT in served_names(LINEAR, MSMODELSLIM)
    config, _ = open_checkpoint(FIXTURE)
    check_served(config)
    assert dict(config.linear_key("model.layers.0.self_attn.o_proj").params) == {
        "group_size": 0, "legacy": False, "right_trans": False, "left": 4}
    assert dict(config.linear_key("model.layers.0.self_attn.qkv_proj").params)["right_trans"] is True


@pytest.mark.parametrize("kind", KINDS)
def test_numbers_match_the_float64_simulation(kind):
    layer = build_layer(FIXTURE, kind)
    assert type(layer.scheme).__name__ == "W4A4FlatQuantDynamicLinear"
    for seed in range(3):
        x = _input(layer, seed)
        served = layer(x)
        assert served.dtype == torch.bfloat16
        assert _rel(served, _reference(kind, x)) <= LOOSE, kind
        assert _rel(served, _reference(kind, x, kernel_rounding=True)) <= TIGHT, kind
        # the check has teeth: the simulation is far closer than the int4 activation error
        assert _rel(_reference(kind, x), _reference(kind, x, quantize_act=False)) > INT4_ACT_ERROR


def test_left_transform_direction_is_pinned():
    layer = build_layer(FIXTURE, "gate_up_proj")
    x = _input(layer, 0)
    layer.left_trans.data = layer.left_trans.data.t().contiguous()  # the untransposed matrix
    assert _rel(layer(x), _reference("gate_up_proj", x)) > 10 * LOOSE


def test_each_weight_once_and_bytes_are_the_theoretical_size():
    for kind in KINDS:
        layer = build_layer(FIXTURE, kind)
        resident = sum(t.numel() * t.element_size() for t in list(layer.parameters()) + list(layer.buffers()))
        n = sum(layer_spec(kind)[1]["output_sizes"])
        assert resident == layer.scheme.theoretical_bytes(layer.input_size, n), kind
        assert not hasattr(layer, "clip_ratio") and not hasattr(layer, "weight_offset")
        assert layer.left_trans.dtype == layer.right_trans.dtype == torch.bfloat16


def test_graph_safe_apply_compiles_without_breaks():
    layer = build_layer(FIXTURE, "qkv_proj")
    x = _input(layer, 1)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    assert torch.equal(compiled(x), eager)


@pytest.mark.parametrize("kind", ["o_proj", "down_proj"])
def test_tensor_parallel_split_input_is_refused(kind):
    with pytest.raises(CheckpointError, match="tp 1"):
        build_layer(FIXTURE, kind, tp_rank=0, tp_size=2)


def test_column_parallel_tp_slices_agree_with_tp1():
    full = build_layer(FIXTURE, "gate_up_proj")
    x = _input(full, 2)
    halves = [build_layer(FIXTURE, "gate_up_proj", tp_rank=r, tp_size=2)(x) for r in range(2)]
    want = full(x)
    inter = want.shape[1] // 2
    got = torch.cat([torch.cat([h[:, :inter // 2] for h in halves], 1),
                     torch.cat([h[:, inter // 2:] for h in halves], 1)], 1)
    assert torch.equal(got, want)


def test_fp32_serving_is_refused():
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        build_layer(FIXTURE, "qkv_proj", params_dtype=torch.float32)


def test_clip_ratio_outside_the_kernel_range_is_refused(tmp_path):
    bad = rewrite_modelslim(FIXTURE, str(tmp_path / "bad"), rewrite=lambda name, t: torch.full_like(t, 1.5)
                            if name.endswith("mlp.down_proj.clip_ratio") else t)
    with pytest.raises(CheckpointError, match=r"clip_ratio .* outside \(0, 1\]"):
        build_layer(bad, "down_proj")


def test_fused_shards_with_different_transforms_are_refused(tmp_path):
    bad = rewrite_modelslim(FIXTURE, str(tmp_path / "bad"), rewrite=lambda name, t: t.flip(0)
                            if name.endswith("layers.0.self_attn.k_proj.left_trans") else t)
    with pytest.raises(CheckpointError, match="different left_trans"):
        build_layer(bad, "qkv_proj")


def test_heads_only_layer_needs_the_headers():
    config = ModelSlimConfig(load_description(FIXTURE))  # description only: no header sizes
    from sgl_ascend.layers.linear import ParallelLinear
    from sgl_ascend.layers.registry import linear_scheme

    prefix, kwargs, _ = layer_spec("o_proj")
    with pytest.raises(CheckpointError, match="headers"):
        ParallelLinear(scheme=linear_scheme(config, prefix), prefix=prefix, **kwargs)


def test_inspect_plans_the_bytes_verify_measures():
    plan = plan_checkpoint(FIXTURE)
    assert plan.ok, plan.errors
    layers = {layer.prefix: layer for layer in plan.layers}
    assert layers["model.layers.0.self_attn.o_proj"].scheme == FLATQUANT


def test_verify_loads_every_layer_and_measures_it_against_the_checkpoints_meaning():
    from sgl_ascend.tools.verify import verify_checkpoint

    report = verify_checkpoint(FIXTURE, None, progress=False)
    assert {e.scheme for e in report.layers} == {FLATQUANT} and len(report.layers) == 8
    # the int4 activation error of each layer (~0.12), against its dequantized weights with the transforms folded
    assert report.worst_layer_error <= 0.25
    assert all(e.resident_bytes == e.theoretical_bytes for e in report.layers)
