"""SGLang adapters: quantization configs, linear / MoE methods, model patches, CPU compatibility.

Everything here imports SGLang; the core package (`sgl_ascend.layers`, `sgl_ascend.quant`) does not.
"""
