"""A broken checkpoint gives one CheckpointError that names the file and the tensor, says what was
expected and what was found. Each test breaks one thing in a tiny W8A8 checkpoint written in-test."""

import json
import os

import pytest
import torch

from helpers.linear import build_layer, synthetic_qwen3_tensors, write_modelslim
from sgl_ascend.layers.registry import check_served
from sgl_ascend.errors import CheckpointError
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint
from sgl_ascend.quant.modelslim import ModelSlimConfig

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"
V = "model.layers.0.self_attn.v_proj"
WEIGHTS = "quant_model_weights-00001-of-00001.safetensors"
INDEX = "quant_model_weights.safetensors.index.json"
DESCRIPTION = "quant_model_description.json"


@pytest.fixture
def parts():
    return synthetic_qwen3_tensors("W8A8", torch.Generator().manual_seed(3))


def _error(call) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        call()
    error = info.value
    # one error, not a chain of them (a located re-raise hides the original)
    assert not isinstance(error.__cause__, CheckpointError)
    assert error.__suppress_context__ or not isinstance(error.__context__, CheckpointError)
    return error


def _qkv_error(folder) -> CheckpointError:
    return _error(lambda: build_layer(folder, "qkv_proj"))


def test_missing_tensor(tmp_path, parts):
    tensors, types = parts
    del tensors[f"{K}.deq_scale"]
    message = str(_qkv_error(write_modelslim(str(tmp_path), tensors, types)))
    assert f"file {tmp_path / INDEX}" in message and f"tensor {K}.deq_scale" in message
    assert "does not have it" in message


def test_wrong_shape(tmp_path, parts):
    tensors, types = parts
    tensors[f"{Q}.weight"] = torch.zeros(128, 129, dtype=torch.int8)
    message = str(_qkv_error(write_modelslim(str(tmp_path), tensors, types)))
    assert f"file {tmp_path / WEIGHTS}" in message and f"tensor {Q}.weight" in message
    assert "shape [128, 129] does not fit the layer's [128, 128]" in message


def test_wrong_dtype(tmp_path, parts):
    tensors, types = parts
    tensors[f"{V}.quant_bias"] = tensors[f"{V}.quant_bias"].float()
    message = str(_qkv_error(write_modelslim(str(tmp_path), tensors, types)))
    assert f"file {tmp_path / WEIGHTS}" in message and f"tensor {V}.quant_bias" in message
    assert "dtype torch.float32 where torch.int32 is expected" in message


def test_unknown_scheme_string(tmp_path, parts):
    tensors, types = parts
    types[f"{Q}.weight"] = "W2A2"
    error = _error(lambda: check_served(ModelSlimConfig.from_dir(write_modelslim(str(tmp_path), tensors, types))))
    assert f"file {tmp_path / DESCRIPTION}" in str(error) and f"tensor {Q}.weight" in str(error)
    assert "unknown scheme 'W2A2'" in str(error)


def test_fused_shards_with_different_schemes(tmp_path, parts):
    tensors, types = parts
    types[f"{K}.weight"] = "W8A8_DYNAMIC"
    message = str(_qkv_error(write_modelslim(str(tmp_path), tensors, types)))
    assert f"file {tmp_path / DESCRIPTION}" in message and "tensor model.layers.0.self_attn.qkv_proj.weight" in message
    assert f"{Q}.weight=W8A8, {K}.weight=W8A8_DYNAMIC, {V}.weight=W8A8" in message


def test_fused_shards_with_different_input_scale(tmp_path, parts):
    tensors, types = parts
    tensors[f"{K}.input_scale"] = torch.tensor([0.03])
    message = str(_qkv_error(write_modelslim(str(tmp_path), tensors, types)))
    assert f"file {tmp_path / WEIGHTS}" in message
    assert f"tensor {Q}.input_scale, {K}.input_scale, {V}.input_scale" in message
    assert "different values [0.02, 0.03, 0.02]" in message


def test_truncated_data(tmp_path, parts):
    folder = write_modelslim(str(tmp_path), *parts)
    path = os.path.join(folder, WEIGHTS)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    error = _error(lambda: SafetensorsCheckpoint(folder))
    # tensors are stored in name order; the last one is cut
    assert f"file {path}" in str(error) and "tensor model.layers.0.self_attn.v_proj.weight" in str(error)
    assert "truncated" in str(error) and "1 tensor(s) end past" in str(error)


