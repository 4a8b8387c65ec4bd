#!/usr/bin/env bash
# Writes msModelSlim C8 checkpoints (int8 KV-cache scales) with the real msmodelslim 26.1.0 on CPU, from
# the tiny Qwen3 in tests/fixtures/msmodelslim, into a cache folder keyed by tool version + recipes:
#   ~/.cache/sgl-ascend/kv/<key>/qwen3-tiny-w8a8-dynamic-c8, qwen3-tiny-w8a8-c8, qwen3moe-tiny-w4a8-dynamic-c8
# (the last from the tiny Qwen3-MoE: attention W8A8_DYNAMIC, experts W4A8_DYNAMIC, C8) and copies them
# into tests/fixtures/msmodelslim/ (the CI-sized subset, committed) with --install.
# usage: scripts/make_c8_fixtures.sh [--install]     (about 1 minute per checkpoint)
# Needs .venv-msmodelslim (msmodelslim 26.1.0, torch 2.13, transformers 4.51): VENV=... to use another.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
fixtures=$repo/tests/fixtures/msmodelslim
venv=${VENV:-$repo/.venv-msmodelslim}
[ -x "$venv/bin/msmodelslim" ] || venv=/work/main/.venv-msmodelslim
export HF_HUB_OFFLINE=1
version=$("$venv/bin/python" -c "import importlib.metadata as m; print(m.version('msmodelslim'))")
# config:output:base model:msmodelslim model type
recipes=("w8a8_dynamic_c8:qwen3-tiny-w8a8-dynamic-c8:qwen3-tiny-bf16:Qwen3-8B"
         "w8a8_static_c8:qwen3-tiny-w8a8-c8:qwen3-tiny-bf16:Qwen3-8B"
         "moe_w4a8_dynamic_c8:qwen3moe-tiny-w4a8-dynamic-c8:qwen3moe-tiny-bf16:Qwen3-30B")
key=$( (echo "msmodelslim $version"; for r in "${recipes[@]}"; do echo "$r"; cat "$fixtures/configs/${r%%:*}.yaml"; done;
        sha256sum "$fixtures"/qwen3-tiny-bf16/model.safetensors "$fixtures"/qwen3moe-tiny-bf16/model.safetensors) |
      sha256sum | cut -c1-16)
out=${SGL_ASCEND_CACHE:-$HOME/.cache/sgl-ascend}/kv/$key
mkdir -p "$out/configs"
for r in "${recipes[@]}"; do
  IFS=: read -r cfg name base model_type <<< "$r"
  if [ ! -f "$out/$name/quant_model_description.json" ]; then
    sed "s#CALIB_PATH#$fixtures/configs/calib_tiny.jsonl#" "$fixtures/configs/$cfg.yaml" > "$out/configs/$cfg.yaml"
    rm -rf "$out/$name.tmp"
    "$venv/bin/msmodelslim" quant --model_path "$fixtures/$base" --save_path "$out/$name.tmp" --device cpu \
      --model_type "$model_type" --config_path "$out/configs/$cfg.yaml" --trust_remote_code False </dev/null
    mv "$out/$name.tmp" "$out/$name"
  fi
  echo "$out/$name"
  if [ "${1:-}" = "--install" ]; then
    rm -rf "$fixtures/$name" && cp -r "$out/$name" "$fixtures/$name"
  fi
done
