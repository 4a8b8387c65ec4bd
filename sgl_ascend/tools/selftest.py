"""`sgl-ascend selftest`: every NPU op and every scheme's layer, run the way the NPU runs them.

On an Ascend host each op and each scheme's layer runs on the NPU (torch_npu) and through the CPU twin
with the same inputs; the difference per op and scheme is what tells whether the twins' reading of the
ops (docs/formats.md lists what no source settles) holds on this device. Report it.
On a CPU host the twin (through the registered torch.ops.npu contract) is compared with an independent
float reference instead: the op's documented formula written out in fp64, and each layer against its
checkpoint's own dequantized weights.

Inputs are seeded (the same numbers on every host); layers come from tiny synthetic msModelSlim and
compressed-tensors checkpoints written to a temporary folder (sgl_ascend/testing/synthetic.py).
"""

import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from sgl_ascend import ops as op_surface
from sgl_ascend.layers.linear import load_linear
from sgl_ascend.layers.moe import build_moe
from sgl_ascend.ops import twin
from sgl_ascend.ops.int4 import pack_int4_to_int32, unpack_int32_to_int4
from sgl_ascend.ops.scales import encode_fp32_as_int64
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint
from sgl_ascend.testing import synthetic
from sgl_ascend.tools.model_layout import layout_from_config, load_config
from sgl_ascend.tools.plan import build_linear, scheme_source
from sgl_ascend.tools.verify import own_float_weight

BF16 = torch.bfloat16


@dataclass
class Check:
    kind: str  # "op" or "scheme"
    name: str
    error: float  # relative error (float outputs) or fraction of differing values (integer outputs)
    tolerance: float
    compared: str  # what was compared with what

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance


def _error(got, want) -> float:
    """Relative L2 error of float outputs; fraction of differing elements of integer ones."""
    got, want = got.detach().cpu(), want.detach().cpu()
    if not want.is_floating_point():
        return (got != want).float().mean().item() if want.numel() else 0.0
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def _worst(got, want) -> float:
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    return max(_error(g, w) for g, w in zip(got, want))


# -- op cases: inputs and an independent fp64 reference of the documented formula --------------------

def _randint8(gen, *shape, low=-127, high=128):
    return torch.randint(low, high, shape, generator=gen, dtype=torch.int8)


def _case_dynamic_quant(gen):
    x = torch.randn(16, 64, generator=gen).to(BF16)

    def reference(x):
        scale = x.double().abs().amax(-1) / 127
        return torch.round(x.double() / scale[:, None]).to(torch.int8), scale.float()
    return (x,), {}, reference


def _case_dynamic_quant_int4(gen):
    x = torch.randn(16, 64, generator=gen).to(BF16)

    def reference(x, **_):
        scale = x.double().abs().amax(-1) / 7
        return pack_int4_to_int32(torch.round(x.double() / scale[:, None]).to(torch.int8)), scale.float()
    return (x,), {"dst_type": torch.quint4x2}, reference


def _case_quantize(gen):
    x = torch.randn(16, 64, generator=gen).to(BF16) * 4
    scale, offset = torch.tensor([8.0], dtype=BF16), torch.tensor([3.0], dtype=BF16)

    def reference(x, scale, offset, *_):  # div_mode=False rounds half away from zero
        y = x.double() * scale.double() + offset.double()
        return (torch.sign(y) * torch.floor(y.abs() + 0.5)).clamp(-128, 127).to(torch.int8)
    return (x, scale, offset, torch.qint8, -1, False), {}, reference


def _case_quant_matmul_pertoken(gen):
    a, w = _randint8(gen, 16, 64), _randint8(gen, 64, 48)
    scale, token = torch.rand(48, generator=gen).to(BF16) * 1e-3, torch.rand(16, generator=gen) * 1e-2

    def reference(a, w, scale, pertoken_scale, output_dtype):
        return (a.double() @ w.double() * scale.double() * pertoken_scale.double()[:, None]).to(BF16)
    return (a, w, scale), {"pertoken_scale": token, "output_dtype": BF16}, reference


def _case_quant_matmul_static(gen):
    a, w = _randint8(gen, 16, 64), _randint8(gen, 64, 48)
    scale, bias = torch.rand(48, generator=gen) * 1e-3, torch.randint(-500, 500, (48,), generator=gen,
                                                                      dtype=torch.int32)

    def reference(a, w, scale, bias, output_dtype):
        return ((a.double() @ w.double() + bias.double()) * scale.double()).to(BF16)
    return (a, w, scale), {"bias": bias, "output_dtype": BF16}, reference


