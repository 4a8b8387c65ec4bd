"""Bad MoE checkpoints end in one clear CheckpointError before any parameter is allocated; and W4A4
experts (msModelSlim layout, built here: one int4 value per byte, range [-7, 7] as the tool writes)."""

import pytest
import torch
from safetensors.torch import save_file

import sgl_ascend.layers.moe.layer as moe_layer
from helpers.common import rel_err
from helpers.moe_checkpoints import PREFIX, copy_fixture, make_checkpoint, w4a4_checkpoint
from helpers.moe_reference import moe_reference, routing
from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.moe import build_moe, moe_method_for_compressed_tensors, moe_method_for_modelslim
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint
from sgl_ascend.quant.modelslim import ModelSlimConfig


@pytest.fixture
def no_allocation(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the layer was built before the checkpoint was validated")
    monkeypatch.setattr(moe_layer, "MoELayer", forbidden)


def _build(path, inter=64, tp=1, method=None):
    config = ModelSlimConfig.from_dir(path)
    return build_moe(method or moe_method_for_modelslim(config, PREFIX), SafetensorsCheckpoint(path), PREFIX,
                     num_experts=4, hidden_size=128, intermediate_size=inter, tp_size=tp)


def test_missing_expert(tmp_path, no_allocation):
    path = copy_fixture(tmp_path, "qwen3moe-tiny-w4a8-dynamic",
                         lambda name, t: None if ".experts.3." in name and "layers.0." in name else t)
    with pytest.raises(CheckpointError, match="experts.3.gate_proj.weight: expert 3 of 4 has no gate_proj tensors"):
        _build(path)


def test_scale_bias_of_wrong_width(tmp_path, no_allocation):
    path = copy_fixture(tmp_path, "qwen3moe-tiny-w4a8-dynamic",
                         lambda name, t: t[:, :8] if name.endswith("experts.2.down_proj.scale_bias") else t)
    with pytest.raises(CheckpointError, match=r"experts.2.down_proj.scale_bias: shape \[128, 8\] where \[128, 16\]"):
        _build(path)


@pytest.mark.parametrize("group,tp,message", [(48, 1, "group size 48 does not divide the input size 128"),
                                              (64, 4, "splits down_proj's input 128 into 32, which group size 64")])
def test_group_size_not_dividing_k(tmp_path, no_allocation, group, tp, message):
    def edit(d):
        d["group_size"] = group
    path = copy_fixture(tmp_path, "qwen3moe-tiny-w4a8-dynamic-g64", None, edit)
    with pytest.raises(CheckpointError, match=message):
        _build(path, inter=128, tp=tp)


def test_clip_tensors_half_present(tmp_path, gen, no_allocation):
    qconfig, _, _ = make_checkpoint(tmp_path, gen, clip=True)
    ckpt = SafetensorsCheckpoint(str(tmp_path))
    tensors = {n: ckpt.get(n) for n in ckpt.names() if not n.endswith("experts.1.up_proj.bias")}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"experts.1.up_proj: activation-clip tensors are half present"):
        build_moe(moe_method_for_compressed_tensors(qconfig, PREFIX), SafetensorsCheckpoint(str(tmp_path)), PREFIX,
                  num_experts=4, hidden_size=128, intermediate_size=64)


def test_nonzero_offset_is_rejected_while_loading(tmp_path):
    path = copy_fixture(tmp_path, "qwen3moe-tiny-w4a8-dynamic",
                         lambda name, t: t + 1 if name.endswith("experts.0.up_proj.weight_offset") else t)
    with pytest.raises(CheckpointError, match="experts.0.up_proj.weight_offset: non-zero weight offset"):
        _build(path)


def test_w4a4_experts_match_reference(tmp_path, gen):
    experts = w4a4_checkpoint(tmp_path, gen)
    x = torch.randn(16, 128, generator=gen).to(torch.bfloat16)
    w, ids = routing(16, 4, 2, gen)
    for tp, ep in [(1, 1), (2, 1), (1, 2)]:
        total = None
        for rank in range(max(tp, ep)):
            config = ModelSlimConfig.from_dir(str(tmp_path))
            layer = build_moe(moe_method_for_modelslim(config, PREFIX), SafetensorsCheckpoint(str(tmp_path)), PREFIX,
                              num_experts=4, hidden_size=128, intermediate_size=64, tp_rank=rank if tp > 1 else 0,
                              tp_size=tp, ep_rank=rank if ep > 1 else 0, ep_size=ep)
            out = layer(x, w, ids).float()
            total = out if total is None else total + out
        assert rel_err(total, moe_reference(x, w, ids, experts, act_bits=(4, 4), tp=tp, ep=ep)) <= 2e-3
        assert layer.resident_bytes() == layer.moe_method.theoretical_bytes(layer.num_local_experts, 128, 64 // tp)
