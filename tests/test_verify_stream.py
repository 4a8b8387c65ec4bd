"""`sgl-ascend verify` streams the model layer by layer; it and `inspect` know DeepSeek (MLA) and tp > 1.

- Peak memory: the CPU tensors Python can reach (helpers.memory.live_cpu_tensor_bytes, not RSS) stay
  under one float layer + one served layer + a few fp32 copies of one linear layer while the layers
  run, far below the float model.
- The streamed float model (transformers' decoder layers materialized one at a time, our causal mask,
  embedding and head) gives transformers' whole-model logits on bf16 Qwen3, Qwen3-MoE and DeepSeek-V3.
- MLA: inspect's bytes equal the theoretical sums; verify passes the tiny W8A8_DYNAMIC DeepSeek-V3 and
  fails a copy whose kv_b_proj / o_proj scales are off.
- tp: the ranks' outputs put together equal tp=1's within bf16 partial-sum rounding plus, for
  row-parallel layers, the per-token activation quantization of each rank's slice of K.
"""

import json

import pytest
import torch

from helpers.common import msmodelslim_fixture
from helpers.deepseek_tiny import (CONFIG as DS, V2_LITE_CONFIG, random_weights, write_bf16,
                                   write_modelslim_w8a8_dynamic)
from helpers.memory import live_cpu_tensor_bytes
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint
from sgl_ascend.testing import synthetic
from sgl_ascend.tools import verify
from sgl_ascend.tools.cli import EXIT_ABOVE_THRESHOLD, EXIT_OK, main
from sgl_ascend.tools.model_layout import layout_from_config, load_config
from sgl_ascend.tools.plan import UnquantizedSource


def run_json(capsys, *argv):
    code = main(list(argv) + ["--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek")
    weights, v2 = random_weights(0), random_weights(0, V2_LITE_CONFIG)
    return {"bf16": write_bf16(str(root / "bf16"), weights),
            "w8a8": write_modelslim_w8a8_dynamic(str(root / "w8a8"), weights),
            "v2-bf16": write_bf16(str(root / "v2-bf16"), v2, V2_LITE_CONFIG),
            "v2-w8a8": write_modelslim_w8a8_dynamic(str(root / "v2-w8a8"), v2, V2_LITE_CONFIG)}


# -- streaming: peak memory -------------------------------------------------------------------------

SHAPE = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             num_hidden_layers=10, vocab_size=2048)


def test_verify_peak_tensor_bytes_is_one_layer_not_the_model(tmp_path, monkeypatch):
    path = synthetic.write_modelslim(str(tmp_path / "w8a8"), "W8A8_DYNAMIC", **SHAPE)
    h, i, q, kv = 256, 1024, 4 * 64, 2 * 64
    linears = [(q + 2 * kv, h), (h, q), (2 * i, h), (h, i)]  # qkv, o, gate_up, down: (N, K)
    float_layer = sum(n * k for n, k in linears) * 2 + 4 * h * 2 + 2 * 64 * 2  # bf16 weights + norms
    served_layer = sum(n * (k + 4) for n, k in linears)  # int8 weight + fp32 scale per row
    fp32_shard = i * h * 4  # the largest checkpoint shard (gate_proj / up_proj / down_proj), dequantized
    bound = float_layer + served_layer + 2 * fp32_shard + (1 << 20)  # activations < 1 MiB
    float_model = 10 * float_layer + 2 * 2048 * h * 2
    assert bound < float_model / 2

    # Measured within the last layer (what earlier layers left behind would show there), at every point
    # where the most is alive; each measurement walks all Python objects.
    peaks, current = [], {"index": None}
    measured_layers = (9,)

    def measure():
        if current["index"] in measured_layers:
            peaks.append(live_cpu_tensor_bytes() - baseline)

    original_layer, original_run = verify._FloatModel.layer, verify._FloatModel.run

    def layer(self, index, state):
        current["index"] = index
        measure()  # the layer's float weights built
        return original_layer(self, index, state)

    def run(layer, hidden, contexts):
        measure()  # own layer, then the same with the served layers swapped in
        return original_run(layer, hidden, contexts)

    original_error, original_weight = verify._linear_error, verify.own_float_weight

    def linear_error(*args):
        measure()
        return original_error(*args)

    def own_float_weight(source, checkpoint, prefix):
        weight = original_weight(source, checkpoint, prefix)
        current["index"] = int(prefix.split(".")[2])
        measure()  # an fp32 dequantized weight alive with everything else
        return weight

    monkeypatch.setattr(verify._FloatModel, "layer", layer)
    monkeypatch.setattr(verify._FloatModel, "run", staticmethod(run))
    monkeypatch.setattr(verify, "_linear_error", linear_error)
    monkeypatch.setattr(verify, "own_float_weight", own_float_weight)
    baseline = live_cpu_tensor_bytes()
    report = verify.verify_checkpoint(path, progress=False)
    assert report.worst_layer_error < 0.05 and len(report.layers) == 10 * 4
    # per layer: built, own run, served run, 7 dequantized shards twice, 4 layer errors
    assert len(peaks) == len(measured_layers) * (3 + 14 + 4)
    assert max(peaks) <= bound, (max(peaks), bound, float_model)
    assert max(peaks) >= float_layer  # the measurement sees the layer


