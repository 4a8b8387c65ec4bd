"""Fixtures only; shared helpers live in tests/helpers (see tests/test_test_layout.py)."""

import pytest
import torch

from helpers.moe_cases import build_case


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """name -> a built fused-MoE case of helpers.moe_cases (built once per test module)."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = build_case(name, str(tmp_path_factory.mktemp(name)), torch.Generator().manual_seed(1))
        return built[name]
    return get
