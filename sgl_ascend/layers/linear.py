"""SGLang-free parallel linear layers, for the tools (inspect, verify) and the tests.

They build a layer for rank `tp_rank` of `tp_size` and feed checkpoint tensors to the scheme's
ShardedParameters through the same load_* calls, with the same shard offsets, as SGLang's
ColumnParallelLinear / MergedColumnParallelLinear / QKVParallelLinear / RowParallelLinear
`weight_loader_v2`. A row-parallel layer returns its rank's partial sum (the caller all-reduces).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch

from sgl_ascend.errors import CheckpointError, shape_str
from sgl_ascend.layers.parameters import ShardedParameter
from sgl_ascend.layers.schemes.base import LinearScheme
from sgl_ascend.quant.modelslim import KV_CACHE_SUFFIXES

ShardId = Union[int, str, None]


@dataclass(frozen=True)
class QKVSizes:
    """Per-rank q/k/v sizes, SGLang's rules: kv heads are replicated when tp_size > num_kv_heads."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    tp_size: int

    @property
    def kv_head_replicas(self) -> int:
        return max(1, self.tp_size // self.num_kv_heads)

    @property
    def local_sizes(self) -> List[int]:
        q = self.num_heads // self.tp_size * self.head_dim
        kv = max(1, self.num_kv_heads // self.tp_size) * self.head_dim
        return [q, kv, kv]

    @property
    def full_sizes(self) -> List[int]:
        return [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2


class ParallelLinear(torch.nn.Module):
    """parallel: "column" (incl. merged and qkv), "row" or "replicated"."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], scheme: LinearScheme, *,
                 parallel: str = "column", prefix: str = "", tp_rank: int = 0, tp_size: int = 1,
                 params_dtype: torch.dtype = torch.bfloat16, bias: bool = False,
                 qkv: Optional[QKVSizes] = None):
        super().__init__()
        if parallel not in ("column", "row", "replicated"):
            raise ValueError(f"parallel must be column, row or replicated, got {parallel!r}")
        self.prefix, self.parallel = prefix, parallel
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.scheme, self.qkv = scheme, qkv
        self.input_size = input_size
        if qkv is not None:
            self.output_partition_sizes = qkv.local_sizes
        elif parallel == "column":
            self.output_partition_sizes = [_divide(s, tp_size, prefix) for s in output_sizes]
        else:
            self.output_partition_sizes = list(output_sizes)
        self.input_size_per_partition = _divide(input_size, tp_size, prefix) if parallel == "row" else input_size
        scheme.create_weights(self, self.input_size_per_partition, self.output_partition_sizes,
                              input_size, sum(output_sizes), params_dtype)
        self.bias = None
        if bias:
            self.bias = ShardedParameter(torch.zeros(sum(self.output_partition_sizes), dtype=params_dtype),
                                         name=f"{prefix}.bias", output_dim=0, first_rank_only=True)

    def weight_loader(self, param: ShardedParameter, loaded: torch.Tensor, shard_id: ShardId = None):
        if self.parallel == "replicated":
            param.load_column_parallel_weight(loaded, tp_rank=0)
        elif self.parallel == "row":
            param.load_row_parallel_weight(loaded, tp_rank=self.tp_rank)
        elif shard_id is None:
            param.load_column_parallel_weight(loaded, tp_rank=self.tp_rank)
        elif isinstance(shard_id, str):
            index = "qkv".index(shard_id)
            sizes = self.output_partition_sizes
            param.load_qkv_weight(loaded, shard_id=shard_id, shard_offset=sum(sizes[:index]),
                                  shard_size=sizes[index], num_heads=self.qkv.kv_head_replicas,
                                  tp_rank=self.tp_rank)
        else:
            sizes = self.output_partition_sizes
            param.load_merged_column_weight(loaded, shard_id=shard_id, shard_offset=sum(sizes[:shard_id]),
                                            shard_size=sizes[shard_id], tp_rank=self.tp_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scheme.apply_weights(self, x, self.bias)


def _divide(size: int, tp_size: int, prefix: str) -> int:
    if size % tp_size:
        raise CheckpointError(f"size {size} of layer {prefix} does not divide by tp size {tp_size}")
    return size // tp_size


def load_linear(layer: ParallelLinear, checkpoint, shards: Dict[ShardId, str], process: bool = True) -> None:
    """Load every tensor of the layer's checkpoint shards, then process the layer.

    `shards` maps shard id (None for an unfused layer, 0/1 for gate/up, "q"/"k"/"v") to the checkpoint
    prefix. A checkpoint tensor with no place in the layer, or a layer tensor missing from the
    checkpoint, is an error naming both. Errors the parameters or the scheme raise about a layer
    tensor are re-raised naming the checkpoint file(s) and tensor(s) it came from. `process=False`
    stops before processing: `sgl-ascend inspect` loads meta tensors built from the headers to check
    shapes and dtypes without reading data.
    """
    scheme = layer.scheme
    expected = {name for name, p in layer.named_parameters(recurse=False) if isinstance(p, ShardedParameter)}
    sources: Dict[str, List] = {}  # layer attribute -> checkpoint TensorInfos loaded into it
    for shard_id, prefix in shards.items():
        present = checkpoint.with_prefix(prefix)
        for suffix in sorted(expected - set(present)):
            raise CheckpointError(
                f"the layer needs {prefix}.{suffix} ({type(scheme).__name__}) but the checkpoint "
                "does not have it; the checkpoint is incomplete or its description is wrong.",
                file=checkpoint.index_file or checkpoint.path, tensor=f"{prefix}.{suffix}")
        for suffix, info in sorted(present.items()):
            if suffix in scheme.ignored_suffixes or f".{suffix}" in KV_CACHE_SUFFIXES:
                continue  # KV_CACHE_SUFFIXES: C8 scales the saver stores under k_proj / v_proj, the KV cache's
            param = getattr(layer, suffix, None)
            if not isinstance(param, ShardedParameter):
                raise CheckpointError(
                    f"tensor {shape_str(info.shape)} {info.dtype} has no place in layer {layer.prefix} "
                    f"({type(scheme).__name__}, which holds {', '.join(sorted(expected))}); the "
                    "description's scheme does not match the tensors.", file=info.file, tensor=info.name)
            sources.setdefault(suffix, []).append(info)
            try:
                layer.weight_loader(param, checkpoint.get(info.name), shard_id)
            except CheckpointError as exc:
                if exc.file is not None:  # already located (e.g. against config.json)
                    raise
                raise _located(exc, [info]) from None
    if not process:
        return
    try:
        scheme.process_weights_after_loading(layer)
    except CheckpointError as exc:
        suffix = (exc.tensor or "").rpartition(".")[2].split(" ")[0]
        if exc.file is not None or suffix not in sources:
            raise
        raise _located(exc, sources[suffix]) from None


def _located(exc: CheckpointError, infos: list) -> CheckpointError:
    """The same error, naming the checkpoint file(s) and tensor(s) instead of the layer's parameter."""
    files = ", ".join(sorted({info.file for info in infos}))
    names = ", ".join(info.name for info in infos)
    return CheckpointError(f"{exc.message} (layer tensor {exc.tensor})", file=files, tensor=names)
