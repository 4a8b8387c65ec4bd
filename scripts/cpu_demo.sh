#!/usr/bin/env bash
# The README's main job on a CPU host: serve a small msModelSlim-quantized Qwen3 with the real
# `python -m sglang.launch_server` (sgl-ascend's plugin picks the scheme from the checkpoint and
# runs the NPU ops through their PyTorch twins), send one /v1/completions request on loopback,
# print the completion, shut the server down.
#   scripts/cpu_demo.sh [MODEL_DIR] [extra launch_server args]
# Default model: tests/fixtures/msmodelslim/qwen3-tiny-w8a8-dynamic (random weights, so the text is
# noise; the point is the path). PYTHON selects the interpreter (the venv with sglang + sgl-ascend).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODEL=${1:-$ROOT/tests/fixtures/msmodelslim/qwen3-tiny-w8a8-dynamic}
[ $# -gt 0 ] && shift
PYTHON=${PYTHON:-python}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
LOG=$(mktemp -t sgl-ascend-demo.XXXXXX.log)

# CPU engine flags (README "SGLang on a CPU host"). sgl_kernel's CUDA-only wheel cannot load here;
# sgl-ascend's CPU compatibility layer says so in the log and lets SGLang start.
SGLANG_USE_CPU_ENGINE=1 setsid "$PYTHON" -m sglang.launch_server --model-path "$MODEL" \
    --host 127.0.0.1 --port "$PORT" --device cpu --attention-backend torch_native \
    --sampling-backend pytorch --disable-cuda-graph --max-total-tokens 4096 \
    --mem-fraction-static 0.05 "$@" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill -TERM -- -$SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT

echo "serving $MODEL on 127.0.0.1:$PORT (log: $LOG)"
for _ in $(seq 1 300); do
    if ! kill -0 "$SERVER" 2>/dev/null; then echo "server exited:"; tail -40 "$LOG"; exit 1; fi
    curl -sf "http://127.0.0.1:$PORT/health_generate" >/dev/null && break
    sleep 1
done
curl -sf "http://127.0.0.1:$PORT/health_generate" >/dev/null || { echo "server not ready after 300 s"; tail -40 "$LOG"; exit 1; }
# the plugin's own lines (not SGLang's server_args, which names the model path: ~/.cache/sgl-ascend/...)
sed -n 's/^\[[^]]*\] //; /^sgl-ascend/p' "$LOG" | sort -u

curl -sf "http://127.0.0.1:$PORT/v1/completions" -H "Content-Type: application/json" \
    -d '{"model": "default", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}' \
    | "$PYTHON" -c 'import json, sys; r = json.load(sys.stdin); print("completion:", repr(r["choices"][0]["text"])); print("usage:", r["usage"])'
