"""Attention kernels behind `ops.attention.block_attention`: one (forward, backward) pair per
backend, all with the same signature and the same numbers.

    forward(q, k, v, visible, causal, scale) -> (out [b, hq, sq, d], lse float32 [b, hq, sq])
    backward(grad_out, q, k, v, out, lse, visible, causal, scale) -> (dq, dk, dv)

`visible` is None or a bool [sq, sk] mask with causality already folded in; `causal` alone
means a diagonal block. Inputs are checked by the caller. K/V have num_kv_heads heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CUDA_BIAS_ALIGN = 16  # the memory-efficient kernel wants bias rows 16-element aligned
_CUDA_LSE_ALIGN = 32  # ... and its log-sum-exp padded to a multiple of 32 queries


def causal_mask(q_len: int, kv_len: int, q_offset: int, device: torch.device) -> torch.Tensor:
    """Boolean [q_len, kv_len] mask, True where query `q_offset + i` may see key j (j <= pos).

    Only built for a chunk of queries against its keys, so its size is bounded by the chunk.
    """
    q_pos = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]  # [q_len, 1]
    k_pos = torch.arange(kv_len, device=device)[None, :]  # [1, kv_len]
    return k_pos <= q_pos


def fold_query_groups(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Queries [b, hq, sq, d] (or their lse [b, hq, sq]) -> [b, hkv, group * sq, ...]: the query
    heads that share a K/V head (query head h reads K/V head h // group) as extra query rows of
    that head. Only where every query sees every key (no mask, not causal): rows are
    independent there, and a kernel that needs equal head counts then runs without repeating
    K/V."""
    return x.reshape(x.shape[0], num_kv_heads, -1, *x.shape[3:])


def unfold_query_groups(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """The inverse of `fold_query_groups`: [b, hkv, group * sq, ...] -> [b, hq, sq, ...]."""
    return x.reshape(x.shape[0], num_q_heads, -1, *x.shape[3:])


def _math_scores(q, k, visible, causal, scale):
    """fp32 scores [batch, kv_heads, group, q_len, kv_len], -inf where not visible."""
    batch, num_q_heads, q_len, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    q_grouped = q.float().reshape(batch, num_kv_heads, -1, q_len, head_dim)  # [b, hkv, g, sq, d]
    scores = q_grouped @ k.float()[:, :, None].transpose(-1, -2) * scale  # [b, hkv, g, sq, sk]
    if visible is None and causal:
        visible = causal_mask(q_len, kv_len, 0, q.device)
    if visible is not None:
        scores = scores.masked_fill(~visible.to(q.device), float("-inf"))
    return scores


def math_forward(q, k, v, visible, causal, scale):
    """Explicit fp32 attention; safe under autograd for rows that see nothing."""
    batch, num_q_heads, q_len, head_dim = q.shape
    scores = _math_scores(q, k, visible, causal, scale)  # [b, hkv, g, sq, sk]
    row_max = scores.detach().amax(-1, keepdim=True)  # [b, hkv, g, sq, 1]
    row_max = row_max.masked_fill(row_max == float("-inf"), 0.0)
    weights = torch.exp(scores - row_max)  # 0 where not visible
    total = weights.sum(-1)  # [b, hkv, g, sq]
    empty = total == 0
    total = total.masked_fill(empty, 1.0)
    out = (weights / total[..., None]) @ v.float()[:, :, None]  # [b, hkv, g, sq, d]
    lse = (row_max[..., 0] + torch.log(total)).masked_fill(empty, float("-inf"))
    out = out.reshape(batch, num_q_heads, q_len, head_dim)  # [b, hq, sq, d]
    return out.to(q.dtype), lse.reshape(batch, num_q_heads, q_len)


def math_backward(grad_out, q, k, v, out, lse, visible, causal, scale):
    """Explicit fp32 gradients of one block given the (possibly merged) out and lse."""
    batch, num_q_heads, q_len, head_dim = q.shape
    num_kv_heads = k.shape[1]
    grouped = (batch, num_kv_heads, -1, q_len, head_dim)  # [b, hkv, g, sq, d]
    scores = _math_scores(q, k, visible, causal, scale)  # [b, hkv, g, sq, sk]
    probs = torch.exp(scores - lse.reshape(grouped[:-1])[..., None])  # [b, hkv, g, sq, sk]
    grad_out_g = grad_out.float().reshape(grouped)
    grad_v = (probs.transpose(-1, -2) @ grad_out_g).sum(2)  # [b, hkv, sk, d]
    grad_probs = grad_out_g @ v.float()[:, :, None].transpose(-1, -2)  # [b, hkv, g, sq, sk]
    delta = (grad_out_g * out.float().reshape(grouped)).sum(-1, keepdim=True)  # [.., sq, 1]
    grad_scores = probs * (grad_probs - delta) * scale  # [b, hkv, g, sq, sk]
    grad_q = grad_scores @ k.float()[:, :, None]  # [b, hkv, g, sq, d]
    grad_k = (grad_scores.transpose(-1, -2) @ q.float().reshape(grouped)).sum(2)  # [b, hkv, sk, d]
    grad_q = grad_q.reshape(batch, num_q_heads, q_len, head_dim)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


def _additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool visibility [q_len, kv_len] -> additive float mask (0 or -inf) in `dtype`."""
    zeros = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return zeros.masked_fill(~visible, float("-inf"))


def cpu_flash_forward(q, k, v, visible, causal, scale):
    """PyTorch's fused CPU flash kernel: GQA native, returns lse float32 [b, hq, sq]."""
    attn_mask = None if visible is None else _additive_mask(visible, q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal and visible is None, attn_mask=attn_mask, scale=scale
    )
    return out, lse


def cpu_flash_backward(grad_out, q, k, v, out, lse, visible, causal, scale):
    attn_mask = None if visible is None else _additive_mask(visible, q.dtype)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, causal and visible is None, attn_mask=attn_mask,
        scale=scale,
    )  # fmt: skip


