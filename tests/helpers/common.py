"""Paths of the checked-in fixtures and the relative error most tests compare with."""

import os

import torch

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
