"""Every served expert scheme as a small test case: its checkpoint (a real msmodelslim fixture, a copy
of one rewritten into another form, or one written with the compressed-tensors library), the
scheme pair serving it, and the float experts + activation bits + W4A8 residuals of its reference
(tests/helpers/moe_reference.py). Shared by the contract, routing and graph-safety tests."""

import contextlib
import os
import os.path
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from helpers.common import msmodelslim_fixture, rewrite_modelslim
from helpers.moe_checkpoints import w4a8_clip_copy
from helpers.moe_reference import int_dequant, modelslim_moe_dequant, modelslim_w4a8_residuals, moe_reference, routing
from sgl_ascend.layers.moe import (FusedMoEMethod, UnquantizedExperts, build_moe, moe_method_for_compressed_tensors,
                                   moe_method_for_modelslim)
from sgl_ascend.layers.moe.routing import ROUTING_ENV
from sgl_ascend.ops.int4 import unpack_int8_pairs
from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint
from sgl_ascend.quant.modelslim import ModelSlimConfig

PREFIX = "model.layers.0.mlp"
PROJS = ("gate_proj", "up_proj", "down_proj")
E, H = 4, 128
CASES = ("w8a8", "w4a8", "w4a8-group", "w4a8-clip", "w4a8-older", "w4a4", "bf16", "mixed-w4a8-w8a8",
         "ct-w4a8", "ct-w4a8-group", "ct-w4a8-clip", "ct-w4a16-group", "ct-w4a16-channel-asym")
PARALLEL = {"tp1": (1, 1), "tp2": (2, 1), "ep2": (1, 2)}


@dataclass
class Case:
    name: str
    method: Callable[[], FusedMoEMethod]
    ckpt: object
    inter: int
    experts: list
    act_bits: tuple = (8, 8)
    residuals: Optional[list] = None

    def reference(self, x, w, ids, tp=1, ep=1):
        return moe_reference(x, w, ids, self.experts, act_bits=self.act_bits, tp=tp, ep=ep, residuals=self.residuals,
                             dtype=x.dtype)

    def layer(self, tp=1, ep=1, rank=0, routing="v2"):
        with routing_env(routing):
            return build_moe(self.method(), self.ckpt, PREFIX, num_experts=E, hidden_size=H,
                             intermediate_size=self.inter, tp_rank=rank if tp > 1 else 0, tp_size=tp,
                             ep_rank=rank if ep > 1 else 0, ep_size=ep)

    def run(self, x, w, ids, tp=1, ep=1, routing="v2"):
        """Sum of the ranks' partial outputs (what the all-reduce produces)."""
        total = None
        for rank in range(max(tp, ep)):
            out = self.layer(tp, ep, rank, routing)(x, w, ids).float()
            total = out if total is None else total + out
        return total


@contextlib.contextmanager
def routing_env(value):
    old = os.environ.get(ROUTING_ENV)
    os.environ[ROUTING_ENV] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[ROUTING_ENV]
        else:
            os.environ[ROUTING_ENV] = old


def inputs(gen, tokens=16, dtype=torch.bfloat16):
    x = torch.randn(tokens, H, generator=gen).to(dtype)
    w, ids = routing(tokens, E, 2, gen)
    return x, w.to(dtype), ids


def experts_of(ckpt, dequant):
    return [tuple(dequant(ckpt, f"{PREFIX}.experts.{e}.{p}") for p in PROJS) for e in range(E)]


# -- rewritten msmodelslim fixtures ------------------------------------------------------------------

def copy_fixture(dst, fixture, rewrite=None, description_edit=None):
    """A copy of a fixture with some tensors rewritten (name -> tensor or None to drop), its description edited."""
    return rewrite_modelslim(msmodelslim_fixture(fixture), str(dst), rewrite, description_edit)


def clip_copy(dst, fixture="qwen3moe-tiny-w4a8-dynamic"):
    """The fixture's experts in the activation-clip form: bias = summed scale_bias, alpha 1, no scale_bias."""
    return w4a8_clip_copy(msmodelslim_fixture(fixture), str(dst))


def older_copy(dst, fixture="qwen3moe-tiny-w4a8-dynamic"):
    """Older writers (no description version): one int4 per byte."""
    def unpack(name, t):
        return unpack_int8_pairs(t, 0) if name.endswith("proj.weight") and ".experts." in name else t

    return copy_fixture(dst, fixture, unpack, lambda d: d.pop("version"))


def mixed_copy(dst):
    """gate/up W4A8_DYNAMIC (per-channel fixture) with down W8A8_DYNAMIC (V0 fixture, same model)."""
    w8 = SafetensorsCheckpoint(msmodelslim_fixture("qwen3moe-tiny-w8a8-v0"))

    def take_down(name, t):
        if ".experts." in name and ".down_proj." in name:
            return w8.get(name) if name in w8 else None
        return t

    def types(d):
        for name in w8.names():
            if ".experts." in name and ".down_proj." in name:
                d[name] = "W8A8_DYNAMIC"
        for name in list(d):
            if ".down_proj.scale_bias" in name:
                del d[name]

    return copy_fixture(dst, "qwen3moe-tiny-w4a8-dynamic", take_down, types)


