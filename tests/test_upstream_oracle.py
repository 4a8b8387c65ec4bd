"""The upstream oracle: SGLang 0.5.23's NPU quantization methods (run on Ascend hardware upstream)
against our contract-checked torch.ops.npu twins and against our layers, scheme by scheme.

For every scheme both serve, on the same checkpoint and bf16 input:
 (a) upstream's calls pass the twins' contract checks (a failure means the twin / contract is wrong,
     unless upstream's call is outside the documented contract);
 (b) our layer's output equals upstream's within the scheme's stated tolerance;
 (c) our forward makes no more torch.ops.npu calls than upstream's (counts printed as a table).
Schemes upstream lacks on NPU (compressed-tensors static W8A8: NPUCompressedTensorsW8A8Int8 raises
NotImplementedError; compressed-tensors dense W4A8: no NPU scheme) have no oracle.
Helpers: tests/helpers/upstream_oracle.py.
"""

import pytest
import torch

from helpers.common import msmodelslim_fixture
from helpers.linear import fixture_layer
from helpers.upstream_oracle import (MOE_PREFIX, count_npu_ops, enter_upstream_env, max_diff, op_table,
                                     upstream_ct_w8a8_dynamic_linear, upstream_modelslim_linear, upstream_modelslim_moe,
                                     upstream_w4a8_clip_moe, w4a4_moe_checkpoint, w4a8_clip_checkpoint)

pytest.importorskip("sglang")
pytestmark = pytest.mark.sglang

from sgl_ascend.layers.registry import linear_scheme
from sgl_ascend.ops.contract import NpuContractError  # noqa: E402

TOKENS = 8
KINDS = ("qkv_proj", "gate_up_proj", "o_proj", "down_proj")
# Our-vs-upstream tolerance, as max |ours - upstream| / max |upstream| over the layer's output
# (why each differs at all is stated at its test).
LINEAR_TOL = {"qwen3-tiny-w8a8": 2e-2, "qwen3moe-tiny-w8a8-v0": 2e-2, "qwen3-tiny-w8a8-dynamic": 1e-2,
              "qwen3-tiny-w4a4-dynamic": 1e-2}
LINEAR_CASES = [(f, k) for f in sorted(LINEAR_TOL) for k in (("qkv_proj", "o_proj") if "moe" in f else KINDS)]
# MoE with int8 activations: upstream requantizes the SwiGLU output inside npu_dequant_swiglu_quant
# (from fp32), ours quantizes npu_swiglu's bf16 output: some down-projection inputs are one int8 step
# apart (measured 0.6-0.8% of max |out|). W4A4 runs the same op chain on both sides (exact).
MOE_TOL = 2e-2
OP_ROWS = []  # (scheme, ours counter, upstream counter), printed at the end of the module


@pytest.fixture(autouse=True)
def upstream_env(monkeypatch):
    enter_upstream_env(monkeypatch)


@pytest.fixture(scope="module", autouse=True)
def print_op_table(request):
    yield
    if OP_ROWS:  # to the terminal, so the table shows without -s
        text = "\n\ntorch.ops.npu calls per layer forward, ours vs SGLang 0.5.23's NPU methods\n"
        text += op_table(OP_ROWS)
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if capture is None or reporter is None:
            print(text)
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(text)


