#!/usr/bin/env bash
# Serve an msModelSlim or compressed-tensors checkpoint on one Ascend NPU.
#   scripts/npu_serve.sh MODEL_DIR [extra sglang.launch_server args...]
# The quantization method comes from the checkpoint (quant_model_description.json -> modelslim,
# config.json quantization_config -> compressed-tensors); pass `--quantization w4a4_int4` for W4A4_DYNAMIC.
set -euo pipefail
MODEL=${1:?usage: $0 MODEL_DIR [extra args]}; shift
source "$(dirname "$0")/npu_env.sh"
exec python -m sglang.launch_server \
    --model-path "$MODEL" \
    --device npu \
    --attention-backend ascend \
    --host "${HOST:-0.0.0.0}" --port "${PORT:-30000}" \
    --mem-fraction-static "${MEM_FRACTION:-0.8}" \
    "$@"
