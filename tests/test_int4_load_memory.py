"""Peak memory of dense int4 layers loaded in SGLang's order: build every layer, load every tensor,
then process every layer (so all layers are loaded before any is processed).

Measured as tests/test_moe_memory.py does (VmHWM after clear_refs, every tensor of 64 KiB or more
its own mmap; checkpoint tensors made fresh on every get(), as reads from disk). Asserted: peak <=
final resident bytes + the largest single checkpoint tensor + 1 MiB (allocator and interpreter
noise), and final == theoretical within 2%. A weight held in the checkpoint layout until processing
fails it: all layers' one-value-per-byte copies exist at once. Measured (Linux x86-64, torch 2.13
CPU, 2 decoder layers at tp rank 1 of 2, final 4.2 MiB): peak - final 2.2-2.6 MiB for W4A4 (largest
tensor 2 MiB), 1.2-1.4 MiB for CT W4A16 (largest 1 MiB); before the weights were packed while
loading (int8 / int32 checkpoint layout until processing, 1M values packed per call): 25 / 22 MiB.
"""

import ctypes
import gc
import os
from dataclasses import dataclass

import pytest
import torch

from helpers.linear import layer_spec
from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.linear import ParallelLinear, load_linear
from sgl_ascend.layers.schemes.ct_wna16 import CTWNA16Linear
from sgl_ascend.layers.schemes.w4a4_dynamic import W4A4DynamicLinear
from sgl_ascend.quant.checkpoint import TensorInfo, tensors_under
from sgl_ascend.tools.plan import resident_bytes
from helpers.memory import MIB, status

# qkv with 1 kv head at tp 2 (replicated k/v), gate_up (merged), o_proj and down_proj (row-parallel)
DIMS = dict(hidden=1024, inter=2048, heads=16, kv_heads=1, head_dim=64)
KINDS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
TP_RANK, TP_SIZE = 1, 2

pytestmark = pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux clear_refs")


def _shard_shapes(dims):
    """checkpoint prefix suffix -> full [N, K] of that projection."""
    h, i, q, kv = dims["hidden"], dims["inter"], dims["heads"] * dims["head_dim"], dims["kv_heads"] * dims["head_dim"]
    return {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}


def _w4a4_tensors(n, k):
    return {"weight": (torch.int8, (n, k)), "weight_scale": (torch.float32, (n, 1)),
            "weight_offset": (torch.float32, (n, 1))}


def _ct_w4a16_tensors(n, k):
    return {"weight_packed": (torch.int32, (n, k // 8)), "weight_scale": (torch.bfloat16, (n, k // 128)),
            "weight_shape": (torch.int64, (2,))}


SCHEMES = {"W4A4_DYNAMIC": (W4A4DynamicLinear, _w4a4_tensors),
           "CT W4A16 g128": (lambda: CTWNA16Linear(4, 128, symmetric=True, packed=True), _ct_w4a16_tensors)}


@dataclass
class SyntheticCheckpoint:
    """int4 checkpoint tensors of `layers` decoder layers, generated on every get()."""

    infos: dict
    dims: dict
    path: str = "<synthetic>"
    index_file: str = None

    @classmethod
    def make(cls, tensors, layers, dims):
        infos = {}
        for layer in range(layers):
            for proj, (n, k) in _shard_shapes(dims).items():
                for suffix, (dtype, shape) in tensors(n, k).items():
                    name = f"model.layers.{layer}.{proj}.{suffix}"
                    infos[name] = TensorInfo(name, "<synthetic>", dtype, shape)
        return cls(infos, dims)

    def with_prefix(self, prefix):
        return tensors_under(self.infos, prefix)

    def get(self, name):
        info = self.infos[name]
        gen = torch.Generator().manual_seed(hash(name) % (1 << 31))
        if name.endswith("weight_shape"):
            shapes = _shard_shapes(self.dims)
            return torch.tensor(shapes[name.split(".", 3)[3].rpartition(".")[0]], dtype=torch.int64)
        if info.dtype == torch.int8:
            return torch.randint(-8, 8, info.shape, dtype=torch.int8, generator=gen)
        if info.dtype == torch.int32:  # any bit pattern is eight valid int4 values
            return torch.randint(-2**31, 2**31, info.shape, dtype=torch.int32, generator=gen)
        if "offset" in name:
            return torch.zeros(info.shape, dtype=info.dtype)
        return (torch.rand(info.shape, generator=gen) * 0.01).to(info.dtype)


def _load_in_sglang_order(scheme, checkpoint, layers, dims):
    specs = [layer_spec(kind, layer, TP_SIZE, **dims) for layer in range(layers) for kind in KINDS]
    built = [ParallelLinear(scheme=scheme(), prefix=prefix, tp_rank=TP_RANK, tp_size=TP_SIZE, **kwargs)
             for prefix, kwargs, _ in specs]
    for layer, (_, _, shards) in zip(built, specs):
        load_linear(layer, checkpoint, shards, process=False)
    for layer in built:
        layer.scheme.process_weights_after_loading(layer)
    return built


@pytest.mark.parametrize("name", list(SCHEMES))
def test_int4_layers_load_into_the_kernel_layout(name):
    scheme, tensors = SCHEMES[name]
    assert ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024) == 1  # M_MMAP_THRESHOLD
    small = dict(hidden=256, inter=512, heads=4, kv_heads=1, head_dim=64)
    # one-time runtime set-up (torch's thread pool) is not the layers'
    _load_in_sglang_order(scheme, SyntheticCheckpoint.make(tensors, 1, small), 1, small)
    checkpoint = SyntheticCheckpoint.make(tensors, 2, DIMS)
    gc.collect()
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    layers = _load_in_sglang_order(scheme, checkpoint, 2, DIMS)
    peak = status("VmHWM") - before
    final = sum(resident_bytes(layer) for layer in layers)
    theoretical = sum(layer.scheme.theoretical_bytes(layer.input_size_per_partition,
                                                     sum(layer.output_partition_sizes)) for layer in layers)
    largest = max(info.nbytes for info in checkpoint.infos.values())
    print(f"{name}: final {final / MIB:.2f} MiB, peak {peak / MIB:.2f} MiB, peak - final "
          f"{(peak - final) / 1024:.0f} KiB, largest checkpoint tensor {largest / 1024:.0f} KiB")
    assert abs(final - theoretical) <= 0.02 * theoretical
    assert peak <= final + largest + MIB


def test_int4_range_is_checked_per_shard_while_loading():
    dims = dict(hidden=256, inter=512, heads=4, kv_heads=1, head_dim=64)
    checkpoint = SyntheticCheckpoint.make(_w4a4_tensors, 1, dims)
    bad, get = "model.layers.0.mlp.up_proj.weight", checkpoint.get

    def get_with_a_bad_value(name):
        tensor = get(name)
        if name == bad:
            tensor[3, 5] = 9
        return tensor
    checkpoint.get = get_with_a_bad_value
    prefix, kwargs, shards = layer_spec("gate_up_proj", 0, TP_SIZE, **dims)
    layer = ParallelLinear(scheme=W4A4DynamicLinear(), prefix=prefix, tp_rank=0, tp_size=TP_SIZE, **kwargs)
    with pytest.raises(CheckpointError, match=r"values span \[.*, 9\]") as info:
        load_linear(layer, checkpoint, shards, process=False)  # rank 0's rows hold the bad value
    assert bad in str(info.value)
