"""W4A4_FLATQUANT_DYNAMIC: FlatQuant's online Kronecker transform of the activation, int4 per-token
activations, int4 per-channel symmetric weights (msModelSlim's flatquant processor, then a W4A4 quantizer).

What msModelSlim 26.1.0 writes per layer (modelslim_v1/save/ascendv1.py on_flat_clip_wrapper): the
W4A4_DYNAMIC tensors (weight int8 [N, K] one int4 per byte, weight_scale / weight_offset fp32 [N, 1]),
left_trans fp32 [L, L], right_trans fp32 [R, R] with L * R = K, and clip_ratio fp32 [1] (the trained
sigmoid(clip_factor), in (0, 1)). o_proj carries left_trans only, over the attention heads: its head_dim
factor is folded into v_proj's output weights (flat_quant_utils/structure_pair.py AttnLinearLinearPair),
so its R factor is the identity, built here.

The layer computes, per token x viewed [L, R]: x'' = left^T @ x @ right (msModelSlim's
FlatQuantOnlineWrapper._apply_flat), int4 with scale max|x''| * clip_ratio / 7, then the int4 matmul.
Kernels, as vllm-ascend calls them (methods/w4a4_flatquant.py): npu_kronecker_quant(x [T, L, R],
left^T, right, clip_ratio, dst_dtype=int32) -> (int4 packed [T, L, R/8], per-token scale), then
npu_quant_matmul(x_q [T, K/8], w, weight_scale fp32, pertoken_scale, output_dtype=x.dtype). The
transforms are stored once, in the model dtype the kernel takes, left already transposed; the clip
ratio is a host float (the kernel's attribute), read once after loading.
"""

from typing import List, Optional

import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.parameters import CheckpointLayout, register, replace_data
from sgl_ascend.layers.registry import register_scheme
from sgl_ascend.layers.schemes.base import LinearScheme
from sgl_ascend.layers.schemes.common import (drop_zero_offset, flatten_channel_scale, kernel_act_dtype,
                                              register_int4_weight)
from sgl_ascend.ops import ops
from sgl_ascend.ops.contract import KRONECKER_MAX_DIM
from sgl_ascend.quant.modelslim import FLATQUANT
from sgl_ascend.quant.scheme_key import LINEAR, MSMODELSLIM


def decompose_dim(k: int):
    """msModelSlim's split of K into the Kronecker factors L <= R, L * R = K, nearest to a square
    (flat_quant_utils/utils.py get_decompose_dim: K = a^2 - b^2 with the smallest a >= sqrt(K))."""
    a = int(k ** 0.5)
    a += a * a < k
    while True:
        b = int((a * a - k) ** 0.5)
        if b * b == a * a - k:
            return a - b, a + b
        a += 1


