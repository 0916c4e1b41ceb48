"""Scaled dot-product attention: the one entry point every layer calls.

Owns the math of attention for the LLM (causal, grouped-query, with a cache offset) and the ViT
(bidirectional). Backends are chosen here, never in the model: PyTorch SDPA on CPU and CUDA
(flash-attn may be added for CUDA). Knows nothing of caches, layers or distributed state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    q_offset: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of `q` over `k`/`v`; K/V heads are shared by groups of query heads.

    q: [batch, num_q_heads, q_len, head_dim]
    k, v: [batch, num_kv_heads, kv_len, head_dim], num_q_heads % num_kv_heads == 0
    causal: query i sits at absolute position `q_offset + i` and sees keys 0..q_offset+i
        (keys are the cache followed by the new tokens, so q_offset = kv_len - q_len).
    Returns [batch, num_q_heads, q_len, head_dim].

    K/V heads are never repeated in memory: SDPA broadcasts them (`enable_gqa`).
    """
    q_len, kv_len = q.shape[-2], k.shape[-2]
    enable_gqa = q.shape[1] != k.shape[1]
    if not causal or (q_len == 1 and q_offset == kv_len - 1):
        mask, is_causal = None, False
    elif q_offset == 0 and q_len == kv_len:
        mask, is_causal = None, True
    else:
        mask, is_causal = causal_mask(q_len, kv_len, q_offset, q.device), False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )


def causal_mask(q_len: int, kv_len: int, q_offset: int, device: torch.device) -> torch.Tensor:
    """Boolean [q_len, kv_len] mask, True where query `q_offset + i` may see key j (j <= pos).

    Only built for a chunk of queries against its keys, so its size is bounded by the chunk.
    """
    q_pos = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]  # [q_len, 1]
    k_pos = torch.arange(kv_len, device=device)[None, :]  # [1, kv_len]
    return k_pos <= q_pos
