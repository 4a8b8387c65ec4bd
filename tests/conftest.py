import os

import pytest
import torch

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
MSMODELSLIM = os.path.join(FIXTURES, "msmodelslim")


def msmodelslim_fixture(name: str) -> str:
    """Path of a checkpoint written by the real msmodelslim tool (see fixtures/msmodelslim/README.md)."""
    return os.path.join(MSMODELSLIM, name)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.float(), expected.float()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