# -- the cases -----------------------------------------------------------------------------------------

def _modelslim(name, path, inter, dequant, act_bits=(8, 8), residual_ckpt=None, params_dtype=torch.bfloat16):
    ckpt, config = SafetensorsCheckpoint(path), ModelSlimConfig.from_dir(path)
    residuals = modelslim_w4a8_residuals(residual_ckpt, PREFIX, E) if residual_ckpt is not None else None
    return Case(name, lambda: moe_method_for_modelslim(config, PREFIX, params_dtype), ckpt, inter,
                experts_of(ckpt, dequant), act_bits, residuals)


def build_case(name, tmp, gen, params_dtype=torch.bfloat16) -> Case:
    """tmp: a directory for rewritten checkpoints; gen: a torch.Generator."""
    from helpers.moe_checkpoints import GROUP_SCHEME, make_checkpoint, w4a4_checkpoint

    w4a8 = msmodelslim_fixture("qwen3moe-tiny-w4a8-dynamic")
    if name == "w8a8":
        path = msmodelslim_fixture("qwen3moe-tiny-w8a8-v0")
        return _modelslim(name, path, 64, int_dequant, params_dtype=params_dtype)
    if name == "w4a8":
        return _modelslim(name, w4a8, 64, modelslim_moe_dequant, residual_ckpt=SafetensorsCheckpoint(w4a8))
    if name == "w4a8-group":
        path = msmodelslim_fixture("qwen3moe-tiny-w4a8-dynamic-g64")
        return _modelslim(name, path, 128, modelslim_moe_dequant, residual_ckpt=SafetensorsCheckpoint(path))
    if name in ("w4a8-clip", "w4a8-older"):
        path = (clip_copy if name == "w4a8-clip" else older_copy)(os.path.join(tmp, name))
        case = _modelslim(name, path, 64, modelslim_moe_dequant, residual_ckpt=SafetensorsCheckpoint(w4a8))
        case.experts = experts_of(SafetensorsCheckpoint(w4a8), modelslim_moe_dequant)  # the same experts
        return case
    if name == "mixed-w4a8-w8a8":
        path = mixed_copy(os.path.join(tmp, name))
        ckpt = SafetensorsCheckpoint(path)
        case = _modelslim(name, path, 64, modelslim_moe_dequant)
        case.experts = [(modelslim_moe_dequant(ckpt, f"{PREFIX}.experts.{e}.gate_proj"),
                         modelslim_moe_dequant(ckpt, f"{PREFIX}.experts.{e}.up_proj"),
                         int_dequant(ckpt, f"{PREFIX}.experts.{e}.down_proj")) for e in range(E)]
        return case
    if name == "w4a4":
        from pathlib import Path

        path = Path(tmp) / name
        experts = w4a4_checkpoint(path, gen)
        ckpt, config = SafetensorsCheckpoint(str(path)), ModelSlimConfig.from_dir(str(path))
        return Case(name, lambda: moe_method_for_modelslim(config, PREFIX), ckpt, 64, experts, (4, 4))
    if name == "bf16":
        ckpt = SafetensorsCheckpoint(msmodelslim_fixture("qwen3moe-tiny-bf16"))
        experts = experts_of(ckpt, lambda c, n: c.get(n + ".weight").float())
        return Case(name, lambda: FusedMoEMethod(UnquantizedExperts("w13"), UnquantizedExperts("w2")), ckpt, 64,
                    experts, (None, None))
    if name.startswith("ct-w4a16"):
        from pathlib import Path

        from helpers.moe_checkpoints import ct_w4a16_checkpoint, w4a16_scheme

        path = Path(tmp) / name
        scheme = w4a16_scheme() if name == "ct-w4a16-group" else w4a16_scheme(0, symmetric=False)
        qconfig, experts = ct_w4a16_checkpoint(path, gen, scheme)
        return Case(name, lambda: moe_method_for_compressed_tensors(qconfig, PREFIX, params_dtype),
                    SafetensorsCheckpoint(str(path)), 64, experts, (None, None))
    if name.startswith("ct-"):
        from pathlib import Path

        path = Path(tmp) / name
        kwargs = {"ct-w4a8": {}, "ct-w4a8-group": {"scheme": GROUP_SCHEME},
                  "ct-w4a8-clip": {"clip": True, "extra": False}}[name]
        qconfig, experts, residuals = make_checkpoint(path, gen, **kwargs)
        ckpt = SafetensorsCheckpoint(str(path))
        return Case(name, lambda: moe_method_for_compressed_tensors(qconfig, PREFIX), ckpt, 64, experts, (8, 8),
                    residuals)
    raise KeyError(name)
