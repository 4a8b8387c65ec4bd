#!/usr/bin/env bash
# Serve a quantized dense model with tensor parallelism over TP NPUs of one node.
#   TP=4 scripts/npu_serve_tp.sh MODEL_DIR [extra args]
# On Atlas A3 each card has two dies, so TP counts dies (TP=2 per card).
set -euo pipefail
MODEL=${1:?usage: TP=N $0 MODEL_DIR [extra args]}; shift
TP=${TP:-2}
export ASCEND_RT_VISIBLE_DEVICES=${ASCEND_RT_VISIBLE_DEVICES:-$(seq -s, 0 $((TP - 1)))}
source "$(dirname "$0")/npu_env.sh"
exec python -m sglang.launch_server \
    --model-path "$MODEL" \
    --device npu \
    --attention-backend ascend \
    --tp-size "$TP" \
    --host "${HOST:-0.0.0.0}" --port "${PORT:-30000}" \
    --mem-fraction-static "${MEM_FRACTION:-0.8}" \
    "$@"
