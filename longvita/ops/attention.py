"""Scaled dot-product attention: the one entry point every layer calls.

Owns the math of attention for the LLM (causal, grouped-query, with a cache offset) and the ViT
(bidirectional), and the pieces that long sequences are built from: attention of one block that
also returns its log-sum-exp (`block_attention`) with its backward given merged results
(`block_attention_backward`), the log-sum-exp merge of partial results (`merge_partials`), and
packed samples that never see each other (`packed_causal_attention`). Backends are chosen
here, never in the model: PyTorch's fused flash kernel on CPU, its memory-efficient kernel on
CUDA, explicit fp32 math anywhere (the kernels themselves are in `attention_kernels`; the
fp32 definition that tests compare against is `longvita.testing.reference_attention`). K/V
heads are shared by groups of query heads and never repeated, except inside the CUDA kernel
call over a causal or masked block (chunk-sized), as that kernel needs equal head counts.
Knows nothing of caches, layers or distributed state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from longvita.ops.attention_kernels import (
    KERNELS,
    causal_mask,
    fold_query_groups,
    unfold_query_groups,
)
from longvita.ops.sequence import check_cu_seqlens


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

    K/V heads are never repeated in memory. When every query sees every key (a decode step,
    or bidirectional attention) the query heads of a group are folded into the query length
    (`_grouped_queries`), which any kernel runs without repeating K/V; otherwise SDPA broadcasts
    them (`enable_gqa`, which some kernels, e.g. CUDA fp32, implement by repeating K/V: the
    engine only takes this path for chunk-sized keys).
    """
    q_len, kv_len = q.shape[-2], k.shape[-2]
    enable_gqa = q.shape[1] != k.shape[1]
    if not causal or (q_len == 1 and q_offset == kv_len - 1):
        if enable_gqa:
            return _grouped_queries(q, k, v, scale)
        mask, is_causal = None, False
    elif q_offset == 0 and q_len == kv_len:
        mask, is_causal = None, True
    else:
        mask, is_causal = causal_mask(q_len, kv_len, q_offset, q.device), False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )


def _grouped_queries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale) -> torch.Tensor:
    """Unmasked attention with K/V heads shared by groups of query heads, as plain multi-head
    attention over the K/V heads (`fold_query_groups`: the group's heads become extra query
    rows [b, hkv, group * q_len, d])."""
    folded = fold_query_groups(q, k.shape[1])
    out = F.scaled_dot_product_attention(folded, k, v, scale=scale)  # [b, hkv, g * q_len, d]
    return unfold_query_groups(out, q.shape[1])


# --- attention with log-sum-exp: the building block of packed and ring attention ---------------

