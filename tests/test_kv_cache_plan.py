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


# -- inspect --kv-cache-dtype int8: the online int8 KV cache on a checkpoint without KV scales -----------------
# qwen3-tiny-bf16: 2 layers, 2 KV heads of 32: per layer and token K + V are 2 * 64 elements.

def kv_json(capsys, name, *flags):
    code, out = run(capsys, "inspect", msmodelslim_fixture(name), "--json", "--device-memory", "1", *flags)
    data = json.loads(out)
    assert code == EXIT_OK and data["ok"], data["errors"]
    return data["kv_cache"], data["fit"]


def test_online_int8_kv_bytes_per_token(capsys):
    """int8 K/V rows (1 byte) + one fp32 scale per token for K and for V, per layer; SGLang's pool counts
    only the rows."""
    kv, fit = kv_json(capsys, "qwen3-tiny-bf16", "--kv-cache-dtype", "int8")
    assert (kv["scheme"], kv["cache_dtype"], kv["online"], kv["skip_layers"]) == ("DynamicInt8KVCache", "int8",
                                                                                   True, [])
    assert kv["pool_bytes_per_token_per_device"] == 2 * (2 * 64)
    assert kv["bytes_per_token_per_device"] == 2 * (2 * 64 + 2 * 4)
    assert kv["bf16_bytes_per_token_per_device"] == 2 * (2 * 64 * 2)
    budget = fit["kv_budget_bytes"]
    assert (fit["tokens"], fit["sglang_pool_tokens"], fit["tokens_bf16_kv"]) == (budget // 272, budget // 256,
                                                                                 budget // 512)
    bf16, _ = kv_json(capsys, "qwen3-tiny-bf16")
    assert bf16["bytes_per_token_per_device"] == bf16["pool_bytes_per_token_per_device"] == 512


def test_online_int8_kv_skip_layers_keep_bf16_beside_their_unused_pool_rows(capsys):
    """A skipped layer: bf16 K/V of its own (2 * 64 * 2) plus its int8 rows in SGLang's one-dtype pool, unused
    (2 * 64), no scales; negative indices count from the end."""
    for skip, kept in (("0", [0]), ("-1", [1])):
        kv, _ = kv_json(capsys, "qwen3-tiny-bf16", "--kv-cache-dtype", "int8", "--kv-cache-skip-layers", skip)
        assert kv["skip_layers"] == kept
        assert kv["bytes_per_token_per_device"] == (2 * 64 + 2 * 4) + (2 * 64 * 2 + 2 * 64)
        assert kv["pool_bytes_per_token_per_device"] == 2 * (2 * 64)


def test_online_int8_kv_per_device_with_tp(capsys):
    kv, _ = kv_json(capsys, "qwen3-tiny-bf16", "--kv-cache-dtype", "int8", "--tp", "2")  # one KV head per rank
    assert kv["bytes_per_token_per_device"] == 2 * (2 * 32 + 2 * 4)


def test_c8_checkpoint_with_kv_cache_dtype_int8_is_its_own_static_cache(capsys):
    kv, _ = kv_json(capsys, "qwen3-tiny-w8a8-dynamic-c8", "--kv-cache-dtype", "int8")
    assert (kv["scheme"], kv["bytes_per_token_per_device"], kv["pool_bytes_per_token_per_device"]) == (
        "StaticInt8KVCache", 256, 256) and "online" not in kv


def test_kv_cache_flags_refused_as_the_server_refuses_them(capsys):
    cases = [("qwen3-tiny-bf16", ["--kv-cache-skip-layers", "0"], "add --kv-cache-dtype int8"),
             ("qwen3-tiny-w8a8-dynamic-c8", ["--kv-cache-dtype", "int8", "--kv-cache-skip-layers", "0"], "C8"),
             ("qwen3-tiny-bf16", ["--kv-cache-dtype", "int8", "--kv-cache-skip-layers", "0,-1"], "every layer"),
             ("qwen3-tiny-bf16", ["--kv-cache-dtype", "int8", "--kv-cache-skip-layers", "2"], "does not exist")]
    for name, flags, message in cases:
        code = main(["inspect", msmodelslim_fixture(name), *flags])
        captured = capsys.readouterr()
        assert code != EXIT_OK and message in captured.err, (flags, captured.err)


def test_inspect_text_names_the_online_cache_and_its_side_buffers(capsys):
    code, out = run(capsys, "inspect", msmodelslim_fixture("qwen3-tiny-bf16"), "--device-memory", "1",
                    "--kv-cache-dtype", "int8", "--kv-cache-skip-layers", "-1")
    assert code == EXIT_OK
    assert ("KV cache: DynamicInt8KVCache (int8, online: --kv-cache-dtype int8, layers [1] kept in bf16), 520 bytes "
            "per token per device (bf16 KV: 512)") in out
    assert "of which SGLang's pool 256 (int8 K/V of every layer) and 264 in the backend's buffers" in out
    assert "SGLang sizes its pool by the pool bytes alone" in out
