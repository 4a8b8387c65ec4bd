#!/usr/bin/env bash
# Serve a quantized model with tensor parallelism over TP NPUs of one node.
#   TP=4 scripts/npu_serve_tp.sh MODEL_DIR [extra args]
#   TP=8 DP=2 scripts/npu_serve_tp.sh MODEL_DIR   # DP attention: 2 attention replicas of TP/DP ranks each
# On Atlas A3 each card has two dies, so TP counts dies (TP=2 per card). DP (default 1) must divide
# TP; DP > 1 adds --dp-size DP --enable-dp-attention (dense/MoE layers stay TP-sharded over all TP ranks).
set -euo pipefail
MODEL=${1:?usage: TP=N [DP=M] $0 MODEL_DIR [extra args]}; shift
TP=${TP:-2}
DP=${DP:-1}
if [ $((TP % DP)) -ne 0 ]; then echo "DP=$DP must divide TP=$TP" >&2; exit 2; fi
DP_ARGS=()
[ "$DP" -gt 1 ] && DP_ARGS=(--dp-size "$DP" --enable-dp-attention)
export ASCEND_RT_VISIBLE_DEVICES=${ASCEND_RT_VISIBLE_DEVICES:-$(seq -s, 0 $((TP - 1)))}
source "$(dirname "$0")/npu_env.sh"
exec python -m sglang.launch_server \
    --model-path "$MODEL" \
    --device npu \
    --attention-backend ascend \
    --tp-size "$TP" \
    "${DP_ARGS[@]}" \
    --host "${HOST:-0.0.0.0}" --port "${PORT:-30000}" \
    --mem-fraction-static "${MEM_FRACTION:-0.8}" \
    "$@"
