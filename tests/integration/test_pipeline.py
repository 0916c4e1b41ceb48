"""The public contract end to end on a tiny random checkpoint."""

from __future__ import annotations

import logging

import pytest
import torch

import longvita
import longvita.infer.progress
import longvita.processing.tiles
from longvita.errors import MediaError, PositionsError, PromptError, ReservedTokenError
from longvita.infer.plan import format_bytes, plan_memory
from longvita.infer.request import GenerationRequest
from longvita.processing.tokens import RESERVED_TOKENS


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


def test_a_checkpoint_path_with_a_tilde_is_the_home_directory(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("HOME", str(tiny_checkpoint.parent))
    pipe = longvita.load(f"~/{tiny_checkpoint.name}")
    assert pipe.config == longvita.load(tiny_checkpoint).config


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
    calls["n"] = 0
    past = pipe.generate("hello", max_new_tokens=6, ignore_eos=True)  # vLLM's ignore_eos
    assert past.stop_reason == "length" and past.token_ids[2:] == [stop] * 4


def test_stream_pieces_are_the_answer_of_generate(pipe, media):
    kwargs = {"images": [media["image"]], "max_new_tokens": 12, "return_scores": True}
    whole = pipe.generate("<image>\nWhat?", **kwargs)
    stream = pipe.stream("<image>\nWhat?", **kwargs)
    pieces = list(stream)
    assert [p.token_id for p in pieces if p.token_id is not None] == whole.token_ids
    assert "".join(p.text for p in pieces) == whole.text == stream.output.text
    assert stream.output.token_ids == whole.token_ids and stream.output.prompt_tokens > 0
    assert torch.equal(stream.output.scores, whole.scores)


def test_stop_sequences_end_the_text_before_them(pipe):
    full = pipe.generate("Tell me a story.", max_new_tokens=16)
    text = full.text
    assert len(text) > 4, text
    stop = text[2:4]  # generated for sure, so the answer must end before its first occurrence
    out = pipe.generate("Tell me a story.", max_new_tokens=16, stop=[stop, "never generated"])
    assert out.stop_reason == "stop_sequence" and out.text == text[: text.index(stop)]
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    with pytest.raises(ValueError, match=r"stop\[0\]"):
        pipe.generate("hi", stop=[""])


def test_a_stream_left_early_releases_its_media(pipe, media, monkeypatch):
    closed = []
    original = longvita.processing.tiles.TileSource.close
    monkeypatch.setattr(
        longvita.processing.tiles.TileSource,
        "close",
        lambda self: (closed.append(True), original(self))[1],
    )
    stream = pipe.stream("<image>\nWhat?", images=[media["image"]], max_new_tokens=8)
    next(iter(stream))
    stream.close()
    assert closed


@pytest.mark.parametrize(
    "content, advice",
    [
        ("image", "use fewer or smaller images$"),
        ("video", "use fewer frames \\(max_frames\\)$"),
        ("both", "use fewer frames \\(max_frames\\) or fewer or smaller images$"),
        ("text", "use a shorter text$"),
    ],
)
def test_prompt_longer_than_positions_is_refused(pipe, media, monkeypatch, content, advice):
    monkeypatch.setattr(pipe.config, "max_position_embeddings", 50)
    images = [media["wide"]] if content in ("image", "both") else []
    videos = [media["video"]] if content in ("video", "both") else []
    text = "<image>\n" * len(images) + "<video>\n" * len(videos) + "What is this? " * 30
    refusal = r"\d+ tokens but the model accepts at most 50 positions \(prompt \+ new tokens\); "
    with pytest.raises(PromptError, match=refusal + advice):
        pipe.generate(text, images=images, videos=videos)


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
    monkeypatch.setattr("longvita.infer.plan.free_memory_bytes", lambda device: free)
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
    media_bytes = prompt.tiles.decode_bytes(2)  # on the CPU, decoding shares the same memory
    needed = plan.kv_cache_bytes + plan.activation_bytes + media_bytes
    for part in [
        f"decoding its media {format_bytes(media_bytes)}",
        f"the prompt has {prompt.num_tokens} tokens (+8 new)",
        f"KV cache needs {format_bytes(plan.kv_cache_bytes)}",
        f"prefill {format_bytes(plan.activation_bytes)}",
        f"{format_bytes(needed)} in all",
        f"but cpu has {format_bytes(free)} free",
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


@pytest.mark.parametrize(
    ("device", "dtype", "message"),
    [
        ("meta", None, "device 'meta' holds no data"),
        ("tpu9", None, "unknown device 'tpu9'"),
        ("cpu", "float64", "dtype 'float64' is not supported"),
        ("cpu", torch.int8, "dtype torch.int8 is not supported"),
        ("cpu", "fp8", "dtype 'fp8' is not supported"),
    ],
)
def test_load_refuses_what_it_cannot_run(tiny_checkpoint, monkeypatch, device, dtype, message):
    def forbidden(*args, **kwargs):
        raise AssertionError("weights read before the device and dtype were checked")

    monkeypatch.setattr("longvita.infer.pipeline.load_model", forbidden)
    with pytest.raises(ValueError, match=message):
        longvita.load(tiny_checkpoint, device=device, dtype=dtype)


@pytest.mark.skipif(torch.accelerator.is_available(), reason="checks a machine without one")
def test_load_refuses_an_accelerator_this_machine_lacks(tiny_checkpoint):
    with pytest.raises(ValueError, match="device 'cuda' is not available.*no accelerator"):
        longvita.load(tiny_checkpoint, device="cuda")


def _conversation(role: str, text: str) -> list[dict]:
    """`text` in a turn of `role`, in a conversation that ends with a user turn."""
    if role == "system":
        return [{"role": "system", "content": text}, {"role": "user", "content": "hi"}]
    if role == "assistant":
        return [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": text},
            {"role": "user", "content": "and?"},
        ]
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("token", RESERVED_TOKENS)
@pytest.mark.parametrize("role", ["system", "user", "assistant"])
def test_reserved_tokens_typed_in_text_are_refused_naming_them(pipe, token, role):
    with pytest.raises(ReservedTokenError, match=f"the text contains '{token}'"):
        pipe.generate(_conversation(role, f"look {token} here"), max_new_tokens=1)


def test_other_special_tokens_typed_in_text_are_parsed(pipe):
    """Documented: like transformers' chat templates, a typed `<|im_start|>` is the control
    token, and `<quad>`/`<ref>`/`<box>` are ordinary grounding tokens."""
    prompt = pipe.process("a <|im_start|> b <box> c")
    ids = prompt.input_ids.tolist()
    assert ids.count(pipe.processor.tokens.im_start) == 3  # user, assistant and the typed one
    assert pipe.tokenizer.convert_tokens_to_ids("<box>") in ids


def test_options_are_checked_before_any_work(pipe, monkeypatch):
    _forbid_work(pipe, monkeypatch)
    with pytest.raises(TypeError, match=r"unknown generation option\(s\) \['temprature'\]"):
        pipe.generate("hi", temprature=0.5)
    for bad, message in [
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"fps": float("inf")}, "fps must be a finite number"),
        ({"max_frames": 0}, "max_frames must be >= 1"),
        ({"vision_batch": 1.5}, "vision_batch must be an integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            pipe.generate("<video>", videos=["never-read.mp4"], **bad)


def test_media_decoders_are_closed_when_generation_fails(pipe, media, monkeypatch):
    closed = []
    original = longvita.processing.tiles.TileSource.close

    def close(self):
        closed.append(self)
        original(self)

    def broken_forward(*args, **kwargs):
        raise RuntimeError("the model broke")

    monkeypatch.setattr(longvita.processing.tiles.TileSource, "close", close)
    monkeypatch.setattr(pipe.model.model, "forward", broken_forward)
    with pytest.raises(RuntimeError, match="the model broke"):
        pipe.generate("<video>\nWhat?", videos=[media["video"]])
    assert closed, "the video decoder of a failed generation was left open"


def test_media_decoding_memory_is_part_of_the_check(pipe, tmp_path, monkeypatch):
    """A big photo costs far more host memory while decoded than its tiles: the pre-flight
    check counts it (`TileSource.decode_bytes`) and refuses before decoding."""
    from longvita.testing import make_image

    photo = make_image(tmp_path / "big.png", (4000, 3000))
    prompt = pipe.process("<image>\nWhat?", [photo])
    media = prompt.tiles.decode_bytes(16)
    plan = plan_memory(
        pipe.config,
        num_prompt_tokens=prompt.num_tokens,
        max_new_tokens=4,
        dtype=torch.float32,
        prefill_chunk=4096,
        vision_batch=16,
        device_type="cpu",
    )
    assert media > 4000 * 3000 * 3  # at least the decoded RGB image
    free = plan.kv_cache_bytes + plan.activation_bytes + media // 2  # fits, but not the media
    monkeypatch.setattr("longvita.infer.plan.free_memory_bytes", lambda device: free)
    _forbid_work(pipe, monkeypatch)
    with pytest.raises(PromptError, match="decoding its media"):
        pipe.generate("<image>\nWhat?", images=[photo], max_new_tokens=4)


def test_max_pixels_refuses_large_media_from_their_headers(tiny_checkpoint, media, monkeypatch):
    small = longvita.load(tiny_checkpoint, max_pixels=640 * 360 - 1)
    _forbid_work(small, monkeypatch)
    with pytest.raises(MediaError, match="max_pixels"):
        small.generate("<image>\nWhat?", images=[media["image"]])  # 640x360
    with pytest.raises(ValueError, match="max_pixels must be >= 1"):
        longvita.load(tiny_checkpoint, max_pixels=0)


def test_a_long_prefill_logs_its_progress(pipe, media, monkeypatch, caplog):
    monkeypatch.setattr(longvita.infer.progress, "PROGRESS_INTERVAL_S", 0.0)  # every chunk
    caplog.set_level(logging.INFO, logger="longvita")
    prompt = pipe.process("<video>\nWhat happens?", videos=[media["video"]])
    if pipe.prefix_cache is not None:
        pipe.prefix_cache.clear()  # an earlier test's video prompt would be a cached prefix
    pipe.generate("<video>\nWhat happens?", videos=[media["video"]], max_new_tokens=1,
                  prefill_chunk=16)  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prefill:")]
    chunks = -(-prompt.num_tokens // 16)
    assert len(lines) == chunks
    assert lines[0].startswith(f"prefill: 16 of {prompt.num_tokens:,} tokens (")
    assert lines[-1].startswith(f"prefill: {prompt.num_tokens:,} tokens in ")


def test_max_new_tokens_past_the_positions_is_trimmed_or_refused(pipe, caplog):
    limit = pipe.config.max_position_embeddings
    request = GenerationRequest.create("Tell me a story.", max_new_tokens=10**6)
    with caplog.at_level(logging.WARNING, logger="longvita"):
        with pytest.raises(PositionsError, match="max_new_tokens=1,000,000 does not fit") as info:
            pipe.prepare(request, trim=False)  # a server refusing its client's max_tokens
        assert not caplog.records  # no "trimmed" warning for what was refused
        prompt, sampling = pipe.prepare(request)
    assert (info.value.prompt_tokens, info.value.positions) == (prompt.num_tokens, limit)
    assert sampling.max_new_tokens == limit - prompt.num_tokens
    assert "trimmed to" in caplog.records[-1].getMessage()
