"""The attention shapes the KV-cache unit tests share, and their float64 reference."""

import torch
import torch.nn.functional as F

N, KV_N, D, PAGE = 4, 2, 32, 32
H = KV_N * D
BF16_TOL = 2e-2


def reference_attention(q, k, v, causal_offset=None):
    """q [S_q, N, D], k/v [S, KV_N, D] float -> [S_q, N, D] in float64 (GQA by repeating KV heads)."""
    k, v = (t.double().repeat_interleave(N // KV_N, dim=1).transpose(0, 1) for t in (k, v))
    q = q.double().transpose(0, 1)
    mask = None
    if causal_offset is not None:
        rows = torch.arange(q.shape[1]).unsqueeze(1) + causal_offset
        mask = torch.arange(k.shape[1]).unsqueeze(0) <= rows
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D ** -0.5).transpose(0, 1)
