"""Fixtures only; shared helpers live in tests/helpers (see tests/test_test_layout.py)."""

import pytest
import torch

import sgl_ascend.ops.contract as contract
from helpers import msmodelslim_matrix as matrix_helpers
from helpers.moe_cases import build_case
from helpers.real_model import real_model_paths


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def violations(monkeypatch):
    """Every NpuContractError raised during the test, as "op: rule" (even one the code swallows)."""
    seen = []
    init = contract.NpuContractError.__init__

    def record(self, op, rule, source):
        seen.append(f"{op}: {rule}")
        init(self, op, rule, source)

    monkeypatch.setattr(contract.NpuContractError, "__init__", record)
    return seen


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """name -> a built fused-MoE case of helpers.moe_cases (built once per test module)."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = build_case(name, str(tmp_path_factory.mktemp(name)), torch.Generator().manual_seed(1))
        return built[name]
    return get


@pytest.fixture(scope="session")
def msmodelslim_matrix():
    """name -> Built (scripts/msmodelslim_matrix.py) for the subset under test, from its cache or built by the
    real msmodelslim (scripts/test.sh builds its venv)."""
    if not matrix_helpers.matrix.msmodelslim_tool.ready():
        pytest.skip(matrix_helpers.matrix.msmodelslim_tool.missing())
    return matrix_helpers.build_subset()


@pytest.fixture(scope="session")
def real_model():
    """scheme -> folder of the real SmolLM2-135M-Instruct (bf16 and W8A8_DYNAMIC), built once and cached
    under ~/.cache/sgl-ascend/smollm2 by scripts/real_model.py (cold: a few minutes)."""
    return real_model_paths()