Backend = Literal["auto", "math", "cpu_flash", "cuda_efficient"]
_BACKENDS = ("auto", *KERNELS)


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of one block of attention, returning the output and its log-sum-exp.

    q: [batch, num_q_heads, q_len, head_dim]; k, v: [batch, num_kv_heads, kv_len, head_dim]
    with num_q_heads % num_kv_heads == 0 (query head h reads K/V head h // group).
    causal: q and k are the same positions (a diagonal block): query i sees keys 0..i.
    mask: optional bool [q_len, kv_len], True where the query may see the key (sample
        boundaries of a packed sequence; chunk-sized, never sequence-sized).
    backend: "auto" (fused CPU kernel on CPU, memory-efficient kernel on CUDA), or one of
        "math" (explicit fp32 scores), "cpu_flash", "cuda_efficient".
    Returns out [batch, num_q_heads, q_len, head_dim] in q's dtype and lse float32
    [batch, num_q_heads, q_len]; a row that sees no key has out 0 and lse -inf.
    """
    scale = _check_block(q, k, v, causal, mask, scale)
    visible = _visibility(q.shape[-2], k.shape[-2], causal, mask)
    forward, _ = KERNELS[_resolve_backend(backend, q.device)]
    out, lse = forward(q, k, v, visible, causal, scale)
    if visible is not None:  # kernels leave 0 or NaN in rows that see nothing: make them exact
        empty = ~visible.any(-1)  # [q_len]
        out = out.masked_fill(empty[:, None], 0.0)
        lse = lse.masked_fill(empty, float("-inf"))
    return out, lse


def block_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of one block, shaped like q, k, v (K/V heads not repeated).

    `out` and `lse` may be the *merged* results over many K/V blocks (ring attention): the
    gradients are then this block's exact share, dq summing over blocks. A row whose lse is
    -inf (it saw nothing) gets zero gradients.
    """
    scale = _check_block(q, k, v, causal, mask, scale)
    if grad_out.shape != q.shape or out.shape != q.shape or lse.shape != q.shape[:-1]:
        raise ValueError(
            f"grad_out {tuple(grad_out.shape)} and out {tuple(out.shape)} must be q's shape "
            f"{tuple(q.shape)}, lse {tuple(lse.shape)} must be {tuple(q.shape[:-1])}"
        )
    visible = _visibility(q.shape[-2], k.shape[-2], causal, mask)
    # exp(score - (+inf)) = 0: rows that saw nothing get no probability mass, hence no gradient
    lse = lse.float().masked_fill(lse == float("-inf"), float("inf"))
    grad_out = grad_out.to(q.dtype)
    out = out.to(q.dtype)
    _, backward = KERNELS[_resolve_backend(backend, q.device)]
    return backward(grad_out, q, k, v, out, lse, visible, causal, scale)


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over keys A + B from the results over A and over B (log-sum-exp merge).

    out_*: [..., q_len, head_dim]; lse_*: [..., q_len]. Computed and returned in float32 (the
    caller casts once at the end); a row that saw nothing on one side (lse -inf) takes the other
    side unchanged, and a row that saw nothing on both stays out 0, lse -inf.
    """
    out = out_a.to(torch.float32, copy=True)
    lse = lse_a.to(torch.float32, copy=True)
    merge_partials_(out, lse, out_b, lse_b)
    return out, lse


def merge_partials_(
    acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> None:
    """`merge_partials` into the accumulator: acc_out/acc_lse (float32, owned by the caller)
    become the merge of themselves with (out, lse), which are left unchanged.

    No [..., q_len, head_dim] temporary is made (a prefill chunk's attention holds two such
    tensors, not five); no autograd: the accumulators must not require grad.
    """
    if acc_out.dtype != torch.float32 or acc_lse.dtype != torch.float32:
        raise ValueError(f"accumulators must be float32, got {acc_out.dtype}, {acc_lse.dtype}")
    lse = lse.float()
    lse_max = torch.maximum(acc_lse, lse)  # [..., q_len]
    lse_max.masked_fill_(lse_max == float("-inf"), 0.0)
    weight_acc = torch.exp(acc_lse - lse_max)  # [..., q_len], 0 where acc_lse = -inf
    weight = torch.exp(lse - lse_max)
    total = weight_acc + weight
    torch.add(lse_max, torch.log(total), out=acc_lse)  # -inf where both sides are empty
    total.masked_fill_(total == 0, 1.0)
    acc_out.mul_((weight_acc / total)[..., None]).addcmul_(out, (weight / total)[..., None])


class _AttentionWithLse(torch.autograd.Function):
    """block_attention with its backward; the lse output carries no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, causal, mask, scale, backend):
        out, lse = block_attention(q, k, v, causal=causal, mask=mask, scale=scale, backend=backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.mask, ctx.scale, ctx.backend = causal, mask, scale, backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = block_attention_backward(
            grad_out, q, k, v, out, lse,
            causal=ctx.causal, mask=ctx.mask, scale=ctx.scale, backend=ctx.backend,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`block_attention` with autograd (single process): (out, lse), gradients through `out`.

    The lse is returned for merging and inspection; it is marked non-differentiable.
    """
    return _AttentionWithLse.apply(q, k, v, causal, mask, scale, backend)


def packed_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | Sequence[int],
    *,
    scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Causal attention over packed samples that never see each other; autograd works.

    q: [batch, num_q_heads, seq, head_dim]; k, v: [batch, num_kv_heads, seq, head_dim].
    cu_seqlens: sample boundaries [num_samples + 1], 0 first, seq last, non-decreasing (every
    row of the batch is packed the same way). One causal call per sample: no [seq, seq] mask.
    An `AttentionFn` via `packed_attention_fn(cu_seqlens)` or functools.partial.
    Returns [batch, num_q_heads, seq, head_dim].
    """
    bounds = check_cu_seqlens(cu_seqlens, q.shape[-2])
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end == start:
            continue
        out, _ = attention_with_lse(
            q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
            causal=True, scale=scale, backend=backend,
        )  # fmt: skip
        outs.append(out)  # [batch, num_q_heads, end - start, head_dim]
    return torch.cat(outs, dim=2)  # [batch, num_q_heads, seq, head_dim]


def packed_attention_fn(
    cu_seqlens: torch.Tensor | Sequence[int], *, scale: float | None = None
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """An attention strategy (q, k, v, layer_idx) -> out for one packing of samples."""
    bounds = check_cu_seqlens(cu_seqlens, int(cu_seqlens[-1]))  # read to the host once

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
        return packed_causal_attention(q, k, v, bounds, scale=scale)

    return attend


def _check_block(q, k, v, causal, mask, scale) -> float:
    """ValueError for inconsistent block shapes; returns the softmax scale."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: want 4-D")
    (batch, num_q_heads, q_len, head_dim), (kv_batch, num_kv_heads, kv_len, kv_dim) = (
        q.shape,
        k.shape,
    )
    if batch != kv_batch or head_dim != kv_dim or num_q_heads % num_kv_heads:
        raise ValueError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)}: batch and head_dim must match and "
            f"num_q_heads {num_q_heads} must be a multiple of num_kv_heads {num_kv_heads}"
        )
    if causal and q_len != kv_len:
        raise ValueError(f"a causal block needs q_len {q_len} == kv_len {kv_len}")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (q_len, kv_len)):
        raise ValueError(f"mask {mask.dtype} {tuple(mask.shape)}: want bool [{q_len}, {kv_len}]")
    return head_dim**-0.5 if scale is None else scale


def _visibility(q_len: int, kv_len: int, causal: bool, mask: torch.Tensor | None):
    """Bool [q_len, kv_len] of visible keys when a mask is given (causal folded in), else None."""
    if mask is None:
        return None
    if causal:
        mask = mask & causal_mask(q_len, kv_len, 0, mask.device)
    return mask


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {_BACKENDS}")
    if backend == "auto":
        return {"cpu": "cpu_flash", "cuda": "cuda_efficient"}.get(device.type, "math")
    return backend
