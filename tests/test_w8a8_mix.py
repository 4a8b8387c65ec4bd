"""msModelSlim W8A8_MIX, on a checkpoint the real msmodelslim 26.1.0 writes (the stock Qwen3-32B C8 recipe's
`pd_mix` activation scope on the tiny Qwen3; tests/fixtures/msmodelslim/configs/w8a8_mix.yaml, built and
cached by helpers.msmodelslim_run).

Both paths against the checkpoint's own convention (helpers.linear.shard_reference): the dynamic path
(every server but a PD-disaggregated decode node) is W8A8_DYNAMIC's numerics on the checkpoint's
weight_scale, the decode-node path W8A8 static's on its input_scale / input_offset / deq_scale /
quant_bias. Tolerances are those of the two schemes in tests/test_linear_schemes.py (TIGHT units of one
bf16 rounding), and against the bf16 model 0.02 (dynamic) / 0.08 (static). Measured worst over layers 0-1
and every kind: 0.98 units on both paths; norm-relative vs the checkpoint's own convention 0.0017
(dynamic) / 0.0089 (static, the bf16 reciprocal of input_scale); vs the bf16 model 0.010 / 0.035.
"""

import json

import pytest
import torch

from helpers.linear import (KINDS, calibrated_input, layer_spec, open_checkpoint, original_reference, rel_err,
                            shard_reference, tight_error)
from helpers.msmodelslim_run import quantized
from sgl_ascend.layers.linear import ParallelLinear, load_linear
from sgl_ascend.layers.registry import linear_scheme, served_table
from sgl_ascend.layers.schemes.w8a8_mix import W8A8MixLinear
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint
from sgl_ascend.quant.modelslim import ModelSlimConfig
from sgl_ascend.tools.cli import EXIT_OK, main
from sgl_ascend.tools.plan import layer_theoretical_bytes, resident_bytes

TIGHT = 1.1
RECIPROCAL_REL = 0.012  # static: 1 / input_scale rounded to bf16 (tests/test_linear_schemes.py)
VS_ORIGINAL = {False: 0.02, True: 0.08}


@pytest.fixture(scope="module")
def mix():
    return quantized("w8a8_mix")


def _layer(path, kind, index=0, decode_node=False, tp_rank=0, tp_size=1, dtype=torch.bfloat16):
    config = ModelSlimConfig.from_dir(path)
    prefix, kwargs, shards = layer_spec(kind, index, tp_size)
    layer = ParallelLinear(scheme=linear_scheme(config, prefix, decode_node=decode_node), prefix=prefix,
                           tp_rank=tp_rank, tp_size=tp_size, params_dtype=dtype,
                           bias=config.has_float_bias(prefix), **kwargs)
    load_linear(layer, SafetensorsCheckpoint(path), shards)
    return layer


def test_the_tool_writes_w8a8_mix_with_both_tensor_sets(mix):
    with open(f"{mix}/quant_model_description.json") as f:
        description = json.load(f)
    assert description["model_quant_type"] == "W8A8_MIX"
    prefix = "model.layers.0.self_attn.q_proj"
    assert {s: description[f"{prefix}.{s}"] for s in ("weight", "input_scale", "input_offset", "quant_bias",
                                                        "deq_scale", "weight_scale", "weight_offset")} == \
        dict.fromkeys(("weight", "input_scale", "input_offset", "quant_bias", "deq_scale", "weight_scale",
                       "weight_offset"), "W8A8_MIX")
    # asymmetric static activations: the recipe's pd_mix scope is asymmetric, so offsets are not all zero
    offsets = [SafetensorsCheckpoint(mix).get(f"model.layers.{i}.mlp.down_proj.input_offset").item() for i in (0, 1)]
    assert any(o != 0 for o in offsets)