def _inputs(k, tokens=TOKENS, seed=0):
    return torch.randn(tokens, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _ours(name, up_ops, build, call):
    """Our layer's output and op counts (a contract violation of ours fails the test)."""
    return count_npu_ops(call, build())


def _compare(name, ours, ours_ops, up, up_ops, tol):
    OP_ROWS.append((name, ours_ops, up_ops))
    assert ours.dtype == up.dtype == torch.bfloat16 and ours.shape == up.shape
    rel = max_diff(ours, up) / up.float().abs().max().item()
    print(f"{name}: max |ours - upstream| = {max_diff(ours, up):.4g} ({rel:.3g} of max |upstream|, tol {tol})")
    assert rel <= tol, name
    assert ours_ops.total <= up_ops.total, (name, dict(ours_ops.counts), dict(up_ops.counts))


# -- msModelSlim dense linears ---------------------------------------------------------------------
# W8A8 static (qwen3-tiny-w8a8; qwen3moe-tiny-w8a8-v0's attention, whose q_proj float bias is
#   folded into quant_bias, which both use): upstream holds input_scale / input_offset in params_dtype (bf16) and multiplies by the
#   bf16 reciprocal 1/input_scale (modelslim_w8a8_int8.py:74-86, linear_method_npu.py:80-106): up to
#   2^-8 relative off x / input_scale, so some int8 activations land one step apart from ours.
# W8A8_DYNAMIC / W4A4_DYNAMIC: upstream holds weight_scale in params_dtype (bf16, 2^-9 relative).

@pytest.mark.parametrize("fixture,kind", LINEAR_CASES)
def test_modelslim_linear(fixture, kind):
    path = msmodelslim_fixture(fixture)
    scheme, layer, bias = upstream_modelslim_linear(path, kind)
    x = _inputs(layer.weight.shape[0])  # processed weight: [K, N] int8 or [K, N/8] int32
    # (a) upstream's calls pass the contract (NpuContractError would fail here)
    up, up_ops = count_npu_ops(scheme.apply_weights, layer, x, bias)
    name = f"{fixture} {kind}"
    ours, ours_ops = _ours(name, up_ops, lambda: fixture_layer(fixture, kind), lambda m: m(x))
    _compare(name, ours, ours_ops, up, up_ops, LINEAR_TOL[fixture])



# -- msModelSlim MoE ---------------------------------------------------------------------------------
# Same checkpoint values on both sides (upstream's scale dtypes hold them exactly: bf16 scales of the
# V0 W8A8 file, int64 fp32 bits for int4 experts): outputs differ by summation order and the bf16
# hand-offs only. Group-wise W4A8 (qwen3moe-tiny-w4a8-dynamic-g64) has no oracle: upstream's modelslim
# path builds its MoE schemes per-channel (modelslim.py:415-420 `cls(self, weight_group)`, group_size 0).

def _moe_inputs(tokens=16, seed=0):
    from helpers.moe_reference import routing

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 128, generator=gen).to(torch.bfloat16)
    weights, ids = routing(tokens, 4, 2, gen)
    return x, weights, ids


def _our_moe(path, inter=64):
    from sgl_ascend.layers.moe import build_moe, moe_method_for_modelslim
    from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint
    from sgl_ascend.quant.modelslim import ModelSlimConfig

    return build_moe(moe_method_for_modelslim(ModelSlimConfig.from_dir(path), MOE_PREFIX),
                     SafetensorsCheckpoint(path), MOE_PREFIX, num_experts=4, hidden_size=128, intermediate_size=inter)


def _check_moe(name, path, upstream):
    x, weights, ids = _moe_inputs()
    up, up_ops = count_npu_ops(upstream, x, weights, ids)  # (a): raises NpuContractError if upstream breaks it
    ours, ours_ops = _ours(name, up_ops, lambda: _our_moe(path), lambda layer: layer(x, weights, ids))
    _compare(name, ours, ours_ops, up, up_ops, MOE_TOL)


@pytest.mark.parametrize("fixture", ["qwen3moe-tiny-w8a8-v0", "qwen3moe-tiny-w4a8-dynamic"])
def test_modelslim_moe(fixture):
    path = msmodelslim_fixture(fixture)
    _check_moe(f"{fixture} MoE", path, upstream_modelslim_moe(path))


def test_w4a8_moe_activation_clip(tmp_path):
    """The per-channel W4A8 fixture in activation-clip form; upstream's clip path is
    NPUCompressedTensorsW4A8Int8DynamicMoE (int64 scales, w13_bias / w2_bias used as the matmul bias)."""
    path = w4a8_clip_checkpoint(msmodelslim_fixture("qwen3moe-tiny-w4a8-dynamic"), str(tmp_path / "clip"))
    _check_moe("W4A8 MoE activation clip", path, upstream_w4a8_clip_moe(path))


def test_w4a4_moe(tmp_path):
    path = w4a4_moe_checkpoint(str(tmp_path / "w4a4"), torch.Generator().manual_seed(0))
    _check_moe("W4A4_DYNAMIC MoE (synthetic)", path, upstream_modelslim_moe(path))


