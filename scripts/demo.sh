#!/usr/bin/env bash
# The README's main job: install sglang==0.5.23 + sgl-ascend into .venv-sglang (first run ~8 min),
# then serve a small msModelSlim checkpoint on CPU with the real sglang.launch_server and send one
# request (scripts/cpu_demo.sh). Arguments go to cpu_demo.sh: [MODEL_DIR] [launch_server args].
source "$(dirname "$0")/env.sh"
sglang_venv
PYTHON="$SGLANG_VENV/bin/python" exec bash "$ROOT/scripts/cpu_demo.sh" "$@"
