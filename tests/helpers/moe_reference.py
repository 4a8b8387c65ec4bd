"""Float references for the MoE tests: the checkpoint's own dequantization, per-token fake-quant of
activations (npu_dynamic_quant's convention: scale = max|x| / qmax, round half to even)."""

import torch
import torch.nn.functional as F

from sgl_ascend.ops.int4 import unpack_int8_pairs


def fake_quant(x: torch.Tensor, bits, with_scale=False):
    if bits is None:
        return (x.float(), torch.ones(x.shape[0], 1)) if with_scale else x.float()
    qmax = 127.0 if bits == 8 else 7.0
    scale = x.float().abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x.float() / scale).clamp(-qmax - 1, qmax) * scale
    return (q, scale) if with_scale else q


def fp16_round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


def modelslim_w4a8_dequant(ckpt, name: str, fp16_groups: bool = False) -> torch.Tensor:
    """q * scale_second * scale (group-wise) or q * scale; q unpacked from pairs along the output dim
    (or one per byte for older files). fp16_groups: the group-wise product scale_second * scale is
    rounded through fp16, as the MoE kernel scale is (upstream's _process_scale)."""
    w = ckpt.get(name + ".weight")
    scale = ckpt.get(name + ".weight_scale").float()
    q = w.float() if w.shape[0] == scale.shape[0] else unpack_int8_pairs(w, 0).float()
    if name + ".weight_scale_second" in ckpt:
        s2 = ckpt.get(name + ".weight_scale_second").float()
        if fp16_groups:
            return q * fp16_round(s2 * scale).repeat_interleave(q.shape[1] // s2.shape[1], dim=1)
        q = q * s2.repeat_interleave(q.shape[1] // s2.shape[1], dim=1)
    return q * scale


def modelslim_moe_dequant(ckpt, name: str) -> torch.Tensor:
    """What the W4A8 experts compute with: group-wise products rounded through fp16."""
    return modelslim_w4a8_dequant(ckpt, name, fp16_groups=True)


def int_dequant(ckpt, name: str) -> torch.Tensor:
    """int8 weight * scale; the scale as the bf16 W8A8 experts hold it (exact for bf16 checkpoint scales)."""
    return ckpt.get(name + ".weight").float() * ckpt.get(name + ".weight_scale").to(torch.bfloat16).float()


def modelslim_w4a8_residuals(ckpt, prefix, num_experts, dequant=None):
    """scale_bias minus 8 * sum(dequantized weight, as the kernel holds it; `dequant` to override):
    zero when the writer computed it from the stored weights, ~0.2% of scale_bias for the V0
    group-wise writer. The kernel adds scale_bias, so this
    difference is part of what the checkpoint computes: (gate/up [2I], down [H, 16]) per expert."""
    out = []
    for e in range(num_experts):
        parts = []
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = f"{prefix}.experts.{e}.{proj}"
            deq = (dequant or modelslim_moe_dequant)(ckpt, name)
            sb = ckpt.get(name + ".scale_bias")
            parts.append(sb - 8 * deq.reshape(deq.shape[0], sb.shape[1], -1).sum(-1))
        out.append((torch.cat([parts[0][:, 0], parts[1][:, 0]]), parts[2]))
    return out


def moe_reference(x, topk_weights, topk_ids, experts, act_bits=(8, 8), tp=1, ep=1, residuals=None,
                  dtype=torch.bfloat16):
    """experts[e] = (gate [I, H], up [I, H], down [H, I]) float; residuals[e] = (gate/up [2I], down
    [H, 16]): what the W4A8 kernel's bias adds beyond 8 * sum(deq), times the token's activation scale.

    Computed in fp32 from the original input, rounded to bf16 where the layer hands a bf16 tensor
    from one op to the next (grouped-matmul outputs, SwiGLU output, each rank's result). With tp/ep
    it is the sum of the ranks' partial results: a tp rank quantizes its own slice of the SwiGLU
    output (per-token scale over its slice). dtype: the activations' dtype the hand-offs round to."""
    def _bf16(t):
        return t.to(dtype).float()

    num_experts, inter = len(experts), experts[0][0].shape[0]
    local, part = num_experts // ep, inter // tp
    total = torch.zeros(x.shape[0], experts[0][2].shape[0])
    for tr in range(tp):
        cols = slice(tr * part, (tr + 1) * part)
        for er in range(ep):
            out = torch.zeros_like(total)
            for t in range(x.shape[0]):
                xt, xs = fake_quant(x[t:t + 1], act_bits[0], with_scale=True)
                for k in range(topk_ids.shape[1]):
                    e = int(topk_ids[t, k])
                    if not er * local <= e < (er + 1) * local:
                        continue
                    gate, up, down = experts[e]
                    g, u = xt @ gate[cols].T, xt @ up[cols].T
                    if residuals is not None:  # enters before the per-token scale, like the bias
                        g = g + residuals[e][0][:inter][cols] * xs
                        u = u + residuals[e][0][inter:][cols] * xs
                    h = F.silu(_bf16(g)) * _bf16(u)
                    if act_bits[1] != 8:  # npu_swiglu hands bf16 on; npu_dequant_swiglu_quant quantizes fp32
                        h = _bf16(h)
                    h, hs = fake_quant(h, act_bits[1], with_scale=True)
                    y = h @ down[:, cols].T
                    if residuals is not None:
                        r2 = residuals[e][1]
                        y = y + r2[:, tr * 16 // tp:(tr + 1) * 16 // tp].sum(-1) * hs
                    out[t] += float(topk_weights[t, k]) * _bf16(y[0])
            total += _bf16(out)
    return total


def routing(num_tokens, num_experts, top_k, gen):
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    return weights.to(torch.bfloat16), ids.to(torch.int32)