def _case_quant_matmul_int4(gen):
    a = torch.randint(-8, 8, (16, 64), generator=gen, dtype=torch.int8)
    w = torch.randint(-8, 8, (64, 48), generator=gen, dtype=torch.int8)
    scale, token = torch.rand(48, generator=gen) * 1e-2, torch.rand(16, generator=gen) * 1e-1

    def reference(a, w, scale, pertoken_scale, output_dtype):
        av, wv = unpack_int32_to_int4(a).double(), unpack_int32_to_int4(w).double()
        return (av @ wv * scale.double() * pertoken_scale.double()[:, None]).to(BF16)
    return ((pack_int4_to_int32(a), pack_int4_to_int32(w), scale),
            {"pertoken_scale": token, "output_dtype": BF16}, reference)


def _case_weight_quant_batchmatmul(gen):
    x, w = torch.randn(16, 64, generator=gen).to(BF16), _randint8(gen, 64, 48)
    scale = (torch.rand(48, generator=gen) * 1e-2).to(BF16)
    offset = torch.randint(-3, 4, (48,), generator=gen).to(BF16)
    bias = torch.randn(48, generator=gen)

    def reference(x, w, scale, offset, bias):
        return (x.double() @ ((w.double() + offset.double()) * scale.double()) + bias.double()).to(BF16)
    return (x, w, scale, offset), {"bias": bias}, reference


def _case_grouped_matmul_w8a8(gen):
    experts, rows = 4, torch.tensor([3, 0, 7, 6])
    a, w = _randint8(gen, int(rows.sum()), 64), _randint8(gen, experts, 64, 32)
    scale = (torch.rand(experts, 32, generator=gen) * 1e-3).to(BF16)
    token = torch.rand(a.shape[0], generator=gen) * 1e-2

    def reference(x, weight, scale, per_token_scale, group_list, **_):
        owner = torch.repeat_interleave(torch.arange(experts), group_list)
        y = torch.einsum("mk,mkn->mn", x[0].double(), weight[0][owner].double())
        return (y * scale[0][owner].double() * per_token_scale[0].double()[:, None]).to(BF16)
    kwargs = dict(scale=[scale], per_token_scale=[token], group_list=rows, split_item=2, group_type=0,
                  group_list_type=1, output_dtype=BF16)
    return ([a], [w]), kwargs, reference


def _case_grouped_matmul_w4a8(gen):
    experts, rows = 4, torch.tensor([5, 2, 0, 9])
    a = _randint8(gen, int(rows.sum()), 64)
    q = torch.randint(-8, 8, (experts, 64, 32), generator=gen, dtype=torch.int8)
    scale = torch.rand(experts, 32, generator=gen) * 1e-3
    token = torch.rand(a.shape[0], generator=gen) * 1e-2
    correction = 8 * (q.double() * scale.double()[:, None, :]).sum(1).float()  # msModelSlim's scale_bias

    def reference(x, weight, group_list, per_token_scale, **_):
        owner = torch.repeat_interleave(torch.arange(experts), group_list)
        y = torch.einsum("mk,mkn->mn", x[0].double(), q[owner].double()) * scale.double()[owner]
        return (y * per_token_scale[0].double()[:, None]).to(BF16)
    kwargs = dict(scale=[encode_fp32_as_int64(scale)], bias=[correction], per_token_scale=[token], group_list=rows,
                  split_item=2, group_type=0, group_list_type=1, output_dtype=BF16)
    return ([a], [pack_int4_to_int32(q)]), kwargs, reference


def _case_swiglu(gen):
    x = torch.randn(16, 64, generator=gen).to(BF16)

    def reference(x):
        gate, up = x.double().chunk(2, -1)
        return (F.silu(gate) * up).to(BF16)
    return (x,), {}, reference


def _case_dequant_swiglu_quant(gen):
    x = torch.randn(16, 64, generator=gen).to(BF16)

    def reference(x, **_):
        gate, up = x.double().chunk(2, -1)
        h = F.silu(gate) * up
        scale = h.abs().amax(-1) / 127
        return torch.round(h / scale[:, None]).to(torch.int8), scale.float()
    return (x,), {"activate_left": True, "quant_mode": 1}, reference


def _routing_inputs(gen, tokens=8, top_k=2, experts=4):
    x = torch.randn(tokens, 32, generator=gen).to(BF16)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).to(torch.int32)
    return x, ids


