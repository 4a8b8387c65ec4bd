"""DeepSeek-V2/V3 (MLA) with sgl-ascend's quantized layers in SGLang's own model class.

SGLang's DeepseekV2/V3 model fits our checkpoints as it is (fused q_a_proj + kv_a_proj_with_mqa,
shared experts, dense first layers all go through our configs); two things need a hand:

1. MLA's absorbed attention multiplies by `w_kc` / `w_vc`, float slices of kv_b_proj's weight that
   the model cuts in `post_load_weights`, before our schemes process the layer. Upstream dequantizes
   only its own int8/fp8 layouts there (and ignores a weight offset). For a kv_b_proj served by one
   of our schemes we hand it the float weight by msModelSlim's convention, (q - offset) * scale,
   and keep the quantized tensors for kv_b_proj's own forward (the MHA prefill path).
2. SGLang's torch_native attention backend keeps MLA's compressed latent in its KV cache, so every
   MLA layer must run the absorbed forward; SGLang has no DeepSeek handler for torch_native and falls
   back to the triton one, which picks the MHA forward for fresh prefills (head-size mismatch).
"""

import torch

from sgl_ascend.errors import CheckpointError


def float_kv_b_proj(proj: torch.nn.Module) -> torch.Tensor:
    """kv_b_proj's float weight [N, K] from its loaded (not yet processed) checkpoint tensors."""
    weight = getattr(proj, "weight", None)
    scale = getattr(proj, "weight_scale", None)
    if weight is None or scale is None or weight.dtype != torch.int8 or weight.dim() != 2 \
            or scale.numel() != weight.shape[0]:
        raise CheckpointError(
            f"kv_b_proj is served by {type(proj.scheme).__name__}, whose tensors MLA cannot turn into the "
            "float w_kc / w_vc it multiplies by; export kv_b_proj as FLOAT, W8A8_DYNAMIC, W8A16 or "
            "W4A4_DYNAMIC (per-channel int weights with weight_scale).",
            tensor=f"{getattr(proj, 'prefix', 'kv_b_proj')}.weight")
    offset = getattr(proj, "weight_offset", None)
    values = weight.float() if offset is None else weight.float() - offset.float().reshape(-1, 1)
    return (values * scale.float().reshape(-1, 1)).to(torch.bfloat16)


def float_kv_b_proj_for_mla(original, model, *args, **kwargs):
    """AROUND hook of DeepseekV2WeightLoaderMixin.post_load_weights (see module docstring, 1)."""
    from sgl_ascend.layers.schemes.base import LinearScheme

    hidden = []
    for layer in getattr(getattr(model, "model", None), "layers", []):
        proj = getattr(getattr(layer, "self_attn", None), "kv_b_proj", None)
        if not isinstance(getattr(proj, "scheme", None), LinearScheme):
            continue
        weight = float_kv_b_proj(proj)
        # Upstream reads kv_b_proj.weight and, if present, weight_scale: show it the float weight only.
        saved = dict(proj._parameters)
        proj._parameters.clear()
        proj.weight = torch.nn.Parameter(weight, requires_grad=False)
        hidden.append((proj, saved))
    try:
        return original(model, *args, **kwargs)
    finally:
        for proj, saved in hidden:
            proj._parameters.clear()
            proj._parameters.update(saved)


def mla_for_torch_native(original_get_handler, cls, backend_name):
    """AROUND hook of AttentionBackendRegistry.get_handler (see module docstring, 2)."""
    handler = original_get_handler(cls, backend_name)
    if backend_name == "torch_native" and backend_name not in cls._handlers:
        from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import (
            AttnForwardMethod)

        return lambda attn, forward_batch: AttnForwardMethod.MLA
    return handler
