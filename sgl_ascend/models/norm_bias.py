"""RMSNorm + bias for msModelSlim anti-outlier checkpoints.

Anti-outlier smoothing (msModelSlim's m1-m4 / "v0" W8A8 recipes) moves a shift into the norms that
feed quantized layers, leaving FLOAT `*.norm.bias` tensors (input_layernorm, post_attention_layernorm,
q_norm, k_norm): the norm computes rmsnorm(x) * weight + bias. SGLang's RMSNorm has no bias and
the models skip unknown `.bias` tensors, so without this the shift is silently lost. When the
checkpoint has norm biases, every RMSNorm built afterwards in this process gets a zero `bias`
parameter (loaded from the checkpoint where it has one) and adds it to its output.

The float projection biases the same recipe leaves (`q/k/v_proj.bias`) need nothing here: the
W8A8 writer folds them into `quant_bias` (checked on tests/fixtures' qwen3moe-tiny-w8a8-v0:
(quant_bias + input_offset * sum_k q) * deq_scale equals the float bias), so the W8A8 scheme
applies them and the model's loader skips the FLOAT copy.
"""

import torch

_enabled = False


def enable_norm_bias() -> None:
    global _enabled
    _enabled = True


def needs_norm_bias(tensor_types) -> bool:
    return any(name.endswith("norm.bias") and kind == "FLOAT" for name, kind in tensor_types.items())


def _add_bias(norm, _args, output):
    if isinstance(output, tuple):
        return (output[0] + norm.bias.to(output[0].dtype), *output[1:])
    return output + norm.bias.to(output.dtype)


def add_norm_bias(_result, norm, *args, **kwargs):
    """AFTER hook of RMSNorm.__init__."""
    if not _enabled:
        return None
    dtype = norm.weight.dtype if isinstance(norm.weight, torch.Tensor) else torch.get_default_dtype()
    norm.bias = torch.nn.Parameter(torch.zeros(norm.hidden_size, dtype=dtype), requires_grad=False)
    norm.register_forward_hook(_add_bias)
    return None
