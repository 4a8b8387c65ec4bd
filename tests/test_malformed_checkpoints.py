"""Malformed checkpoints through the CLI: each gives one CheckpointError (exit code 2, no traceback) whose
message names the file and the tensor or json key, and says what to do.

Every case copies a real fixture (tests/fixtures/msmodelslim, or a compressed-tensors checkpoint
written by the library through tests/helpers/ct.py) to tmp_path and breaks it one way. `inspect`
reads headers only (plus small tensors and one row of int4-in-int8 weights); `verify` loads the
values, so broken scale values are `verify`-only cases (inspect passes them, by design).
"""

import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable, List, Tuple

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.common import msmodelslim_fixture
from sgl_ascend.errors import CheckpointError
from sgl_ascend.ops.scales import encode_fp32_as_int64
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint
from sgl_ascend.tools.cli import EXIT_CHECKPOINT_ERROR, EXIT_OK, main

MS = "qwen3-tiny-w8a8-dynamic"        # msModelSlim: index + description + one shard
MS_STATIC = "qwen3-tiny-w8a8"         # per-tensor input_scale, deq_scale
MS_G64 = "qwen3moe-tiny-w4a8-dynamic-g64"
CT = "ct-w4a16-group"                 # compressed-tensors pack-quantized, model.safetensors, no index
W = "quant_model_weights-00001-of-00001.safetensors"
INDEX = "quant_model_weights.safetensors.index.json"
DESCRIPTION = "quant_model_description.json"
O_PROJ = "model.layers.0.self_attn.o_proj"


@dataclass
class Case:
    id: str
    fixture: str
    breaks: Callable[[str], List[str]]   # breaks the folder, returns what the message must contain
    commands: Tuple[str, ...] = ("inspect", "verify")
    inspect_ok: bool = False             # a value problem that headers cannot show


CASES: List[Case] = []


def case(fixture, **kw):
    def register(fn):
        CASES.append(Case(fn.__name__, fixture, fn, **kw))
        return fn
    return register


# -- helpers that break files ------------------------------------------------------------------------

def read_header(path):
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_header(path, header_text: str, data: bytes):
    raw = header_text.encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data)


def edit_header(path, edit):
    header, data = read_header(path)
    header = edit(header) or header
    write_header(path, json.dumps(header), data)


