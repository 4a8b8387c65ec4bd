"""Steps the compressed-tensors schemes share: per-tensor scales of fused shards, weight_shape metadata,
int4 pack-quantized weights into the kernel layout."""

from typing import List

import torch
from sgl_ascend.errors import CheckpointError, shape_str
from sgl_ascend.layers.parameters import QKV_SHARD_INDEX, ShardedParameter
from sgl_ascend.layers.schemes.common import one_intra_op_thread, pack_int4_for_kernel
from sgl_ascend.ops.int4 import CT_OFFSET_BITS, unpack_int32_to_int4


@one_intra_op_thread()
def write_packed_int4(target: torch.Tensor, packed: torch.Tensor) -> None:
    """pack-quantized int4, int32 [n, K/8] (the library's packing: v + 8 per nibble along K) -> the
    kernel's int32 [K, n/8] slice. A word XOR CT_OFFSET_BITS is ours along K (ops/int4.py); its
    nibbles are sign-extended with int8 ops and packed along n, an eighth of the rows at a time: the
    unpacked values of a step (8 per word) then take a quarter of the packed tensor's bytes, and a
    weight takes 8 steps whatever its size (few steps: see common.INT4_PACK_CHUNK_BYTES)."""
    n, words = packed.shape
    rows = max(8, -(-n // 8) // 8 * 8)  # whole int32 columns of the target
    for start in range(0, n, rows):
        values = unpack_int32_to_int4(packed[start:start + rows] ^ CT_OFFSET_BITS)  # always in [-8, 7]
        pack_int4_for_kernel(values, out=target.narrow(1, start // 8, values.shape[0] // 8))


def float_zero_point_to_int8(values: torch.Tensor) -> torch.Tensor:
    """An activation zero point stored as a float (msmodelslim's compressed-tensors writer stores its input
    offset in the model dtype; the library writes int8): the same int8 code when the values are whole numbers
    in int8's range (vLLM and SGLang copy it into their int8 parameter), an error otherwise."""
    if values.is_meta:  # header-only loads (inspect) have no values to check
        return torch.empty_like(values, dtype=torch.int8)
    codes = values.float().round()
    if not torch.equal(codes, values.float()) or codes.min() < -128 or codes.max() > 127:
        raise CheckpointError(f"a {values.dtype} activation zero point must hold int8 codes (whole numbers in "
                              f"[-128, 127]), got {values.flatten()[:4].tolist()}; re-export the checkpoint.")
    return codes.to(torch.int8)


def expand_per_shard(values: torch.Tensor, output_partition_sizes: List[int]) -> torch.Tensor:
    """One value per fused shard -> one per output channel (a per-tensor scale of each q/k/v part)."""
    sizes = torch.tensor(output_partition_sizes, device=values.device)
    return values.repeat_interleave(sizes)


class WeightShape(ShardedParameter):
    """`weight_shape` of pack-quantized layers: the unpacked [N, K] of each checkpoint shard.

    It is metadata, the same on every rank: each fused shard writes its row, `check_and_drop`
    validates the rows against the layer and frees them.
    """

    def _row(self, shard_index, loaded):
        self._check_dtype(loaded)
        if loaded.numel() != 2:
            raise CheckpointError(f"expected 2 values [out, in], got shape {shape_str(loaded.shape)}",
                                  tensor=self._shard_name(shard_index))
        out_features, in_features = loaded.reshape(2).tolist()
        if in_features != self.input_size:
            raise CheckpointError(
                f"weight_shape says the unpacked weight is [{out_features}, {in_features}], but the layer "
                f"has {self.input_size} input channels; the checkpoint does not match the model config "
                "(or was packed from a different shape).", tensor=self._shard_name(shard_index))
        self.data[shard_index or 0] = loaded.reshape(2)

    def load_column_parallel_weight(self, loaded_weight, **_):
        self._row(0, loaded_weight)

    def load_row_parallel_weight(self, loaded_weight, **_):
        self._row(0, loaded_weight)

    def load_merged_column_weight(self, loaded_weight, shard_id=None, **_):
        self._row(shard_id, loaded_weight)

    def load_qkv_weight(self, loaded_weight, shard_id=None, **_):
        self._row(None if shard_id is None else QKV_SHARD_INDEX[shard_id], loaded_weight)


def register_weight_shape(layer: torch.nn.Module, shards: int, input_size: int) -> None:
    prefix = getattr(layer, "prefix", "") or layer.__class__.__name__
    param = WeightShape(torch.full((shards, 2), -1, dtype=torch.int64), name=f"{prefix}.weight_shape")
    param.input_size = input_size
    layer.register_parameter("weight_shape", param)


def check_and_drop_weight_shape(layer: torch.nn.Module, input_size: int, output_size: int) -> None:
    """Every shard's unpacked shape must have the layer's full K, and the shards' N add up to N."""
    param = layer.weight_shape
    rows = param.data.tolist()
    ns, ks = [r[0] for r in rows], [r[1] for r in rows]
    if any(k != input_size for k in ks) or sum(ns) != output_size:
        raise CheckpointError(
            f"weight_shape says [out, in] = {rows} (one row per shard), but the layer is "
            f"[{output_size}, {input_size}] in full; the checkpoint does not match the model config "
            "(or was packed from a different shape).", tensor=param.tensor_name)
    delattr(layer, "weight_shape")