# -- the streamed float model is transformers' model -------------------------------------------------

def streamed_float_logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    config = load_config(path)
    checkpoint = SafetensorsCheckpoint(path)
    model = verify._FloatModel(path, torch.bfloat16)
    contexts = [model.context(ids.shape[1])]
    hidden = model.embed(checkpoint, [ids])
    for index, part in enumerate(verify._layer_parts(layout_from_config(config))):
        layer = model.layer(index, verify._layer_state(part, index, UnquantizedSource(), checkpoint, torch.bfloat16))
        hidden = model.run(layer, hidden, contexts)
    return model.logits(checkpoint, hidden)[0]


@pytest.mark.parametrize("name", ["qwen3-tiny-bf16", "qwen3moe-tiny-bf16", "bf16", "v2-bf16"])
def test_streamed_float_model_matches_transformers(name, deepseek):
    from transformers import AutoModelForCausalLM

    path = deepseek.get(name) or msmodelslim_fixture(name)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = whole(input_ids=ids).logits[0].float()
    got = streamed_float_logits(path, ids)
    assert verify._rel(got, expected) < 1e-2  # same bf16 ops; the whole model may fuse or order them otherwise
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


# -- MLA ----------------------------------------------------------------------------------------------

def test_inspect_mla_bytes_equal_theoretical(capsys, deepseek):
    """W8A8_DYNAMIC linear: N * (K + 4) (int8 + fp32 scale per row); experts N * (K + 2) (bf16 scale);
    floats at 2 bytes, the V3 routing bias at 4; MLA's float w_kc / w_vc: a bf16 copy of kv_b_proj.
    tp=2: q_b / kv_b / gate_up split N, o / down split K, the fused q_a + kv_a replicated, w_kc / w_vc
    split by heads, experts split I (moe tp 2), embeddings and lm_head split by vocab."""
    h, heads, v = DS["hidden_size"], DS["num_attention_heads"], DS["vocab_size"]
    qa, kva, rope, nope, vd = (DS["q_lora_rank"], DS["kv_lora_rank"], DS["qk_rope_head_dim"], DS["qk_nope_head_dim"],
                               DS["v_head_dim"])
    inter, moe_i, experts = DS["intermediate_size"], DS["moe_intermediate_size"], DS["n_routed_experts"]

    def linear(n, k, tp_n=1, tp_k=1):
        return n // tp_n * (k // tp_k + 4)

    def model_bytes(tp):
        attn = (linear(qa + kva + rope, h) + linear(heads * (nope + rope), qa, tp) + linear(heads * (nope + vd), kva, tp)
                + linear(h, heads * vd, 1, tp) + heads * (nope + vd) * kva * 2 // tp)
        norms = (2 * h + qa + kva) * 2
        dense = linear(2 * inter, h, tp) + linear(h, inter, 1, tp)
        shared = linear(2 * moe_i, h, tp) + linear(h, moe_i, 1, tp)
        routed = experts * (2 * moe_i // tp * (h + 2) + h * (moe_i // tp + 2))
        router = experts * h * 2 + experts * 4
        return 2 * (attn + norms) + dense + shared + routed + router + 2 * v * h * 2 // tp + h * 2

    for tp in (1, 2):
        code, data = run_json(capsys, "inspect", deepseek["w8a8"], "--tp", str(tp))
        assert code == EXIT_OK and data["ok"] and not data["unused"]
        key = "resident_bytes" if tp == 1 else "resident_bytes_per_device"
        assert data["memory"][key] == model_bytes(tp)
    modules = {(g["layers"], g["module"]) for g in data["groups"]}
    assert {("0-1", "self_attn.fused_qkv_a_proj_with_mqa"), ("0-1", "self_attn.kv_b_proj"), ("0", "mlp.gate_up_proj"),
            ("1", "mlp.experts"), ("1", "mlp.shared_experts.down_proj")} <= modules


@pytest.mark.parametrize("version, attention", [("", ("fused_qkv_a_proj_with_mqa", "q_b_proj")),
                                                ("v2-", ("q_proj", "kv_a_proj_with_mqa"))])
def test_verify_mla_passes(capsys, deepseek, version, attention):
    code, data = run_json(capsys, "verify", deepseek[f"{version}w8a8"], "--reference", deepseek[f"{version}bf16"])
    assert code == EXIT_OK and data["passed"]
    prefixes = {layer["prefix"] for layer in data["layers"]}
    assert {f"model.layers.0.self_attn.{m}" for m in attention} <= prefixes
    assert {"model.layers.1.self_attn.kv_b_proj", "model.layers.1.mlp.experts",
            "model.layers.1.mlp.shared_experts.gate_up_proj"} <= prefixes
    assert 0 < data["worst_layer_error"] < 0.03  # int8 per-token activations
    assert all(layer["resident_bytes"] == layer["theoretical_bytes"] for layer in data["layers"])
    assert data["top1_agreement"] >= 0.9 and data["logit_rel_error"] < 0.06


def test_verify_mla_fails_on_wrong_scales(capsys, deepseek, tmp_path):
    """kv_b_proj's and o_proj's scales x8: served faithfully (layer errors small), far from the bf16 model."""
    from safetensors.torch import load_file, save_file

    import shutil

    path = tmp_path / "w8a8-wrong"
    shutil.copytree(deepseek["w8a8"], path)
    weights = path / "quant_model_weights.safetensors"
    tensors = load_file(weights)
    for name in list(tensors):
        if name.endswith(("kv_b_proj.weight_scale", "o_proj.weight_scale")):
            tensors[name] = tensors[name] * 8
    save_file(tensors, weights, metadata={"format": "pt"})
    code, data = run_json(capsys, "verify", str(path), "--reference", deepseek["bf16"])
    assert code == EXIT_ABOVE_THRESHOLD and not data["passed"]
    assert data["worst_layer_error"] < 0.03 and data["top1_agreement"] < 0.8
    wrong = [layer for layer in data["layers"] if layer["prefix"].endswith(("kv_b_proj", "o_proj"))]
    assert len(wrong) == 4 and all(layer["weight_rel_error"] > 6 for layer in wrong)


# -- tp > 1 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, tp, ep", [("qwen3-tiny-w8a16", 2, 1), ("qwen3-tiny-w8a8-dynamic", 4, 1),
                                          ("qwen3moe-tiny-w8a8-v0", 2, 2), ("w8a8", 2, 1), ("v2-w8a8", 4, 2)])
