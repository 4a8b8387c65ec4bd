"""Linear schemes, one per file, and the table that maps checkpoint scheme names to them."""

from sgl_ascend.layers.schemes.base import LinearScheme, SchemeLinearMethod
from sgl_ascend.layers.schemes.ct_fp8_w8a16 import CTFP8W8A16Linear
from sgl_ascend.layers.schemes.ct_w8a8_dynamic import CTW8A8DynamicTensorLinear
from sgl_ascend.layers.schemes.ct_w8a8_static import CTW8A8StaticLinear
from sgl_ascend.layers.schemes.ct_wna16 import CTWNA16Linear
from sgl_ascend.layers.schemes.unquantized import UnquantizedLinear
from sgl_ascend.layers.schemes.w4a4_dynamic import W4A4DynamicLinear
from sgl_ascend.layers.schemes.w4a8_dynamic import W4A8DynamicLinear
from sgl_ascend.layers.schemes.w8a8_dynamic import W8A8DynamicLinear
from sgl_ascend.layers.schemes.w8a8_static import W8A8StaticLinear
from sgl_ascend.layers.schemes.w8a16 import W8A16Linear

MODELSLIM_LINEAR_SCHEMES = {
    "FLOAT": UnquantizedLinear,
    "W8A8": W8A8StaticLinear,
    "W8A8_DYNAMIC": W8A8DynamicLinear,
    "W8A16": W8A16Linear,
    "W4A4_DYNAMIC": W4A4DynamicLinear,
    "W4A8_DYNAMIC": W4A8DynamicLinear,
}


def linear_scheme_for_modelslim(kind: str, config, prefix: str) -> LinearScheme:
    from sgl_ascend.errors import CheckpointError

    scheme_class = MODELSLIM_LINEAR_SCHEMES.get(kind)
    if scheme_class is None:
        raise CheckpointError(
            f"layer {prefix} is {kind}, which sgl-ascend does not serve as a linear layer; served: "
            f"{', '.join(MODELSLIM_LINEAR_SCHEMES)}.", file=config.source, tensor=f"{prefix}.weight")
    return scheme_class()


def linear_scheme_for_compressed_tensors(args, config, prefix: str) -> LinearScheme:
    """A compressed-tensors layer's scheme from its resolved args (None: ignored / not targeted)."""
    from compressed_tensors.quantization import QuantizationStrategy

    from sgl_ascend.errors import CheckpointError
    from sgl_ascend.quant import compressed_tensors as ct

    if args is None:
        return UnquantizedLinear()
    weights, acts = args.weights, args.input_activations
    if args.kind in (ct.WNA16, ct.W4A8):
        return CTWNA16Linear(weights.num_bits, args.group_size, weights.symmetric,
                             packed=args.format == "pack-quantized")
    if args.kind == ct.W8A8_STATIC:
        return CTW8A8StaticLinear(weights.strategy == QuantizationStrategy.CHANNEL, acts.symmetric)
    if args.kind == ct.W8A8_DYNAMIC:
        if weights.strategy == QuantizationStrategy.CHANNEL:
            return W8A8DynamicLinear(with_offset=False)  # the tensor names fit as they are
        return CTW8A8DynamicTensorLinear()
    if args.kind == ct.FP8_W8A16:
        return CTFP8W8A16Linear(weights.strategy == QuantizationStrategy.CHANNEL,
                                static_input_scale=acts is not None and not acts.dynamic)
    raise CheckpointError(
        f"layer {prefix} is {args.kind} with {ct.enum_str(weights.strategy)} weights (config group {args.group}), "
        "which sgl-ascend has no kernel for on this device; served: WNA16, W4A8, W8A8 static and "
        "dynamic, FP8 weight-only.",
        file=config.source, tensor=f"{prefix}.weight")


__all__ = ["linear_scheme_for_compressed_tensors", "CTWNA16Linear", "CTW8A8DynamicTensorLinear",
           "CTW8A8StaticLinear", "CTFP8W8A16Linear",
           "LinearScheme", "SchemeLinearMethod", "MODELSLIM_LINEAR_SCHEMES", "linear_scheme_for_modelslim",
           "UnquantizedLinear", "W4A4DynamicLinear", "W4A8DynamicLinear", "W8A8DynamicLinear", "W8A8StaticLinear", "W8A16Linear"]