def _case_moe_init_routing_v2(gen):
    x, ids = _routing_inputs(gen)

    def reference(x, ids, **_):
        order = sorted(range(ids.numel()), key=lambda p: (int(ids.reshape(-1)[p]), p))
        rows = x[[p // ids.shape[1] for p in order]]
        counts = torch.bincount(ids.reshape(-1).long(), minlength=4)
        return rows, counts
    kwargs = dict(active_num=ids.numel(), expert_num=4, expert_tokens_num_type=1, expert_tokens_num_flag=True,
                  active_expert_range=[0, 4], quant_mode=-1)
    return (x, ids), kwargs, reference


def _case_moe_finalize_routing(gen):
    x, ids = _routing_inputs(gen)
    probs = torch.rand(ids.shape, generator=gen).to(BF16)
    pairs = ids.numel()
    perm = torch.randperm(pairs, generator=gen).to(torch.int32)  # pair t*K+k lives in row perm[t*K+k]

    def reference(rows, *_, **__):
        picked = rows.double()[perm.long()].reshape(*ids.shape, -1)
        return (picked * probs.double()[..., None]).sum(1).to(BF16)
    rows = torch.randn(pairs, 32, generator=gen).to(BF16)
    return (rows, None, None, None, probs, perm, ids, 2), {}, reference


# label -> (op, case builder, tolerance)
OP_CASES: Dict[str, Tuple[str, Callable, float]] = {
    "npu_dynamic_quant int8": ("npu_dynamic_quant", _case_dynamic_quant, 0.01),
    "npu_dynamic_quant int4": ("npu_dynamic_quant", _case_dynamic_quant_int4, 0.01),
    "npu_quantize div_mode=False": ("npu_quantize", _case_quantize, 0.01),
    "npu_quant_matmul per-token": ("npu_quant_matmul", _case_quant_matmul_pertoken, 0.01),
    "npu_quant_matmul static int32 bias": ("npu_quant_matmul", _case_quant_matmul_static, 0.01),
    "npu_quant_matmul int4 x int4": ("npu_quant_matmul", _case_quant_matmul_int4, 0.01),
    "npu_weight_quant_batchmatmul": ("npu_weight_quant_batchmatmul", _case_weight_quant_batchmatmul, 0.01),
    "npu_grouped_matmul W8A8": ("npu_grouped_matmul", _case_grouped_matmul_w8a8, 0.01),
    "npu_grouped_matmul W4A8": ("npu_grouped_matmul", _case_grouped_matmul_w4a8, 0.01),
    "npu_swiglu": ("npu_swiglu", _case_swiglu, 0.01),
    "npu_dequant_swiglu_quant": ("npu_dequant_swiglu_quant", _case_dequant_swiglu_quant, 0.01),
    "npu_moe_init_routing_v2": ("npu_moe_init_routing_v2", _case_moe_init_routing_v2, 0.0),
    "npu_moe_finalize_routing": ("npu_moe_finalize_routing", _case_moe_finalize_routing, 0.01),
}


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _select_outputs(name: str, out):
    """The outputs an op's reference covers (routing: the rows and the per-expert counts)."""
    if name == "npu_moe_init_routing_v2":
        return out[0], out[2]
    if name == "npu_grouped_matmul":
        return out[0]
    return out


def run_op_checks(device: Optional[str]) -> List[Check]:
    checks = []
    for label, (name, make, tol) in OP_CASES.items():
        args, kwargs, reference = make(torch.Generator().manual_seed(0))
        twin_out = _select_outputs(name, getattr(op_surface.ops if device is None else twin, name)(*args, **kwargs))
        if device is None:
            checks.append(Check("op", label, _worst(twin_out, reference(*args, **kwargs)), tol,
                                "twin vs fp64 reference"))
        else:
            got = _select_outputs(name, getattr(torch.ops.npu, name)(*_to(args, device), **_to(kwargs, device)))
            checks.append(Check("op", label, _worst(got, twin_out), tol, f"{device} vs twin"))
    return checks


# -- scheme cases: tiny synthetic checkpoints through the serving layers -----------------------------------

TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            num_hidden_layers=1, vocab_size=256)
TINY_MOE = dict(TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
# Relative error of a layer against its own dequantized weights: activation quantization dominates
# (int8 ~1%, int4 ~15%); weight-only layers round once in bf16.
DENSE_TOLERANCE = {"FLOAT": 0.01, "W8A16": 0.01, "W8A8": 0.03, "W8A8_DYNAMIC": 0.03, "W4A8_DYNAMIC": 0.03,
                   "W4A4_DYNAMIC": 0.25, "CT W4A16": 0.01}
EXPERT_TOLERANCE = {"FLOAT": 0.01, "W8A8_DYNAMIC": 0.04, "W4A8_DYNAMIC": 0.04, "W4A4_DYNAMIC": 0.3}
DEVICE_TOLERANCE = 0.01  # device vs twin: a few bf16 roundings


def _dense_checks(path: str, label: str, tolerance: float, device: Optional[str], gen) -> List[Check]:
    config = load_config(path)
    source, checkpoint = scheme_source(path, config), SafetensorsCheckpoint(path)
    checks = []
    for spec in layout_from_config(config).linears:
        x = torch.randn(8, spec.input_size, generator=gen).to(BF16)
        name = f"{label} {spec.prefix.rpartition('.')[2]}"
        with op_surface.use_twins() if device else _nothing():
            layer = build_linear(spec, source, config)
            load_linear(layer, checkpoint, spec.shards)
            with torch.no_grad():
                served = layer(x)
        if device is None:
            weight = torch.cat([own_float_weight(source, checkpoint, s) for s in spec.shards.values()])
            checks.append(Check("scheme", name, _error(served, F.linear(x.double(), weight.double())), tolerance,
                                "layer vs its dequantized weights"))
            continue
        on_device = build_linear(spec, source, config, device=device)
        load_linear(on_device, checkpoint, spec.shards)
        with torch.no_grad():
            checks.append(Check("scheme", name, _error(on_device(x.to(device)), served), DEVICE_TOLERANCE,
                                f"{device} vs twin"))
    return checks


def _expert_checks(path: str, label: str, tolerance: float, device: Optional[str], gen) -> List[Check]:
    config = load_config(path)
    source, checkpoint = scheme_source(path, config), SafetensorsCheckpoint(path)
    checks = []
    for spec in layout_from_config(config).experts:
        mlp = spec.prefix.rpartition(".")[0]
        tokens, top_k = 8, 2
        x = torch.randn(tokens, spec.hidden_size, generator=gen).to(BF16)
        ids = torch.stack([torch.randperm(spec.num_experts, generator=gen)[:top_k] for _ in range(tokens)])
        weights = torch.rand(tokens, top_k, generator=gen).softmax(-1).to(BF16)

        def build(on):
            return build_moe(source.moe_method(mlp, config.params_dtype), checkpoint, mlp,
                             num_experts=spec.num_experts, hidden_size=spec.hidden_size,
                             intermediate_size=spec.intermediate_size, params_dtype=config.params_dtype).to(on)
        with op_surface.use_twins() if device else _nothing():
            with torch.no_grad():
                served = build("cpu")(x, weights, ids.to(torch.int32))
        if device is None:
            want = torch.zeros(tokens, spec.hidden_size, dtype=torch.float64)
            for e in range(spec.num_experts):
                def w(proj):
                    return own_float_weight(source, checkpoint, spec.expert_prefix(e, proj)).double()
                hidden = F.silu(x.double() @ w("gate_proj").t()) * (x.double() @ w("up_proj").t())
                routed = (ids == e).double() * weights.double()
                want += routed.sum(1, keepdim=True) * (hidden @ w("down_proj").t())
            checks.append(Check("scheme", f"{label} experts", _error(served, want), tolerance,
                                "experts vs their dequantized weights"))
            continue
        with torch.no_grad():
            got = build(device)(x.to(device), weights.to(device), ids.to(device, torch.int32))
        checks.append(Check("scheme", f"{label} experts", _error(got, served), DEVICE_TOLERANCE,
                            f"{device} vs twin"))
    return checks


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_scheme_checks(device: Optional[str]) -> List[Check]:
    gen = torch.Generator().manual_seed(0)
    checks = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, tol in DENSE_TOLERANCE.items():
            path = os.path.join(tmp, kind.replace(" ", "_"))
            if kind == "CT W4A16":
                synthetic.write_ct_w4a16(path, group_size=32, **TINY)
            else:
                synthetic.write_modelslim(path, kind, **TINY)
            checks += _dense_checks(path, f"{'compressed-tensors' if kind.startswith('CT') else 'msModelSlim'} "
                                          f"{kind.removeprefix('CT ')}", tol, device, gen)
        for kind, tol in EXPERT_TOLERANCE.items():
            path = os.path.join(tmp, f"moe-{kind}")
            synthetic.write_modelslim_moe(path, kind, **TINY_MOE)
            checks += _expert_checks(path, f"msModelSlim MoE {kind}", tol, device, gen)
    return checks


def run_selftest(device: Optional[str] = None) -> List[Check]:
    """All op and scheme checks; `device` None compares the twin with the references (CPU hosts)."""
    return run_op_checks(device) + run_scheme_checks(device)


def device_for_selftest() -> Optional[str]:
    return "npu" if op_surface.backend == "npu" else None


def format_checks(checks: List[Check]) -> str:
    rows = [("kind", "name", "compared", "error", "tolerance", "")]
    rows += [(c.kind, c.name, c.compared, f"{c.error:.2e}", f"{c.tolerance:g}", "ok" if c.passed else "FAIL")
             for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    failed = [c for c in checks if not c.passed]
    lines.append(f"selftest: {len(checks) - len(failed)} of {len(checks)} checks within tolerance"
                 + (f", {len(failed)} ABOVE" if failed else ""))
    return "\n".join(lines)


def checks_json(checks: List[Check]) -> List[dict]:
    return [{**asdict(c), "passed": c.passed} for c in checks]
