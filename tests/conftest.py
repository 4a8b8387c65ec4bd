"""Fixtures only; shared helpers live in tests/helpers (see tests/test_test_layout.py)."""

import pytest
import torch


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