def edit_tensors(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_json(path, edit):
    with open(path) as f:
        data = json.load(f)
    data = edit(data) or data
    with open(path, "w") as f:
        json.dump(data, f)


def set_key(key, value):
    def edit(d):
        d[key] = value
    return edit


def replace_with_dir(path):
    os.remove(path)
    os.mkdir(path)


def j(folder, *names):
    return os.path.join(folder, *names)


# -- crashed with a traceback before -------------------------------------------------------------------

@case(MS)
def header_is_a_json_list(d):
    header, data = read_header(j(d, W))
    write_header(j(d, W), json.dumps([1, 2]), data)
    return [j(d, W), "header is a JSON list"]


@case(MS)
def index_is_a_json_string(d):
    with open(j(d, INDEX), "w") as f:
        f.write('"quant_model_weights-00001-of-00001.safetensors"')
    return [j(d, INDEX), "JSON string"]


@case(MS)
def config_is_a_directory(d):
    replace_with_dir(j(d, "config.json"))
    return [j(d, "config.json"), "is a directory"]


@case(MS)
def description_is_a_directory(d):
    replace_with_dir(j(d, DESCRIPTION))
    return [j(d, DESCRIPTION), "is a directory"]


@case(MS)
def index_is_a_directory(d):
    replace_with_dir(j(d, INDEX))
    return [j(d, INDEX), "is a directory"]


@case(CT)
def ct_weight_packed_transposed(d):
    edit_tensors(j(d, "model.safetensors"), lambda t: t.__setitem__(
        f"{O_PROJ}.weight_packed", t[f"{O_PROJ}.weight_packed"].t().contiguous()))
    return [j(d, "model.safetensors"), f"tensor {O_PROJ}.weight_packed", "expects [128, 16]", "transposed"]


@case(CT)
def ct_weight_packed_wrong_packed_dim(d):
    name = "model.layers.1.mlp.gate_proj.weight_packed"

    def edit(t):
        t[name] = torch.cat([t[name], t[name][:, :1]], dim=1)  # [256, 17]
    edit_tensors(j(d, "model.safetensors"), edit)
    return [j(d, "model.safetensors"), f"tensor {name}", "shape [256, 17]", "expects [256, 16]"]


# -- passed though broken --------------------------------------------------------------------------------

@case(MS)
def num_attention_heads_zero(d):
    edit_json(j(d, "config.json"), set_key("num_attention_heads", 0))
    return [j(d, "config.json"), "key num_attention_heads", "must be positive"]


@case(MS)
def num_hidden_layers_below_the_layers_present(d):
    edit_json(j(d, "config.json"), set_key("num_hidden_layers", 1))
    return [j(d, "config.json"), "key num_hidden_layers", "model.layers.1.", "Set num_hidden_layers to 2"]


@case(MS)
def num_hidden_layers_above_the_layers_present(d):
    edit_json(j(d, "config.json"), set_key("num_hidden_layers", 10 ** 9))  # also: no 10^9-layer layout is built
    return [j(d, "config.json"), "key num_hidden_layers", "layers up to 1 only"]


@case(MS)
def w8a8_layer_relabelled_w4a4(d):
    edit_json(j(d, DESCRIPTION), set_key(f"{O_PROJ}.weight", "W4A4_DYNAMIC"))
    return [j(d, W), f"tensor {O_PROJ}.weight", "[-8, 7]", "W4A4_DYNAMIC"]


def _scale_case(fixture, name, value, found, index=5, **kw):
    def breaks(d):
        def edit(t):
            t[name].reshape(-1)[index] = value
        (shard,) = [f for f in os.listdir(d) if f.endswith(".safetensors")]
        edit_tensors(j(d, shard), edit)
        return [j(d, shard), f"tensor {name}", found, "Re-quantize"]
    breaks.__name__ = f"scale_{found}_{name.rsplit('.', 1)[1]}{'_experts' if 'experts' in name else ''}"
    CASES.append(Case(breaks.__name__, fixture, breaks, **kw))


_scale_case(MS, f"{O_PROJ}.weight_scale", 0.0, "zero", commands=("verify",), inspect_ok=True)
_scale_case(MS, "model.layers.1.mlp.down_proj.weight_scale", float("nan"), "NaN", commands=("verify",),
            inspect_ok=True)
_scale_case(MS, "model.layers.0.mlp.gate_proj.weight_scale", float("inf"), "infinite", commands=("verify",),
            inspect_ok=True)
_scale_case(MS, "model.layers.1.self_attn.k_proj.weight_scale", -0.01, "negative", commands=("verify",),
            inspect_ok=True)
_scale_case(MS_STATIC, f"{O_PROJ}.deq_scale", -1e-6, "negative", commands=("verify",), inspect_ok=True)
# experts load through the MoE loader, which reads through the same checkpoint reader
_scale_case("qwen3moe-tiny-w4a8-dynamic", "model.layers.0.mlp.experts.3.down_proj.weight_scale", float("nan"),
            "NaN", commands=("verify",), inspect_ok=True)
_scale_case(MS_G64, "model.layers.0.mlp.experts.2.gate_proj.weight_scale_second", 0.0, "zero",
            commands=("verify",), inspect_ok=True)
# a per-tensor scale is small enough for inspect to read
_scale_case(MS_STATIC, "model.layers.0.self_attn.k_proj.input_scale", float("nan"), "NaN", index=0)


@case(MS, commands=("verify",), inspect_ok=True)
def scale_row_of_zeros(d):
    edit_tensors(j(d, W), lambda t: t[f"{O_PROJ}.weight_scale"][7:9].zero_())
    return [j(d, W), f"tensor {O_PROJ}.weight_scale", "2 zero", "2 row(s) entirely zero"]


@case(CT)
def ct_unknown_top_level_format(d):
    def edit(c):
        c["quantization_config"]["format"] = "bogus-quantized"
    edit_json(j(d, "config.json"), edit)
    return [j(d, "config.json"), "key quantization_config.format", "'bogus-quantized'"]


# -- vague before ----------------------------------------------------------------------------------------

def _header_case(id, edit, fragments, tensor=f"{O_PROJ}.weight_scale"):
    def breaks(d):
        def change(h):
            edit(h[tensor])
        edit_header(j(d, W), change)
        return [j(d, W), f"tensor {tensor}"] + fragments
    breaks.__name__ = id
    CASES.append(Case(id, MS, breaks))


_header_case("dtype_u32", lambda e: e.__setitem__("dtype", "U32"), ["dtype U32", "re-export"])
_header_case("dtype_unknown", lambda e: e.__setitem__("dtype", "X9"), ['dtype "X9" is not a safetensors dtype'])
_header_case("shape_disagrees_with_offsets", lambda e: e.__setitem__("shape", [128, 2]),
             ["needs 1024 bytes", "span 512"])
_header_case("shape_of_2_pow_40_elements", lambda e: e.__setitem__("shape", [1 << 20, 1 << 20]),
             ["needs 4398046511104 bytes"])
_header_case("shape_of_2_pow_40_elements_with_offsets",
             lambda e: e.update(shape=[1 << 20, 1 << 20], data_offsets=[e["data_offsets"][0],
                                                                         e["data_offsets"][0] + (4 << 40)]),
             ["truncated", "end past"])
_header_case("negative_dim", lambda e: e.__setitem__("shape", [-128, -1]), ["non-negative"])
_header_case("offsets_not_a_pair", lambda e: e.__setitem__("data_offsets", [0]), ["data_offsets [0]"])
_header_case("entry_not_an_object", lambda e: e.clear(), ["not an object with dtype, shape and data_offsets"])


@case(MS)
def shard_is_a_dangling_symlink(d):
    os.remove(j(d, W))
    os.symlink(j(d, "gone.safetensors"), j(d, W))
    return [j(d, W), "symbolic link", "does not exist"]


@case(MS)
def shard_is_a_symlink_to_a_json_file(d):
    os.remove(j(d, W))
    os.symlink(j(d, "config.json"), j(d, W))
    return [j(d, W), "header cannot be read"]


@case(MS)
def shard_is_a_directory(d):
    replace_with_dir(j(d, W))
    return [j(d, W), "is a directory"]


@case(CT)
def shard_name_not_utf8(d):
    os.rename(os.fsencode(j(d, "model.safetensors")), os.fsencode(d) + b"/model\xff.safetensors")
    return [j(d, "model\\xff.safetensors"), "not valid UTF-8", "rename"]


@case(MS)
def weight_map_is_a_list(d):
    edit_json(j(d, INDEX), lambda i: i.__setitem__("weight_map", list(i["weight_map"])))
    return [j(d, INDEX), "key weight_map", "JSON list"]


@case(MS)
def weight_map_value_not_a_string(d):
    edit_json(j(d, INDEX), lambda i: i["weight_map"].__setitem__(f"{O_PROJ}.weight", 5))
    return [j(d, INDEX), f"tensor {O_PROJ}.weight", "not a shard file name"]


def _group_size_case(fixture, size):
    def breaks(d):
        if fixture == CT:
            edit_json(j(d, "config.json"), lambda c: c["quantization_config"]["config_groups"]["group_0"][
                "weights"].__setitem__("group_size", size))
            return [j(d, "config.json"), "key quantization_config.config_groups.group_0.weights.group_size",
                    f"group size {size} does not divide"]
        edit_json(j(d, DESCRIPTION), set_key("group_size", size))
        return [j(d, DESCRIPTION), "key group_size", f"group size {size} does not divide"]
    breaks.__name__ = f"group_size_{size}_{'ct' if fixture == CT else 'modelslim'}"
    CASES.append(Case(breaks.__name__, fixture, breaks))


for _fixture in (CT, MS_G64):
    for _size in (7, 10 ** 9):
        _group_size_case(_fixture, _size)


# -- an index sending the reader outside the folder ------------------------------------------------

@case(MS)
def index_points_to_parent_folder(d):
    edit_json(j(d, INDEX), lambda i: i["weight_map"].__setitem__(f"{O_PROJ}.weight", "../../etc/passwd"))
    return [j(d, INDEX), f"tensor {O_PROJ}.weight", "outside the checkpoint folder"]


@case(MS)
def index_points_to_absolute_path(d):
    edit_json(j(d, INDEX), lambda i: i["weight_map"].__setitem__(f"{O_PROJ}.weight", "/etc/passwd"))
    return [j(d, INDEX), f"tensor {O_PROJ}.weight", "absolute path"]


@case(MS)
def index_points_through_a_symlinked_folder(d):
    outside = d + "-outside"
    os.mkdir(outside)
    shutil.copy(j(d, W), outside)
    os.symlink(outside, j(d, "sub"))
    edit_json(j(d, INDEX), lambda i: i.__setitem__("weight_map", {k: f"sub/{W}" for k in i["weight_map"]}))
    return [j(d, INDEX), "tensor model.", "outside the checkpoint folder"]


# -- more of our own --------------------------------------------------------------------------------------

@case(CT)
def tensors_duplicated_across_shards(d):
    shutil.copy(j(d, "model.safetensors"), j(d, "model-00002.safetensors"))
    return [j(d, "model.safetensors"), "tensor model.", "also stored in model-00002.safetensors"]


@case(MS)
def index_names_a_missing_shard(d):
    edit_json(j(d, INDEX), lambda i: i["weight_map"].__setitem__(f"{O_PROJ}.weight", "other.safetensors"))
    return [j(d, INDEX), f"tensor {O_PROJ}.weight", "that file is missing"]


@case(MS)
def header_length_past_end_of_file(d):
    with open(j(d, W), "r+b") as f:
        f.write((1 << 40).to_bytes(8, "little"))
    return [j(d, W), "header cannot be read", "truncated"]


@case(MS)
def empty_shard(d):
    open(j(d, W), "w").close()
    return [j(d, W), "0 bytes", "empty"]


@case(MS)
def tensor_listed_twice_in_a_header(d):
    header, data = read_header(j(d, W))
    name = f"{O_PROJ}.weight_scale"
    text = "{" + json.dumps(name) + ": " + json.dumps(header[name]) + ", " + json.dumps(header)[1:]
    write_header(j(d, W), text, data)
    return [j(d, W), f"tensor {name}", "twice"]


@case(MS)
def bytes_after_the_last_tensor(d):
    with open(j(d, W), "ab") as f:
        f.write(b"\0" * 16)
    return [j(d, W), "16 bytes follow the last tensor"]


@case(MS)
def overlapping_offsets(d):
    def edit(h):
        h["model.layers.1.self_attn.o_proj.weight_scale"]["data_offsets"] = h[f"{O_PROJ}.weight_scale"]["data_offsets"]
    edit_header(j(d, W), edit)
    return [j(d, W), "overlaps the previous tensor"]


@case(MS)
def metadata_not_strings(d):
    edit_header(j(d, W), lambda h: h.__setitem__("__metadata__", {"format": 1}))
    return [j(d, W), "key __metadata__"]


@case(MS)
def header_not_json(d):
    header, data = read_header(j(d, W))
    write_header(j(d, W), json.dumps(header)[:-5] + "#####", data)
    return [j(d, W), "header is not valid JSON"]


@case(MS)
def config_is_a_json_list(d):
    with open(j(d, "config.json"), "w") as f:
        f.write("[]")
    return [j(d, "config.json"), "JSON list"]


@case(MS)
def description_not_utf8(d):
    with open(j(d, DESCRIPTION), "wb") as f:
        f.write(b'{"version": "1.0.0", "\xff": 1}')
    return [j(d, DESCRIPTION), "not UTF-8"]


@case(MS)
def kv_heads_not_dividing_heads(d):
    edit_json(j(d, "config.json"), set_key("num_key_value_heads", 3))
    return [j(d, "config.json"), "key num_key_value_heads", "does not divide"]


@case(MS)
def index_without_weight_map(d):
    edit_json(j(d, INDEX), lambda i: {"metadata": {}})
    return [j(d, INDEX), "key weight_map"]


# -- the suite ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ct_source(tmp_path_factory):
    from helpers.ct import write_qwen3_ct_checkpoint

    return write_qwen3_ct_checkpoint(str(tmp_path_factory.mktemp("ct") / CT), "w4a16_group")


def _copy(fixture, tmp_path, ct_source):
    src = ct_source if fixture == CT else msmodelslim_fixture(fixture)
    dst = str(tmp_path / fixture)
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_checkpoint(case, tmp_path, capsys, request):
    ct_source = request.getfixturevalue("ct_source") if case.fixture == CT else None
    folder = _copy(case.fixture, tmp_path, ct_source)
    fragments = case.breaks(folder)
    commands = case.commands + (("inspect",) if case.inspect_ok else ())
    capsys.readouterr()  # building the compressed-tensors fixture prints progress bars
    for command in commands:
        code = main([command, folder])  # anything but a return (an exception) fails the test
        out = capsys.readouterr()
        if command == "inspect" and case.inspect_ok:
            assert code == EXIT_OK, out.out + out.err  # values are invisible to a headers-only inspect
            continue
        assert code == EXIT_CHECKPOINT_ERROR, out.out + out.err
        assert "Traceback" not in out.err
        if out.err:  # raised: one CheckpointError, printed on one line
            assert out.err.count("checkpoint error:") == 1 and out.err.count("\n") == 1, out.err
            text = out.err
        else:  # inspect collected it as the plan's only error
            assert "NOT SERVABLE as is: 1 error(s)" in out.out, out.out
            text = out.out
        for fragment in fragments:
            assert fragment in text, f"{command}: {fragment!r} not in:\n{text}"
        assert "Traceback" not in text


# -- reader-level checks --------------------------------------------------------------------------------

def test_int64_deq_scale_is_decoded_before_the_check(tmp_path):
    from sgl_ascend.quant.checks import check_scale_values

    scale = torch.tensor([1e-3, -2e-3, 3e-3])
    save_file({"x.deq_scale": encode_fp32_as_int64(scale), "x.weight": torch.zeros(3, 2, dtype=torch.int8)},
              str(tmp_path / "model.safetensors"))
    checkpoint = SafetensorsCheckpoint(str(tmp_path))
    checkpoint.get("x.weight")  # not a scale: not checked
    with pytest.raises(CheckpointError) as info:
        checkpoint.get("x.deq_scale")
    assert info.value.tensor == "x.deq_scale" and info.value.file == str(tmp_path / "model.safetensors")
    assert "1 negative of 3" in str(info.value) and "index [1]: -0.002" in str(info.value)
    check_scale_values(encode_fp32_as_int64(scale.abs()), file="f", tensor="t")  # positive: fine


def test_symlinked_shards_of_the_hugging_face_cache_are_read(tmp_path):
    """Hugging Face's cache links snapshot files to blobs outside the snapshot folder: still served."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    save_file({"x.weight": torch.ones(2, 2)}, str(blobs / "0123"))
    os.symlink("../../blobs/0123", snapshot / "model.safetensors")
    with open(snapshot / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {"x.weight": "model.safetensors"}}, f)
    checkpoint = SafetensorsCheckpoint(str(snapshot))
    assert checkpoint.get("x.weight").sum() == 4


def test_header_validation_accepts_every_fixture():
    for name in ("qwen3-tiny-w8a8", "qwen3-tiny-w4a4-dynamic", "qwen3moe-tiny-w8a8-v0", MS_G64):
        checkpoint = SafetensorsCheckpoint(msmodelslim_fixture(name))
        assert checkpoint.names()
