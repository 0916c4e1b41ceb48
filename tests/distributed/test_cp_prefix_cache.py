"""The prefix cache under context parallelism on gloo ranks: each rank keeps and reloads its own
shard (in memory, and through its own file across runs), and the questions that reuse a prefix
get the single-process cold run's tokens and logits; a cache written at another cp size is not
used."""

from __future__ import annotations

import logging

import pytest
import torch

import longvita
from longvita.infer.cp_engine import ShardedRunner
from longvita.infer.decode import run_to_end
from longvita.infer.prefix_cache import PrefixCache, PromptPrefix
from longvita.infer.prefix_disk import DiskPrefixStore
from longvita.infer.prefix_key import PromptKey
from longvita.infer.request import SamplingParams
from longvita.model.checkpoint import load_model
from longvita.parallel.state import ParallelState

MAX_NEW_TOKENS = 6
MODEL_IDENTITY = "tiny-checkpoint"


def _prefix_cache(model, directory: str, memory_bytes: int) -> PrefixCache:
    config = model.config
    disk = DiskPrefixStore(
        directory,
        model_identity=MODEL_IDENTITY,
        dtype=torch.float32,
        kv_shape=(config.num_hidden_layers, config.num_key_value_heads, config.head_dim),
    )
    tokens_per_tile = config.vision.tokens_per_tile
    return PrefixCache(max_bytes=memory_bytes, tokens_per_tile=tokens_per_tile, disk=disk)


def _ask(model, state, prompt: dict, cache: PrefixCache, prefill_chunk: int):
    runner = ShardedRunner(
        model,
        prompt["input_ids"],
        state=state,
        params=SamplingParams(max_new_tokens=MAX_NEW_TOKENS),
        pad_id=prompt["pad_id"],
        tiles=prompt["pixel_values"],
        visual_mask=prompt["visual_mask"],
        prefill_chunk=prefill_chunk,
        vision_batch=2,
        prefix=PromptPrefix(cache, PromptKey(*prompt["key"])),
    )
    keep_scores = state.cp_rank == 0
    vocab = model.config.vocab_size
    stop_ids = prompt["stop_ids"]
    return run_to_end(runner, runner.params, stop_ids, return_scores=keep_scores, vocab_size=vocab)


def _questions(rank, world_size, checkpoint, prompts, directory, prefill_chunk) -> dict:
    """Run 1: the first and second questions, one Pipeline's memory; run 2 (new caches, the
    same directory): the next turn, from disk."""
    state = ParallelState.from_group(world_size, timeout_s=60)
    model = load_model(checkpoint).eval()
    first_run = _prefix_cache(model, directory, memory_bytes=2**30)
    results = {name: _ask(model, state, prompts[name], first_run, prefill_chunk) for name in
               ("first", "second")}  # fmt: skip
    second_run = _prefix_cache(model, directory, memory_bytes=0)
    results["next_turn"] = _ask(model, state, prompts["next_turn"], second_run, prefill_chunk)
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("prefill_chunk", [4096, 6])
def test_cp2_reuses_each_ranks_shard_and_answers_as_one_cold_process(
    ranks, tiny_checkpoint, media, tmp_path, caplog, prefill_chunk
):
    """prefill_chunk 6: rounds of 3 tokens per chunk, cut inside the shared prefix."""
    cold = longvita.load(tiny_checkpoint, prefix_cache_bytes=0)
    video = [media["video"]]
    first_answer = cold.generate("<video>\nWhat happens?", videos=video, max_new_tokens=4).text
    questions = {
        "first": "<video>\nWhat happens?",
        "second": "<video>\nWhat moves?",
        "next_turn": [
            {"role": "user", "content": "<video>\nWhat happens?"},
            {"role": "assistant", "content": first_answer},
            {"role": "user", "content": "And then?"},
        ],
    }
    prompts, references = {}, {}
    for name, messages in questions.items():
        processed = cold.process(messages, [], video)
        key = PromptKey.of_prompt(
            processed.input_ids,
            processed.visual_mask,
            processed.tiles,
            tokens_per_tile=cold.config.vision.tokens_per_tile,
        )
        prompts[name] = {
            "input_ids": processed.input_ids,
            "visual_mask": processed.visual_mask,
            "pixel_values": processed.pixel_values,
            "pad_id": cold.processor.tokens.pad,
            "stop_ids": cold.processor.tokens.stop,
            "key": (key.token_ids, key.media_ids),
        }
        references[name] = cold.generate_tokens(
            processed.input_ids,
            processed.visual_mask,
            processed.pixel_values,
            SamplingParams(max_new_tokens=MAX_NEW_TOKENS),
            return_scores=True,
        )
    directory = tmp_path / "prefix"
    args = (str(tiny_checkpoint), prompts, str(directory), prefill_chunk)
    results = ranks(_questions, 2, args=args, timeout_s=180)
    for name, reference in references.items():
        got = results[0][name]
        assert all(per_rank[name].token_ids == reference.token_ids for per_rank in results), name
        torch.testing.assert_close(got.scores, reference.scores, msg=name)
        assert sum(got.kv_cache_tokens_per_rank) >= prompts[name]["input_ids"].numel()
    assert results[0]["first"].cached_tokens == 0
    second, next_turn = results[0]["second"], results[0]["next_turn"]
    first_slot = int(prompts["first"]["visual_mask"].nonzero()[0])
    assert second.cached_tokens > first_slot and second.tiles_encoded_per_rank == [0, 0]
    assert next_turn.cached_tokens >= prompts["first"]["input_ids"].numel() - 1
    assert next_turn.tiles_encoded_per_rank == [0, 0]
    names = sorted(path.name for path in directory.iterdir())
    assert {name.split(".", 1)[1] for name in names} == {"cp2-rank0.safetensors",
                                                         "cp2-rank1.safetensors"}  # fmt: skip

    # the same directory at cp 1: not used, and the user is told which --cp would use it
    single = _prefix_cache(cold.model, str(directory), memory_bytes=0)
    prompt = prompts["second"]
    prefix = PromptPrefix(single, PromptKey(*prompt["key"]))
    with caplog.at_level(logging.WARNING, logger="longvita.infer.prefix_disk"):
        assert prefix.matches(cp=1, cp_rank=0) == {}
    assert "--cp 2" in caplog.text and "this run uses --cp 1" in caplog.text
