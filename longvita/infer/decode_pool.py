"""Decoding sequences' KV caches side by side, so that one attention call per layer serves them.

The batch engine (`infer.batch`) runs each prompt into a cache of its own (chunked prefill, the
prefix cache). A sequence that starts decoding moves into a slot of this pool: one buffer
[layers, slots, kv_heads, tokens, head_dim] per keys and values, where its cache becomes a
`KVCache` over the slot's view, so every per-sequence path still works on it. The decode tokens
of a step's pooled sequences then store their keys and values with one indexed copy per layer
and attend with one masked SDPA call over the slots in use (`attend`), where each sequence cost
a few calls per layer: a step of 8 demo-model sequences is 1.4x faster on a CPU, of 32 2.1x
(`benchmarks/decode_pool.py`), and on a GPU the kernel launches of a step stop growing with the
number of sequences. The engine goes through the pool from `batch.MIN_POOLED_ROWS` pooled
tokens a step; with fewer, each attends in its slot's cache alone.

The buffer grows when a sequence finds no free slot (slots double, up to the batch's) or holds
more tokens than a slot (a slot holds the next power of two, up to `max_tokens`), only into free
memory (as much again must stay free), and is freed when the last pooled sequence ends. A
sequence that does not fit (too long, every slot taken, no memory, a cache of another dtype)
decodes in its own cache as before. The lowest free slot is taken, so the range attended, slot
0 to the highest in use, has few holes; a hole gets a query row of zeros whose output is
dropped. The attention is a cache's own decode step's (every cached token visible, the new one
included); only the batched kernel's order of additions differs, as with any batched matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longvita.infer.plan import free_memory_bytes
from longvita.model.kv_cache import KVCache

DEFAULT_POOL_TOKENS = 4096
"""Most tokens (prompt + answer) a pooled sequence may hold; longer ones decode alone."""
MIN_POOL_TOKENS = 64
"""Fewest tokens per slot: a slot holds a power of two of tokens from there."""
MIN_POOL_SLOTS = 4
"""Slots of a new pool (they double from there as needed, up to `slots`)."""


@dataclass
class PooledRows:
    """A step's decode tokens of pooled sequences: rows [0, count) of the packed row, one per
    sequence, in `slots` order; built once per step, used by every layer."""

    slots: torch.Tensor
    """[count] long: each row's slot."""
    positions: torch.Tensor
    """[count] long: where each row's token is stored (its sequence's cached length)."""
    span: int
    """Slots attended: 0 .. span - 1 (the highest slot of the rows + 1)."""
    visible: torch.Tensor
    """[span, 1, 1, length] bool: the cached tokens each slot's query sees (hole: the first)."""
    dense: bool
    """The rows are slots 0 .. count - 1 in order: no scatter or gather needed."""

    @property
    def count(self) -> int:
        return self.slots.numel()


