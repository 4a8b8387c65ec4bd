"""End to end: SGLang on CPU serves a compressed-tensors checkpoint through sgl-ascend's config.

The checkpoint is a tiny Qwen3 quantized by the compressed-tensors library itself (tests/helpers/ct.py,
W4A16 group-32, pack-quantized); the float reference is the same checkpoint decompressed by the
library (transformers' compressed-tensors integration, run_compressed=False), in float32. The MoE case:
the tiny Qwen3-MoE with its experts quantized by the library to W4A16 group-32 (served by
CTW4A16Experts on npu_grouped_matmul's weight-only path); reference: transformers in float32 on the
library's own decompressed experts.
"""

import time

import pytest

from helpers.float_reference import compare
from helpers.sglang_server import launch

pytestmark = pytest.mark.sglang

PROMPT = list(range(10, 26))
MAX_TOKENS = 8
TOLERANCE = 0.05  # nats; weight-only scheme, the error left is bf16 vs float32


def test_serves_compressed_tensors_w4a16(tmp_path):
    from helpers.ct import library_decompressed_logprobs, write_qwen3_ct_checkpoint

    model_dir = write_qwen3_ct_checkpoint(str(tmp_path / "ct-w4a16"), "w4a16_group")
    start = time.monotonic()
    with launch(model_dir) as server:
        served = server.complete(PROMPT, MAX_TOKENS)
        log = server.log_tail(400)
    served_s = time.monotonic() - start
    result = compare(served, library_decompressed_logprobs(model_dir, PROMPT, served["token_ids"]), TOLERANCE)
    print(f"\n[e2e] compressed-tensors w4a16_group: server {served_s:.1f}s, {result}")
    assert len(served["token_ids"]) == MAX_TOKENS
    assert result["ok"], result
    assert "sgl-ascend compressed-tensors config: format pack-quantized" in log, log[-3000:]


def test_serves_compressed_tensors_w4a16_moe(tmp_path):
    from helpers.ct import EXPERT_SCHEMES, write_qwen3moe_ct_checkpoint
    from helpers.float_reference import teacher_forced_logprobs

    reference = str(tmp_path / "float")
    model_dir = write_qwen3moe_ct_checkpoint(str(tmp_path / "ct-moe-w4a16"), EXPERT_SCHEMES["w4a16_group"],
                                             reference_dir=reference)
    start = time.monotonic()
    with launch(model_dir) as server:
        served = server.complete(PROMPT, MAX_TOKENS)
        log = server.log_tail(400)
    served_s = time.monotonic() - start
    result = compare(served, teacher_forced_logprobs(reference, PROMPT, served["token_ids"]), TOLERANCE)
    print(f"\n[e2e] compressed-tensors MoE w4a16_group: server {served_s:.1f}s, {result}")
    assert len(served["token_ids"]) == MAX_TOKENS
    assert result["ok"], result
    # the experts are the only quantized layers: the registry's one WNA16 expert class (CTW4A16Experts) served them
    assert "sgl-ascend compressed-tensors config: format pack-quantized" in log, log[-3000:]
