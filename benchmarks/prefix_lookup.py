"""Prefix cache lookups as the store grows: the index of prefix hashes against comparing the
prompt with every entry (what `MemoryPrefixStore` did before the index), same entries, same run.

Entries are short chats, the case where a server's store holds the most of them: a 40-token
system prompt every entry shares, then 60 tokens of its own (random ids below 150,000, fixed
seed). The store holds `--entries` of them (no KV cache bytes to speak of: 8 bytes of keys and
values each, so nothing is evicted). Per store size:
- `index`: `MemoryPrefixStore.matches` for a prompt that continues one entry (the next turn of
  the chat added first, so the least recently added of many) and for a new chat (shares the
  system prompt only), and `add` of a new chat (its prefix hashes included);
- `scan`: the shared length of the same prompts with every entry (`PromptKey.shared_prefix`, the
  old lookup; the old `add` ran the same loop through `covers`);
both must find the same longest shared length (`same_longest`). Medians of `--repeats` calls, in
milliseconds. Also the time to hash a prompt's prefixes (`PromptKey.prefix_hashes`, once per
prompt) at 1K, 64K and 1M tokens.

    python benchmarks/prefix_lookup.py                       # 100 / 1,000 / 10,000 entries
    python benchmarks/prefix_lookup.py --entries 100 1000 --repeats 5

Prints one JSON object to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from common import median_ms

from longvita.infer.prefix_cache import CachedPrefix, MemoryPrefixStore
from longvita.infer.prefix_key import PromptKey

SYSTEM_TOKENS = 40
OWN_TOKENS = 60


def chat_key(system: torch.Tensor, own: torch.Tensor) -> PromptKey:
    ids = torch.cat([system, own])
    return PromptKey(ids, torch.zeros_like(ids))


def entry_of(key: PromptKey) -> CachedPrefix:
    kv = torch.zeros(1, 1, 1, 1)  # the lookup never reads the keys and values
    return CachedPrefix(key, kv, kv, torch.arange(key.num_tokens), num_bytes=8)


def timed_ms(call, repeats: int) -> float:
    """`median_ms`, rounded for the JSON."""
    return round(median_ms(call, repeats), 4)


def scan_longest(entries: list[CachedPrefix], key: PromptKey) -> int:
    return max((key.shared_prefix(entry.key) for entry in entries), default=0)


def index_longest(store: MemoryPrefixStore, key: PromptKey) -> int:
    return max((m.length for m in store.matches(key, cp=1, cp_rank=0)), default=0)


def measure_store(size: int, repeats: int, generator: torch.Generator) -> dict:
    system = torch.randint(0, 150_000, (SYSTEM_TOKENS,), generator=generator)
    keys = [
        chat_key(system, torch.randint(0, 150_000, (OWN_TOKENS,), generator=generator))
        for _ in range(size)
    ]
    entries = [entry_of(key) for key in keys]
    store = MemoryPrefixStore(max_bytes=2**40)
    started = time.perf_counter()
    for entry in entries:
        store.add(entry)
    fill_s = time.perf_counter() - started
    next_turn = chat_key(system, torch.cat([keys[0].token_ids[SYSTEM_TOKENS:], torch.arange(9)]))
    new_chat = chat_key(system, torch.randint(0, 150_000, (OWN_TOKENS,), generator=generator))
    prompts = {"next_turn": next_turn, "new_chat": new_chat}
    for key in prompts.values():
        _ = key.prefix_hashes  # hashed once per prompt, in both modes' stead
    result: dict = {"entries": size, "fill_s": round(fill_s, 3)}
    for name, key in prompts.items():
        result[name] = {
            "index_ms": timed_ms(lambda key=key: index_longest(store, key), repeats),
            "scan_ms": timed_ms(lambda key=key: scan_longest(entries, key), repeats),
            "longest": index_longest(store, key),
            "same_longest": index_longest(store, key) == scan_longest(entries, key),
        }
    new_chats = [
        torch.randint(0, 150_000, (OWN_TOKENS,), generator=generator) for _ in range(repeats)
    ]
    fresh = iter([entry_of(chat_key(system, own)) for own in new_chats])  # hashed inside `add`
    last = entries[-1]
    result["add_index_ms"] = timed_ms(lambda: store.add(next(fresh)), repeats)
    result["add_scan_ms"] = timed_ms(lambda: [last.key.covers(e.key) for e in entries], repeats)
    return result


def hashing_ms(num_tokens: int, repeats: int) -> float:
    ids = torch.arange(num_tokens)
    return timed_ms(lambda: PromptKey(ids, torch.zeros_like(ids)).prefix_hashes, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=21, help="calls per median (21)")
    args = parser.parse_args()
    if min(args.entries) < 1 or args.repeats < 1:
        parser.error("--entries and --repeats must be >= 1")
    generator = torch.Generator().manual_seed(0)
    report = {
        "benchmark": "prefix_lookup",
        "config": {**vars(args), "torch": torch.__version__, "cpus": os.cpu_count()},
        "stores": [measure_store(size, args.repeats, generator) for size in args.entries],
        "prefix_hashes_ms": {
            str(n): hashing_ms(n, max(3, args.repeats // 7)) for n in (1024, 65536, 1 << 20)
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