def test_verify_tp_equals_tp1(capsys, deepseek, name, tp, ep):
    path = deepseek.get(name) or msmodelslim_fixture(name)
    code, data = run_json(capsys, "verify", path, "--tp", str(tp), "--ep", str(ep))
    assert code == EXIT_OK and data["passed"] and data["tp"] == tp
    for layer in data["layers"]:
        if layer["prefix"].endswith(("fused_qkv_a_proj_with_mqa", "kv_a_proj_with_mqa")):  # replicated
            assert layer["tp_error"] is None
        elif layer["prefix"].endswith(("o_proj", "down_proj")) and "W8A16" not in layer["scheme"]:
            # each rank quantizes its own slice of K per token: within the layer's own quantization error
            assert layer["tp_error"] <= 1.5 * layer["rel_error"] + 0.005
        else:  # column ranks compute tp=1's columns; weight-only rows and experts: bf16 partial sums
            assert layer["tp_error"] < 0.01, layer


def test_verify_tp_catches_a_wrong_rank_slice(capsys, monkeypatch):
    """Every row-parallel rank loading rank 0's slice of K: tp=1 is unaffected, the ranks' sum is not."""
    from sgl_ascend.layers.parameters import ShardedParameter

    original = ShardedParameter.load_row_parallel_weight
    monkeypatch.setattr(ShardedParameter, "load_row_parallel_weight",
                        lambda self, loaded, tp_rank=0, **kw: original(self, loaded, 0, **kw))
    code, data = run_json(capsys, "verify", msmodelslim_fixture("qwen3-tiny-w8a16"), "--tp", "2")
    assert code == EXIT_ABOVE_THRESHOLD and not data["passed"]
    assert data["worst_layer_error"] < 0.01 and data["worst_tp_error"] > 0.5
    rows = {layer["prefix"].rpartition(".")[2] for layer in data["layers"] if layer["tp_error"] > 0.5}
    assert rows == {"o_proj", "down_proj"}
