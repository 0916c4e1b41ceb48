"""Ring attention: causal attention over a sequence sharded across the context-parallel group.

Owns the ring schedule, forward and backward, as one autograd Function. Layout (LONGVITA.md
section 6, `parallel.sharding`): the global sequence of S tokens is cut into 2*cp chunks of
C = S / (2*cp); rank r holds chunks r and 2*cp-1-r, concatenated, so its q/k/v are
[batch, heads, 2C, head_dim].

Forward: the local K/V (both chunks, K/V heads only) travel around the ring, rank -> rank+1,
for cp-1 hops. Each hop's send/receive is started before the attention on the block in hand,
so communication overlaps compute. A (query chunk a, key chunk b) pair is full attention when
b < a, causal when b == a, and skipped when b > a; with packed samples it is cut further into
one rectangle per sample present in both chunks (no mask is ever built), and pairs with no
common sample are skipped. Partial results are merged with their log-sum-exp.

Backward: the K/V travel again; each rank computes its blocks' gradients with the saved global
out and lse; dq stays local, and the dK/dV of a block travel with it (float32), one hop behind
the K/V, so that each rank adds its share and the last hop lands the sum on the block's owner.

The math lives in `ops.attention`; this module only schedules it and moves tensors.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longvita.ops.attention import (
    attention_with_lse,
    block_attention,
    block_attention_backward,
    merge_partials,
    packed_causal_attention,
)
from longvita.ops.sequence import check_cu_seqlens, zigzag_chunks

Rectangle = tuple[int, int, int, int]
"""(q_start, q_end, k_start, k_end): queries against keys, indices inside their chunks."""


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    cu_seqlens: torch.Tensor | Sequence[int] | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of this rank's queries over the whole sharded sequence.

    q: [batch, num_q_heads, 2C, head_dim], k, v: [batch, num_kv_heads, 2C, head_dim]: this
    rank's two zigzag chunks (RoPE already applied with global positions).
    group: the context-parallel process group; None (or a group of one) = local attention.
    cu_seqlens: global sample boundaries [num_samples + 1] (0 first, S = 2C * cp last),
        replicated on every rank; samples never attend across them. None = one sample.
    Returns [batch, num_q_heads, 2C, head_dim]; differentiable in q, k, v.
    """
    cp = 1 if group is None else dist.get_world_size(group)
    if cp == 1:
        if cu_seqlens is None:
            return attention_with_lse(q, k, v, causal=True, scale=scale)[0]
        return packed_causal_attention(q, k, v, cu_seqlens, scale=scale)
    plan = _RingPlan.build(q, k, group, cu_seqlens)
    return _RingAttention.apply(q, k, v, plan, scale)


