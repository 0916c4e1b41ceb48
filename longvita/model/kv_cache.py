"""Key/value cache: one preallocated buffer per layer, written in place as tokens arrive.

Owns the storage and how new tokens attend to it: used as the attention strategy of a forward
(`cache(q, k, v, layer_idx)`), it stores the new keys/values and attends over everything cached
so far. A chunk of several new tokens after a non-empty cache attends to the cache (all of it)
and to itself (causal) separately and merges the partial results by log-sum-exp, so no mask
of [chunk, context] is ever built; the cached part is read in blocks of `kv_block` tokens, so
the scratch memory of a chunk is bounded by chunk x kv_block whatever the context length (the
CUDA kernel repeats K/V heads for grouped-query attention: per block, not per cache). The
engine calls `advance` once per forward, after every layer has written. Allocated once for the
known prompt + max_new_tokens, in the model dtype. Inference only: partial results are merged in
place, so no gradient flows through the cache.
"""

from __future__ import annotations

import torch

from longvita.ops.attention import attention, block_attention, merge_partials_

DEFAULT_KV_BLOCK = 16384
"""Cached tokens attended per kernel call by a prefill chunk (see the module docstring)."""


class KVCache:
    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
        kv_block: int = DEFAULT_KV_BLOCK,
    ) -> None:
        if capacity < 0 or kv_block < 1:
            raise ValueError(f"need capacity >= 0 and kv_block >= 1, got {capacity=}, {kv_block=}")
        shape = (num_layers, batch_size, num_kv_heads, capacity, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.kv_block = kv_block
        self.length = 0
        """Tokens cached and visible to the next step."""

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k`, `v` [batch, kv_heads, new, head_dim] after the cached tokens of `layer`.

        Returns views of all keys/values of that layer: [batch, kv_heads, length + new, head_dim].
        """
        end = self.length + k.shape[-2]
        if end > self.capacity:
            raise ValueError(
                f"KV cache holds {self.capacity} tokens; {self.length} cached + "
                f"{k.shape[-2]} new = {end} do not fit"
            )
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int
    ) -> torch.Tensor:
        """Attention strategy: store k/v of the new tokens, attend over cache + new tokens.

        q: [batch, heads, new, head_dim]; k, v: [batch, kv_heads, new, head_dim].
        """
        cached = self.length
        k_all, v_all = self.update(layer_idx, k, v)  # [batch, kv_heads, cached + new, head_dim]
        if cached == 0 or q.shape[-2] == 1:  # first chunk (causal) or one token (sees all)
            return attention(q, k_all, v_all, causal=True, q_offset=cached)
        out, lse = block_attention(q, k, v, causal=True)  # the chunk over itself
        out, lse = out.float(), lse.float()  # the accumulator, merged in place block by block
        for start in range(0, cached, self.kv_block):  # the chunk over the cache
            end = min(start + self.kv_block, cached)
            block_out, block_lse = block_attention(
                q, k_all[:, :, start:end], v_all[:, :, start:end], causal=False
            )  # [batch, heads, new, head_dim], [batch, heads, new]
            merge_partials_(out, lse, block_out, block_lse)
            del block_out, block_lse
        return out.to(q.dtype)

    def advance(self, num_tokens: int) -> None:
        """Make the `num_tokens` just written by every layer visible to the next step."""
        self.length += num_tokens

    @property
    def num_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()
