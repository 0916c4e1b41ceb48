"""Key/value cache: one preallocated buffer per layer, written in place as tokens arrive.

Owns the storage and how new tokens attend to it: used as the attention strategy of a forward
(`cache(q, k, v, layer_idx)`), it stores the new keys/values and attends over everything cached
so far. A chunk of several new tokens after a non-empty cache attends to the cache (all of it)
and to itself (causal) separately and merges the partial results by log-sum-exp, so no mask
of [chunk, context] is ever built; the cached part is read in blocks of `kv_block` tokens, so
the scratch memory of a chunk is bounded by chunk x kv_block whatever the context length (the
CUDA kernel repeats K/V heads for grouped-query attention: per block, not per cache). The
engine calls `advance` once per forward, after every layer has written. Allocated once for the
known prompt + max_new_tokens. Inference only: partial results are merged in place, so no
gradient flows through the cache.

The storage dtype (`kv_cache_dtype`) is the model's, another float dtype, or "int8": keys and
values quantized per token and head (`ops.kv_quant`, 2 x (head_dim + 4) bytes per token, layer
and K/V head instead of 2 x head_dim x 4 in float32). An int8 cache is read block by block: a
decode step attends straight over the int8 block, a prefill chunk dequantizes one block at a
time into a buffer of 4,096 tokens and runs the fused kernel on it; the whole cache is
never dequantized. A prefill chunk attends to its own (new) keys and values as computed, a
decode step to its own as cached (like a context-parallel rank's). A float cache
of another dtype than the model's is read the same way, converted block by block.
"""

from __future__ import annotations

import torch

from longvita.ops.attention import attention, block_attention, merge_partials_
from longvita.ops.kv_quant import dequantize_int8, int8_attention, quantize_int8

DEFAULT_KV_BLOCK = 16384
"""Cached tokens attended per kernel call by a prefill chunk (see the module docstring)."""
INT8_DECODE_SPAN = 65536
"""Cached int8 tokens a decode step attends per `ops.kv_quant.int8_attention` call (its
scores: 4 bytes per query row and token), merged by log-sum-exp."""
INT8_PREFILL_BLOCK = 4096
"""Cached int8 tokens a prefill chunk dequantizes at a time (at most `kv_block`): the buffer
stops growing at one default chunk's length, so memory is the cache plus a constant from
there on (more log-sum-exp merges than 16,384-token blocks: ~2% of a 32K prefill)."""
INT8_DIRECT_ROWS = 64
"""Query rows (query heads x new tokens) up to which an int8 block is attended directly
(`ops.kv_quant.int8_attention`) rather than dequantized for the fused kernel."""


