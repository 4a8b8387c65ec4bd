"""The one way this repository runs the real msmodelslim (26.1.0, on CPU).

Every producer of msModelSlim checkpoints goes through here: the conformance matrix
(scripts/msmodelslim_matrix.py), the real model (scripts/real_model.py), the tiny-fixture recipes the
tests and the committed C8 fixtures use (`fixture` below). The tool lives in its own venv, built by
scripts/env.sh `msmodelslim_venv` (torch 2.13, transformers 4.51: with transformers 5.x msmodelslim leaves
MoE experts FLOAT); SGL_ASCEND_MSMODELSLIM_VENV points at another one.

    python scripts/msmodelslim_tool.py fixture RECIPE [--base qwen3-tiny-bf16] [--calibration FILE] [--install NAME]
    python scripts/msmodelslim_tool.py committed [--install] [NAME ...]

`fixture` quantizes a tiny model of tests/fixtures/msmodelslim with tests/fixtures/msmodelslim/configs/
RECIPE.yaml, cached under ~/.cache/sgl-ascend/new-schemes/RECIPE-<key> (key: tool versions, recipe,
calibration, base model files), and prints the folder; --install copies it into the fixtures as NAME.
`committed` does that for the committed fixtures listed in COMMITTED (all of them, or the NAMEs given).

Standard library only, so any Python (the core venv's, SGLang's) can import it.
"""

import argparse
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_VAR = "SGL_ASCEND_MSMODELSLIM_VENV"
CACHE_ROOT = os.path.expanduser(os.environ.get("SGL_ASCEND_CACHE", "~/.cache/sgl-ascend"))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "msmodelslim")
FIXTURE_CONFIGS = os.path.join(FIXTURES, "configs")
# the msmodelslim model adapter each tiny fixture model is quantized through
FIXTURE_MODEL_TYPES = {"qwen3-tiny-bf16": "Qwen3-8B", "qwen3moe-tiny-bf16": "Qwen3-30B"}
# Committed fixtures quantized from a committed base: folder -> (recipe, base, calibration). The rest
# (the group-wise V0 experts on a base built for them) come from tests/fixtures/msmodelslim/
# make_msmodelslim_fixtures.sh, which builds the base models too.
COMMITTED = {
    "qwen3-tiny-w8a8-dynamic-c8": ("w8a8_dynamic_c8", "qwen3-tiny-bf16", "calib_tiny.jsonl"),
    "qwen3-tiny-w8a8-c8": ("w8a8_static_c8", "qwen3-tiny-bf16", "calib_tiny.jsonl"),
    "qwen3-tiny-w8a8-mix-c8": ("w8a8_mix_c8", "qwen3-tiny-bf16", "calib_tiny.jsonl"),
    "qwen3moe-tiny-w4a8-dynamic-c8": ("moe_w4a8_dynamic_c8", "qwen3moe-tiny-bf16", "calib_tiny.jsonl"),
    # FlatQuant trains on 4 samples concatenated along the batch dim: they need equal token counts
    "qwen3-tiny-w4a4-flatquant": ("w4a4_flatquant", "qwen3-tiny-bf16", "calib_equal_length.jsonl"),
}


def venv_dir() -> str:
    return os.environ.get(VENV_VAR, os.path.join(ROOT, ".venv-msmodelslim"))


def python() -> str:
    return os.path.join(venv_dir(), "bin", "python")


def ready() -> bool:
    return os.access(os.path.join(venv_dir(), "bin", "msmodelslim"), os.X_OK)


def missing() -> str:
    """What to do when the venv is not there."""
    return (f"no msmodelslim at {venv_dir()}: build it with `source scripts/env.sh && msmodelslim_venv` "
            f"(scripts/test.sh does), or set {VENV_VAR} to a venv that has msmodelslim 26.1.0")


def versions(packages: Sequence[str] = ("msmodelslim", "torch", "transformers", "safetensors")) -> Dict[str, str]:
    """package -> version installed in the venv, read from its dist-info folders (no interpreter started)."""
    found = {}
    for package in packages:
        infos = glob.glob(os.path.join(venv_dir(), "lib", "python*", "site-packages", f"{package}-*.dist-info"))
        found[package] = os.path.basename(infos[0])[len(package) + 1:-len(".dist-info")] if infos else "?"
    return found


