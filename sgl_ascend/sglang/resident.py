"""Logs the bytes each rank holds resident after SGLang loaded the model.

Registered AFTER `DefaultModelLoader.load_weights_and_postprocess` (weights loaded and every quant
method's `process_weights_after_loading` done). The count is what `sgl-ascend inspect --tp N --ep M`
predicts per device: every parameter plus the persistent buffers (the weights some schemes keep as
buffers); non-persistent buffers such as RoPE caches are not weights and are left out. Under
tensor/expert parallelism the number is this rank's share, so the server log shows, rank by rank,
whether the checkpoint is sliced as predicted.
"""

import logging

import torch

logger = logging.getLogger(__name__)


def resident_bytes(model: torch.nn.Module) -> int:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        skipped = module._non_persistent_buffers_set
        total += sum(b.numel() * b.element_size() for name, b in module.named_buffers(recurse=False)
                     if name not in skipped)
    return total


def log_resident_bytes(result, model, *args, **kwargs):
    """AFTER hook: one log line per rank, `sgl-ascend resident bytes: tp rank R/N, ep rank R/M: B`."""
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    logger.info("sgl-ascend resident bytes: tp rank %d/%d, ep rank %d/%d: %d", parallel.tp_rank,
                parallel.tp_size, parallel.moe_ep_rank, parallel.moe_ep_size, resident_bytes(model))
    return result