def test_truncated_header(tmp_path, parts):
    folder = write_modelslim(str(tmp_path), *parts)
    path = os.path.join(folder, WEIGHTS)
    with open(path, "r+b") as f:
        f.truncate(40)
    error = _error(lambda: SafetensorsCheckpoint(folder))
    assert f"file {path}" in str(error) and "header cannot be read" in str(error)


def _edit_index(folder, edit):
    path = os.path.join(folder, INDEX)
    with open(path) as f:
        index = json.load(f)
    edit(index["weight_map"])
    with open(path, "w") as f:
        json.dump(index, f)
    return path


def test_index_points_at_missing_shard(tmp_path, parts):
    folder = write_modelslim(str(tmp_path), *parts)
    second = "quant_model_weights-00002-of-00002.safetensors"
    index = _edit_index(folder, lambda m: m.__setitem__(f"{Q}.weight", second))
    message = str(_error(lambda: SafetensorsCheckpoint(folder)))
    assert f"file {index}" in message and f"tensor {Q}.weight" in message
    assert "in quant_model_weights-00002-of-00002.safetensors, but that file is missing" in message


def test_index_points_at_missing_tensor(tmp_path, parts):
    folder = write_modelslim(str(tmp_path), *parts)
    index = _edit_index(folder, lambda m: m.__setitem__(f"{Q}.weight_scale", WEIGHTS))
    message = str(_error(lambda: SafetensorsCheckpoint(folder)))
    assert f"file {index}" in message and f"tensor {Q}.weight_scale" in message
    assert f"the index places it in {WEIGHTS} but it is missing" in message


def test_tensor_the_scheme_does_not_have(tmp_path, parts):
    tensors, types = parts
    tensors[f"{Q}.weight_scale"] = torch.ones(128, 1)  # W8A8 static ignores it: loads fine
    tensors[f"{Q}.smooth_factor"] = torch.ones(128)
    message = str(_qkv_error(write_modelslim(str(tmp_path), tensors, types)))
    assert f"file {tmp_path / WEIGHTS}" in message and f"tensor {Q}.smooth_factor" in message
    assert "has no place in layer" in message


def test_nonzero_offset_for_a_symmetric_kernel(tmp_path):
    tensors, types = synthetic_qwen3_tensors("W8A8_DYNAMIC", torch.Generator().manual_seed(4))
    tensors[f"{K}.weight_offset"][3] = 2.0
    message = str(_qkv_error(write_modelslim(str(tmp_path), tensors, types)))
    assert f"file {tmp_path / WEIGHTS}" in message
    assert f"tensor {Q}.weight_offset, {K}.weight_offset, {V}.weight_offset" in message
    assert "non-zero weight offset (max |offset| = 2)" in message


def test_w8a8_float_bias_missing_from_quant_bias(tmp_path):
    tensors, types = synthetic_qwen3_tensors("W8A8", torch.Generator().manual_seed(9), float_bias=True)
    tensors[f"{K}.bias"] = tensors[f"{K}.bias"] + 1.0  # no longer what quant_bias carries
    message = str(_qkv_error(write_modelslim(str(tmp_path), tensors, types)))
    assert f"file {tmp_path / WEIGHTS}" in message and f"tensor {Q}.bias, {K}.bias, {V}.bias" in message
    assert "the float bias is not inside quant_bias" in message


def test_missing_or_broken_description(tmp_path):
    error = _error(lambda: ModelSlimConfig.from_dir(str(tmp_path)))
    assert f"file {tmp_path / DESCRIPTION}" in str(error) and "not an msModelSlim checkpoint" in str(error)
    (tmp_path / DESCRIPTION).write_text("{not json")
    error = _error(lambda: ModelSlimConfig.from_dir(str(tmp_path)))
    assert f"file {tmp_path / DESCRIPTION}" in str(error) and "not valid json" in str(error)


@pytest.mark.parametrize("shape", [(16, 128), (128, 8)])
def test_packed_weight_of_the_wrong_shape_is_a_checkpoint_error_in_the_loader(shape):
    """SGLang's own load path (no plan check before it): a transposed or mis-packed weight_packed
    stops with a CheckpointError naming the tensor, not an AttributeError."""
    from sgl_ascend.layers.linear import ParallelLinear
    from sgl_ascend.layers.schemes import CTWNA16Linear

    layer = ParallelLinear(128, [128], CTWNA16Linear(4, 32, symmetric=True, packed=True), prefix="m.proj")
    with pytest.raises(CheckpointError, match="does not fit|cannot take rank 0's slice") as info:
        layer.weight_loader(layer.weight_packed, torch.zeros(shape, dtype=torch.int32))
    assert "weight_packed" in str(info.value)
