"""The decode pool: pooled decode steps attend as each sequence's own cache would, through holes,
growth and slot reuse; what cannot be pooled is refused, never half-moved."""

from __future__ import annotations

import pytest
import torch

from longvita.infer import decode_pool
from longvita.infer.decode_pool import DecodePool
from longvita.model.kv_cache import KVCache

LAYERS, KV_HEADS, HEADS, DIM = 2, 2, 4, 8


def filled_cache(length: int, capacity: int, seed: int, dtype=torch.float32) -> KVCache:
    cache = KVCache(num_layers=LAYERS, batch_size=1, num_kv_heads=KV_HEADS, head_dim=DIM,
                    capacity=capacity, dtype=dtype, device="cpu")  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    for layer in range(LAYERS):
        k = torch.randn(1, KV_HEADS, length, DIM, generator=generator)
        cache.write(layer, k, torch.randn(1, KV_HEADS, length, DIM, generator=generator))
    cache.advance(length)
    return cache


def pool(slots: int = 4, max_tokens: int = 1024) -> DecodePool:
    return DecodePool(num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=DIM, slots=slots,
                      dtype=torch.float32, device="cpu", max_tokens=max_tokens)  # fmt: skip


def decode_both(pairs: list[tuple[KVCache, KVCache]], the_pool: DecodePool, seed: int):
    """One decode step of every (own cache, pooled copy) pair, each layer: the pooled rows'
    output and the own caches' outputs, [1, heads, n, dim] each, caches advanced."""
    generator = torch.Generator().manual_seed(seed)
    n = len(pairs)
    rows = the_pool.rows([pooled for _, pooled in pairs])
    pooled_out, own_out = [], []
    for layer in range(LAYERS):
        q = torch.randn(1, HEADS, n, DIM, generator=generator)
        k = torch.randn(1, KV_HEADS, n, DIM, generator=generator)
        v = torch.randn(1, KV_HEADS, n, DIM, generator=generator)
        pooled_out.append(the_pool.attend(q, k, v, layer, rows))
        own = [
            own(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], layer)
            for i, (own, _) in enumerate(pairs)
        ]
        own_out.append(torch.cat(own, dim=2))
    for own, pooled in pairs:
        own.advance(1)
        pooled.advance(1)
    return torch.stack(pooled_out), torch.stack(own_out)


def test_pooled_decode_steps_attend_as_each_cache_alone_through_holes_and_growth():
    the_pool = pool()
    own = [filled_cache(length, length + 8, seed) for seed, length in enumerate((5, 17, 3))]
    pairs = [(cache, the_pool.admit(filled_cache(cache.length, cache.capacity, seed)))
             for seed, cache in enumerate(own)]  # fmt: skip
    assert [the_pool.holds(pooled) for _, pooled in pairs] == [True] * 3
    assert the_pool.tokens_per_slot == decode_pool.MIN_POOL_TOKENS
    for step in range(3):  # slots 0, 1, 2 in order: the dense case
        pooled, alone = decode_both(pairs, the_pool, seed=10 + step)
        torch.testing.assert_close(pooled, alone)

    the_pool.release(pairs[1][1])  # slot 1 becomes a hole
    pairs = [pairs[2], pairs[0]]  # and the rows come in another order than the slots
    pooled, alone = decode_both(pairs, the_pool, seed=20)
    torch.testing.assert_close(pooled, alone)

    long = filled_cache(300, 400, seed=7)  # needs a larger pool: every slot moves
    pairs.append((long, the_pool.admit(filled_cache(300, 400, seed=7))))
    assert the_pool.tokens_per_slot == 512 and the_pool.caches[1] is pairs[-1][1]  # the hole
    for step in range(2):
        pooled, alone = decode_both(pairs, the_pool, seed=30 + step)
        torch.testing.assert_close(pooled, alone)


def test_what_cannot_be_pooled_is_refused(monkeypatch):
    the_pool = pool(slots=2, max_tokens=600)
    assert the_pool.admit(filled_cache(4, 8, 0, dtype=torch.int8)) is None  # another dtype
    assert the_pool.admit(filled_cache(4, 601, 0)) is None  # over max_tokens
    monkeypatch.setattr(decode_pool, "free_memory_bytes", lambda device: 1000)
    assert the_pool.admit(filled_cache(4, 8, 0)) is None  # growing needs more than is free
    monkeypatch.setattr(decode_pool, "free_memory_bytes", lambda device: None)  # unknown: grow
    with monkeypatch.context() as refusing:  # an allocator that fails all the same
        refusing.setattr(torch, "zeros", _out_of_memory)
        assert the_pool.admit(filled_cache(4, 8, 0)) is None
    first, second = the_pool.admit(filled_cache(4, 8, 0)), the_pool.admit(filled_cache(4, 8, 1))
    assert first is not None and second is not None
    assert the_pool.admit(filled_cache(4, 8, 2)) is None  # no free slot
    the_pool.release(first)
    assert the_pool.admit(filled_cache(4, 8, 2)) is not None  # the freed slot is taken again


def _out_of_memory(*args, **kwargs):
    raise RuntimeError("DefaultCPUAllocator: not enough memory")


def test_a_full_pooled_cache_is_an_error_not_an_overwrite():
    the_pool = pool()
    pooled = the_pool.admit(filled_cache(6, 6, 0))
    with pytest.raises(ValueError, match="full"):
        the_pool.rows([pooled])


def test_storage_grows_with_the_sequences_held_and_keeps_their_tokens():
    the_pool = pool(slots=32)
    sources = [filled_cache(4 + i, 12, seed=i) for i in range(5)]
    pooled = [the_pool.admit(source) for source in sources]
    assert tuple(the_pool.keys.shape[1::2]) == (8, 64)  # 4 slots, then 8; 64 tokens each
    pooled.append(the_pool.admit(sources[0]))  # 12 tokens need no more room
    pooled.append(the_pool.admit(filled_cache(3, 100, seed=9)))  # 100 need 128 a slot
    assert tuple(the_pool.keys.shape[1::2]) == (8, 128)
    for source, cache in zip(sources, pooled, strict=False):  # moved thrice, tokens intact
        for name, tensor in source.held(source.length).items():
            torch.testing.assert_close(cache.held(cache.length)[name], tensor, rtol=0, atol=0)
    for cache in pooled:
        the_pool.release(cache)
    assert the_pool.num_bytes == 0  # the last one out frees the storage
    assert the_pool.admit(sources[1]) is not None