def ring_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ring_attention` of one causal sample, forward only, with its log-sum-exp.

    For callers that merge the result with attention over other keys (the cached tokens of a
    context-parallel prefill chunk). Returns out [batch, num_q_heads, 2C, head_dim] float32
    and lse float32 [batch, num_q_heads, 2C]; no autograd.
    """
    cp = 1 if group is None else dist.get_world_size(group)
    if cp == 1:
        out, lse = block_attention(q, k, v, causal=True, scale=scale)
        return out.float(), lse
    return _ring_forward(q, k, v, _RingPlan.build(q, k, group, None), scale)


def make_ring_attention_fn(
    group: dist.ProcessGroup | None,
    cu_seqlens: torch.Tensor | Sequence[int] | None = None,
    *,
    scale: float | None = None,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """An attention strategy (q, k, v, layer_idx) -> out: ring attention over `group`.

    The boundaries are read to the host once here, not in every layer.
    """
    if torch.is_tensor(cu_seqlens):
        cu_seqlens = [int(b) for b in cu_seqlens.tolist()]

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
        return ring_attention(q, k, v, group=group, cu_seqlens=cu_seqlens, scale=scale)

    return attend


@dataclass(frozen=True)
class _RingPlan:
    """Who sends to whom and which blocks are computed; the same for every layer."""

    group: dist.ProcessGroup
    cp: int
    rank: int
    """This process's rank inside `group`."""
    chunk_len: int
    next_peer: int
    """Global rank of rank + 1 in the ring (we send to it)."""
    prev_peer: int
    """Global rank of rank - 1 in the ring (we receive from it)."""
    bounds: tuple[int, ...]
    """Global sample boundaries, 0 .. S."""

    @classmethod
    def build(cls, q, k, group, cu_seqlens) -> _RingPlan:
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        local_len = q.shape[-2]
        if local_len % 2 or k.shape[-2] != local_len:
            raise ValueError(
                f"local q length {local_len} and k length {k.shape[-2]} must be equal and even "
                "(two zigzag chunks)"
            )
        seq_len = local_len * cp
        bounds = [0, seq_len] if cu_seqlens is None else check_cu_seqlens(cu_seqlens, seq_len)
        return cls(
            group=group,
            cp=cp,
            rank=rank,
            chunk_len=local_len // 2,
            next_peer=dist.get_global_rank(group, (rank + 1) % cp),
            prev_peer=dist.get_global_rank(group, (rank - 1) % cp),
            bounds=tuple(bounds),
        )

    def blocks(self, src: int) -> list[tuple[slice, slice, bool]]:
        """Work of this rank on the K/V of ring rank `src`: (local query rows, local key rows,
        causal) for every block to compute; pairs of chunks with k after q are left out."""
        mine, theirs = zigzag_chunks(self.cp, self.rank), zigzag_chunks(self.cp, src)
        size, work = self.chunk_len, []
        for q_local, q_chunk in enumerate(mine):
            for k_local, k_chunk in enumerate(theirs):
                if k_chunk > q_chunk:
                    continue
                for q_start, q_end, k_start, k_end in self._rectangles(q_chunk, k_chunk):
                    rows = slice(q_local * size + q_start, q_local * size + q_end)
                    cols = slice(k_local * size + k_start, k_local * size + k_end)
                    work.append((rows, cols, k_chunk == q_chunk))
        return work

    def _rectangles(self, q_chunk: int, k_chunk: int) -> list[Rectangle]:
        """One rectangle per sample present in both chunks (all of it when unpacked)."""
        size = self.chunk_len
        q_lo, k_lo = q_chunk * size, k_chunk * size
        first = bisect.bisect_right(self.bounds, k_lo) - 1  # sample holding the first key
        rects = []
        for start, end in zip(self.bounds[first:-1], self.bounds[first + 1 :], strict=True):
            q_start, q_end = max(start, q_lo), min(end, q_lo + size)
            k_start, k_end = max(start, k_lo), min(end, k_lo + size)
            if start >= k_lo + size:  # this sample and the later ones have no key here
                break
            if q_start < q_end and k_start < k_end:
                rects.append((q_start - q_lo, q_end - q_lo, k_start - k_lo, k_end - k_lo))
        return rects

    def shift(self, tensor: torch.Tensor, what: str, step: int) -> _Exchange:
        """Start sending `tensor` to the next rank and receiving its like from the previous."""
        received = torch.empty_like(tensor)
        ops = [
            dist.P2POp(dist.isend, tensor, self.next_peer, self.group),
            dist.P2POp(dist.irecv, received, self.prev_peer, self.group),
        ]
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as err:  # a peer already gone can fail the send as it is posted
            raise self.failure(what, step, err) from err
        return _Exchange(works, tensor, received, what, step, self)

    def failure(self, what: str, step: int, err: RuntimeError) -> RuntimeError:
        """The error of a ring hop that failed, saying which and between whom."""
        return RuntimeError(
            f"ring attention: passing {what} at step {step} failed on cp rank {self.rank}/"
            f"{self.cp} (send to global rank {self.next_peer}, receive from {self.prev_peer}); "
            f"a peer died, stalled or the group timed out: {err}"
        )


@dataclass
class _Exchange:
    """One in-flight ring hop; `wait` returns the received tensor."""

    works: list
    sent: torch.Tensor
    """Kept alive until the send completes."""
    received: torch.Tensor
    what: str
    step: int
    plan: _RingPlan

    def wait(self) -> torch.Tensor:
        try:
            for work in self.works:
                work.wait()
        except RuntimeError as err:  # DistBackendError and gloo timeouts are RuntimeErrors
            raise self.plan.failure(self.what, self.step, err) from err
        return self.received


def _forward_step(q, kv, blocks, out, lse, scale) -> None:
    """Attention of the local queries on one K/V block, merged into out/lse in place."""
    for rows, cols, causal in blocks:
        block_out, block_lse = block_attention(
            q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], causal=causal, scale=scale
        )  # [b, hq, rows, d], [b, hq, rows]
        out[:, :, rows], lse[:, :, rows] = merge_partials(
            out[:, :, rows], lse[:, :, rows], block_out, block_lse
        )


def _backward_step(grad_out, q, kv, out, lse, blocks, dq, dkv, scale) -> None:
    """Gradients of one K/V block: dq accumulated in place, the block's dk/dv into dkv."""
    for rows, cols, causal in blocks:
        grad_q, grad_k, grad_v = block_attention_backward(
            grad_out[:, :, rows], q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols],
            out[:, :, rows], lse[:, :, rows], causal=causal, scale=scale,
        )  # fmt: skip
        dq[:, :, rows] += grad_q
        dkv[0][:, :, cols] += grad_k
        dkv[1][:, :, cols] += grad_v


def _ring_forward(q, k, v, plan: _RingPlan, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward ring: out float32 [b, hq, 2C, d] and lse float32 [b, hq, 2C]."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # [b, hq, 2C, d]
    lse = torch.full(q.shape[:-1], float("-inf"), device=q.device)  # [b, hq, 2C]
    kv = torch.stack((k, v))  # [2, b, hkv, 2C, d]: one message per hop
    for step in range(plan.cp):
        src = (plan.rank - step) % plan.cp  # whose K/V we hold
        incoming = plan.shift(kv, "K/V", step) if step < plan.cp - 1 else None
        _forward_step(q, kv, plan.blocks(src), out, lse, scale)
        if incoming is not None:
            kv = incoming.wait()
    return out, lse


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _RingPlan, scale):
        out, lse = _ring_forward(q, k, v, plan, scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        grad_out = grad_out.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # [b, hq, 2C, d]
        kv = torch.stack((k, v))  # [2, b, hkv, 2C, d]
        dkv_in_flight = None  # dk/dv of the block we receive next, summed by earlier holders
        for step in range(plan.cp):
            src = (plan.rank - step) % plan.cp
            incoming = plan.shift(kv, "K/V", step) if step < plan.cp - 1 else None
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)  # [2, b, hkv, ..]
            _backward_step(grad_out, q, kv, out, lse, plan.blocks(src), dq, dkv, scale)
            if dkv_in_flight is not None:
                dkv += dkv_in_flight.wait()  # the shares of the ranks that held this block before
            dkv_in_flight = plan.shift(dkv, "dK/dV", step)  # on to the next holder (last: owner)
            if incoming is not None:
                kv = incoming.wait()
        dkv = dkv_in_flight.wait()  # our own block's gradient, summed around the whole ring
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None
