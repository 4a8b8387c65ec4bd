"""In-process checks (no server) of what lets SGLang's multi-process engine serve our layers: the CPU
compatibility hooks for --tp/--ep-size/--dp on gloo, the MoE start-up refusals and the resident-byte
count. tests/test_sglang_tp.py runs the real servers."""

import os
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.sglang


@pytest.fixture(scope="module")
def registered():
    from sgl_ascend.sglang_plugin import register

    register()


def test_cpu_hooks_are_registered_on_this_cpu_only_host(registered):
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sgl_ascend.sglang import cpu_compat

    assert cpu_compat.enabled()
    for target, hook, _ in cpu_compat.hooks():
        assert any(h is hook for _, h, _ in HookRegistry._hooks[target]), target


def test_cpu_compat_off_by_env(monkeypatch):
    from sgl_ascend.sglang import cpu_compat

    monkeypatch.setenv(cpu_compat.ENV_DISABLE, "1")
    assert not cpu_compat.enabled()


def test_rank_cores_split_and_wrap():
    from sgl_ascend.sglang.cpu_compat import rank_cores

    assert rank_cores({0, 1}, 2) == "0|1"
    assert rank_cores(range(8), 2) == "0,1,2,3|4,5,6,7"
    assert rank_cores(range(5), 2) == "0,1,2|3,4"
    assert rank_cores({0, 1}, 4) == "0|1|0|1"  # fewer cores than ranks: shared round-robin


def test_gloo_groups_get_no_pynccl():
    from sgl_ascend.sglang.cpu_compat import no_pynccl_on_gloo

    def original(group_ranks, local_rank, backend, use_pynccl=None, **kwargs):
        return use_pynccl

    assert no_pynccl_on_gloo(original, [[0, 1]], 0, "gloo") is False
    assert no_pynccl_on_gloo(original, [[0, 1]], 0, "gloo", True) is False
    assert no_pynccl_on_gloo(original, [[0, 1]], 0, backend="gloo", use_pynccl=True) is False
    assert no_pynccl_on_gloo(original, [[0, 1]], 0, "nccl") is None  # other backends untouched
    assert no_pynccl_on_gloo(original, [[0, 1]], 0, "nccl", True) is True


def test_threads_bound_per_rank_only_when_unset(monkeypatch):
    import sglang.srt.utils.numa_utils as numa_utils

    from sgl_ascend.sglang.cpu_compat import bind_threads_per_rank

    monkeypatch.setattr(numa_utils, "get_cpu_ids_by_node", lambda: [[0, 1]])
    seen = []

    def original(*, numa_index, world_size):
        bind = os.environ.get("SGLANG_CPU_OMP_THREADS_BIND")
        seen.append(bind)
        return bind.split("|")[numa_index] if bind else "0,1"

    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND", raising=False)
        assert bind_threads_per_rank(original, numa_index=0, world_size=1) == "0,1"  # one node per rank
        assert seen[-1] is None
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
        pinned = []
        monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: pinned.append(cpus))
        assert bind_threads_per_rank(original, numa_index=1, world_size=2) == "1"
        assert seen[-1] == "0|1" and pinned == [[1]] and torch.get_num_threads() == 1
        monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "0,1|0,1")  # the user's choice wins
        assert bind_threads_per_rank(original, numa_index=1, world_size=2) == "0,1"
        assert pinned == [[1]]
    finally:
        torch.set_num_threads(threads)
        assert os.sched_getaffinity(0) == affinity


def _moe_flags(monkeypatch, a2a="none", eplb=False, redundant=0, location="trivial"):
    import sglang.srt.layers.moe.utils as moe_utils
    import sglang.srt.runtime_context as runtime_context

    backend = moe_utils.MoeA2ABackend(a2a)
    monkeypatch.setattr(moe_utils, "get_moe_a2a_backend", lambda: backend)
    moe = SimpleNamespace(enable_eplb=eplb, ep_num_redundant_experts=redundant, init_expert_location=location)
    monkeypatch.setattr(runtime_context, "get_exec", lambda: SimpleNamespace(moe=moe))


@pytest.mark.parametrize("flags, message", [
    ({"a2a": "deepep"}, "--moe-a2a-backend deepep is not served.*Use --moe-a2a-backend none"),
    ({"a2a": "ascend_fuseep"}, "--moe-a2a-backend ascend_fuseep is not served"),
    ({"eplb": True}, "Drop --enable-eplb, --ep-num-redundant-experts and --init-expert-location"),
    ({"redundant": 2}, "EPLB / redundant experts"),
    ({"location": "/x/expert_location.json"}, "EPLB / redundant experts"),
])
def test_unserved_moe_flags_are_refused(registered, monkeypatch, flags, message):
    from sgl_ascend.sglang.moe_method import refuse_unserved_flags

    _moe_flags(monkeypatch, **flags)
    with pytest.raises(ValueError, match=message):
        refuse_unserved_flags(torch.nn.Module())


def test_fused_shared_experts_are_refused(registered, monkeypatch):
    from sgl_ascend.sglang.moe_method import refuse_unserved_flags

    _moe_flags(monkeypatch)
    layer = torch.nn.Module()
    layer.num_fused_shared_experts = 0
    refuse_unserved_flags(layer)
    layer.num_fused_shared_experts = 1
    with pytest.raises(ValueError, match="--disable-shared-experts-fusion"):
        refuse_unserved_flags(layer)


def test_resident_bytes_count_parameters_and_persistent_buffers():
    from sgl_ascend.sglang.resident import resident_bytes

    model = torch.nn.Linear(4, 8, dtype=torch.bfloat16)  # 32 + 8 bf16
    model.register_buffer("deq_scale", torch.zeros(8, dtype=torch.int64))
    model.register_buffer("cos_sin_cache", torch.zeros(100), persistent=False)
    assert resident_bytes(model) == 40 * 2 + 8 * 8


def test_tp_not_dividing_heads_is_refused_on_cpu():
    from sgl_ascend.sglang.cpu_compat import refuse_padded_heads

    def config(quantization, heads=4, kv_heads=2):
        return SimpleNamespace(quantization=quantization, num_attention_heads=heads,
                               get_total_num_kv_heads=lambda: kv_heads)

    def original(model_config, load_config, tp_size):
        return model_config

    with pytest.raises(ValueError, match=r"--tp 4 does not divide this model's 4 attention / 2 KV heads.*here: 1, 2"):
        refuse_padded_heads(original, config("modelslim"), None, 4)
    assert refuse_padded_heads(original, cfg := config("modelslim"), None, 2) is cfg
    assert refuse_padded_heads(original, cfg := config(None), None, 4) is cfg  # SGLang's own models: it pads