class DecodePool:
    """Slots for up to `slots` decoding sequences of one model, storage grown on demand."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        slots: int,
        dtype: torch.dtype,
        device: torch.device | str,
        max_tokens: int = DEFAULT_POOL_TOKENS,
    ) -> None:
        if slots < 1 or max_tokens < 1:
            raise ValueError(f"need slots, max_tokens >= 1, got {slots=}, {max_tokens=}")
        if not dtype.is_floating_point:
            raise ValueError(f"a decode pool stores a float dtype, got {dtype}")
        self.dtype, self.device = dtype, torch.device(device)
        self.max_slots, self.max_tokens = slots, max_tokens
        shape = (num_layers, 0, num_kv_heads, 0, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=self.device)
        self.values = torch.empty(shape, dtype=dtype, device=self.device)
        self.caches: list[KVCache | None] = []
        """The cache over each slot, None where the slot is free."""
        self._slots: dict[int, int] = {}  # id(cache) -> its slot

    @property
    def tokens_per_slot(self) -> int:
        return self.keys.shape[3]

    @property
    def num_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def admit(self, cache: KVCache) -> KVCache | None:
        """A slot's cache holding what `cache` holds (copied in), with its capacity; None when
        the sequence cannot be pooled (the module docstring says when)."""
        if cache.dtype != self.dtype or cache.capacity > self.max_tokens:
            return None
        slots = len(self.caches)
        if None not in self.caches:
            if slots == self.max_slots:
                return None
            slots = min(max(MIN_POOL_SLOTS, 2 * slots), self.max_slots)
        tokens = self.tokens_per_slot
        if cache.capacity > tokens:
            tokens = min(max(MIN_POOL_TOKENS, 1 << (cache.capacity - 1).bit_length()),
                         self.max_tokens)  # fmt: skip
        if not self._resize(slots, tokens):
            return None
        slot = self.caches.index(None)
        pooled = KVCache.over(*self._views(slot, cache.capacity))
        pooled.load(cache.held(cache.length), cache.length)
        self.caches[slot] = pooled
        self._slots[id(pooled)] = slot
        return pooled

    def holds(self, cache: KVCache) -> bool:
        return id(cache) in self._slots

    def release(self, cache: KVCache) -> None:
        """Free the slot of a cache `admit` returned (its sequence ended); the storage goes
        when no slot is held (a burst of long sequences does not keep it large)."""
        self.caches[self._slots.pop(id(cache))] = None
        if not self._slots:
            layers, _, kv_heads, _, head_dim = self.keys.shape
            empty = (layers, 0, kv_heads, 0, head_dim)
            self.keys = torch.empty(empty, dtype=self.dtype, device=self.device)
            self.values = torch.empty(empty, dtype=self.dtype, device=self.device)
            self.caches = []

    def rows(self, caches: list[KVCache]) -> PooledRows:
        """The per-step plan of decode tokens for `caches` (pooled, one token each)."""
        slots = [self._slots[id(cache)] for cache in caches]
        lengths = [cache.length for cache in caches]
        full = [length for cache, length in zip(caches, lengths, strict=True)
                if length >= cache.capacity]  # fmt: skip
        if full:
            raise ValueError(f"a pooled KV cache is full ({full[0]} tokens): no room to decode")
        span = max(slots) + 1
        seen = [0] * span  # a hole sees its first token only (its output is dropped)
        for slot, length in zip(slots, lengths, strict=True):
            seen[slot] = length + 1  # the new token included
        visible = torch.arange(max(seen)) < torch.tensor(seen)[:, None]  # [span, length]
        return PooledRows(
            slots=torch.tensor(slots, device=self.device),
            positions=torch.tensor(lengths, device=self.device),
            span=span,
            visible=visible.to(self.device)[:, None, None, :],
            dense=slots == list(range(len(slots))),
        )

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, rows: PooledRows
    ) -> torch.Tensor:
        """Store k, v [1, kv_heads, count, head_dim] of the rows' new tokens in their slots and
        attend q [1, heads, count, head_dim] over each slot's tokens -> [1, heads, count,
        head_dim]."""
        heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[-1]
        count, group = rows.count, heads // kv_heads
        keys, values = self.keys[layer], self.values[layer]  # [slots, kv_heads, tokens, dim]
        keys[rows.slots, :, rows.positions] = k[0].transpose(0, 1)  # [count, kv_heads, dim]
        values[rows.slots, :, rows.positions] = v[0].transpose(0, 1)
        # the group's query heads as rows of their K/V head: [count, kv_heads, group, dim]
        queries = q[0].transpose(0, 1).reshape(count, kv_heads, group, head_dim)
        if not rows.dense:
            spread = queries.new_zeros(rows.span, kv_heads, group, head_dim)
            queries = spread.index_copy_(0, rows.slots, queries)
        length = rows.visible.shape[-1]
        out = F.scaled_dot_product_attention(
            queries,
            keys[: rows.span, :, :length],
            values[: rows.span, :, :length],
            attn_mask=rows.visible,
        )  # [span, kv_heads, group, dim]
        if not rows.dense:
            out = out.index_select(0, rows.slots)
        return out.reshape(count, heads, head_dim).transpose(0, 1)[None]

    def _views(self, slot: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        where = (slice(None), slice(slot, slot + 1), slice(None), slice(0, capacity))
        return self.keys[where], self.values[where]

    def _resize(self, slots: int, tokens: int) -> bool:
        """Storage of `slots` x `tokens` (no smaller than now), the pooled caches moved into
        it; False, nothing changed, when that needs more than half the free memory."""
        layers, old_slots, kv_heads, old_tokens, head_dim = self.keys.shape
        if (slots, tokens) == (old_slots, old_tokens):
            return True
        shape = (layers, slots, kv_heads, tokens, head_dim)
        needed = 2 * torch.Size(shape).numel() * self.keys.element_size()
        free = free_memory_bytes(self.device)
        if free is not None and 2 * needed > free:
            return False
        # zeroed: the attention reads each slot up to the longest row's length, and a NaN in
        # uninitialised memory would survive the mask (NaN + -inf) into the real rows
        try:
            keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
            values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        except (torch.OutOfMemoryError, RuntimeError):  # the allocator refused (RuntimeError on
            return False  # a CPU): the sequence decodes in its own cache, nothing is lost
        keys[:, :old_slots, :, :old_tokens] = self.keys
        values[:, :old_slots, :, :old_tokens] = self.values
        self.keys, self.values = keys, values
        self.caches += [None] * (slots - old_slots)
        for slot, cache in enumerate(self.caches):
            if cache is not None:
                cache.move_to(*self._views(slot, cache.capacity))
        return True
