"""SGLang plugin entry point (`sglang.srt.plugins`), run by `load_plugins()` in every SGLang process.

SGLang calls `register()` in the launcher before it parses the command line and again at the start
of each scheduler / detokenizer process, so the CLI choices, the quantization registry and the
hooks below exist wherever SGLang looks for them. SGLang imports stay inside the functions so the
core package imports without SGLang.
"""

import logging

logger = logging.getLogger(__name__)

NEW_QUANTIZATION_METHODS = ("w4a4_int4",)


def register() -> None:
    from sgl_ascend.sglang import cpu_compat

    # First: everything below imports SGLang modules that import sgl_kernel.
    cpu_compat.activate()
    _register_cli_choices()
    _register_quantization_methods()
    _register_hooks()
    _register_int8_kv_cache()


def _register_cli_choices() -> None:
    from sglang.srt.arg_groups import choices

    missing = [name for name in NEW_QUANTIZATION_METHODS if name not in choices.QUANTIZATION_CHOICES]
    choices.add_quantization_method_choices(missing)


def _serves_checkpoint_formats() -> bool:
    """Our modelslim / compressed-tensors configs replace upstream's on NPU and CPU, not on CUDA/ROCm."""
    from sglang.srt.utils import is_cuda_alike

    return not is_cuda_alike()


def _register_quantization_methods() -> None:
    from sglang.srt.layers import quantization

    from sgl_ascend.sglang.ct_config import AscendCompressedTensorsConfig
    from sgl_ascend.sglang.modelslim_config import AscendModelSlimConfig, W4A4Int4Config

    ours = {"w4a4_int4": W4A4Int4Config}
    if _serves_checkpoint_formats():
        ours["modelslim"] = AscendModelSlimConfig
        ours["compressed-tensors"] = AscendCompressedTensorsConfig
    for registry in (quantization.QUANTIZATION_METHODS, quantization.CPU_QUANTIZATION_METHODS):
        # In-place: replacing an existing key keeps its position, so SGLang's
        # override_quantization_method loop still asks the configs in upstream's order.
        registry.update(ours)
    logger.info("sgl-ascend serves quantization methods: %s", ", ".join(sorted(ours)))


def _register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sgl_ascend.models.deepseek import float_kv_b_proj_for_mla, mla_for_torch_native
    from sgl_ascend.models.norm_bias import add_norm_bias
    from sgl_ascend.sglang import cpu_compat
    from sgl_ascend.sglang.resident import log_resident_bytes
    from sgl_ascend.sglang.weight_filter import drop_ignored_tensors

    HookRegistry.register("sglang.srt.model_loader.loader.DefaultModelLoader.load_weights_only",
                          drop_ignored_tensors, HookType.BEFORE)
    HookRegistry.register("sglang.srt.models.deepseek_common.attention_backend_handler."
                          "AttentionBackendRegistry.get_handler", mla_for_torch_native, HookType.AROUND)
    HookRegistry.register("sglang.srt.layers.layernorm.RMSNorm.__init__", add_norm_bias, HookType.AFTER)
    HookRegistry.register("sglang.srt.models.deepseek_common.deepseek_weight_loader."
                          "DeepseekV2WeightLoaderMixin.post_load_weights", float_kv_b_proj_for_mla, HookType.AROUND)
    HookRegistry.register("sglang.srt.model_loader.loader.DefaultModelLoader.load_weights_and_postprocess",
                          log_resident_bytes, HookType.AFTER)
    if cpu_compat.enabled():  # CPU-only hosts: SGLang's multi-process engine on gloo
        for target, hook, kind in cpu_compat.hooks():
            HookRegistry.register(target, hook, HookType[kind])


def _register_int8_kv_cache() -> None:
    """KV-cache quantized checkpoints and `--kv-cache-dtype int8`: page size, int8 pool and our attention backend
    (sglang/kv_cache.py)."""
    from sglang.srt.arg_groups.resolution_hooks import _HOOKS, register_resolution_hook
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sgl_ascend.sglang.kv_cache import RESOLUTION_STEP, add_kv_cache_server_args, \
        int8_kv_attention_backend, int8_kv_cache_dtype, online_kv_cache_dtype, resolve_int8_kv_page_size


    if resolve_int8_kv_page_size not in _HOOKS.get(RESOLUTION_STEP, ()):  # register() runs more than once
        register_resolution_hook(RESOLUTION_STEP)(resolve_int8_kv_page_size)
    runner = "sglang.srt.model_executor.model_runner.ModelRunner"
    HookRegistry.register("sglang.srt.server_args.ServerArgs.add_cli_args", add_kv_cache_server_args,
                          HookType.AFTER)
    HookRegistry.register("sglang.srt.mem_cache.kv_cache_dtype.configure_kv_cache_dtype", online_kv_cache_dtype,
                          HookType.AROUND)
    HookRegistry.register(f"{runner}.configure_kv_cache_dtype", int8_kv_cache_dtype, HookType.AFTER)
    HookRegistry.register("sglang.srt.model_executor.model_runner_components.attention_backend_setup."
                          "_build_full_attention_backend_from_str", int8_kv_attention_backend, HookType.AROUND)
