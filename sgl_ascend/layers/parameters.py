"""Parameters that know how tensor parallelism splits them.

Each quantized tensor of a layer is a `ShardedParameter`. Its `load_*` methods have the names and
keyword arguments of SGLang's `weight_loader_v2` protocol (sglang/srt/layers/linear.py), so SGLang's
parallel linear layers load it directly, and our own SGLang-free layers (`layers/linear.py`) call
the same methods. A layer built for rank r of tp ranks therefore holds exactly rank r's slice,
whoever loads it.
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from sgl_ascend.errors import CheckpointError, shape_str

QKV_SHARD_INDEX = {"q": 0, "k": 1, "v": 2}


@dataclass(frozen=True)
class CheckpointLayout:
    """A parameter stored in its kernel layout from the start, filled from checkpoint slices.

    The sharding rules (output_dim, input_dim, shard offsets) stay in checkpoint coordinates; each
    narrowed checkpoint slice goes to `write(stored slice, checkpoint slice)`, which converts it in
    place, so no checkpoint-layout copy of the weight is ever held (as the MoE experts' writers).
    shape / dtype: this rank's tensor as the checkpoint stores it.
    stored_output_dim / outputs_per_element: where the output channels lie in the stored tensor.
    """

    shape: Tuple[int, ...]
    dtype: torch.dtype
    write: Callable[[torch.Tensor, torch.Tensor], None]
    stored_output_dim: int
    outputs_per_element: int = 1


#: dtype kinds an expert tensor may accept (several writers store scales as fp32, bf16 or int64 bits)
DTYPE_KINDS = {
    "int8": lambda d: d == torch.int8,
    "int32": lambda d: d == torch.int32,
    "int": lambda d: not d.is_floating_point and d != torch.bool,
    "float": lambda d: d.is_floating_point,
    "float_or_int64": lambda d: d.is_floating_point or d == torch.int64,
    "number": lambda d: d != torch.bool,
}


def check_dtype(got: torch.dtype, want: Union[torch.dtype, str], tensor: Optional[str] = None,
                file: Optional[str] = None) -> None:
    """One dtype rule for every loaded tensor. want: a stored dtype (integers and FP8 codes must match
    exactly, other floats convert) or a kind of DTYPE_KINDS."""
    if isinstance(want, str):
        ok = DTYPE_KINDS[want](got)
    else:
        want_int, got_int = not want.is_floating_point, not got.is_floating_point
        # FP8 values are codes like ints: a copy from (or into) another float dtype would re-quantize.
        fp8 = want.itemsize == 1 or got.itemsize == 1
        ok = want_int == got_int and not ((want_int or fp8) and got != want)
    if not ok:
        raise CheckpointError(
            f"dtype {got} where {want} is expected; the checkpoint's scheme "
            "does not match this tensor. Re-export it or check its quantization description "
            "(quant_model_description.json, or quantization_config in config.json).", file=file, tensor=tensor)


@dataclass(frozen=True)
class ExpertLayout:
    """A fused expert parameter [E_local, ...] filled one expert and shard at a time.

    spec: the per-expert checkpoint tensor (moe.base.TensorSpec: full shape, dtype kind, tp_dim).
    write(stored slice, checkpoint slice): as CheckpointLayout.write, on this expert's (and shard's)
        slice of the parameter and this rank's tensor-parallel slice of the checkpoint tensor.
    n_dim: the dim of one expert's slice that holds output channels (gate / up halves), None when
        the tensor has none (a per-expert scalar).
    record_full(local expert, unsliced tensor): for writers that also need the whole tensor.
    """

    spec: Any
    write: Callable[[torch.Tensor, torch.Tensor], None]
    n_dim: Optional[int] = 0
    record_full: Optional[Callable[[int, torch.Tensor], None]] = None


#: SGLang FusedMoE shard ids of gate_proj / up_proj -> their half of w13's output channels
EXPERT_SHARD_INDEX = {"w1": 0, "w3": 1}


def _without_ones(shape) -> tuple:
    return tuple(d for d in shape if d != 1)


class _StoredSlice:
    """A stored tensor seen in checkpoint coordinates: what `_copy_slice` needs of a target."""

    def __init__(self, stored: torch.Tensor, shape, layout: CheckpointLayout):
        self.stored, self.shape, self.layout = stored, torch.Size(shape), layout

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> "_StoredSlice":
        # only output channels are narrowed (fused shards); alignment is checked by the caller
        per = self.layout.outputs_per_element
        shape = list(self.shape)
        shape[dim] = length
        stored = self.stored.narrow(self.layout.stored_output_dim, start // per, length // per)
        return _StoredSlice(stored, shape, self.layout)

    def copy_(self, loaded: torch.Tensor) -> None:
        if not self.stored.is_meta:  # header-only loads (inspect) have no values to convert
            self.layout.write(self.stored, loaded)


class ShardedParameter(torch.nn.Parameter):
    """A layer tensor plus its sharding rules.

    output_dim: dim that column-parallel layers split (None: the same on every rank).
    input_dim: dim that row-parallel layers split (None: replicated on every rank).
    output_pack_factor: logical output rows per stored row (2 for int4 pairs packed along N).
    per_shard: one entry per fused shard (per-tensor scales of a fused qkv / gate_up layer).
    first_rank_only: an additive term of a row-parallel layer; ranks > 0 hold zeros so the
        all-reduce adds it once.
    checkpoint_layout: set when the stored tensor is in another layout than the checkpoint's.
    converters: checkpoint dtype -> function giving the stored dtype, for tensors writers store in
        more than one encoding (msModelSlim's deq_scale: fp32, or int64 carrying fp32 bits); the
        whole loaded tensor is converted (it is a per-channel vector) before it is sliced.
    """

    def __new__(cls, data: torch.Tensor, **_):
        return super().__new__(cls, data, requires_grad=False)

    def __init__(self, data: torch.Tensor, *, name: str, output_dim: Optional[int] = None,
                 input_dim: Optional[int] = None, output_pack_factor: int = 1,
                 per_shard: bool = False, first_rank_only: bool = False,
                 checkpoint_layout: Optional[CheckpointLayout] = None,
                 expert_layout: Optional[ExpertLayout] = None,
                 converters: Optional[Dict[torch.dtype, Callable[[torch.Tensor], torch.Tensor]]] = None):
        self.tensor_name = name
        self.output_dim = output_dim
        self.input_dim = input_dim
        self.output_pack_factor = output_pack_factor
        self.per_shard = per_shard
        self.first_rank_only = first_rank_only
        self.checkpoint_layout = checkpoint_layout
        self.expert_layout = expert_layout
        self.converters = converters or {}

    # -- the four SGLang loader entry points -------------------------------------------------
    def load_column_parallel_weight(self, loaded_weight: torch.Tensor, tp_rank: int = 0,
                                    use_presharded_weights: bool = False, **_):
        loaded_weight = self._convert(loaded_weight)
        self._copy_slice(self._target(), loaded_weight, self.output_dim, tp_rank, use_presharded_weights)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, shard_id: Optional[int] = None,
                                  shard_offset: Optional[int] = None, shard_size: Optional[int] = None,
                                  tp_rank: int = 0, use_presharded_weights: bool = False, **_):
        loaded_weight = self._convert(loaded_weight)
        self._load_fused_shard(loaded_weight, shard_id, shard_offset, shard_size,
                               source_rank=tp_rank, presharded=use_presharded_weights)

    def load_qkv_weight(self, loaded_weight: torch.Tensor, shard_id: Union[str, None] = None,
                        shard_offset: Optional[int] = None, shard_size: Optional[int] = None,
                        num_heads: int = 1, tp_rank: int = 0, use_presharded_weights: bool = False, **_):
        # SGLang passes tp_rank (its kv group's rank for k/v) and num_heads = kv head replicas:
        # that many consecutive ranks share one k/v slice, as in SGLang's own parameters.
        loaded_weight = self._convert(loaded_weight)
        source_rank = tp_rank if shard_id == "q" else tp_rank // max(num_heads, 1)
        index = QKV_SHARD_INDEX[shard_id] if shard_id is not None else None
        self._load_fused_shard(loaded_weight, index, shard_offset, shard_size,
                               source_rank=source_rank, presharded=use_presharded_weights)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor, tp_rank: int = 0,
                                 use_presharded_weights: bool = False, **_):
        loaded_weight = self._convert(loaded_weight)
        if self.first_rank_only and tp_rank > 0:
            self._check_dtype(loaded_weight)
            self.data.zero_()
            return
        self._copy_slice(self._target(), loaded_weight, self.input_dim, tp_rank, use_presharded_weights)

    def load_expert_weight(self, loaded_weight: torch.Tensor, *, local_expert: int, shard_id: str,
                           tp_rank: int = 0, tp_size: int = 1, weight_name: Optional[str] = None):
        """One expert's checkpoint tensor (SGLang FusedMoE shard "w1" gate, "w3" up, "w2" down) into
        its slice of this fused parameter: checked against the spec, narrowed to this rank's slice
        along spec.tp_dim, converted by the layout's writer in place."""
        layout, name = self.expert_layout, weight_name or self.tensor_name
        spec = layout.spec
        spec.check(loaded_weight.dtype, loaded_weight.shape, name)
        full, loaded = loaded_weight, loaded_weight
        if spec.tp_dim is not None and tp_size > 1:
            size = loaded.shape[spec.tp_dim]
            if size % tp_size:
                raise CheckpointError(f"dim {spec.tp_dim} of size {size} does not split into {tp_size} "
                                      "tensor-parallel slices", tensor=name)
            loaded = loaded.narrow(spec.tp_dim, tp_rank * (size // tp_size), size // tp_size)
        target = None
        if self.data.numel():
            target = self.data[local_expert]
            if shard_id != "w2" and layout.n_dim is not None:
                half = target.shape[layout.n_dim] // 2
                target = target.narrow(layout.n_dim, EXPERT_SHARD_INDEX[shard_id] * half, half)
        try:
            layout.write(target, loaded)
            if layout.record_full is not None:
                layout.record_full(local_expert, full)
        except CheckpointError as exc:  # a writer's value check: name the tensor
            if exc.tensor is not None:
                raise
            raise CheckpointError(exc.message, tensor=name) from None

    # -- helpers -----------------------------------------------------------------------------
    def _convert(self, loaded: torch.Tensor) -> torch.Tensor:
        convert = self.converters.get(loaded.dtype)
        return loaded if convert is None else convert(loaded)

    def _target(self):
        layout = self.checkpoint_layout
        return self.data if layout is None else _StoredSlice(self.data, layout.shape, layout)

    def _load_fused_shard(self, loaded, shard_index, shard_offset, shard_size, source_rank, presharded):
        if self.per_shard:
            if loaded.numel() != 1:
                raise CheckpointError(
                    f"expected a per-tensor value (1 element), got shape {shape_str(loaded.shape)}",
                    tensor=self._shard_name(shard_index))
            self._check_dtype(loaded)
            self.data[0 if shard_index is None else shard_index] = loaded.reshape(())
            return
        if self.output_dim is None or shard_offset is None:
            # Per-layer data that every shard must agree on is loaded whole (e.g. replicated vectors).
            self._copy_slice(self._target(), loaded, None, source_rank, presharded)
            return
        factor = self.output_pack_factor
        if self.checkpoint_layout is not None:
            factor *= self.checkpoint_layout.outputs_per_element
        if shard_offset % factor or shard_size % factor:
            raise CheckpointError(
                f"fused shard at rows {shard_offset}..{shard_offset + shard_size} does not align with "
                f"{factor} values packed per stored row", tensor=self._shard_name(shard_index))
        rows = self.output_pack_factor
        target = self._target().narrow(self.output_dim, shard_offset // rows, shard_size // rows)
        self._copy_slice(target, loaded, self.output_dim, source_rank, presharded, shard_index)

    def _copy_slice(self, target, loaded, dim, rank, presharded, shard_index=None):
        self._check_dtype(loaded, shard_index)
        if loaded.dim() == 0:
            loaded = loaded.reshape(1)
        if dim is not None and not presharded:
            size = target.shape[dim]
            if loaded.dim() != target.dim() or loaded.shape[dim] < (rank + 1) * size:
                raise CheckpointError(
                    f"cannot take rank {rank}'s slice of {size} along dim {dim} from checkpoint shape "
                    f"{shape_str(loaded.shape)}; expected {target.dim()} dims with at least "
                    f"{(rank + 1) * size} along dim {dim} (layer slice {shape_str(target.shape)}). "
                    "Check that the checkpoint matches the model config and tp size.",
                    tensor=self._shard_name(shard_index))
            loaded = loaded.narrow(dim, rank * size, size)
        if loaded.shape != target.shape:
            if _without_ones(loaded.shape) == _without_ones(target.shape):
                loaded = loaded.reshape(target.shape)  # [N] vs [N, 1] scale layouts
            else:
                raise CheckpointError(
                    f"shape {shape_str(loaded.shape)} does not fit the layer's {shape_str(target.shape)} "
                    "(after tensor-parallel slicing). Check that the checkpoint matches the model config.",
                    tensor=self._shard_name(shard_index))
        try:
            target.copy_(loaded)
        except CheckpointError as exc:  # a layout writer's value check: name the tensor
            if exc.tensor is not None:
                raise
            raise CheckpointError(exc.message, tensor=self._shard_name(shard_index)) from None

    def _check_dtype(self, loaded, shard_index=None):
        want = self.data.dtype if self.checkpoint_layout is None else self.checkpoint_layout.dtype
        check_dtype(loaded.dtype, want, tensor=self._shard_name(shard_index))

    def _shard_name(self, shard_index):
        return self.tensor_name if shard_index is None else f"{self.tensor_name} (fused shard {shard_index})"


def register(layer: torch.nn.Module, attr: str, data: torch.Tensor, **rules) -> ShardedParameter:
    """Create a ShardedParameter named after the layer and attach it (one line per tensor in schemes)."""
    prefix = getattr(layer, "prefix", "") or layer.__class__.__name__
    param = ShardedParameter(data, name=f"{prefix}.{attr}", **rules)
    layer.register_parameter(attr, param)
    return param


def replace_data(layer: torch.nn.Module, attr: str, data: torch.Tensor) -> None:
    """Swap a parameter's tensor after loading, keeping one copy (the old storage is released)."""
    getattr(layer, attr).data = data
