"""The public contract end to end on a tiny random checkpoint."""

from __future__ import annotations

import pytest
import torch

import longvita
from longvita.errors import MediaError, PromptError
from longvita.infer.plan import plan_memory


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return longvita.load(tiny_checkpoint, device="cpu", dtype="float32")


def _full_forward_logits(pipe, prompt, new_tokens):
    """Logits at every position of prompt + new tokens, one uncached forward."""
    ids = torch.cat([prompt.input_ids, torch.tensor(new_tokens, dtype=torch.int64)])
    mask = torch.cat([prompt.visual_mask, torch.zeros(len(new_tokens), dtype=torch.bool)])
    with torch.inference_mode():
        return pipe.model(
            ids[None],
            pixel_values=prompt.pixel_values,
            visual_mask=mask[None],
            logit_positions=torch.arange(ids.numel()),
        )[0]  # [seq, vocab]


@pytest.mark.parametrize("case", ["text", "image", "video", "image+video"])
def test_cached_decoding_equals_full_forward_at_every_step(pipe, media, case):
    prompts = {
        "text": ("Describe a quiet morning.", [], []),
        "image": ("<image>\nWhat is in this image?", [media["wide"]], []),
        "video": ("<video>\nWhat happens?", [], [media["video"]]),
        "image+video": ("<video> then <image>?", [media["image"]], [media["video"]]),
    }
    text, images, videos = prompts[case]
    out = pipe.generate(text, images=images, videos=videos, max_new_tokens=12, return_scores=True)
    assert out.scores.shape == (len(out.token_ids), pipe.config.vocab_size)
    assert out.scores.dtype == torch.float32
    prompt = pipe.process(text, images, videos)
    assert out.prompt_tokens == prompt.num_tokens
    full = _full_forward_logits(pipe, prompt, out.token_ids)
    steps = full[prompt.num_tokens - 1 : prompt.num_tokens - 1 + len(out.token_ids)]
    torch.testing.assert_close(out.scores, steps)
    assert out.token_ids == steps.argmax(-1).tolist()


def test_contract_fields_and_plain_string(pipe, media):
    out = pipe.generate(
        [{"role": "user", "content": "<image>\nWhat?"}], images=[media["image"]], max_new_tokens=5
    )
    assert isinstance(out.token_ids, list) and all(isinstance(t, int) for t in out.token_ids)
    assert isinstance(out.text, str) and out.scores is None
    assert out.text == pipe.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    again = pipe.generate("<image>\nWhat?", images=[media["image"]], max_new_tokens=5)
    assert again.token_ids == out.token_ids


def test_sampling_is_reproducible_with_a_seed(pipe):
    a = pipe.generate("Tell me a story.", max_new_tokens=10, temperature=1.0, top_k=50, seed=7)
    b = pipe.generate("Tell me a story.", max_new_tokens=10, temperature=1.0, top_k=50, seed=7)
    assert a.token_ids == b.token_ids


def test_stops_at_stop_token_without_including_it(pipe, monkeypatch):
    stop = pipe.processor.tokens.im_end
    original = pipe.model.lm_head.forward
    calls = {"n": 0}

    def lm_head(x):  # make <|im_end|> win from the third step on
        calls["n"] += 1
        logits = original(x)
        if calls["n"] >= 3:
            logits[..., stop] = 1e4
        return logits

    monkeypatch.setattr(pipe.model.lm_head, "forward", lm_head)
    out = pipe.generate("hello", max_new_tokens=10, return_scores=True)
    assert len(out.token_ids) == 2 and stop not in out.token_ids
    assert out.stop_reason == "stop_token" and out.scores.shape[0] == 2


def test_prompt_longer_than_positions_is_refused(pipe, media, monkeypatch):
    monkeypatch.setattr(pipe.config, "max_position_embeddings", 50)
    with pytest.raises(PromptError, match=r"\d+ tokens but the model accepts at most 50"):
        pipe.generate("<image>\nWhat is this?", images=[media["wide"]])


def _forbid_work(pipe, monkeypatch):
    """Make decoding any media or running the model fail the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("media decoded or model run before the prompt was refused")

    monkeypatch.setattr("longvita.processing.tiles.load_image", forbidden)
    monkeypatch.setattr("longvita.processing.tiles.iter_video_frames", forbidden)
    monkeypatch.setattr(pipe.model, "forward", forbidden)


def test_refusal_for_positions_comes_before_any_work(pipe, media, monkeypatch):
    monkeypatch.setattr(pipe.config, "max_position_embeddings", 60)
    _forbid_work(pipe, monkeypatch)
    with pytest.raises(PromptError, match=r"\d+ tokens but the model accepts at most 60"):
        pipe.generate("<video>\n<image>", images=[media["wide"]], videos=[media["video"]])


def test_prompt_over_free_memory_is_refused_before_any_work(pipe, media, monkeypatch):
    prompt = pipe.process("<video>\n<image>", [media["wide"]], [media["video"]])
    plan = plan_memory(
        pipe.config,
        num_prompt_tokens=prompt.num_tokens,
        max_new_tokens=8,
        dtype=torch.float32,
        prefill_chunk=16,
        vision_batch=2,
        device_type="cpu",
    )
    free = plan.kv_cache_bytes  # the cache fits, not the cache and the prefill together
    monkeypatch.setattr("longvita.infer.pipeline.free_memory_bytes", lambda device: free)
    _forbid_work(pipe, monkeypatch)
    with pytest.raises(PromptError) as info:
        pipe.generate(
            "<video>\n<image>",
            images=[media["wide"]],
            videos=[media["video"]],
            max_new_tokens=8,
            prefill_chunk=16,
            vision_batch=2,
        )
    message = str(info.value)
    needed = plan.kv_cache_bytes + plan.activation_bytes
    for part in [
        f"the prompt has {prompt.num_tokens} tokens (+8 new)",
        f"KV cache needs {plan.kv_cache_bytes} bytes",
        f"prefill {plan.activation_bytes} bytes",
        f"{needed} bytes",
        f"but cpu has {free} bytes",
        "fewer frames",
        "smaller prefill_chunk (e.g. 4)",
        "--cp",
    ]:
        assert part in message


@pytest.mark.parametrize("kind", ["missing_image", "bad_video", "count"])
def test_bad_media_raise_value_errors_naming_the_problem(pipe, media, tmp_path, kind):
    if kind == "missing_image":
        with pytest.raises(MediaError, match="nope.png"):
            pipe.generate("<image>", images=[tmp_path / "nope.png"])
    elif kind == "bad_video":
        bad = tmp_path / "bad.mp4"
        bad.write_bytes(b"not a video at all")
        with pytest.raises(MediaError, match="bad.mp4"):
            pipe.generate("<video>", videos=[bad])
    else:
        with pytest.raises(ValueError, match="1 <image> tag.* 2 image"):
            pipe.generate("<image>", images=[media["image"], media["image"]])


def test_visual_feature_count_mismatch_names_both_counts(pipe):
    ids = torch.tensor([[1, 2, 3]])
    mask = torch.tensor([[False, True, True]])
    pixels = torch.zeros(1, 3, 56, 56)
    with pytest.raises(ValueError, match="2 visual placeholder tokens .* give 4 features"):
        pipe.model(ids, pixel_values=pixels, visual_mask=mask)
