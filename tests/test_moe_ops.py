"""The MoE op twins: routing (npu_moe_init_routing_v2), combine (npu_moe_token_unpermute) and the
group-wise W4A8 form of npu_grouped_matmul, checked against brute-force definitions."""

import pytest
import torch

from sgl_ascend.ops import ops
from sgl_ascend.ops.int4 import pack_int4_to_int32
from sgl_ascend.ops.scales import encode_fp32_as_int64


def _routing_case(gen, tokens=7, experts=6, top_k=3):
    x = torch.randn(tokens, 16, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).to(torch.int32)
    return x, ids


def test_init_routing_v2_sorts_pairs_by_expert(gen):
    x, ids = _routing_case(gen)
    rows, row_idx, counts, _ = ops.npu_moe_init_routing_v2(
        x, ids, active_num=ids.numel(), expert_num=6, expert_tokens_num_type=1, expert_tokens_num_flag=True,
        quant_mode=-1, active_expert_range=[0, 6])
    pairs = sorted(range(ids.numel()), key=lambda p: (int(ids.view(-1)[p]), p))  # stable by expert
    for i, p in enumerate(pairs):
        assert torch.equal(rows[i], x[p // 3]) and int(row_idx[p]) == i
    assert counts.tolist() == torch.bincount(ids.view(-1).long(), minlength=6).tolist()
    cum = ops.npu_moe_init_routing_v2(x, ids, active_num=ids.numel(), expert_num=6, expert_tokens_num_type=0,
                                      expert_tokens_num_flag=True, quant_mode=-1)[2]
    assert cum.tolist() == counts.cumsum(0).tolist()


def test_init_routing_v2_quant_and_expert_range(gen):
    x, ids = _routing_case(gen)
    rows, row_idx, counts, scale = ops.npu_moe_init_routing_v2(
        x, ids, active_num=ids.numel(), expert_num=6, expert_tokens_num_type=1, expert_tokens_num_flag=True,
        quant_mode=1, active_expert_range=[2, 4])
    kept = [p for p in sorted(range(ids.numel()), key=lambda p: (int(ids.view(-1)[p]), p)) if 2 <= ids.view(-1)[p] < 4]
    q, s = ops.npu_dynamic_quant(x)
    assert rows.dtype == torch.int8 and counts.tolist() == [int((ids == 2).sum()), int((ids == 3).sum())]
    for i, p in enumerate(kept):
        assert torch.equal(rows[i], q[p // 3]) and scale[i] == s[p // 3] and int(row_idx[p]) == i
    assert (row_idx == -1).sum() == ids.numel() - len(kept)
    assert not rows[len(kept):].any()


def test_init_routing_v2_range_within_expert_num(gen):
    """torch_npu docs (_op_plugin_docs.py:11104): expert_end must not exceed expert_num."""
    from sgl_ascend.ops import NpuContractError

    x, ids = _routing_case(gen)
    with pytest.raises(NpuContractError, match="must not exceed expert_num 6"):
        ops.npu_moe_init_routing_v2(x, ids, active_num=ids.numel(), expert_num=6, expert_tokens_num_type=1,
                                    expert_tokens_num_flag=True, quant_mode=-1, active_expert_range=[4, 8])


def test_token_unpermute_inverts_routing(gen):
    x, ids = _routing_case(gen)
    probs = torch.rand(ids.shape, generator=gen)
    rows, row_idx, _, _ = ops.npu_moe_init_routing_v2(x, ids, active_num=ids.numel(), expert_num=6, quant_mode=-1)
    out = ops.npu_moe_token_unpermute(rows.float() * 2, row_idx, probs=probs)
    assert torch.allclose(out, 2 * x.float() * probs.sum(dim=1, keepdim=True), rtol=1e-6)


def test_grouped_matmul_group_wise_w4a8(gen):
    """int8 x, int4 weights with [K/G, N] group scales (int64 fp32 bits) and the 8 * sum(deq) bias:
    the result is x @ dequantized weight, per expert."""
    experts, k, n, group = 3, 64, 16, 32
    q = torch.randint(-8, 8, (experts, k, n), generator=gen, dtype=torch.int8)
    scales = torch.rand(experts, k // group, n, generator=gen) + 0.5
    deq = q.float() * scales.repeat_interleave(group, dim=1)
    x = torch.randint(-128, 128, (10, k), generator=gen, dtype=torch.int8)
    token_scale = torch.rand(10, generator=gen)
    counts = torch.tensor([3, 0, 7])
    out = ops.npu_grouped_matmul([x], [pack_int4_to_int32(q)], scale=[encode_fp32_as_int64(scales)],
                                 bias=[8 * deq.sum(dim=1)], per_token_scale=[token_scale], group_list=counts,
                                 split_item=2, group_type=0, group_list_type=1, output_dtype=torch.bfloat16)[0]
    expert_of_row = torch.repeat_interleave(torch.arange(experts), counts)
    ref = torch.stack([x[r].float() @ deq[expert_of_row[r]] for r in range(10)]) * token_scale[:, None]
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, rtol=2 ** -8, atol=1e-3)  # one bf16 rounding of the result


def test_grouped_matmul_defaults_and_w8a8_scale_dtype_are_rejected(gen):
    """What the MoE path must not do (the real op rejects it): leave split_item/group_type at their
    defaults (0 / None) with a Tensor group_list, or hand the per-token int8 matmul an fp32 scale
    with bf16 output (the table pairs bf16 scale -> bf16, fp32 scale -> fp16)."""

    from sgl_ascend.ops import NpuContractError

    x = torch.randint(-128, 128, (6, 32), generator=gen, dtype=torch.int8)
    w = torch.randint(-128, 128, (2, 32, 16), generator=gen, dtype=torch.int8)
    counts, token_scale = torch.tensor([2, 4]), torch.rand(6, generator=gen)
    kwargs = dict(per_token_scale=[token_scale], group_list=counts, group_list_type=1)
    with pytest.raises(NpuContractError, match="group_type"):
        ops.npu_grouped_matmul([x], [w], scale=[torch.rand(2, 16, dtype=torch.bfloat16)], **kwargs,
                               output_dtype=torch.bfloat16)
    with pytest.raises(NpuContractError, match="scale torch.float32 with output_dtype torch.bfloat16"):
        ops.npu_grouped_matmul([x], [w], scale=[torch.rand(2, 16)], **kwargs, split_item=2, group_type=0,
                               output_dtype=torch.bfloat16)
    for scale, out in ((torch.rand(2, 16, dtype=torch.bfloat16), torch.bfloat16), (torch.rand(2, 16), torch.float16)):
        y = ops.npu_grouped_matmul([x], [w], scale=[scale], **kwargs, split_item=2, group_type=0, output_dtype=out)[0]
        assert y.dtype == out
