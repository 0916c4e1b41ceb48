"""The KV cache's dtype (`kv_cache_dtype`) end to end on the tiny model (CPU, fp32 weights):
the int8 cache tracks the float32 cache's logits within a bound and gives its greedy tokens,
for text, image and video prompts, chunked or not; it is 3.2x smaller here (head_dim 16), the
memory check and `longvita plan` count it, and the prefix cache keeps and reuses it (memory and
disk)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import longvita
from longvita.cli import main
from longvita.errors import PromptError
from longvita.infer import plan as plan_module
from longvita.model import kv_cache as kv_cache_module
from longvita.model.kv_cache import KVCache, kv_bytes_per_token

MAX_NEW_TOKENS = 16
PROMPTS = {  # name: (text, image keys, video keys)
    "text": (" ".join(["The quick brown fox jumps over the lazy dog."] * 3), [], []),
    "image": ("<image>\nWhat is in this image?", ["wide"], []),
    "video": ("<video>\nWhat happens?", [], ["video"]),
}
MAX_RELATIVE_LOGIT_ERROR = {"int8": 1e-2, "bfloat16": 2e-2}
"""max |logits - float32 cache's| / max |float32 cache's logits| over every step (measured on
this model: int8 0.8-1.5e-3)."""


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint):
    """The same model with a float32, an int8 and a bfloat16 cache, prefix cache off."""
    return {
        name: longvita.load(tiny_checkpoint, kv_cache_dtype=name, prefix_cache_bytes=0)
        for name in ("auto", "int8", "bfloat16")
    }


def _generate(pipe, media, name, **options):
    text, image_keys, video_keys = PROMPTS[name]
    return pipe.generate(
        text,
        [media[k] for k in image_keys],
        [media[k] for k in video_keys],
        max_new_tokens=MAX_NEW_TOKENS,
        return_scores=True,
        **options,
    )


def relative_logit_error(got, reference) -> float:
    """Over the steps both took from the same context: up to the first token they differ on."""
    steps = min(len(got.token_ids), len(reference.token_ids))
    differ = [a != b for a, b in zip(got.token_ids, reference.token_ids, strict=False)]
    steps = differ.index(True) + 1 if any(differ) else steps
    difference = (got.scores[:steps] - reference.scores[:steps]).abs().max()
    return float(difference / reference.scores[:steps].abs().max())


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "bfloat16"])
@pytest.mark.parametrize("name", list(PROMPTS))
@pytest.mark.parametrize("prefill_chunk", [4096, 7])
def test_a_smaller_cache_tracks_the_float32_cache(
    pipes, media, kv_cache_dtype, name, prefill_chunk
):
    """prefill_chunk 7: every chunk after the first reads the cache (dequantized blocks).
    The bfloat16 cache flips a near tie of this random model on one prompt (its logits stay
    within the bound up to there); the int8 one gives the same tokens on all."""
    reference = _generate(pipes["auto"], media, name, prefill_chunk=prefill_chunk)
    got = _generate(pipes[kv_cache_dtype], media, name, prefill_chunk=prefill_chunk)
    if kv_cache_dtype == "int8":
        assert got.token_ids == reference.token_ids
    error = relative_logit_error(got, reference)
    assert 0 < error < MAX_RELATIVE_LOGIT_ERROR[kv_cache_dtype]


def test_the_cache_sizes_follow_the_dtype(pipes, media):
    config = pipes["auto"].config
    shape = {
        "num_layers": config.num_hidden_layers,
        "num_kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
    }
    sizes = {}
    for name, dtype in (
        ("auto", torch.float32),
        ("int8", torch.int8),
        ("bfloat16", torch.bfloat16),
    ):
        out = _generate(pipes[name], media, "image")
        capacity = out.prompt_tokens + MAX_NEW_TOKENS
        assert out.kv_cache_bytes_per_rank == [capacity * kv_bytes_per_token(**shape, dtype=dtype)]
        sizes[name] = out.kv_cache_bytes_per_rank[0]
    assert sizes["auto"] / sizes["int8"] == pytest.approx(4 * 16 / (16 + 4))  # head_dim 16
    assert pipes["int8"].kv_cache_dtype == torch.int8
    assert pipes["auto"].kv_cache_dtype == torch.float32


def test_a_decode_step_reads_int8_blocks_directly_as_the_kernel_reads_them_dequantized(
    monkeypatch,
):
    """The two ways an int8 cache is read (direct for a few query rows, dequantized blocks for
    the fused kernel) give the same attention, in blocks of any size."""
    shape = {"num_layers": 1, "batch_size": 1, "num_kv_heads": 2, "head_dim": 16}
    cache = KVCache(capacity=50, dtype=torch.int8, device="cpu", kv_block=7, **shape)
    cache.write(0, torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16))
    cache.advance(50)
    q = torch.randn(1, 4, 1, 16)

    def attend():
        out, lse = torch.zeros(q.shape), torch.full(q.shape[:-1], float("-inf"))
        cache.attend_cached_(q, 0, 50, out, lse)
        return out, lse

    direct = attend()
    monkeypatch.setattr(kv_cache_module, "INT8_DIRECT_ROWS", 0)
    dequantized = attend()
    torch.testing.assert_close(direct, dequantized, rtol=1e-5, atol=1e-5)


def test_the_memory_check_counts_the_cache_dtype(pipes, media, monkeypatch):
    """With room for the int8 cache but not the float32 one, float32 is refused and int8 runs."""
    prompt = pipes["auto"].process(*_texts_and_media(media, "video"))
    plans = {
        name: plan_module.plan_memory(
            pipes[name].config,
            num_prompt_tokens=prompt.num_tokens,
            max_new_tokens=MAX_NEW_TOKENS,
            dtype=torch.float32,
            kv_cache_dtype=pipes[name].kv_cache_dtype,
            prefill_chunk=4096,
            vision_batch=16,
            device_type="cpu",
        )
        for name in ("auto", "int8")
    }
    assert plans["int8"].kv_cache_dtype == "int8"
    assert plans["int8"].kv_cache_bytes < plans["auto"].kv_cache_bytes / 3
    media_bytes = prompt.tiles.decode_bytes(16)
    needed = {
        name: plan.kv_cache_bytes + plan.activation_bytes + media_bytes
        for name, plan in plans.items()
    }
    free = needed["int8"] + (needed["auto"] - needed["int8"]) // 2
    monkeypatch.setattr(plan_module, "free_memory_bytes", lambda device: free)
    with pytest.raises(PromptError, match="KV cache needs"):
        _generate(pipes["auto"], media, "video")
    assert len(_generate(pipes["int8"], media, "video").token_ids) > 0


def _texts_and_media(media, name):
    text, image_keys, video_keys = PROMPTS[name]
    return text, [media[k] for k in image_keys], [media[k] for k in video_keys]


@pytest.mark.parametrize("prefill_chunk", [4096, 5])
def test_the_prefix_cache_keeps_and_reuses_int8_keys_and_values(
    tiny_checkpoint, pipes, media, tmp_path, prefill_chunk
):
    text, images, videos = _texts_and_media(media, "video")
    options = {"max_new_tokens": 8, "return_scores": True, "prefill_chunk": prefill_chunk}
    cold = pipes["int8"].generate(text, images, videos, **options)
    directory = tmp_path / "prefix"
    first = longvita.load(tiny_checkpoint, kv_cache_dtype="int8", prefix_cache_dir=directory)
    first.generate(text, images, videos, **options)
    again = first.generate(text, images, videos, **options)  # from memory
    other = longvita.load(
        tiny_checkpoint, kv_cache_dtype="int8", prefix_cache_bytes=0, prefix_cache_dir=directory
    )
    from_disk = other.generate(text, images, videos, **options)
    for got in (again, from_disk):
        assert got.cached_tokens == got.prompt_tokens - 1
        assert got.token_ids == cold.token_ids
        assert relative_logit_error(got, cold) < MAX_RELATIVE_LOGIT_ERROR["int8"]


def test_a_disk_cache_of_another_cache_dtype_is_not_used(tiny_checkpoint, media, tmp_path, caplog):
    text, images, videos = _texts_and_media(media, "image")
    directory = tmp_path / "prefix"
    longvita.load(tiny_checkpoint, prefix_cache_dir=directory).generate(text, images)
    int8 = longvita.load(
        tiny_checkpoint, kv_cache_dtype="int8", prefix_cache_bytes=0, prefix_cache_dir=directory
    )
    with caplog.at_level(logging.WARNING):
        out = int8.generate(text, images, videos, max_new_tokens=4)
    assert out.cached_tokens == 0
    assert "float32 keys/values, this KV cache stores int8" in caplog.text


def test_bad_cache_dtypes_are_refused_before_loading(tiny_checkpoint):
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8' is not supported; use one of"):
        longvita.load(tiny_checkpoint, kv_cache_dtype="fp8")


def test_cli_generate_and_plan_take_the_cache_dtype(tiny_checkpoint, capsys):
    args = ["--model", str(tiny_checkpoint), "--max-new-tokens", "4", "--json"]
    assert main(["generate", "--prompt", "Hello there", *args]) == 0
    float32 = json.loads(capsys.readouterr().out)
    assert main(["generate", "--prompt", "Hello there", "--kv-cache-dtype", "int8", *args]) == 0
    int8 = json.loads(capsys.readouterr().out)
    assert int8["kv_cache_bytes"] * 3.2 == pytest.approx(float32["kv_cache_bytes"])
    plan = ["plan", "--model", str(tiny_checkpoint), "--prompt-tokens", "1000", "--json"]
    assert main([*plan, "--kv-cache-dtype", "int8"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["kv_cache_dtype"] == "int8"
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "Hi", "--kv-cache-dtype", "fp4", *args])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fp4'" in capsys.readouterr().err
