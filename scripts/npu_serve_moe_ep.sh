#!/usr/bin/env bash
# Serve a quantized MoE model (Qwen3-MoE, DeepSeek-V2/V3) with TP attention and expert parallelism.
#   TP=8 EP=8 scripts/npu_serve_moe_ep.sh MODEL_DIR [extra args]
#   TP=16 EP=16 DP=2 scripts/npu_serve_moe_ep.sh MODEL_DIR   # + DP attention (see npu_serve_tp.sh)
# Experts are split over EP ranks (each holds num_experts / EP of them); attention and dense layers
# over TP. Experts move between ranks with SGLang's default dispatch (--moe-a2a-backend none): sgl-ascend's
# MoE methods refuse other a2a backends, EPLB and fused shared experts at start-up (docs/sglang.md). DeepSeek MLA models: SGLANG_NPU_USE_MLAPO=1 fuses MLA preprocessing, and
# SGLANG_NPU_USE_MULTI_STREAM=1 overlaps shared and routed experts.
set -euo pipefail
MODEL=${1:?usage: TP=N EP=M $0 MODEL_DIR [extra args]}; shift
export TP=${TP:-8}
EP=${EP:-$TP}
export SGLANG_NPU_USE_MULTI_STREAM=${SGLANG_NPU_USE_MULTI_STREAM:-1}
# Same launch as a TP server, with experts split over EP ranks.
exec bash "$(dirname "$0")/npu_serve_tp.sh" "$MODEL" --ep-size "$EP" "$@"
