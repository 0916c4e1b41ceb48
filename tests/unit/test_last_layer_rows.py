"""A prefill that needs only its last position's logits: the model's last layer computes keys
and values for every row and nothing else for the others (`Qwen2Model.forward` keep_last, a
`KVCache` taking a suffix of queries). Same logits and the same cache as computing every row."""

from __future__ import annotations

import pytest
import torch

from longvita.config import tiny
from longvita.infer.engine import allocate_cache
from longvita.model.kv_cache import KVCache
from longvita.model.long_vita import rows_wanted
from longvita.model.qwen2 import SUFFIX_QUERIES
from longvita.testing import random_model

CACHE_DTYPES = [None, torch.bfloat16, torch.int8]  # None: the model's (float32)
LOGIT_ERROR = {None: 1e-5, torch.bfloat16: 5e-3, torch.int8: 1e-2}
"""Max |logits - one forward without a cache's| / max |those logits| (as in
tests/integration/test_kv_cache_dtype.py: a smaller cache rounds the cached keys/values)."""


class EveryRow:
    """The same cache without the suffix capability: the model computes every row."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache

    def __call__(self, q, k, v, layer_idx):
        return self.cache(q, k, v, layer_idx)


def cache_state(cache: KVCache, layers: slice = slice(None)) -> list[torch.Tensor]:
    """What `cache` holds in `layers` up to its length: keys, values (and int8 scales)."""
    held = [cache.keys, cache.values]
    if cache.quantized:
        held += [cache.key_scales, cache.value_scales]
    end = cache.length
    return [t[layers, ..., :end, :] if t.dim() == 5 else t[layers, ..., :end] for t in held]


def prefill(model, input_ids, cache, attention_fn, chunk: int) -> torch.Tensor:
    """The prompt chunk by chunk, as `engine.prefill_chunks` runs it: the last logits."""
    seq = input_ids.numel()
    logits = None
    with torch.inference_mode():
        for start in range(0, seq, chunk):
            end = min(start + chunk, seq)
            logits = model(
                input_ids[start:end][None],
                position_ids=torch.arange(start, end)[None],
                attention_fn=attention_fn,
                logit_positions=None if end == seq else torch.zeros(0, dtype=torch.long),
            )
            assert logits.shape[1] == (1 if end == seq else 0)
            cache.advance(end - start)
    return logits


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, ids=["model", "bfloat16", "int8"])
@pytest.mark.parametrize("chunk", [37, 5, 64])
def test_a_prefill_that_skips_the_last_layers_other_rows_gives_the_same_logits_and_cache(
    cache_dtype, chunk
):
    model = random_model(tiny())
    input_ids = torch.randint(6, model.config.vocab_size, (37,), generator=torch.Generator())
    skipping = allocate_cache(model, 40, cache_dtype)
    every = allocate_cache(model, 40, cache_dtype)
    rows = []
    attend = model.model.layers[-1].self_attn.forward

    def last_layer(*args, **kwargs):
        out = attend(*args, **kwargs)
        rows.append(out.shape[1])
        return out

    model.model.layers[-1].self_attn.forward = last_layer
    fast = prefill(model, input_ids, skipping, skipping, chunk)
    skipped_rows, rows[:] = rows[:], []
    full = prefill(model, input_ids, every, EveryRow(every), chunk)
    chunks = -(-37 // chunk)
    assert skipped_rows == [0] * (chunks - 1) + [1]  # the path was taken
    assert rows == [min(chunk, 37 - start) for start in range(0, 37, chunk)]
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    for kept, reference in zip(cache_state(skipping), cache_state(every), strict=True):
        assert torch.equal(kept, reference)
    assert skipping.length == every.length == 37
    with torch.inference_mode():
        whole = model(input_ids[None])  # one forward, no cache: the last position's logits
    error = (fast - whole).abs().max() / whole.abs().max()
    assert error < LOGIT_ERROR[cache_dtype], float(error)


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, ids=["model", "bfloat16", "int8"])
def test_a_cache_attends_the_last_query_or_none_as_among_all(cache_dtype):
    """After 11 cached tokens, 6 new ones: q of the last token alone gets the last row of the
    full result; q of none only stores k/v."""
    model = random_model(tiny())
    config = model.config
    gen = torch.Generator().manual_seed(1)

    def tensors(heads, n):
        return torch.randn(1, heads, n, config.head_dim, generator=gen)

    old_k, old_v = tensors(config.num_key_value_heads, 11), tensors(config.num_key_value_heads, 11)
    q = tensors(config.num_attention_heads, 6)
    k, v = tensors(config.num_key_value_heads, 6), tensors(config.num_key_value_heads, 6)
    results = {}
    for rows in (6, 1, 0):
        cache = allocate_cache(model, 20, cache_dtype)
        cache(tensors(config.num_attention_heads, 11), old_k, old_v, 0)
        cache.advance(11)
        out = cache(q[:, :, 6 - rows :], k, v, 0)
        cache.advance(6)
        results[rows] = out, cache_state(cache, slice(0, 1))  # layer 0: the one written
    full, state = results[6]
    torch.testing.assert_close(results[1][0], full[:, :, -1:], rtol=1e-5, atol=1e-5)
    assert results[0][0].shape[-2] == 0
    for rows in (1, 0):
        assert all(torch.equal(a, b) for a, b in zip(results[rows][1], state, strict=True))


def test_other_query_counts_are_refused():
    model = random_model(tiny())
    cache = allocate_cache(model, 20)
    config = model.config
    q = torch.zeros(1, config.num_attention_heads, 2, config.head_dim)
    k = torch.zeros(1, config.num_key_value_heads, 5, config.head_dim)
    with pytest.raises(ValueError, match="all 5 new tokens, the last or none; got 2"):
        cache(q, k, k, 0)


def test_rows_wanted_only_with_a_cache_that_takes_a_suffix():
    cache = allocate_cache(random_model(tiny()), 4)
    assert getattr(cache, SUFFIX_QUERIES)
    assert rows_wanted(None, cache) == 1
    assert rows_wanted(torch.zeros(0, dtype=torch.long), cache) == 0
    assert rows_wanted(torch.arange(3), cache) is None  # every position: every row
    assert rows_wanted(None, EveryRow(cache)) is None
    assert rows_wanted(None, None) is None
