"""Checkpoints written by the real msmodelslim tool on demand, cached by versions and recipe.

`quantized(recipe, base)` is scripts/msmodelslim_tool.py's `fixture`: `msmodelslim quant --device cpu` on a
tiny model of tests/fixtures/msmodelslim with the recipe tests/fixtures/msmodelslim/configs/<recipe>.yaml,
run once and cached under ~/.cache/sgl-ascend/new-schemes/ keyed by the tool versions, the recipe, the
calibration text and the base model's files. Without the msmodelslim venv and without a cached output the
test is skipped, saying what to build.
"""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("msmodelslim_tool", os.path.join(ROOT, "scripts", "msmodelslim_tool.py"))
msmodelslim_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(msmodelslim_tool)


def quantized(recipe: str, base: str = "qwen3-tiny-bf16") -> str:
    """The folder msmodelslim wrote for `recipe` on `base` (built on the first call, then cached)."""
    try:
        return msmodelslim_tool.fixture(recipe, base)
    except FileNotFoundError as e:
        pytest.skip(f"no cached msmodelslim output for {recipe}: {e}")
