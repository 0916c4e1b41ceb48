"""8-bit keys and values: symmetric int8 with one float32 scale per token and head.

The math of the quantized KV cache (`model.kv_cache`), as pure functions: quantizing a block of
keys or values, dequantizing it into a buffer the caller owns, and the attention of a few query
rows (a decode step) straight over int8 keys and values. That last one never dequantizes with
the scales: a key's scale multiplies its scores (one number per key and query row) and a
value's scale the probabilities, so the per-element work is one int8 -> float conversion.

Why int8 and not fp8 e4m3 (the same bytes, the same per-row scale): on a CPU, converting
float8 to float32 is a scalar routine, ~50x slower than int8's (0.17 against 8 G elements/s on
one AVX2 core). Their errors split: on Gaussian rows int8's is 4x lower (0.6% against 2.5%
relative), with one channel 20x the others (keys of real LLMs have such) fp8's is (1.0%
against 1.7%); benchmarks/results/kv_cache_dtype.md has the end-to-end figures.
"""

from __future__ import annotations

import torch

INT8_MAX = 127


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] -> (int8 [..., d], float32 scale [...]) with x ~= q * scale[..., None].

    Symmetric, one scale per row (a token's key or value in one head): scale = max |x| / 127.
    A row of zeros gets scale 0 and stays exactly zero.
    """
    x = x.float()
    scale = x.abs().amax(dim=-1) / INT8_MAX  # [...]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """q [..., d] int8 and scale [...] into `out` [..., d] (any float dtype, the caller's
    buffer: no temporary of q's size is made); returns `out`."""
    return out.copy_(q).mul_(scale[..., None].to(out.dtype))


def int8_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    key_scales: torch.Tensor,
    values: torch.Tensor,
    value_scales: torch.Tensor,
    *,
    scale: float | None = None,
    block: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention of a few query rows over int8 keys/values, with its log-sum-exp.

    q: [batch, num_q_heads, n, d]; keys, values: int8 [batch, num_kv_heads, L, d];
    key_scales, value_scales: float32 [batch, num_kv_heads, L]. Query head h reads K/V head
    h // (num_q_heads / num_kv_heads). Returns out float32 [batch, num_q_heads, n, d] and lse
    float32 [batch, num_q_heads, n]; L = 0 gives out 0 and lse -inf.

    Two passes over the keys and values, `block` tokens at a time, each block converted to
    float32 into a reused buffer: the scores of every key first (float32 [batch * num_kv_heads,
    group * n, L]: meant for decode steps, a few query rows), one softmax, then the values. Five
    kernel calls per block over the two passes, no log-sum-exp merges; the scales cost one pass
    over the scores each. Nothing of the scores' size is allocated beyond the scores: a process
    with a fixed malloc mmap threshold (the benchmarks' memory runs) pays page faults for every
    such temporary, each layer of each step. (32K tokens of 4 K/V heads of 64 and 16 query
    heads, 8 layers: 1.2-1.7x faster than the fused kernel over a float32 cache, which reads 4x
    the bytes, on one AVX2 core; 0.8-1.3x on two, where the 4-row products, not memory, set the
    pace.)
    """
    batch, num_q_heads, n, d = q.shape
    num_kv_heads, length = keys.shape[1], keys.shape[2]
    if length == 0:
        out = q.new_zeros(q.shape, dtype=torch.float32)
        return out, q.new_full(q.shape[:-1], float("-inf"), dtype=torch.float32)
    scale = d**-0.5 if scale is None else scale
    heads = batch * num_kv_heads
    rows = (q.float() * scale).reshape(heads, (num_q_heads // num_kv_heads) * n, d)
    keys, values = keys.reshape(heads, length, d), values.reshape(heads, length, d)
    width = min(block, length)
    buffer = torch.empty(heads, width, d, device=q.device)  # one block in float
    block_scores = rows.new_empty(heads, rows.shape[1], width)
    scores = rows.new_empty(heads, rows.shape[1], length)
    for start in range(0, length, block):
        stop = min(start + block, length)
        block_keys = buffer[:, : stop - start].copy_(keys[:, start:stop])
        products = block_scores[:, :, : stop - start]
        scores[:, :, start:stop] = torch.bmm(rows, block_keys.transpose(1, 2), out=products)
    scores.mul_(key_scales.reshape(heads, 1, length))
    top = scores.amax(dim=-1, keepdim=True)  # [heads, rows, 1], finite: every row sees keys
    probs = scores.sub_(top).exp_()  # unnormalized
    total = probs.sum(dim=-1, keepdim=True)
    probs.div_(total).mul_(value_scales.reshape(heads, 1, length))
    lse = (top + total.log()).squeeze(-1)  # [heads, rows]
    out = rows.new_zeros(rows.shape)
    for start in range(0, length, block):
        stop = min(start + block, length)
        block_values = buffer[:, : stop - start].copy_(values[:, start:stop])
        out.baddbmm_(probs[:, :, start:stop], block_values)
    return out.reshape(batch, num_q_heads, n, d), lse.reshape(batch, num_q_heads, n)
