"""Tensor parallelism: the layer built for rank r holds exactly rank r's slice of every tensor, and
the ranks' outputs put together (concatenated for column layers, summed for row layers, as the
all-gather / all-reduce would) equal the tp=1 layer's output.

Slices are checked before processing against an independent slicing of the raw checkpoint tensors;
outputs after processing, in bf16 (the NPU kernels compute in bf16/fp16 only). Tolerances, in units
of one bf16 rounding (helpers.linear.tight_error): column ranks compute the tp=1 layer's columns,
each rounded once (TIGHT_COLUMNS: within one bf16 ulp = 2 units); row ranks' partial sums are each
rounded to bf16 before the (exact, here) all-reduce, so their error is relative to the sum of the
partials' magnitudes (TIGHT_PARTIALS).
"""

import pytest
import torch

from sgl_ascend.ops.int4 import unpack_int32_to_int4
from helpers.common import msmodelslim_fixture
from helpers.linear import (KV_HEADS, build_layer, calibrated_input, layer_reference, layer_spec, open_checkpoint,
                            rel_err, synthetic_qwen3, tight_error)

TIGHT_COLUMNS, TIGHT_PARTIALS = 2.1, 2.1
ALL_KINDS = ("column", "gate_up_proj", "qkv_proj", "o_proj", "down_proj")
CHECKPOINTS = {
    # name: (kinds it has, what it adds)
    "qwen3-tiny-w8a8": ALL_KINDS,               # per-shard input_scale/offset, quant_bias, deq_scale
    "qwen3-tiny-w8a8-dynamic": ALL_KINDS,       # per-channel weight_scale / weight_offset
    "qwen3-tiny-w8a16": ALL_KINDS,
    "qwen3-tiny-w4a4-dynamic": ALL_KINDS,       # column / gate_up are W4A4
    "qwen3moe-tiny-w8a8-v0": ("qkv_proj", "o_proj"),  # bf16 scales, FLOAT q/k/v bias
    "synthetic-W8A8_DYNAMIC-bias": ALL_KINDS,   # FLOAT bias on column and row layers
    "synthetic-W8A8-bias": ALL_KINDS,           # float bias folded into quant_bias, row included
    "synthetic-W4A4_DYNAMIC": ALL_KINDS,        # int4 row-parallel
    "synthetic-FLOAT-bias": ALL_KINDS,          # unquantized layers with a bias
}
CASES = [(name, kind) for name, kinds in CHECKPOINTS.items() for kind in kinds]


@pytest.fixture(scope="module")
def synthetic_dirs(tmp_path_factory):
    gen = torch.Generator().manual_seed(2)
    root = tmp_path_factory.mktemp("tp")
    return {"synthetic-W8A8_DYNAMIC-bias": synthetic_qwen3(str(root / "dyn"), "W8A8_DYNAMIC", gen, float_bias=True),
            "synthetic-W8A8-bias": synthetic_qwen3(str(root / "static"), "W8A8", gen, float_bias=True),
            "synthetic-W4A4_DYNAMIC": synthetic_qwen3(str(root / "w4a4"), "W4A4_DYNAMIC", gen),
            "synthetic-FLOAT-bias": synthetic_qwen3(str(root / "float"), "FLOAT", gen, float_bias=True)}


def _path(name, synthetic_dirs):
    return synthetic_dirs[name] if name.startswith("synthetic") else msmodelslim_fixture(name)


