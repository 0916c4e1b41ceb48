"""The prefix cache: the keys and values of recent prompts, for the prompts that start the same.

A second question about an hour-long video shares its first hundreds of thousands of tokens
(the video) with the first question. The engine copies their keys and values from here into the
new prompt's KV cache and prefills only the rest: no video decoding, no ViT, no attention over
the shared part (positions stay global, so the rest attends to the copied keys as to its own).

Owns:
- `CachedPrefix`, one prompt's keys/values as one process (or one context-parallel rank) holds
  them, with the prompt's `PromptKey` and the positions held;
- `MemoryPrefixStore`, the recent entries of one Pipeline within a byte budget, least recently
  used dropped first. An entry shares the finished prompt's KV cache buffer (the decoded tokens
  are written after the prompt, so the prompt part never changes) unless the buffer is more
  than twice the prompt (a long answer's room): then the prompt part is copied alone;
- `PrefixCache`, that store and, optionally, the disk store (`infer.prefix_disk`), and
  `PromptPrefix`, one prompt's use of them: the entries it shares a prefix with, copying the
  chosen one's first tokens into a KV cache (the one copy a hit costs), keeping the prompt's
  own keys/values after its prefill, and writing them to disk when the generation ends.
The engine (`infer.engine`, `infer.cp_engine`) decides when; a context-parallel group agrees on
one entry (`parallel.collectives.best_common`). A prompt reuses at most all its tokens but the
last, whose logits start the answer. No torch.distributed here.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from longvita.infer.prefix_key import PromptKey
from longvita.model.kv_cache import KVCache
from longvita.processing.processor import ProcessedPrompt

if TYPE_CHECKING:
    from longvita.infer.prefix_disk import DiskPrefixStore

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_FRACTION = 0.25
"""`longvita.load`'s default in-memory budget: this share of the device's free memory."""
UNKNOWN_FREE_MEMORY_BUDGET = 2 * 2**30
"""The budget where the free memory cannot be read."""
MAX_CANDIDATES = 8
"""Entries a lookup compares token by token: of those with the prompt's longest prefix hash in
common, the ones added last."""
INDEX_BYTES_PER_HASH = 400
"""Memory per prefix hash of an entry: its place in the store's index (330-340 bytes: a key
tuple and dict slots) and in its key's list of hashes (50-75), measured with tracemalloc on
CPython 3.11 for prompts of 60 and 2,000 tokens."""


@dataclass(eq=False)
class CachedPrefix:
    """One prompt's keys and values, as one process or one context-parallel rank holds them."""

    key: PromptKey
    """The whole prompt's key (every rank has all of it)."""
    keys: torch.Tensor
    """[layers, kv_heads, T, head_dim]: the T prompt tokens held here, in position order."""
    values: torch.Tensor
    """[layers, kv_heads, T, head_dim]."""
    positions: torch.Tensor
    """[T] int64 ascending: the prompt positions of those tokens (0..T-1 in one process)."""
    cp: int = 1
    """Context-parallel ranks the prompt was split over."""
    cp_rank: int = 0
    num_bytes: int = 0
    """Memory the entry keeps alive (0 when it is mapped from a file)."""
    path: Path | None = None
    """The file it is mapped from (`infer.prefix_disk`), None in memory."""
    key_scales: torch.Tensor | None = None
    """float32 [layers, kv_heads, T] when the keys/values are int8 (`model.kv_cache`)."""
    value_scales: torch.Tensor | None = None

    @classmethod
    def of_cache(cls, key: PromptKey, held: dict[str, torch.Tensor], **fields) -> CachedPrefix:
        """An entry of the tensors a KV cache holds (`KVCache.held`)."""
        return cls(key, held["keys"], held["values"], key_scales=held.get("key_scales"),
                   value_scales=held.get("value_scales"), **fields)  # fmt: skip

    def tensors(self) -> dict[str, torch.Tensor]:
        """The keys, values (and scales of int8 ones) by `KVCache.held`'s names."""
        held = {"keys": self.keys, "values": self.values}
        if self.key_scales is not None:
            held["key_scales"], held["value_scales"] = self.key_scales, self.value_scales
        return held

    @property
    def storage_bytes(self) -> int:
        """Bytes of its tensors (what a copy of the prompt part alone takes)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def entry_id(self) -> str:
        """The key's digest: the same prompt and media have the same id on every rank and run."""
        return self.key.digest

    @property
    def num_tokens(self) -> int:
        return self.positions.numel()

    def tokens_before(self, length: int) -> int:
        """How many of the tokens held are among the prompt's first `length`."""
        return int(torch.searchsorted(self.positions, length))


@dataclass(frozen=True)
class PrefixMatch:
    entry: CachedPrefix
    length: int
    """Prompt tokens (positions 0..length-1) the entry holds for the new prompt."""


Slot = tuple[str, int, int]
"""An entry's place in the store: (entry id, cp, cp_rank)."""


def _slot(entry: CachedPrefix) -> Slot:
    return entry.entry_id, entry.cp, entry.cp_rank


