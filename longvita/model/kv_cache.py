"""Key/value cache: one preallocated buffer per layer, written in place as tokens arrive.

Owns storage only. The attention layer writes the new keys/values of a step through `update`
and reads back everything cached so far; the engine calls `advance` once per step after every
layer has written. Allocated once for the known prompt + max_new_tokens, in the model dtype.
"""

from __future__ import annotations

import torch


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

    def advance(self, num_tokens: int) -> None:
        """Make the `num_tokens` just written by every layer visible to the next step."""
        self.length += num_tokens

    @property
    def num_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()
