"""`inspect` / `verify` with a quantized KV cache: the real Qwen3-MoE W4A8 + C8 checkpoint, and inspect's
prediction of the online int8 KV cache (`--kv-cache-dtype int8 [--kv-cache-skip-layers ...]`)."""

import json

from helpers.common import msmodelslim_fixture
from sgl_ascend.tools.cli import EXIT_OK, main

MOE_C8 = "qwen3moe-tiny-w4a8-dynamic-c8"


def run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_moe_w4a8_c8_checkpoint_is_planned_with_an_int8_kv_cache(capsys):
    """msmodelslim 26.1.0's MoE W4A8_DYNAMIC + C8 output: every tensor is taken (the KV scales by the KV-cache
    scheme, not left unused), and the int8 cache is 1 byte per K/V element: 2 layers x (K, V) x 2 KV heads x 32."""
    code, out = run(capsys, "inspect", msmodelslim_fixture(MOE_C8), "--json")
    plan = json.loads(out)
    assert code == EXIT_OK and plan["ok"] and not plan["unused"] and not plan["missing"], plan["errors"]
    assert {g["scheme"] for g in plan["groups"] if g["module"] == "mlp.experts"} == {"W4A8_DYNAMIC"}
    kv = plan["kv_cache"]
    assert (kv["scheme"], kv["cache_dtype"]) == ("StaticInt8KVCache", "int8")
    assert kv["bytes_per_token_per_device"] == 2 * 2 * 2 * 32 and kv["bf16_bytes_per_token_per_device"] == 512


def test_moe_w4a8_c8_checkpoint_passes_verify_and_inspect_bytes_are_the_loaded_bytes(capsys):
    _, out = run(capsys, "inspect", msmodelslim_fixture(MOE_C8), "--json")
    planned = {layer["prefix"]: layer["resident_bytes"] for layer in json.loads(out)["layers"]}
    code, out = run(capsys, "verify", msmodelslim_fixture(MOE_C8), "--reference",
                    msmodelslim_fixture("qwen3moe-tiny-bf16"), "--json")
    data = json.loads(out)
    assert code == EXIT_OK and data["passed"]
    experts = [layer for layer in data["layers"] if layer["prefix"].endswith("mlp.experts")]
    assert len(experts) == 2 and all(0 < e["rel_error"] < 0.02 for e in experts)  # measured 0.0147
    assert all(layer["resident_bytes"] == layer["theoretical_bytes"] for layer in data["layers"])
    assert {layer["prefix"]: layer["resident_bytes"] for layer in data["layers"]} == planned
    assert data["top1_agreement"] >= 0.9  # measured 0.949