class MemoryPrefixStore:
    """Entries within `max_bytes` (their tensors and their bookkeeping, `cost`), least recently
    used dropped first; thread-safe.

    An index of the entries' prefix hashes (`PromptKey.prefix_hashes`) finds the entries a
    prompt shares the most with by a binary search over the prompt's hashes, so a lookup costs
    the same with ten entries or a hundred thousand (a server's store of short chats)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"the prefix cache's byte budget must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Slot, CachedPrefix] = OrderedDict()  # least recent first
        self._by_prefix: dict[tuple[int, int, int], dict[Slot, None]] = {}
        """(cp, cp_rank, prefix hash) -> the slots of the entries with that prefix, in the order
        they were added."""
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def num_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def cost(entry: CachedPrefix) -> int:
        """What an entry takes from the budget: the memory it keeps alive, its key's token ids
        and media ids (16 bytes a token), and its prefix hashes (`INDEX_BYTES_PER_HASH`); for a
        60-token chat of the demo model the last two are a fifth of the whole."""
        key = entry.key
        return entry.num_bytes + 16 * key.num_tokens + INDEX_BYTES_PER_HASH * len(key.prefix_hashes)

    def add(self, entry: CachedPrefix) -> bool:
        """Keep `entry`, in place of the entries of prompts it covers (`PromptKey.covers`: the
        same prompt, an earlier question about the same video) among those it shares the
        longest prefix with, dropping the least recently used to stay within the budget; False
        when it alone is over the budget (not kept)."""
        if self.cost(entry) > self.max_bytes:
            return False
        slot = _slot(entry)
        with self._lock:
            for held in self._closest(entry.key, entry.cp, entry.cp_rank):
                if entry.key.covers(held.key):
                    self._remove(_slot(held))  # the new prompt serves all it did
            self._remove(slot)  # the same prompt, kept before
            self._entries[slot] = entry
            self._bytes += self.cost(entry)
            for prefix in entry.key.prefix_hashes:
                self._by_prefix.setdefault((entry.cp, entry.cp_rank, prefix), {})[slot] = None
            while self._bytes > self.max_bytes:
                self._remove(next(iter(self._entries)))
        return True

    def matches(self, key: PromptKey, *, cp: int, cp_rank: int) -> list[PrefixMatch]:
        """The entries of this rank that share the longest prefix with `key`: those with the
        longest prefix hash in common (`PromptKey.prefix_hashes`; the `MAX_CANDIDATES` added
        last when more have it), with their exact shared lengths. One of them shares the most
        tokens of all entries, or falls short of it by less than one `PREFIX_BLOCK`."""
        with self._lock:
            entries = self._closest(key, cp, cp_rank)
        found = [PrefixMatch(entry, key.shared_prefix(entry.key)) for entry in entries]
        return [match for match in found if match.length > 0]

    def touch(self, entry: CachedPrefix) -> None:
        """Mark `entry` as just used."""
        with self._lock:
            if self._entries.get(_slot(entry)) is entry:
                self._entries.move_to_end(_slot(entry))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._by_prefix.clear()
            self._bytes = 0

    def _closest(self, key: PromptKey, cp: int, cp_rank: int) -> list[CachedPrefix]:
        """The entries of (cp, cp_rank) with the longest of `key`'s prefix hashes (the lock is
        held). A hash is indexed only with every shorter one of the same entry, so the hashes
        of `key` found in the index are a leading run: its end is found by bisection."""
        hashes = key.prefix_hashes
        low, high = 0, len(hashes)  # the first `low` hashes are in the index
        while low < high:
            middle = (low + high + 1) // 2
            if (cp, cp_rank, hashes[middle - 1]) in self._by_prefix:
                low = middle
            else:
                high = middle - 1
        if low == 0:
            return []
        slots = self._by_prefix[(cp, cp_rank, hashes[low - 1])]
        return [self._entries[slot] for slot in itertools.islice(reversed(slots), MAX_CANDIDATES)]

    def _remove(self, slot: Slot) -> None:
        """Forget the entry in `slot`, if any (the lock is held)."""
        entry = self._entries.pop(slot, None)
        if entry is None:
            return
        self._bytes -= self.cost(entry)
        for prefix in entry.key.prefix_hashes:
            index_key = (entry.cp, entry.cp_rank, prefix)
            slots = self._by_prefix[index_key]
            del slots[slot]
            if not slots:
                del self._by_prefix[index_key]


class PrefixCache:
    """A Pipeline's prefix cache: recent prompts in memory, and on disk when `disk` is given.

    max_bytes: the in-memory budget (0 turns in-memory reuse off); tokens_per_tile: the model's
    visual slots per tile (to attach each slot to its medium).
    """

    def __init__(
        self, *, max_bytes: int, tokens_per_tile: int, disk: DiskPrefixStore | None = None
    ) -> None:
        self.memory = MemoryPrefixStore(max_bytes)
        self.disk = disk
        self.tokens_per_tile = tokens_per_tile

    @property
    def enabled(self) -> bool:
        return self.memory.max_bytes > 0 or self.disk is not None

    def for_prompt(self, prompt: ProcessedPrompt) -> PromptPrefix | None:
        """The prompt's use of the cache (hashes its media files); None when the cache is off
        or a medium has no identity."""
        if not self.enabled:
            return None
        key = PromptKey.of_prompt(
            prompt.input_ids, prompt.visual_mask, prompt.tiles, tokens_per_tile=self.tokens_per_tile
        )
        return None if key is None else PromptPrefix(self, key)

    def matches(self, key: PromptKey, *, cp: int, cp_rank: int) -> dict[str, PrefixMatch]:
        """Entry id -> the match, from memory, then from disk for the prompts not in memory
        (the disk is not read when memory holds all the prompt but its last token)."""
        found = {m.entry.entry_id: m for m in self.memory.matches(key, cp=cp, cp_rank=cp_rank)}
        whole = any(m.length >= key.num_tokens - 1 for m in found.values())
        if self.disk is not None and not whole:
            for match in self.disk.matches(key, cp=cp, cp_rank=cp_rank):
                found.setdefault(match.entry.entry_id, match)
        return found

    def clear(self) -> None:
        """Drop every entry held in memory (the files on disk stay)."""
        self.memory.clear()


def longest(lengths: dict[str, int]) -> tuple[str, int] | None:
    """The (entry id, length) with the most tokens (ties: the smallest id); None if empty."""
    if not lengths:
        return None
    return min(lengths.items(), key=lambda item: (-item[1], item[0]))


class PromptPrefix:
    """One prompt's use of the prefix cache: find, load, keep, persist."""

    def __init__(self, cache: PrefixCache, key: PromptKey) -> None:
        self.cache = cache
        self.key = key
        self._matches: dict[str, PrefixMatch] = {}
        self._kept: CachedPrefix | None = None
        self._persisted = False

    def matches(self, *, cp: int = 1, cp_rank: int = 0) -> dict[str, int]:
        """Entry id -> prompt tokens it can give (all but the last prompt token at most)."""
        found = self.cache.matches(self.key, cp=cp, cp_rank=cp_rank)
        limit = self.key.num_tokens - 1
        self._matches = {
            entry_id: match for entry_id, match in found.items() if min(match.length, limit) > 0
        }
        return {entry_id: min(m.length, limit) for entry_id, m in self._matches.items()}

    def held_before(self, entry_id: str, length: int) -> int:
        """Tokens among the prompt's first `length` that entry `entry_id` holds (this rank's
        share under context parallelism)."""
        return self._matches[entry_id].entry.tokens_before(length)

    def load(self, entry_id: str, length: int, kv: KVCache) -> torch.Tensor:
        """Copy the tokens among the first `length` of entry `entry_id` (from `matches`) into
        the empty cache `kv`; returns their positions [k] (0..length-1 in one process)."""
        entry = self._matches[entry_id].entry
        if kv.length != 0:
            raise ValueError(f"the KV cache must be empty to load a prefix, it holds {kv.length}")
        count = entry.tokens_before(length)
        kv.load(entry.tensors(), count)
        source = "memory" if entry.path is None else str(entry.path)
        logger.info(
            "prefix cache: the first %d of the prompt's %d tokens from %s",
            length,
            self.key.num_tokens,
            source,
        )
        if entry.path is None:
            self.cache.memory.touch(entry)
        elif self.cache.disk is not None:
            self.cache.disk.touch(entry.path)
        return entry.positions[:count]

    def keep(self, kv: KVCache, positions: torch.Tensor, *, cp: int = 1, cp_rank: int = 0) -> None:
        """After the prompt's prefill: keep its keys/values (the first len(positions) tokens
        of `kv`, at those prompt positions) for the prompts that follow, in memory now and on
        disk at `persist`."""
        count = positions.numel()
        self._kept = CachedPrefix.of_cache(
            self.key,
            kv.held(count),  # [layers, kv_heads, count, head_dim] views of kv
            positions=positions.cpu(),
            cp=cp,
            cp_rank=cp_rank,
            num_bytes=kv.num_bytes,
        )
        memory, entry = self.cache.memory, self._kept
        alone = entry.storage_bytes  # the prompt part's
        if memory.max_bytes == 0:
            return
        if alone > memory.max_bytes:
            logger.info(
                "prefix cache: a prompt of %d tokens (%d bytes) is over the in-memory budget of "
                "%d bytes: not kept in memory",
                self.key.num_tokens,
                alone,
                memory.max_bytes,
            )
            return
        if kv.capacity > 2 * count or entry.num_bytes > memory.max_bytes:  # the prompt part alone
            copies = {name: tensor.clone() for name, tensor in entry.tensors().items()}
            entry = dataclasses.replace(entry, **copies, num_bytes=alone)  # fields by those names
        memory.add(entry)

    def persist(self) -> None:
        """Write the kept keys/values to the disk store, once (nothing without one)."""
        if self._kept is None or self._persisted or self.cache.disk is None:
            return
        self._persisted = True
        self.cache.disk.write(self._kept)