@pytest.mark.parametrize("decode_node", [False, True], ids=["prefill-and-mixed", "decode-node"])
@pytest.mark.parametrize("kind", KINDS)
def test_each_path_matches_the_checkpoint_convention(mix, kind, decode_node, gen):
    for index in (0, 1):
        layer = _layer(mix, kind, index, decode_node)
        assert isinstance(layer.scheme, W8A8MixLinear)
        x = calibrated_input(layer, gen, 9)
        out = layer(x)
        assert out.shape == (9, sum(layer.output_partition_sizes)) and out.dtype == torch.bfloat16
        convention = "W8A8" if decode_node else "W8A8_DYNAMIC"
        tight = _reference(mix, kind, x, index, convention, npu_reciprocal=True)
        assert tight_error(out, tight) <= TIGHT
        assert rel_err(out, _reference(mix, kind, x, index, convention)) <= (RECIPROCAL_REL if decode_node else 0.004)
        assert rel_err(out, original_reference(kind, x, layer=index)) <= VS_ORIGINAL[decode_node]


def _reference(path, kind, x, index, convention, npu_reciprocal=False):
    """layer_reference with the description's W8A8_MIX read as one of its two conventions."""
    _, checkpoint = open_checkpoint(path)
    _, _, shards = layer_spec(kind, index)
    outs = []
    for prefix in shards.values():
        tensors = {s: checkpoint.get(i.name) for s, i in checkpoint.with_prefix(prefix).items()}
        outs.append(shard_reference(tensors, convention, x, npu_reciprocal=npu_reciprocal))
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("decode_node", [False, True])
def test_each_path_holds_only_its_own_tensors(mix, decode_node):
    for kind in KINDS:
        layer = _layer(mix, kind, decode_node=decode_node)
        held = {name for name, _ in layer.named_parameters()}
        if decode_node:
            assert {"input_scale_reciprocal", "input_offset", "quant_bias", "deq_scale"} <= held
            assert not held & {"weight_scale", "weight_offset"}
        else:
            assert held == {"weight", "weight_scale"}
        assert resident_bytes(layer) == layer_theoretical_bytes(layer)


@pytest.mark.parametrize("tp_size", [2])
def test_tensor_parallel_ranks_put_together_equal_tp1(mix, tp_size, gen):
    for kind in ("gate_up_proj", "o_proj"):
        whole = _layer(mix, kind)
        x = calibrated_input(whole, gen, 5)
        ranks = [_layer(mix, kind, tp_rank=r, tp_size=tp_size) for r in range(tp_size)]
        if kind == "o_proj":  # row-parallel: K slices, outputs summed (each rank quantizes its slice)
            slices = x.chunk(tp_size, dim=-1)
            out = sum(r(s).double() for r, s in zip(ranks, slices))
            ref = _reference(mix, kind, x, 0, "W8A8_DYNAMIC")
            assert rel_err(out, ref) <= 0.01
        else:
            outs = [r(x) for r in ranks]
            half = [o.split(r.output_partition_sizes, dim=-1) for o, r in zip(outs, ranks)]
            out = torch.cat([torch.cat([h[i] for h in half], dim=-1) for i in range(2)], dim=-1)
            torch.testing.assert_close(out, whole(x), rtol=0, atol=0)


def test_inspect_bytes_equal_resident_bytes(mix, capsys):
    assert main(["inspect", mix, "--json"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and not data["errors"] and not data["missing"]
    by_prefix = {layer["prefix"]: layer for layer in data["layers"]}
    for index in (0, 1):
        for kind in KINDS:
            layer = _layer(mix, kind, index)
            assert by_prefix[layer.prefix]["resident_bytes"] == resident_bytes(layer)
    # the static tensors the serving path does not use are reported as knowingly ignored
    assert any(entry["tensor"].endswith(".deq_scale") for entry in data["ignored"])


def test_verify_passes(mix, capsys):
    code = main(["verify", mix, "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == EXIT_OK and data["passed"], data
    assert 0 < data["worst_layer_error"] < 0.02
    for layer in data["layers"]:
        assert layer["resident_bytes"] == layer["theoretical_bytes"]


def test_scheme_listing_shows_it():
    assert ("msmodelslim", "linear", "W8A8_MIX", "W8A8MixLinear") in served_table()
    assert main(["schemes"]) == EXIT_OK


def test_fp16_model_decode_node_takes_int64_deq_scale(mix, gen):
    layer = _layer(mix, "qkv_proj", decode_node=True, dtype=torch.float16)
    assert layer.deq_scale.dtype == torch.int64
    x = calibrated_input(layer, gen, 7, dtype=torch.float16)
    ref = _reference(mix, "qkv_proj", x, 0, "W8A8")
    assert rel_err(layer(x), ref) <= RECIPROCAL_REL
