"""Checkpoints written by the real msmodelslim tool on demand, cached by versions and recipe.

`quantized(recipe, base)` runs `msmodelslim quant --device cpu` on a tiny model of tests/fixtures/msmodelslim
with the recipe tests/fixtures/msmodelslim/configs/<recipe>.yaml, once: the output lands in
~/.cache/sgl-ascend/new-schemes/<recipe>-<key>/, key = sha1 of the msmodelslim / transformers / torch
versions, the recipe text, the calibration text and the base model's files. A later call (or CI with the
cache) reuses it; a changed recipe or tool version makes a new key, so a stale output is never read.
The tool runs from the venv `$SGL_ASCEND_MSMODELSLIM_VENV` (default: the repository's .venv-msmodelslim,
built by scripts/env.sh `msmodelslim_venv`); without it and without a cached output the test is skipped,
saying what to build.
"""

import glob
import hashlib
import os
import shutil
import subprocess
import tempfile

import pytest

from helpers.common import MSMODELSLIM

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(MSMODELSLIM, "configs")
CALIB = os.path.join(CONFIGS, "calib_tiny.jsonl")
CACHE = os.path.join(os.path.expanduser(os.environ.get("SGL_ASCEND_CACHE", "~/.cache/sgl-ascend")), "new-schemes")
# the msmodelslim model adapter each tiny base model is quantized through
MODEL_TYPES = {"qwen3-tiny-bf16": "Qwen3-8B", "qwen3moe-tiny-bf16": "Qwen3-30B"}


def venv() -> str:
    return os.environ.get("SGL_ASCEND_MSMODELSLIM_VENV", os.path.join(REPO, ".venv-msmodelslim"))


def _versions(env: str) -> str:
    """"msmodelslim-26.1.0 torch-2.13.0+cpu transformers-4.51.0" from the venv's dist-info folders."""
    found = []
    for package in ("msmodelslim", "torch", "transformers"):
        infos = glob.glob(os.path.join(env, "lib", "python*", "site-packages", f"{package}-*.dist-info"))
        found.append(os.path.basename(infos[0])[:-len(".dist-info")] if infos else f"{package}-?")
    return " ".join(found)


def _digest(*parts: bytes) -> str:
    h = hashlib.sha1()
    for part in parts:
        h.update(hashlib.sha1(part).digest())
    return h.hexdigest()[:12]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def cache_key(recipe: str, base: str, env: str) -> str:
    model_dir = os.path.join(MSMODELSLIM, base)
    files = [_read(p) for p in sorted(glob.glob(os.path.join(model_dir, "*"))) if os.path.isfile(p)]
    return _digest(_versions(env).encode(), _read(os.path.join(CONFIGS, f"{recipe}.yaml")), _read(CALIB),
                   MODEL_TYPES[base].encode(), *files)


def quantized(recipe: str, base: str = "qwen3-tiny-bf16") -> str:
    """The folder msmodelslim wrote for `recipe` on `base` (built on the first call, then cached)."""
    env = venv()
    tool = os.path.join(env, "bin", "msmodelslim")
    key = cache_key(recipe, base, env)
    out = os.path.join(CACHE, f"{recipe}-{key}")
    if os.path.isfile(os.path.join(out, "quant_model_description.json")):
        return out
    if not os.path.exists(tool):
        pytest.skip(f"no cached msmodelslim output for {recipe} and no msmodelslim at {tool}: build the venv "
                    "(source scripts/env.sh && msmodelslim_venv) or set SGL_ASCEND_MSMODELSLIM_VENV")
    os.makedirs(CACHE, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f"{recipe}-", dir=CACHE)
    try:
        config = os.path.join(work, f"{recipe}.yaml")
        with open(config, "w") as f:
            f.write(_read(os.path.join(CONFIGS, f"{recipe}.yaml")).decode().replace("CALIB_PATH", CALIB))
        save = os.path.join(work, "out")
        run = subprocess.run([tool, "quant", "--model_path", os.path.join(MSMODELSLIM, base), "--save_path", save,
                              "--device", "cpu", "--model_type", MODEL_TYPES[base], "--config_path", config,
                              "--trust_remote_code", "False"], stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}, timeout=900)
        if run.returncode or not os.path.isfile(os.path.join(save, "quant_model_description.json")):
            raise RuntimeError(f"msmodelslim quant {recipe} failed ({run.returncode}):\n{run.stdout[-3000:]}\n"
                               f"{run.stderr[-3000:]}")
        with open(os.path.join(save, "msmodelslim_versions.txt"), "w") as f:
            f.write(_versions(env) + "\n")
        try:
            os.rename(save, out)  # atomic: a concurrent builder's identical output may have won
        except OSError:
            if not os.path.isdir(out):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
