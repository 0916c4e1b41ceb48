"""Context-parallel generation at CP = 2 and 4 on gloo ranks against the single-process engine:
the same tokens, per-step logits within fp32 tolerance, KV cache shards of about 1/cp, and
prompts shorter than the group (ranks with only padding, or without a tile)."""

from __future__ import annotations

import os
import time

import pytest
import torch

import longvita
from longvita.config import tiny
from longvita.errors import MediaError
from longvita.infer.cp_engine import generate_sharded
from longvita.infer.layout import PromptLayout, shard_round
from longvita.infer.request import SamplingParams
from longvita.model.checkpoint import load_model
from longvita.parallel.state import ParallelState
from longvita.processing.tiles import TileSource
from longvita.testing import random_model
from tests.distributed.spawn import RankFailed

MAX_NEW_TOKENS = 8
PROMPTS = {  # name: (text, image keys, video keys, sampling)
    "text": ("Describe a quiet morning.", [], [], {}),
    "image": ("<image>\nWhat is in this image?", ["wide"], [], {}),
    "video": ("<video>\nWhat happens?", [], ["video"], {}),
    "image_sampled": ("<image>\nWhat?", ["image"], [], {"temperature": 0.8, "seed": 3}),
}
RAW_CONFIG = tiny(vocab_size=96)  # tiles of 4 tokens
CONTEXT_ID = 5


def _generate_prompts(
    rank: int,
    world_size: int,
    checkpoint: str,
    prompts: dict,
    chunks: tuple[int, ...],
    kv_cache_dtype: torch.dtype | None = None,
) -> dict:
    """Every prompt (processed by the parent: no tokenizer here) at every prefill chunk."""
    state = ParallelState.from_group(world_size, timeout_s=60)
    model = load_model(checkpoint).eval()
    results = {}
    for prefill_chunk in chunks:
        for name, prompt in prompts.items():
            results[name, prefill_chunk] = generate_sharded(
                model,
                prompt["input_ids"],
                state=state,
                params=SamplingParams(max_new_tokens=MAX_NEW_TOKENS, **PROMPTS[name][3]),
                stop_ids=prompt["stop_ids"],
                pad_id=prompt["pad_id"],
                tiles=prompt["pixel_values"],
                visual_mask=prompt["visual_mask"],
                return_scores=True,
                prefill_chunk=prefill_chunk,
                vision_batch=2,
                kv_cache_dtype=kv_cache_dtype,
            )
    return results


def _prompts_and_references(pipe, media, names: list[str]) -> tuple[dict, dict]:
    """The named PROMPTS processed for the ranks (no tokenizer there), and `pipe`'s answers."""
    prompts, references = {}, {}
    for name in names:
        text, image_keys, video_keys, sampling = PROMPTS[name]
        images, videos = [media[k] for k in image_keys], [media[k] for k in video_keys]
        processed = pipe.process(text, images, videos)
        prompts[name] = {
            "input_ids": processed.input_ids,
            "visual_mask": processed.visual_mask,
            "pixel_values": processed.pixel_values,
            "stop_ids": pipe.processor.tokens.stop,
            "pad_id": pipe.processor.tokens.pad,
        }
        references[name] = pipe.generate(
            text, images, videos, max_new_tokens=MAX_NEW_TOKENS, return_scores=True, **sampling
        )
    return prompts, references