def _expected_slice(checkpoint, shards, suffix, parallel, rank, tp):
    """Rank `rank`'s part of a layer tensor, sliced here from the raw checkpoint tensors."""
    pieces = []
    for shard_id, prefix in shards.items():
        full = checkpoint.get(f"{prefix}.{suffix}")
        if suffix in ("input_scale", "input_offset"):  # one per fused shard, the same on every rank
            pieces.append(full.reshape(1))
        elif parallel == "row":
            if suffix == "weight":
                return full.chunk(tp, dim=1)[rank]
            if suffix in ("quant_bias", "bias"):  # added once: only rank 0 holds it
                return full if rank == 0 else torch.zeros_like(full)
            return full
        elif shard_id in ("k", "v") and tp > KV_HEADS:  # kv heads replicated over tp // kv ranks
            pieces.append(full.chunk(KV_HEADS, dim=0)[rank // (tp // KV_HEADS)])
        else:
            pieces.append(full.chunk(tp, dim=0)[rank])
    return torch.cat(pieces)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name,kind", CASES)
def test_rank_holds_exactly_its_slice(name, kind, tp, synthetic_dirs):
    path = _path(name, synthetic_dirs)
    _, checkpoint = open_checkpoint(path)
    _, _, shards = layer_spec(kind)
    seen = set()
    for rank in range(tp):
        layer = build_layer(path, kind, tp_rank=rank, tp_size=tp, process=False)
        for attr, param in layer.named_parameters():
            expected = _expected_slice(checkpoint, shards, attr, layer.parallel, rank, tp)
            data = param.data
            if getattr(param, "checkpoint_layout", None) is not None:  # int4 packed while loading
                data = unpack_int32_to_int4(data).t()
            assert torch.equal(data, expected.to(data.dtype).reshape(data.shape)), (attr, rank)
            seen.add(attr)
    assert "weight" in seen and ("bias" in seen) == (name.endswith("-bias") or "v0" in name and kind == "qkv_proj")


def _put_together(outputs, layer_sizes, tp, kind):
    """Column ranks' outputs -> the tp=1 layout (per fused shard, ranks side by side)."""
    if kind != "qkv_proj":
        per_rank = [o.split(layer_sizes, dim=-1) for o in outputs]
        return torch.cat([torch.cat([p[i] for p in per_rank], dim=-1) for i in range(len(layer_sizes))], dim=-1)
    replicas = max(1, tp // KV_HEADS)
    q, k, v = zip(*(o.split(layer_sizes, dim=-1) for o in outputs))
    for r in range(tp):  # replicas of one kv head group compute the same numbers
        assert torch.equal(k[r], k[r - r % replicas]) and torch.equal(v[r], v[r - r % replicas])
    return torch.cat([torch.cat(q, -1), torch.cat(k[::replicas], -1), torch.cat(v[::replicas], -1)], dim=-1)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name,kind", CASES)
def test_rank_outputs_put_together_equal_tp1(name, kind, tp, synthetic_dirs, gen):
    path = _path(name, synthetic_dirs)
    whole = build_layer(path, kind)
    x = calibrated_input(whole, gen, rows=5)
    expected = whole(x)
    ranks = [build_layer(path, kind, tp_rank=r, tp_size=tp) for r in range(tp)]
    if whole.parallel == "row":
        parts = [layer(part).double() for layer, part in zip(ranks, x.chunk(tp, dim=-1))]
        total = sum(parts)  # the all-reduce, exact here: each rank's partial carries its own rounding
        magnitude = sum(p.abs() for p in parts)
        if "DYNAMIC" in type(whole.scheme).__name__.upper():
            # each rank quantizes its own K slice per token: same convention, other scales
            ref = layer_reference(path, kind, x, k_slices=tp, npu_reciprocal=True)
            assert tight_error(total, ref, magnitude + ref.abs()) <= TIGHT_PARTIALS
            int4 = type(whole.scheme).__name__ == "W4A4DynamicLinear"
            assert rel_err(total, expected) < (0.3 if int4 else 0.03)  # activation quantization noise
        else:
            assert tight_error(total, expected, magnitude + expected.abs().double()) <= TIGHT_PARTIALS
    else:
        together = _put_together([layer(x) for layer in ranks], ranks[0].output_partition_sizes, tp, kind)
        assert tight_error(together, expected) <= TIGHT_COLUMNS


def test_kv_heads_beyond_tp_are_split_not_replicated():
    # tp=2 with 2 kv heads: each rank holds one kv head (no replication), q split in two
    path = msmodelslim_fixture("qwen3-tiny-w8a8-dynamic")
    layer = build_layer(path, "qkv_proj", tp_rank=1, tp_size=2)
    assert layer.output_partition_sizes == [64, 32, 32]
    layer4 = build_layer(path, "qkv_proj", tp_rank=3, tp_size=4)
    assert layer4.output_partition_sizes == [32, 32, 32]