def kv_bytes_per_token(
    *, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes one cached token takes in a cache of storage `dtype` (int8: values and scales)."""
    per_head = head_dim + 4 if dtype == torch.int8 else head_dim * dtype.itemsize
    return 2 * num_layers * num_kv_heads * per_head


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
        if not (dtype.is_floating_point or dtype == torch.int8):
            raise ValueError(f"a KV cache stores a float dtype or int8, got {dtype}")
        shape = (num_layers, batch_size, num_kv_heads, capacity, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.quantized = dtype == torch.int8
        self.key_scales: torch.Tensor | None = None
        """float32 [layers, batch, kv_heads, capacity] for an int8 cache, else None."""
        self.value_scales: torch.Tensor | None = None
        if self.quantized:
            self.key_scales = torch.empty(shape[:-1], dtype=torch.float32, device=device)
            self.value_scales = torch.empty(shape[:-1], dtype=torch.float32, device=device)
        self.capacity = capacity
        self.kv_block = kv_block
        self.length = 0
        """Tokens cached and visible to the next step."""
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None  # dequantized block

    @classmethod
    def over(cls, keys: torch.Tensor, values: torch.Tensor) -> KVCache:
        """An empty float cache over given storage [layers, 1, kv_heads, capacity, head_dim]:
        views of a larger buffer (`infer.decode_pool`), written and read like its own."""
        if keys.shape != values.shape or keys.dim() != 5 or not keys.dtype.is_floating_point:
            raise ValueError(
                f"a cache over storage needs float keys and values of one 5-D shape, got "
                f"{tuple(keys.shape)} {keys.dtype} and {tuple(values.shape)} {values.dtype}"
            )
        layers, batch, kv_heads, _, head_dim = keys.shape
        cache = cls(num_layers=layers, batch_size=batch, num_kv_heads=kv_heads, head_dim=head_dim,
                    capacity=0, dtype=keys.dtype, device=keys.device)  # fmt: skip
        cache.move_to(keys, values)
        return cache

    def move_to(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Use other storage of this cache's shape that holds the same tokens (a pool that
        grew has copied them)."""
        self.keys, self.values, self.capacity = keys, values, keys.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype (torch.int8 for the quantized cache)."""
        return self.keys.dtype

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Store `k`, `v` [batch, kv_heads, new, head_dim] after the cached tokens of `layer`
        (quantized in an int8 cache); returns the end of what `layer` now holds."""
        end = self.length + k.shape[-2]
        if end > self.capacity:
            raise ValueError(
                f"KV cache holds {self.capacity} tokens; {self.length} cached + "
                f"{k.shape[-2]} new = {end} do not fit"
            )
        where = (layer, slice(None), slice(None), slice(self.length, end))
        if self.quantized:
            self.keys[where], self.key_scales[where] = quantize_int8(k)
            self.values[where], self.value_scales[where] = quantize_int8(v)
        else:
            self.keys[where] = k
            self.values[where] = v
        return end

    takes_query_suffix = True
    """q may hold only the last new token's queries, or none (`qwen2.SUFFIX_QUERIES`)."""

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int
    ) -> torch.Tensor:
        """Attention strategy: store k/v of the new tokens, attend over cache + new tokens.

        q: [batch, heads, rows, head_dim] for the new tokens' last `rows`: all of them, the
        last only (a prompt's last chunk in the model's last layer) or none (the chunks before
        it there: only k/v are stored); k, v: [batch, kv_heads, new, head_dim].
        """
        rows, new = q.shape[-2], k.shape[-2]
        if rows not in (new, 1, 0):
            raise ValueError(f"q must hold all {new} new tokens, the last or none; got {rows}")
        cached = self.length
        end = self.write(layer_idx, k, v)
        if rows == 0:
            return q
        if self.keys.dtype == q.dtype and (cached == 0 or rows == 1):
            # first chunk (causal) or one query (sees all): one kernel call over the cache
            keys, values = self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]
            return attention(q, keys, values, causal=True, q_offset=end - rows)
        if cached == 0:  # the first chunk, the cache in another dtype: over itself, as given
            return attention(q, k, v, causal=True, q_offset=new - rows)
        if new == 1:  # a decode step over the cache in another dtype, itself included
            out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            lse = torch.full(q.shape[:-1], float("-inf"), device=q.device)
            self.attend_cached_(q, layer_idx, end, out, lse)
            return out.to(q.dtype)
        # the chunk over itself as given (its last query sees all of it), then over the cache
        out, lse = block_attention(q, k, v, causal=rows == new)
        out, lse = out.float(), lse.float()  # the accumulator, merged in place block by block
        self.attend_cached_(q, layer_idx, cached, out, lse)
        return out.to(q.dtype)

    def attend_cached_(
        self,
        q: torch.Tensor,
        layer: int,
        end: int,
        out: torch.Tensor,
        lse: torch.Tensor,
    ) -> None:
        """Merge the attention of q [batch, heads, n, head_dim] over the first `end` cached
        tokens of `layer` (unmasked) into the float32 accumulators out [batch, heads, n,
        head_dim] and lse [batch, heads, n], one block of cached tokens at a time."""
        direct = self.quantized and q.shape[1] * q.shape[2] <= INT8_DIRECT_ROWS
        block = self.kv_block
        if self.quantized:
            block = INT8_DECODE_SPAN if direct else min(block, INT8_PREFILL_BLOCK)
        for start in range(0, end, block):
            stop = min(start + block, end)
            if direct:
                block_out, block_lse = int8_attention(q, *self._int8_block(layer, start, stop))
            else:
                keys, values = self._float_block(layer, start, stop, q.dtype)
                block_out, block_lse = block_attention(q, keys, values, causal=False)
            merge_partials_(out, lse, block_out, block_lse)
            del block_out, block_lse

    def _int8_block(self, layer: int, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        where = (layer, slice(None), slice(None), slice(start, stop))
        return (
            self.keys[where],
            self.key_scales[where],
            self.values[where],
            self.value_scales[where],
        )

    def _float_block(
        self, layer: int, start: int, stop: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values [batch, kv_heads, stop - start, head_dim] in `dtype` of cached tokens
        start..stop: views of a cache in `dtype`, else converted (int8: dequantized) into a
        reused buffer."""
        where = (layer, slice(None), slice(None), slice(start, stop))
        if self.keys.dtype == dtype:
            return self.keys[where], self.values[where]
        size = stop - start
        scratch = self._scratch
        if scratch is None or scratch[0].shape[-2] < size or scratch[0].dtype != dtype:
            tokens = min(self.kv_block, INT8_PREFILL_BLOCK if self.quantized else self.capacity)
            shape = (*self.keys.shape[1:3], min(tokens, self.capacity), self.keys.shape[-1])
            device = self.keys.device
            self._scratch = scratch = (
                torch.empty(shape, dtype=dtype, device=device),
                torch.empty(shape, dtype=dtype, device=device),
            )  # one block, reused by every layer and chunk
        keys, values = scratch[0][:, :, :size], scratch[1][:, :, :size]
        if not self.quantized:
            return keys.copy_(self.keys[where]), values.copy_(self.values[where])
        dequantize_int8(self.keys[where], self.key_scales[where], keys)
        dequantize_int8(self.values[where], self.value_scales[where], values)
        return keys, values

    def advance(self, num_tokens: int) -> None:
        """Make the `num_tokens` just written by every layer visible to the next step."""
        self.length += num_tokens

    def held(self, count: int) -> dict[str, torch.Tensor]:
        """Views of the first `count` cached tokens of batch row 0, by name: "keys", "values"
        [layers, kv_heads, count, head_dim] and, in an int8 cache, "key_scales",
        "value_scales" [layers, kv_heads, count] (what the prefix cache keeps)."""
        held = {"keys": self.keys[:, 0, :, :count], "values": self.values[:, 0, :, :count]}
        if self.quantized:
            held["key_scales"] = self.key_scales[:, 0, :, :count]
            held["value_scales"] = self.value_scales[:, 0, :, :count]
        return held

    def load(self, tensors: dict[str, torch.Tensor], count: int) -> None:
        """Copy the first `count` tokens of `held`-shaped tensors into batch row 0 of this
        empty cache and make them visible."""
        if self.length != 0:
            raise ValueError(f"the KV cache must be empty to load tokens, it holds {self.length}")
        for name, target in self.held(count).items():
            if name not in tensors:
                raise ValueError(f"loading into a {self.dtype} KV cache needs {name!r}")
            target.copy_(tensors[name].narrow(2, 0, count))  # dim 2: the tokens
        self.advance(count)

    @property
    def num_bytes(self) -> int:
        total = 2 * self.keys.numel() * self.keys.element_size()
        if self.quantized:
            total += 2 * self.key_scales.numel() * self.key_scales.element_size()
        return total
