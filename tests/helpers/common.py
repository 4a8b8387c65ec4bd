"""Paths of the checked-in fixtures, rewritten copies of them, and the relative error most tests compare with."""

import json
import os
import shutil

import torch

from sgl_ascend.quant.checkpoint import SafetensorsCheckpoint
from sgl_ascend.testing import synthetic

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
MSMODELSLIM = os.path.join(FIXTURES, "msmodelslim")
# the tiny bf16 Qwen3 the msModelSlim fixtures were quantized from; its tokenizer serves every tiny model
QWEN3_BF16 = os.path.join(MSMODELSLIM, "qwen3-tiny-bf16")


def msmodelslim_fixture(name: str) -> str:
    """Path of a checkpoint written by the real msmodelslim tool (see fixtures/msmodelslim/README.md)."""
    return os.path.join(MSMODELSLIM, name)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.float(), expected.float()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def rewrite_modelslim(src: str, dst: str, rewrite=None, description_edit=None, extra=None) -> str:
    """A copy of the msModelSlim checkpoint at `src` in `dst` with tensors rewritten (name, tensor ->
    tensor, or None to drop), the description edited in place by `description_edit`, `extra` tensors
    added; written unindexed through the one msModelSlim writer. Other files are copied as they are."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json",
                                                            synthetic.MODELSLIM_DESCRIPTION))
    ckpt = SafetensorsCheckpoint(src)
    tensors = {}
    for name in ckpt.names():
        tensor = rewrite(name, ckpt.get(name)) if rewrite else ckpt.get(name)
        if tensor is not None:
            tensors[name] = tensor.contiguous()  # safetensors writes contiguous tensors only
    tensors.update(extra or {})
    with open(os.path.join(src, synthetic.MODELSLIM_DESCRIPTION)) as f:
        description = json.load(f)
    if description_edit:
        description_edit(description)
    return synthetic.write_modelslim_folder(dst, tensors, description, indexed=False)