@pytest.mark.distributed
@pytest.mark.parametrize(("cp", "small_chunk"), [(2, 6), (4, 10)])
def test_tokens_and_logits_equal_the_single_process_engine(
    ranks, tiny_checkpoint, media, cp, small_chunk
):
    """Text, image, video and sampled prompts of 32-74 tokens, prefilled in one round and in
    rounds of `small_chunk` tokens per rank (tiles cut across rounds and ranks)."""
    pipe = longvita.load(tiny_checkpoint)
    prompts, references = _prompts_and_references(pipe, media, list(PROMPTS))
    chunks = (4096, small_chunk)
    results = ranks(_generate_prompts, cp, args=(str(tiny_checkpoint), prompts, chunks))
    for (name, prefill_chunk), got in results[0].items():
        reference = references[name]
        assert len(reference.token_ids) == MAX_NEW_TOKENS, name  # no early stop: 8 steps
        for rank, per_rank in enumerate(results):
            assert per_rank[name, prefill_chunk].token_ids == reference.token_ids, (name, rank)
            assert per_rank[name, prefill_chunk].stop_reason == reference.stop_reason
        torch.testing.assert_close(got.scores, reference.scores, msg=f"{name} {prefill_chunk}")
        assert all(per_rank[name, prefill_chunk].scores is None for per_rank in results[1:])
        per_round = cp * 2 * (prefill_chunk // 2)  # prompt tokens in a round
        assert (got.prefill_rounds > 1) == (reference.prompt_tokens > per_round)
        assert all(
            per_rank[name, prefill_chunk].kv_cache_bytes_per_rank == got.kv_cache_bytes_per_rank
            for per_rank in results
        )  # every rank reports every rank's numbers
        layout = PromptLayout.build(reference.prompt_tokens, cp, prefill_chunk)
        _check_shards(got, pipe, reference, slack=layout.chunk_len)


def _check_shards(got, pipe, reference, *, slack: int) -> None:
    """Each rank holds 1/cp of the cache (give or take `slack` tokens: the padding of the last
    round, which the first decoded tokens fill) and encodes only the tiles its tokens need."""
    cp, config = got.cp, pipe.config
    bytes_per_token = (
        2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    )
    single_process = reference.kv_cache_bytes  # prompt + max_new_tokens
    assert single_process == (reference.prompt_tokens + MAX_NEW_TOKENS) * bytes_per_token
    cached = got.kv_cache_tokens_per_rank
    assert len(cached) == cp
    assert sum(cached) == reference.prompt_tokens + MAX_NEW_TOKENS - 1  # last token not fed back
    assert max(cached) - min(cached) <= max(1, slack)
    for num_bytes, num_tokens in zip(got.kv_cache_bytes_per_rank, cached, strict=True):
        assert num_bytes == num_tokens * bytes_per_token  # sized exactly
        assert num_bytes <= single_process / cp + max(1, slack) * bytes_per_token
    tiles = got.tiles_encoded_per_rank
    assert max(tiles) <= reference.num_tiles <= sum(tiles)  # each tile once per rank at most
    if reference.num_tiles > 0 and got.prefill_rounds == 1:  # no rank needs them all
        assert max(tiles) < reference.num_tiles


@pytest.mark.distributed
def test_an_int8_cache_under_cp_equals_the_single_process_int8_cache(ranks, tiny_checkpoint, media):
    """One round (each rank's prompt share attends exactly, as the single process's one chunk
    does), then every decode step over the int8 shards: the single process's tokens and logits,
    with each rank holding its share of the int8 cache."""
    pipe = longvita.load(tiny_checkpoint, kv_cache_dtype="int8", prefix_cache_bytes=0)
    prompts, references = _prompts_and_references(pipe, media, ["text", "video"])
    args = (str(tiny_checkpoint), prompts, (4096,), torch.int8)
    results = ranks(_generate_prompts, 2, args=args)
    for name, reference in references.items():
        got = results[0][name, 4096]
        assert got.token_ids == reference.token_ids, name
        torch.testing.assert_close(got.scores, reference.scores, msg=name)
        assert sum(got.kv_cache_bytes_per_rank) < reference.kv_cache_bytes  # shards, int8
        assert max(got.kv_cache_bytes_per_rank) <= reference.kv_cache_bytes / 2 * 1.1


def _raw_prompt(num_tokens: int, tile_slots: tuple[int, ...]) -> dict:
    """Token ids with a 4-token tile at each of `tile_slots` (not a Processor prompt)."""
    gen = torch.Generator().manual_seed(num_tokens)
    input_ids = torch.randint(6, RAW_CONFIG.vocab_size, (num_tokens,), generator=gen)
    visual_mask = torch.zeros(num_tokens, dtype=torch.bool)
    tokens_per_tile = RAW_CONFIG.vision.tokens_per_tile
    for start in tile_slots:
        visual_mask[start : start + tokens_per_tile] = True
    input_ids[visual_mask] = CONTEXT_ID
    size = RAW_CONFIG.vision.image_size
    pixel_values = torch.randn(len(tile_slots), 3, size, size, generator=gen)
    return {"input_ids": input_ids, "visual_mask": visual_mask, "tiles": pixel_values}


RAW_CASES = {  # name: (prompt tokens, tile slot starts, prefill_chunk, stop at the first token)
    "one_token": (1, (), 4096, False),
    "three_tokens": (3, (), 4096, False),
    "one_tile_over_all_ranks": (6, (1,), 4096, False),
    "rounds_of_two_tokens": (19, (5, 9), 2, False),  # 3 rounds of 8, tiles across rounds
    "stops_at_once": (5, (), 4096, True),
}


def _generate_raw(rank: int, world_size: int) -> dict:
    state = ParallelState.from_group(world_size, timeout_s=60)
    model = random_model(RAW_CONFIG, seed=1)
    results = {}
    for name, (num_tokens, tile_slots, prefill_chunk, stop_at_once) in RAW_CASES.items():
        first = _first_greedy_token(model, _raw_prompt(num_tokens, tile_slots))
        results[name] = generate_sharded(
            model,
            **_raw_prompt(num_tokens, tile_slots),
            state=state,
            params=SamplingParams(max_new_tokens=6),
            stop_ids=(first,) if stop_at_once else (),
            pad_id=0,
            return_scores=True,
            prefill_chunk=prefill_chunk,
            vision_batch=1,
        )
    return results


def _full_forward_logits(model, prompt: dict, new_tokens: list[int]) -> torch.Tensor:
    """Logits at every position of prompt + new tokens: one uncached forward, the definition."""
    ids = torch.cat([prompt["input_ids"], torch.tensor(new_tokens, dtype=torch.int64)])
    mask = torch.cat([prompt["visual_mask"], torch.zeros(len(new_tokens), dtype=torch.bool)])
    with torch.inference_mode():
        return model(
            ids[None],
            pixel_values=prompt["tiles"],
            visual_mask=mask[None],
            logit_positions=torch.arange(ids.numel()),
        )[0]  # [seq, vocab]


def _first_greedy_token(model, prompt: dict) -> int:
    return int(_full_forward_logits(model, prompt, [])[-1].argmax())


@pytest.mark.distributed
def test_cp_larger_than_the_prompt_and_its_tiles(ranks):
    """cp 4 = 8 chunks over 1..6 tokens: ranks with only padding, a tile cut over every rank;
    and rounds of 2 tokens per rank."""
    model = random_model(RAW_CONFIG, seed=1)
    results = ranks(_generate_raw, 4, timeout_s=120)
    assert results[0]["rounds_of_two_tokens"].prefill_rounds == 3
    for name, (num_tokens, tile_slots, _, stop_at_once) in RAW_CASES.items():
        got = results[0][name]
        assert all(per_rank[name].token_ids == got.token_ids for per_rank in results), name
        if stop_at_once:
            assert got.token_ids == [] and got.stop_reason == "stop_token"
            assert got.scores.shape == (0, RAW_CONFIG.vocab_size)
            continue
        assert len(got.token_ids) == 6 and got.stop_reason == "length"
        full = _full_forward_logits(model, _raw_prompt(num_tokens, tile_slots), got.token_ids)
        steps = full[num_tokens - 1 : num_tokens - 1 + len(got.token_ids)]  # [6, vocab]
        torch.testing.assert_close(got.scores, steps, msg=name)
        assert got.token_ids == steps.argmax(-1).tolist()
    cached = results[0]["one_token"].kv_cache_tokens_per_rank
    assert cached == [2, 2, 1, 1]  # 1 prompt token on rank 0; the 5 fed back fill ranks 1-3 first


@pytest.mark.parametrize("prefill_chunk", [4096, 4])
def test_one_rank_in_process_equals_the_definition(prefill_chunk):
    """cp = 1 without torch.distributed: rounds of 4 tokens merge ring and cached attention."""
    model = random_model(RAW_CONFIG, seed=1)
    prompt = _raw_prompt(19, (5, 9))
    got = generate_sharded(
        model,
        **prompt,
        state=ParallelState.single(),
        params=SamplingParams(max_new_tokens=6),
        stop_ids=(),
        pad_id=0,
        return_scores=True,
        prefill_chunk=prefill_chunk,
    )
    assert got.prefill_rounds == (1 if prefill_chunk > 19 else 5)
    full = _full_forward_logits(model, prompt, got.token_ids)
    torch.testing.assert_close(got.scores, full[18 : 18 + 6])
    assert got.kv_cache_tokens_per_rank == [19 + 5] and got.tiles_encoded_per_rank == [2]


# -- the layout, without processes -------------------------------------------------------------


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("num_tokens", [1, 2, 5, 7, 16, 33, 100])
@pytest.mark.parametrize("prefill_chunk", [1, 6, 4096])
def test_layout_covers_the_prompt_once_with_real_tokens_first(cp, num_tokens, prefill_chunk):
    layout = PromptLayout.build(num_tokens, cp, prefill_chunk)
    assert 2 * layout.chunk_len <= max(2, prefill_chunk)
    ids = torch.arange(num_tokens)
    seen, last = [], None
    for rank in range(cp):
        for round_idx in range(layout.num_rounds):
            shard = shard_round(ids, None, layout, rank=rank, round_idx=round_idx, pad_id=-1)
            real = shard.position_ids < num_tokens  # [2c]
            count = layout.real_tokens(rank, round_idx)
            assert shard.num_real == count
            assert real[:count].all() and not real[count:].any()  # the real tokens come first
            assert (shard.input_ids[:count] == shard.position_ids[:count]).all()
            assert (shard.input_ids[count:] == -1).all()  # then padding
            seen += shard.position_ids[:count].tolist()
            if num_tokens - 1 in shard.position_ids.tolist():
                assert round_idx == layout.num_rounds - 1
                last = (rank, shard.position_ids.tolist().index(num_tokens - 1))
    assert sorted(seen) == list(range(num_tokens))  # every token once
    assert last == layout.last_token()
    owners = layout.decode_owners(50)
    totals = [layout.kv_capacity(rank, owners) for rank in range(cp)]
    assert sum(totals) == num_tokens + 50
    assert max(totals) - min(totals) <= 1  # the ranks short of tokens (padding) are filled first


# -- a rank lost while decoding ----------------------------------------------------------------

GROUP_TIMEOUT_S = 5


def _dies_while_decoding(rank: int, world_size: int) -> None:
    state = ParallelState.from_group(world_size, timeout_s=GROUP_TIMEOUT_S)
    model = random_model(RAW_CONFIG, seed=1)
    if rank == 1:
        calls = {"mlp": 0}
        mlp = model.model.layers[0].mlp
        forward = mlp.forward

        def exit_on_third_forward(x):
            calls["mlp"] += 1
            if calls["mlp"] == 3:  # prefill, decode step 0, then die in decode step 1
                os._exit(0)  # abrupt, exit code 0: only rank 0's error reaches the harness
            return forward(x)

        mlp.forward = exit_on_third_forward
    generate_sharded(
        model,
        **_raw_prompt(9, (2,)),
        state=state,
        params=SamplingParams(max_new_tokens=6),
        stop_ids=(),
        pad_id=0,
    )


@pytest.mark.distributed
def test_a_rank_lost_while_decoding_fails_the_others_within_the_timeout(ranks):
    start = time.monotonic()
    with pytest.raises(RankFailed, match="rank 0 failed") as failure:
        ranks(_dies_while_decoding, 2, timeout_s=120, group_timeout_s=GROUP_TIMEOUT_S)
    message = str(failure.value)
    assert "context-parallel generation" in message and "decode step 1" in message, message
    assert time.monotonic() - start < 40


class _UndecodableTiles(TileSource):
    """A medium whose frames fail to decode where this rank reads them."""

    def get(self, tile_ids):
        raise MediaError("frame 7 of clip.mp4 cannot be decoded")


def _media_fails_on_rank_1(rank: int, world_size: int) -> tuple[str, str, float]:
    state = ParallelState.from_group(world_size, timeout_s=60)
    model = random_model(RAW_CONFIG, seed=1)
    prompt = _raw_prompt(9, (2,))  # the tile's slots 2-5 fall on both ranks
    source = _UndecodableTiles if rank == 1 else TileSource
    prompt["tiles"] = source.from_tensor(prompt["tiles"])
    start = time.monotonic()
    try:
        generate_sharded(
            model,
            **prompt,
            state=state,
            params=SamplingParams(max_new_tokens=4),
            stop_ids=(),
            pad_id=0,
        )
    except MediaError as err:
        return type(err).__name__, str(err), time.monotonic() - start
    return "no error", "", time.monotonic() - start


@pytest.mark.distributed
def test_media_that_fails_on_one_rank_fails_every_rank_at_once(ranks):
    """Each rank decodes only its share of the media. The others must not go on to the round's
    attention without the failed rank (a server's rank then waits for its next request: the
    group hangs until its timeout), but raise its error too."""
    (name_0, message_0, seconds_0), (name_1, message_1, _) = ranks(
        _media_fails_on_rank_1, 2, timeout_s=120
    )
    assert name_1 == "MediaError" and message_1 == "frame 7 of clip.mp4 cannot be decoded"
    assert name_0 == "MediaError" and message_0 == f"{message_1} (cp rank 1/2)"
    assert seconds_0 < 30
