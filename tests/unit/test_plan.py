"""`infer.plan` and `longvita plan`: the memory estimator against what the code allocates."""

from __future__ import annotations

import argparse
import heapq
import json
import os

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import longvita
from longvita.config import LongVITAConfig, VisionConfig, long_vita_14b, tiny
from longvita.errors import CheckpointError, PromptError
from longvita.infer import plan as plan_module
from longvita.infer.engine import allocate_cache, feature_stream, prefill
from longvita.infer.plan import (
    check_prompt_memory,
    count_parameters,
    count_prompt_tokens,
    free_memory_bytes,
    kv_tokens_per_device,
    plan_memory,
)
from longvita.infer.plan_cli import add_parser
from longvita.model.long_vita import LongVITAForCausalLM
from longvita.processing.image import candidate_grids
from longvita.processing.processor import (
    image_token_count,
    image_tokens,
    video_token_count,
    video_tokens,
)
from longvita.processing.tiles import TileSource
from longvita.processing.tokens import load_tokenizer, special_token_ids
from longvita.testing import random_model, write_tiny_tokenizer

ESTIMATE_FACTOR = 2.5
"""The activation estimate is an upper bound of the measured peak, and at most this factor
above it (measured ratios 1.4-2.4 on CPU, fp32 and bf16; the highest, 2.4, where the ViT
batch dominates)."""


@pytest.mark.parametrize(
    "config",
    [tiny(), long_vita_14b(), LongVITAConfig(**{**vars(tiny()), "tie_word_embeddings": True})],
    ids=["tiny", "14b", "tied"],
)
def test_parameter_count_is_exact(config):
    with torch.device("meta"):
        model = LongVITAForCausalLM(config)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())


def test_official_model_numbers():
    config = long_vita_14b()
    tokens = count_prompt_tokens(config, frames=4096, text_tokens=0)
    assert tokens == 1_056_768  # LONGVITA.md: 4,096 frames is 1,056,768 tokens
    plan = plan_memory(
        config,
        num_prompt_tokens=tokens,
        max_new_tokens=64,
        prefill_chunk=4096,
        vision_batch=16,
    )
    assert plan.weight_bytes == 2 * 15_083_491_328  # about 15.1B parameters in bf16
    assert plan.kv_cache_bytes == 2 * 48 * 8 * 128 * 2 * (tokens + 64)  # 196,608 bytes a token
    assert 1 < plan.activation_bytes / 2**30 < 4  # a 4096-token chunk, 16 tiles
    sharded = plan_memory(
        config,
        num_prompt_tokens=tokens,
        max_new_tokens=64,
        cp=8,
        prefill_chunk=4096,
        vision_batch=16,
    )
    assert sharded.weight_bytes == plan.weight_bytes
    assert sharded.kv_cache_bytes * 8 == pytest.approx(plan.kv_cache_bytes, rel=1e-2)


def test_token_counts_match_tag_expansion(tmp_path):
    tokens = special_token_ids(load_tokenizer(write_tiny_tokenizer(tmp_path)))
    for grid in candidate_grids(12):
        expected = len(image_tokens(grid, tokens=tokens, tokens_per_tile=256))
        assert image_token_count(grid, tokens_per_tile=256) == expected
    assert video_token_count(7, tokens_per_tile=256) == len(
        video_tokens(7, tokens=tokens, tokens_per_tile=256)
    )
    config = long_vita_14b()
    assert count_prompt_tokens(config, images=2, text_tokens=10) == 2 * 3366 + 10
    with pytest.raises(ValueError, match="frames=-1"):
        count_prompt_tokens(config, frames=-1)