@register_scheme(LINEAR, MSMODELSLIM, FLATQUANT)
class W4A4FlatQuantDynamicLinear(LinearScheme):

    def __init__(self, right_trans: bool = True, left: Optional[int] = None):
        self.has_right, self.left_size = right_trans, left

    @classmethod
    def from_key(cls, key, **context):
        return cls(key.param("right_trans", True), key.param("left"))

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: List[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **_):
        n, k = sum(output_partition_sizes), input_size_per_partition
        prefix = getattr(layer, "prefix", "") or "the layer"
        self.act_dtype = kernel_act_dtype(params_dtype, FLATQUANT)
        if k != input_size:
            raise CheckpointError(
                f"{FLATQUANT} transforms the layer's whole input ({input_size}) before quantizing it, but tensor "
                f"parallelism gives this rank {k} of it; serve the checkpoint with tp 1 (a row-parallel FlatQuant "
                "layer would need its input gathered first).", tensor=f"{prefix}.left_trans")
        left = self.left_size if self.left_size is not None else (decompose_dim(k)[0] if self.has_right else None)
        if left is None:
            raise CheckpointError(
                "the layer carries left_trans only (its size, the attention heads, is read from the safetensors "
                "headers), and the checkpoint's headers were not read; load it from its folder.",
                tensor=f"{prefix}.left_trans")
        if k % left or max(left, k // left) > KRONECKER_MAX_DIM or (k // left) % 8:
            raise CheckpointError(
                f"left_trans [{left}, {left}] does not split the input size {k} into Kronecker factors the NPU kernel "
                f"takes (L * R = K, L and R <= {KRONECKER_MAX_DIM}, R a multiple of 8; npu_kronecker_quant).",
                tensor=f"{prefix}.left_trans")
        self.shape = (left, k // left)
        register_int4_weight(layer, "weight", n, k)
        register(layer, "weight_scale", torch.empty(n, 1, dtype=torch.float32), output_dim=0)
        register(layer, "weight_offset", torch.empty(n, 1, dtype=torch.float32), output_dim=0)
        self._loaded = set()
        self._register_transform(layer, "left_trans", left, transpose=True)
        if self.has_right:
            self._register_transform(layer, "right_trans", k // left, transpose=False)
        # one per fused shard (q / k / v each trained its own); one kernel call quantizes the shared input
        register(layer, "clip_ratio", torch.empty(len(output_partition_sizes), dtype=torch.float32), per_shard=True)

    def _register_transform(self, layer, attr: str, size: int, transpose: bool):
        """[size, size] in the model dtype from the fp32 checkpoint matrix; the fused shards of a layer
        (q / k / v, gate / up) share one input, so they carry one transform: checked equal as they load."""

        def write(stored: torch.Tensor, loaded: torch.Tensor) -> None:
            value = (loaded.t() if transpose else loaded).to(stored.dtype)
            if attr in self._loaded and not torch.equal(stored, value):
                raise CheckpointError(f"the fused shards carry different {attr}; they share one input, so one "
                                      "transform must serve them all. Re-export the checkpoint.")
            stored.copy_(value)
            self._loaded.add(attr)

        layout = CheckpointLayout((size, size), torch.float32, write, stored_output_dim=0)
        register(layer, attr, torch.empty(size, size, dtype=self.act_dtype), checkpoint_layout=layout)

    def process_weights_after_loading(self, layer):
        flatten_channel_scale(layer, "weight_scale")
        drop_zero_offset(layer, "weight_offset", f"the {FLATQUANT} kernel")
        ratios = layer.clip_ratio.data
        if not bool(((ratios > 0) & (ratios <= 1)).all()):
            raise CheckpointError(f"clip_ratio {ratios.tolist()} is outside (0, 1], the range npu_kronecker_quant "
                                  "takes; the checkpoint is not FlatQuant's trained sigmoid clip.",
                                  tensor=layer.clip_ratio.tensor_name)
        # Fused shards trained their ratios apart (1e-5 apart in the real tool's output); the largest
        # clips least, so no shard's activations are clipped harder than it was trained for.
        self.clip_ratio = float(ratios.max())
        delattr(layer, "clip_ratio")
        if not self.has_right:
            layer.register_buffer("right_trans", torch.eye(self.shape[1], dtype=self.act_dtype), persistent=False)

    def apply_weights(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
        left, right = self.shape
        x_q, token_scale = ops.npu_kronecker_quant(x.reshape(-1, left, right), layer.left_trans, layer.right_trans,
                                                   clip_ratio=self.clip_ratio, dst_dtype=torch.int32)
        out = ops.npu_quant_matmul(x_q.reshape(-1, left * right // 8), layer.weight, layer.weight_scale,
                                   pertoken_scale=token_scale, output_dtype=x.dtype)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if bias is None else out + bias

    def theoretical_bytes(self, input_size_per_partition: int, output_size_per_partition: int) -> int:
        left, right = self.shape
        return output_size_per_partition * (input_size_per_partition // 2 + 4) + \
            (left * left + right * right) * self.act_dtype.itemsize