# -- compressed-tensors dense W8A8 dynamic -------------------------------------------------------------
# Upstream on NPU: NPUCompressedTensorsW8A8Int8 -> NPUW8A8Int8DynamicLinearMethod (fp32 weight scales,
# as the checkpoint holds them): same values on both sides.
CT_LAYERS = {  # fused layer -> (parallel, shards, input size, output sizes)
    "self_attn.qkv_proj": ("column", {s: f"model.layers.0.self_attn.{s}_proj" for s in "qkv"}, 128, [128, 64, 64]),
    "self_attn.o_proj": ("row", {None: "model.layers.0.self_attn.o_proj"}, 128, [128]),
    "mlp.gate_up_proj": ("column", {0: "model.layers.0.mlp.gate_proj", 1: "model.layers.0.mlp.up_proj"}, 128,
                         [256, 256]),
    "mlp.down_proj": ("row", {None: "model.layers.0.mlp.down_proj"}, 256, [128]),
}
CT_TOL = 1e-2


@pytest.fixture(scope="module")
def ct_checkpoints(tmp_path_factory):
    from helpers.ct import SCHEMES, Qwen3LayerLinears, quantize_with_library, write_checkpoint

    out = {}
    for name in ("w8a8_dynamic", "w8a8_dynamic_tensor"):
        model = Qwen3LayerLinears(128, 256, 4, 2, 32, generator=torch.Generator().manual_seed(0))
        tensors, qconfig, _ = quantize_with_library(model, SCHEMES[name])
        out[name] = write_checkpoint(str(tmp_path_factory.mktemp(name)), tensors, qconfig)
    return out


def _our_ct_linear(path, fused):
    from sgl_ascend.layers.linear import ParallelLinear, QKVSizes, load_linear
    from sgl_ascend.quant import compressed_tensors as ct
    from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint

    parallel, shards, k, sizes = CT_LAYERS[fused]
    qkv = QKVSizes(4, 2, 32, 1) if fused.endswith("qkv_proj") else None
    prefix = f"model.layers.0.{fused}"
    layer = ParallelLinear(k, qkv.full_sizes if qkv else sizes,
                           linear_scheme(ct.CompressedTensorsConfig.from_dir(path), prefix), parallel=parallel,
                           prefix=prefix, params_dtype=torch.bfloat16, qkv=qkv)
    load_linear(layer, SafetensorsCheckpoint(path), shards)
    return layer


CT_CASES = [("w8a8_dynamic", f) for f in CT_LAYERS] + [("w8a8_dynamic_tensor", "self_attn.o_proj"),
                                                         ("w8a8_dynamic_tensor", "mlp.down_proj")]


@pytest.mark.parametrize("scheme,fused", CT_CASES)
def test_ct_w8a8_dynamic_linear(ct_checkpoints, scheme, fused):
    path = ct_checkpoints[scheme]
    _, shards, k, sizes = CT_LAYERS[fused]
    strategy = "tensor" if scheme.endswith("tensor") else "channel"
    up_scheme, layer = upstream_ct_w8a8_dynamic_linear(path, shards, k, sizes, strategy)
    x = _inputs(k)
    up, up_ops = count_npu_ops(up_scheme.apply_weights, layer, x, None)
    name = f"ct {scheme} {fused}"
    ours, ours_ops = _ours(name, up_ops, lambda: _our_ct_linear(path, fused), lambda m: m(x))
    _compare(name, ours, ours_ops, up, up_ops, CT_TOL)


def test_ct_w8a8_per_tensor_fused_upstream_is_outside_the_contract(ct_checkpoints):
    """Upstream's NPU kernel hands a fused per-tensor layer's scale as one value per shard (its NPU
    process_weights_after_loading skips the per-channel expansion the CUDA scheme does), a [3] scale
    for n = 256: npu_quant_matmul documents scale as [1] or [n] (DOC:4969). No oracle for this case;
    we expand to [n] (sgl_ascend/layers/schemes/ct_w8a8_dynamic.py)."""
    _, shards, k, sizes = CT_LAYERS["self_attn.qkv_proj"]
    up_scheme, layer = upstream_ct_w8a8_dynamic_linear(ct_checkpoints["w8a8_dynamic_tensor"], shards, k, sizes,
                                                       "tensor")
    assert tuple(layer.weight_scale.shape) == (3,)
    with pytest.raises(NpuContractError, match="scale must be 1-D of 1 or n=256"):
        up_scheme.apply_weights(layer, _inputs(k), None)