def _cuda_bias(visible, q) -> torch.Tensor:
    """Additive bias for the CUDA kernel: [b, hq, sq, sk], a broadcast view of one padded row
    block (rows 16-aligned in memory, as the kernel requires)."""
    q_len, kv_len = visible.shape
    padded = -(-kv_len // _CUDA_BIAS_ALIGN) * _CUDA_BIAS_ALIGN
    bias = torch.zeros(q_len, padded, dtype=q.dtype, device=q.device)  # [sq, sk padded]
    bias[:, :kv_len].masked_fill_(~visible.to(q.device), float("-inf"))
    return bias[:, :kv_len].expand(q.shape[0], q.shape[1], q_len, kv_len)


def _cuda_mask_type(visible, causal) -> int:
    return 1 if causal and visible is None else 0  # 1 = causal from the top-left corner


def _repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """K or V [b, hkv, sk, d] -> [b, hkv * group, sk, d] (as given when group is 1: no copy)."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _sum_groups(grad: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """The gradient of a repeated K or V [b, hq, sk, d] -> [b, hkv, sk, d]."""
    if grad.shape[1] == num_kv_heads:
        return grad
    return grad.unflatten(1, (num_kv_heads, grad.shape[1] // num_kv_heads)).sum(2)


def _every_key_seen(visible, causal, group: int) -> bool:
    """Grouped heads over a block that every query sees whole (a block of the KV cache, another
    rank's keys): the query groups fold into rows, K/V stay as they are."""
    return visible is None and not causal and group > 1


def cuda_efficient_forward(q, k, v, visible, causal, scale):
    """PyTorch's memory-efficient CUDA kernel. It needs as many K/V heads as query heads: over a
    block every query sees whole, the query heads of a group become rows of their K/V head
    (`fold_query_groups`); over a causal or masked block (chunk-sized), K/V are repeated for
    the compute only (never stored or sent repeated)."""
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_q_heads // num_kv_heads
    if _every_key_seen(visible, causal, group):
        out, lse = cuda_efficient_forward(
            fold_query_groups(q, num_kv_heads), k, v, None, False, scale
        )
        return unfold_query_groups(out, num_q_heads), unfold_query_groups(lse, num_q_heads)
    k, v = _repeat_kv(k, group), _repeat_kv(v, group)  # [b, hq, sk, d]
    bias = None if visible is None else _cuda_bias(visible, q)
    out, lse, *_ = torch.ops.aten._efficient_attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [b, s, h, d]
        bias, None, None, None, None, 0.0, _cuda_mask_type(visible, causal),
        compute_log_sumexp=True, scale=scale,
    )  # fmt: skip
    return out.transpose(1, 2), lse[..., : q.shape[2]]  # [b, hq, sq, d], [b, hq, sq]


def cuda_efficient_backward(grad_out, q, k, v, out, lse, visible, causal, scale):
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_q_heads // num_kv_heads
    if _every_key_seen(visible, causal, group):
        folded = (fold_query_groups(t, num_kv_heads) for t in (grad_out, q, out, lse))
        grad_out, q, out, lse = folded
        grad_q, grad_k, grad_v = cuda_efficient_backward(
            grad_out, q, k, v, out, lse, None, False, scale
        )
        return unfold_query_groups(grad_q, num_q_heads), grad_k, grad_v
    q_len, kv_len = q.shape[2], k.shape[2]
    k, v = _repeat_kv(k, group), _repeat_kv(v, group)  # [b, hq, sk, d]
    bias = None if visible is None else _cuda_bias(visible, q)
    lse_pad = -(-q_len // _CUDA_LSE_ALIGN) * _CUDA_LSE_ALIGN - q_len
    lse = F.pad(lse, (0, lse_pad), value=float("inf")).contiguous()  # [b, hq, sq padded]
    unused_rng = torch.empty((), dtype=torch.int64, device=q.device)  # no dropout
    bshd = [t.transpose(1, 2).contiguous() for t in (grad_out, q, k, v, out)]  # [b, s, h, d]
    grad_q, grad_k, grad_v, _ = torch.ops.aten._efficient_attention_backward(
        bshd[0], bshd[1], bshd[2], bshd[3], bias, bshd[4], None, None, q_len, kv_len, lse,
        0.0, unused_rng, unused_rng, _cuda_mask_type(visible, causal), False, scale=scale,
    )  # fmt: skip
    grad_k, grad_v = (_sum_groups(g.transpose(1, 2), num_kv_heads) for g in (grad_k, grad_v))
    return grad_q.transpose(1, 2), grad_k, grad_v  # grads of K/V: [b, hkv, sk, d]


KERNELS = {
    "math": (math_forward, math_backward),
    "cpu_flash": (cpu_flash_forward, cpu_flash_backward),
    "cuda_efficient": (cuda_efficient_forward, cuda_efficient_backward),
}
