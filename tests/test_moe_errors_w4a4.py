"""Bad MoE checkpoints end in one clear CheckpointError before any parameter is allocated; and W4A4
experts (msModelSlim layout, built here: one int4 value per byte, range [-7, 7] as the tool writes)."""

import json

import pytest
import torch
from safetensors.torch import save_file

import sgl_ascend.layers.moe.layer as moe_layer
from conftest import rel_err
from moe_reference import moe_reference, routing
from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.moe import build_moe, moe_method_for_compressed_tensors, moe_method_for_modelslim
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint
from sgl_ascend.quant.modelslim import ModelSlimConfig
from test_moe_compressed_tensors import make_checkpoint
from test_moe_modelslim import PREFIX, _copy_fixture


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
    path = _copy_fixture(tmp_path, "qwen3moe-tiny-w4a8-dynamic",
                         lambda name, t: None if ".experts.3." in name and "layers.0." in name else t)
    with pytest.raises(CheckpointError, match="experts.3.gate_proj.weight: expert 3 of 4 has no gate_proj tensors"):
        _build(path)


def test_scale_bias_of_wrong_width(tmp_path, no_allocation):
    path = _copy_fixture(tmp_path, "qwen3moe-tiny-w4a8-dynamic",
                         lambda name, t: t[:, :8] if name.endswith("experts.2.down_proj.scale_bias") else t)
    with pytest.raises(CheckpointError, match=r"experts.2.down_proj.scale_bias: shape \[128, 8\] where \[128, 16\]"):
        _build(path)


@pytest.mark.parametrize("group,tp,message", [(48, 1, "group size 48 does not divide the input size 128"),
                                              (64, 4, "splits down_proj's input 128 into 32, which group size 64")])
def test_group_size_not_dividing_k(tmp_path, no_allocation, group, tp, message):
    def edit(d):
        d["group_size"] = group
    path = _copy_fixture(tmp_path, "qwen3moe-tiny-w4a8-dynamic-g64", None, edit)
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
    path = _copy_fixture(tmp_path, "qwen3moe-tiny-w4a8-dynamic",
                         lambda name, t: t + 1 if name.endswith("experts.0.up_proj.weight_offset") else t)
    with pytest.raises(CheckpointError, match="experts.0.up_proj.weight_offset: non-zero weight offset"):
        _build(path)


def _w4a4_checkpoint(path, gen, num_experts=4, hidden=128, inter=64):
    tensors, description, experts = {}, {"version": "1.0.0", "group_size": 0}, []
    for e in range(num_experts):
        deq = []
        for proj, (n, k) in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
            w = torch.randn(n, k, generator=gen) * 0.05
            scale = w.abs().amax(dim=1, keepdim=True) / 7
            q = torch.round(w / scale).clamp(-7, 7).to(torch.int8)
            name = f"{PREFIX}.experts.{e}.{proj}"
            tensors.update({f"{name}.weight": q, f"{name}.weight_scale": scale,
                            f"{name}.weight_offset": torch.zeros_like(scale)})
            description.update({f"{name}.{s}": "W4A4_DYNAMIC" for s in ("weight", "weight_scale", "weight_offset")})
            deq.append(q.float() * scale)
        experts.append(tuple(deq))
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "quant_model_weights.safetensors"))
    (path / "quant_model_description.json").write_text(json.dumps(description))
    return experts


def test_w4a4_experts_match_reference(tmp_path, gen):
    experts = _w4a4_checkpoint(tmp_path, gen)
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
