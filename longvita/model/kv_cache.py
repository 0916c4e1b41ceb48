"""Key/value cache: one preallocated buffer per layer, written in place as tokens arrive.

Owns the storage and how new tokens attend to it: used as the attention strategy of a forward
(`cache(q, k, v, layer_idx)`), it stores the new keys/values and attends over everything cached
so far. A chunk of several new tokens after a non-empty cache attends to the cache (all of it)
and to itself (causal) separately and merges the two by log-sum-exp, so no mask of
[chunk, context] is ever built. The engine calls `advance` once per forward, after every layer
has written. Allocated once for the known prompt + max_new_tokens, in the model dtype.
"""

from __future__ import annotations

import torch

from longvita.ops.attention import attention, block_attention, merge_partials


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
    ) -> None:
        shape = (num_layers, batch_size, num_kv_heads, capacity, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity
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
        out_cache, lse_cache = block_attention(
            q, k_all[:, :, :cached], v_all[:, :, :cached], causal=False
        )  # [batch, heads, new, head_dim], [batch, heads, new]
        out_new, lse_new = block_attention(q, k, v, causal=True)
        out, _ = merge_partials(out_cache, lse_cache, out_new, lse_new)
        return out.to(q.dtype)

    def advance(self, num_tokens: int) -> None:
        """Make the `num_tokens` just written by every layer visible to the next step."""
        self.length += num_tokens

    @property
    def num_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()