def _rounds_then_fewest(prompt: int, new: int, cp: int, prefill_chunk: int) -> int:
    """Independent simulation of the context-parallel layout: rounds of 2cp zigzag chunks of c
    tokens (each rank at most prefill_chunk tokens a round), each new token to the rank holding
    the fewest; the largest shard."""
    chunk = max(1, min(prefill_chunk // 2, -(-prompt // (2 * cp))))
    owner_of_chunk = [min(k, 2 * cp - 1 - k) for k in range(2 * cp)]
    loads = [0] * cp
    for position in range(prompt):
        loads[owner_of_chunk[position // chunk % (2 * cp)]] += 1
    heap = [(load, rank) for rank, load in enumerate(loads)]
    heapq.heapify(heap)
    for _ in range(new):
        load, rank = heapq.heappop(heap)
        heapq.heappush(heap, (load + 1, rank))
    return max(load for load, _ in heap)


@pytest.mark.parametrize("cp", [1, 2, 3, 8])
@pytest.mark.parametrize(("prompt", "new"), [(1, 1), (5, 64), (100, 3), (1001, 17)])
@pytest.mark.parametrize("prefill_chunk", [1, 16, 4096])
def test_kv_tokens_per_device(cp, prompt, new, prefill_chunk):
    expected = _rounds_then_fewest(prompt, new, cp, prefill_chunk)
    assert kv_tokens_per_device(prompt, new, cp, prefill_chunk) == expected
    assert expected * cp >= prompt + new


@pytest.mark.parametrize(
    ("dtype", "kv_cache_dtype"),
    [(torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.int8)],
)
@pytest.mark.parametrize(("prompt", "new"), [(1, 1), (300, 64), (4097, 8)])
def test_kv_cache_bytes_are_what_the_engine_allocates(dtype, kv_cache_dtype, prompt, new):
    config = tiny()
    model = random_model(config).to(dtype)
    cache = allocate_cache(model, prompt + new, kv_cache_dtype)
    plan = plan_memory(
        config,
        num_prompt_tokens=prompt,
        max_new_tokens=new,
        dtype=dtype,
        kv_cache_dtype=kv_cache_dtype,
        prefill_chunk=64,
        vision_batch=4,
    )
    assert plan.kv_cache_bytes == cache.num_bytes
    assert cache.keys.dtype == (dtype if kv_cache_dtype is None else kv_cache_dtype)


def test_pipeline_reports_the_planned_cache(tiny_checkpoint, media):
    pipe = longvita.load(tiny_checkpoint)
    out = pipe.generate("<image>\nWhat?", images=[media["image"]], max_new_tokens=5)
    plan = plan_memory(
        pipe.config,
        num_prompt_tokens=out.prompt_tokens,
        max_new_tokens=5,
        dtype=torch.float32,
        prefill_chunk=64,
        vision_batch=4,
    )
    assert out.kv_cache_bytes == plan.kv_cache_bytes


def _peak_allocated_bytes(fn, trace_path) -> int:
    """Peak of the bytes the CPU allocator holds while fn runs, above what it held before.

    The profiler's memory events carry the allocator's running total ("Total Allocated").
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    prof.export_chrome_trace(str(trace_path))
    events = json.loads(trace_path.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    assert memory, "the profiler recorded no allocation"
    base = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in memory) - base


MEASURE_CONFIG = LongVITAConfig(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=65536,
    torch_dtype="float32",
    vision=VisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
    ),
)


@pytest.mark.parametrize(
    ("text", "frames", "prefill_chunk", "vision_batch", "dtype", "kv_cache_dtype"),
    [
        (1024, 0, 512, 8, torch.float32, None),  # text: the decoder layers dominate
        (64, 200, 512, 64, torch.float32, None),  # video: the ViT batch dominates
        (1000, 40, 128, 4, torch.float32, None),
        (1024, 40, 256, 8, torch.bfloat16, None),
        (6000, 0, 512, 8, torch.float32, torch.int8),  # int8: dequantized key blocks
    ],
)
def test_activation_estimate_bounds_a_measured_chunked_prefill(
    text, frames, prefill_chunk, vision_batch, dtype, kv_cache_dtype, tmp_path
):
    config = MEASURE_CONFIG
    model = random_model(config).to(dtype)
    tokens_per_tile = config.vision.tokens_per_tile
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 2000, (text + frames * (tokens_per_tile + 2),), generator=gen)
    visual_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for frame in range(frames):
        start = text // 2 + frame * (tokens_per_tile + 2) + 1
        visual_mask[start : start + tokens_per_tile] = True
    tiles = TileSource.from_tensor(torch.randn(frames, 3, 56, 56, generator=gen))
    cache = allocate_cache(model, input_ids.numel() + 1, kv_cache_dtype)

    def run():
        with torch.inference_mode():
            stream = feature_stream(model, tiles, visual_mask, vision_batch=vision_batch)
            prefill(
                model,
                input_ids,
                cache,
                stream=stream,
                visual_mask=visual_mask,
                prefill_chunk=prefill_chunk,
            )

    measured = _peak_allocated_bytes(run, tmp_path / "trace.json")
    plan = plan_memory(
        config,
        num_prompt_tokens=input_ids.numel(),
        max_new_tokens=1,
        dtype=dtype,
        kv_cache_dtype=kv_cache_dtype,
        prefill_chunk=prefill_chunk,
        vision_batch=vision_batch,
        has_tiles=frames > 0,
        device_type="cpu",
    )
    assert measured <= plan.activation_bytes <= ESTIMATE_FACTOR * measured, (measured, plan)


OFFICIAL_4096_FRAMES = dict(  # the official model, 4,096 frames, bf16 on a GPU
    num_prompt_tokens=1_056_832,
    dtype=torch.bfloat16,
    device=torch.device("cuda", 0),
    prefill_chunk=4096,
    vision_batch=16,
    has_tiles=True,
)


def _free_memory(monkeypatch, *, device: int | None, host: int | None = 2**40) -> None:
    """Pretend the device and the host have this much free memory (None: unknown)."""
    monkeypatch.setattr(
        plan_module,
        "free_memory_bytes",
        lambda where: host if torch.device(where).type == "cpu" else device,
    )


def test_a_prompt_that_fits_passes_and_unknown_memory_is_not_checked(monkeypatch):
    config = long_vita_14b()
    plan = plan_memory(config, max_new_tokens=64, **_plan_args(OFFICIAL_4096_FRAMES))
    _free_memory(monkeypatch, device=plan.kv_cache_bytes + plan.activation_bytes)
    check_prompt_memory(config, max_new_tokens=64, **OFFICIAL_4096_FRAMES)
    _free_memory(monkeypatch, device=None)
    check_prompt_memory(config, max_new_tokens=64, **OFFICIAL_4096_FRAMES)


def _plan_args(check_args: dict) -> dict:
    args = {k: v for k, v in check_args.items() if k not in ("device",)}
    return {**args, "device_type": check_args["device"].type}


def test_a_refusal_gives_the_numbers_and_what_to_change(monkeypatch):
    _free_memory(monkeypatch, device=80 * 2**30)
    with pytest.raises(PromptError) as info:
        check_prompt_memory(long_vita_14b(), max_new_tokens=64, **OFFICIAL_4096_FRAMES)
    message = str(info.value)
    assert "1,056,832 tokens (+64 new)" in message and "KV cache needs 193.5" in message
    assert "but cuda:0 has 80.00 GiB free" in message
    assert "fewer frames" in message and "prefill_chunk (e.g. 1024)" in message
    assert "--cp N" in message


def test_a_refusal_caused_by_max_new_tokens_names_it(monkeypatch):
    config = long_vita_14b()
    args = {**OFFICIAL_4096_FRAMES, "num_prompt_tokens": 1000}
    plan = plan_memory(config, max_new_tokens=1000, **_plan_args(args))
    _free_memory(monkeypatch, device=plan.kv_cache_bytes + plan.activation_bytes)
    check_prompt_memory(config, max_new_tokens=1000, **args)  # exactly fits
    with pytest.raises(PromptError, match="max_new_tokens=500,000 is what does not fit") as info:
        check_prompt_memory(config, max_new_tokens=500_000, **args)
    assert "does not fit: 1,000 new tokens would" in str(info.value)  # exact at cp 1


def test_media_decoding_counts_against_the_host(monkeypatch):
    config = long_vita_14b()
    args = {**OFFICIAL_4096_FRAMES, "num_prompt_tokens": 1000}
    _free_memory(monkeypatch, device=2**40, host=2**30)
    check_prompt_memory(config, max_new_tokens=8, media_bytes=2**29, **args)
    with pytest.raises(PromptError, match="decoding the prompt's media needs about 2.00 GiB"):
        check_prompt_memory(config, max_new_tokens=8, media_bytes=2**31, **args)
    cpu = {**args, "device": torch.device("cpu"), "dtype": torch.float32}
    plan = plan_memory(config, max_new_tokens=8, **_plan_args(cpu))
    needed = plan.kv_cache_bytes + plan.activation_bytes
    _free_memory(monkeypatch, device=None, host=needed + 2**20)
    check_prompt_memory(config, max_new_tokens=8, media_bytes=2**20, **cpu)  # on the CPU: added
    with pytest.raises(PromptError, match="decoding its media 2.00 MiB"):
        check_prompt_memory(config, max_new_tokens=8, media_bytes=2**21, **cpu)


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="needs Linux /proc/meminfo")
def test_free_memory_on_cpu():
    assert free_memory_bytes("cpu") > 2**20


@pytest.mark.parametrize(
    ("field", "value"), [("num_prompt_tokens", 0), ("cp", 0), ("prefill_chunk", 0)]
)
def test_plan_rejects_bad_settings(field, value):
    kwargs = dict(num_prompt_tokens=10, max_new_tokens=1, cp=1, prefill_chunk=8, vision_batch=2)
    with pytest.raises(ValueError, match=field):
        plan_memory(tiny(), **{**kwargs, field: value})


def _plan_cli(argv, capsys, *, status: int = 0) -> str:
    parser = argparse.ArgumentParser(prog="longvita")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *argv])
    assert args.func(args) == status
    return capsys.readouterr().out


def test_plan_cli_prints_memory_per_device(tiny_checkpoint, capsys):
    base = ["--model", str(tiny_checkpoint), "--frames", "100", "--dtype", "bf16"]
    record = json.loads(_plan_cli([*base, "--cp", "2", "--json"], capsys))
    config = LongVITAConfig.from_pretrained(tiny_checkpoint)
    tokens = 100 * (config.vision.tokens_per_tile + 2) + 64
    expected = plan_memory(
        config,
        num_prompt_tokens=tokens,
        max_new_tokens=64,
        cp=2,
        prefill_chunk=4096,
        vision_batch=16,
    )
    assert record == {
        **expected.to_dict(),
        "max_position_embeddings": config.max_position_embeddings,
        "fits": True,
    }
    text = _plan_cli(base, capsys)
    assert f"{tokens:,} prompt tokens + 64 new, cp=1, bfloat16" in text
    for row in ("weights", "KV cache", "activations", "total"):
        assert row in text
    too_long = ["--model", str(tiny_checkpoint), "--frames", "6000"]
    text = _plan_cli(too_long, capsys, status=1)  # refused: a non-zero exit
    assert "refused: the 36,064-token prompt does not fit the model's 32,768 positions" in text
    assert json.loads(_plan_cli([*too_long, "--json"], capsys, status=1))["fits"] is False
    trimmed = ["--model", str(tiny_checkpoint), "--prompt-tokens", "32760"]
    assert "only 8 new tokens fit" in _plan_cli(trimmed, capsys)  # generate trims, not refuses


def test_plan_cli_needs_a_config(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="config.json"):
        _plan_cli(["--model", str(tmp_path)], capsys)
