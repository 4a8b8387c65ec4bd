#!/usr/bin/env bash
# Environment for SGLang on Ascend NPUs (sourced by the npu_*.sh launchers).
# Values follow SGLang's Ascend deployment guides; override any of them before sourcing.

# CANN toolkit (and ATB / nnal when installed): libraries, op kernels, torch_npu's runtime.
for env in /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/nnal/atb/set_env.sh; do
    if [ -f "$env" ]; then
        # shellcheck disable=SC1090
        source "$env"
    fi
done

# Which NPUs this server uses (the NPU counterpart of CUDA_VISIBLE_DEVICES).
export ASCEND_RT_VISIBLE_DEVICES=${ASCEND_RT_VISIBLE_DEVICES:-0}
# Fewer fragmentation OOMs with growing KV caches.
export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}
# HCCL (collectives between NPUs): buffer per communicator in MB, AIV expansion for small messages.
export HCCL_BUFFSIZE=${HCCL_BUFFSIZE:-200}
export HCCL_OP_EXPANSION_MODE=${HCCL_OP_EXPANSION_MODE:-AIV}
# Network interfaces HCCL / Gloo bind to; set them on multi-NIC hosts (e.g. eth0).
if [ -n "${NIC:-}" ]; then
    export HCCL_SOCKET_IFNAME=$NIC GLOO_SOCKET_IFNAME=$NIC
fi
# Host threads: avoid oversubscribing the CPU cores next to each NPU process.
export OMP_PROC_BIND=${OMP_PROC_BIND:-false}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-16}
# Unset debugging knobs that serialise kernels.
unset ASCEND_LAUNCH_BLOCKING

# sgl-ascend is found through its `sglang.srt.plugins` entry point; SGLANG_PLUGINS (if set) must name it.
if [ -n "${SGLANG_PLUGINS:-}" ] && [[ ",$SGLANG_PLUGINS," != *",sgl_ascend,"* ]]; then
    export SGLANG_PLUGINS="$SGLANG_PLUGINS,sgl_ascend"
fi