def atomic_build(final: str, build) -> str:
    """build(tmp_dir) writes into a fresh sibling folder that becomes `final` only when complete, so a
    cut-off build is a cache miss, never a half-written hit. Returns `final`."""
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=os.path.dirname(final))
    try:
        build(tmp)
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(final):  # else a concurrent builder finished first: use theirs
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def quant(model: str, save: str, config: str, model_type: str, log: str, cwd: Optional[str] = None,
          timeout: Optional[float] = None) -> int:
    """`msmodelslim quant --device cpu`; its output goes to `log`. Returns the exit code (0 also needs
    the caller to find the files it expects: the tool exits 0 on some failures)."""
    cmd = [os.path.join(venv_dir(), "bin", "msmodelslim"), "quant", "--model_path", model, "--save_path", save,
           "--device", "cpu", "--model_type", model_type, "--config_path", config, "--trust_remote_code", "False"]
    # offline: the recipes name local folders; no PYTHONPATH: the tool must not import this checkout
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    with open(log, "w") as f:
        # cwd: the V0 calibration drops features.npy into the working directory
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
                              cwd=cwd or os.path.dirname(log), timeout=timeout).returncode


def log_tail(log: str, chars: int = 4000) -> str:
    with open(log) as f:
        return f.read()[-chars:]


def _digest(*parts: bytes) -> str:
    h = hashlib.sha1()
    for part in parts:
        h.update(hashlib.sha1(part).digest())
    return h.hexdigest()[:12]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def fixture_key(recipe: str, base: str, calibration: str) -> str:
    model_dir = os.path.join(FIXTURES, base)
    files = [_read(p) for p in sorted(glob.glob(os.path.join(model_dir, "*"))) if os.path.isfile(p)]
    tool_versions = " ".join(f"{p}-{v}" for p, v in versions(("msmodelslim", "torch", "transformers")).items())
    return _digest(tool_versions.encode(), _read(os.path.join(FIXTURE_CONFIGS, f"{recipe}.yaml")),
                   _read(os.path.join(FIXTURE_CONFIGS, calibration)), FIXTURE_MODEL_TYPES[base].encode(), *files)


def fixture(recipe: str, base: str = "qwen3-tiny-bf16", calibration: str = "calib_tiny.jsonl") -> str:
    """The folder msmodelslim wrote for configs/`recipe`.yaml on the tiny `base`, calibrated on
    configs/`calibration` (built once, then cached)."""
    out = os.path.join(CACHE_ROOT, "new-schemes", f"{recipe}-{fixture_key(recipe, base, calibration)}")
    if os.path.isfile(os.path.join(out, "quant_model_description.json")):
        return out
    if not ready():
        raise FileNotFoundError(missing())

    def build(tmp):
        config = os.path.join(tmp, f"{recipe}.yaml")
        with open(config, "w") as f:
            f.write(_read(os.path.join(FIXTURE_CONFIGS, f"{recipe}.yaml")).decode()
                    .replace("CALIB_PATH", os.path.join(FIXTURE_CONFIGS, calibration)))
        work = tempfile.mkdtemp(prefix=f"{recipe}-")
        try:
            log, save = os.path.join(work, "msmodelslim.log"), os.path.join(work, "out")
            code = quant(os.path.join(FIXTURES, base), save, config, FIXTURE_MODEL_TYPES[base], log, timeout=900)
            if code or not os.path.isfile(os.path.join(save, "quant_model_description.json")):
                raise RuntimeError(f"msmodelslim quant {recipe} on {base} failed (exit {code}):\n{log_tail(log)}")
            for name in os.listdir(save):
                shutil.move(os.path.join(save, name), tmp)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        os.remove(config)
    return atomic_build(out, build)


def install(folder: str, name: str) -> str:
    target = os.path.join(FIXTURES, name)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folder, target)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fix = sub.add_parser("fixture", help="quantize a tiny fixture model with a recipe of tests/fixtures/msmodelslim/configs")
    fix.add_argument("recipe", help="a configs/<recipe>.yaml name, e.g. w8a8_dynamic_c8")
    fix.add_argument("--base", default="qwen3-tiny-bf16", choices=sorted(FIXTURE_MODEL_TYPES))
    fix.add_argument("--calibration", default="calib_tiny.jsonl", help="a file of configs/")
    fix.add_argument("--install", metavar="NAME", help="copy the output to tests/fixtures/msmodelslim/NAME")
    com = sub.add_parser("committed", help="rebuild the committed fixtures of COMMITTED")
    com.add_argument("names", nargs="*", help=f"of: {', '.join(COMMITTED)} (default: all)")
    com.add_argument("--install", action="store_true", help="copy the outputs over the committed folders")
    args = parser.parse_args(argv)
    if args.command == "fixture":
        jobs = [(args.install, (args.recipe, args.base, args.calibration))]
    else:
        unknown = [n for n in args.names if n not in COMMITTED]
        if unknown:
            parser.error(f"unknown fixture(s) {unknown}; known: {', '.join(COMMITTED)}")
        jobs = [(name if args.install else None, COMMITTED[name]) for name in args.names or COMMITTED]
    for name, how in jobs:
        try:
            out = fixture(*how)
        except (FileNotFoundError, RuntimeError) as e:
            print(e, file=sys.stderr)
            return 1
        print(install(out, name) if name else out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
