"""sgl-ascend: msModelSlim and compressed-tensors quantized models on Ascend NPUs, as an SGLang plugin."""

__version__ = "0.1.0"
