"""Prefix reuse end to end: a prompt that starts like an earlier one, in the same process or
through `--prefix-cache DIR`, gives the greedy tokens of a cold run (logits within fp32
tolerance: the chunk boundaries move) while prefilling only the rest and decoding no frame of
the shared video."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

import longvita
from longvita.cli import main
from longvita.testing import make_tiny_checkpoint, make_video

MAX_NEW_TOKENS = 8
QUESTIONS = {  # name: (first prompt, second prompt, image keys, video keys)
    "text": ("Describe a quiet morning in detail.", "Describe a quiet morning.", [], []),
    "image": ("<image>\nWhat is in this image?", "<image>\nWhat colour is it?", ["wide"], []),
    "video": ("<video>\nWhat happens?", "<video>\nWhat moves?", [], ["video"]),
    "image+video": ("<video> then <image>?", "<video> then <image>, why?", ["image"], ["video"]),
}


@pytest.fixture(scope="module")
def cold(tiny_checkpoint):
    return longvita.load(tiny_checkpoint, prefix_cache_bytes=0)


def generate(pipe, text, images=(), videos=(), **options):
    return pipe.generate(
        text, list(images), list(videos), max_new_tokens=MAX_NEW_TOKENS, return_scores=True,
        **options,
    )  # fmt: skip


def assert_same_answer(got, reference) -> None:
    assert got.token_ids == reference.token_ids
    torch.testing.assert_close(got.scores, reference.scores)


@pytest.mark.parametrize("case", list(QUESTIONS))
@pytest.mark.parametrize("prefill_chunk", [4096, 5])
def test_second_question_reuses_the_first_and_answers_as_cold(
    tiny_checkpoint, cold, media, case, prefill_chunk
):
    """prefill_chunk 5: the cold run's chunk boundaries fall inside the shared prefix."""
    first, second, image_keys, video_keys = QUESTIONS[case]
    images, videos = [media[k] for k in image_keys], [media[k] for k in video_keys]
    pipe = longvita.load(tiny_checkpoint)
    generate(pipe, first, images, videos, prefill_chunk=prefill_chunk)
    got = generate(pipe, second, images, videos, prefill_chunk=prefill_chunk)
    reference = generate(cold, second, images, videos, prefill_chunk=prefill_chunk)
    assert_same_answer(got, reference)
    assert reference.cached_tokens == 0 < got.cached_tokens < got.prompt_tokens
    shared = pipe.process(first, images, videos).input_ids
    ids = pipe.process(second, images, videos).input_ids
    expected = int((ids[: len(shared)] != shared[: len(ids)]).nonzero()[0])
    assert got.cached_tokens == expected  # the whole shared prefix, nothing more
    assert got.prefill_rounds == -(-(got.prompt_tokens - expected) // prefill_chunk)
    if video_keys and not image_keys:  # the question after the video: no frame decoded
        assert got.tiles_encoded_per_rank == [0]


def test_the_same_prompt_again_prefills_only_its_last_token(tiny_checkpoint, cold, media):
    pipe = longvita.load(tiny_checkpoint)
    generate(pipe, "<image>\nWhat?", [media["image"]])
    got = generate(pipe, "<image>\nWhat?", [media["image"]])
    assert got.cached_tokens == got.prompt_tokens - 1 and got.tiles_encoded_per_rank == [0]
    assert_same_answer(got, generate(cold, "<image>\nWhat?", [media["image"]]))


def test_multi_turn_reuses_the_previous_turn(tiny_checkpoint, cold, media):
    pipe = longvita.load(tiny_checkpoint)
    turn = [{"role": "user", "content": "<video>\nWhat happens?"}]
    answer = generate(pipe, turn, videos=[media["video"]])
    turn += [
        {"role": "assistant", "content": answer.text},
        {"role": "user", "content": "And then?"},
    ]
    got = generate(pipe, turn, videos=[media["video"]])
    assert got.cached_tokens >= answer.prompt_tokens - 1  # all of turn 1's prompt
    assert got.tiles_encoded_per_rank == [0]
    assert_same_answer(got, generate(cold, turn, videos=[media["video"]]))


def test_a_changed_file_at_the_same_path_is_a_miss(tiny_checkpoint, cold, tmp_path):
    video = make_video(tmp_path / "v.mp4", num_frames=12, fps=4)
    pipe = longvita.load(tiny_checkpoint)
    before = generate(pipe, "<video>\nWhat happens?", videos=[video])
    make_video(video, num_frames=12, fps=4, size=(64, 96))
    got = generate(pipe, "<video>\nWhat happens?", videos=[video])
    first_slot = int(pipe.process("<video>\nWhat happens?", [], [video]).visual_mask.nonzero()[0])
    assert (
        got.cached_tokens == first_slot
        and got.tiles_encoded_per_rank == before.tiles_encoded_per_rank
    )
    assert_same_answer(got, generate(cold, "<video>\nWhat happens?", videos=[video]))


def test_the_disk_cache_serves_another_pipeline_without_decoding(
    tiny_checkpoint, cold, media, tmp_path
):
    directory = tmp_path / "prefix"
    video = [media["video"]]
    writer = longvita.load(tiny_checkpoint, prefix_cache_bytes=0, prefix_cache_dir=directory)
    generate(writer, "<video>\nWhat happens?", videos=video)
    (written,) = os.listdir(directory)
    assert written.endswith(".cp1-rank0.safetensors")
    reader = longvita.load(tiny_checkpoint, prefix_cache_bytes=0, prefix_cache_dir=directory)
    got = generate(reader, "<video>\nWhat moves?", videos=video)
    assert got.cached_tokens > 0 and got.tiles_encoded_per_rank == [0]
    assert_same_answer(got, generate(cold, "<video>\nWhat moves?", videos=video))


def test_a_corrupt_cache_file_is_ignored_with_a_warning(
    tiny_checkpoint, cold, media, tmp_path, caplog
):
    directory = tmp_path / "prefix"
    video = [media["video"]]
    writer = longvita.load(tiny_checkpoint, prefix_cache_bytes=0, prefix_cache_dir=directory)
    generate(writer, "<video>\nWhat happens?", videos=video)
    (path,) = directory.iterdir()
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    reader = longvita.load(tiny_checkpoint, prefix_cache_bytes=0, prefix_cache_dir=directory)
    with caplog.at_level(logging.WARNING, logger="longvita.infer.prefix_disk"):
        got = generate(reader, "<video>\nWhat moves?", videos=video)
    assert got.cached_tokens == 0 and "ignoring" in caplog.text and path.name in caplog.text
    assert_same_answer(got, generate(cold, "<video>\nWhat moves?", videos=video))


def test_a_cache_of_another_checkpoint_is_not_used(tiny_checkpoint, media, tmp_path, caplog):
    directory = tmp_path / "prefix"
    other = make_tiny_checkpoint(tmp_path / "other", seed=1)  # other weights, same shapes
    writer = longvita.load(other, prefix_cache_bytes=0, prefix_cache_dir=directory)
    generate(writer, "<video>\nWhat happens?", videos=[media["video"]])
    reader = longvita.load(tiny_checkpoint, prefix_cache_bytes=0, prefix_cache_dir=directory)
    with caplog.at_level(logging.WARNING, logger="longvita.infer.prefix_disk"):
        got = generate(reader, "<video>\nWhat moves?", videos=[media["video"]])
    assert got.cached_tokens == 0 and "another model" in caplog.text


def test_cli_second_question_reads_the_disk_cache(tiny_checkpoint, media, tmp_path, capsys):
    base = ["generate", "--model", str(tiny_checkpoint), "--video", str(media["video"])]
    base += ["--max-new-tokens", "6", "--json", "--prefix-cache", str(tmp_path / "prefix")]
    assert main([*base, "--prompt", "<video>\\nWhat happens?"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main([*base, "--prompt", "<video>\\nWhat moves?"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert first["cached_tokens"] == 0 and second["cached_tokens"] > 0
    assert second["tiles_encoded_per_rank"] == [0]
    cold = longvita.load(tiny_checkpoint, prefix_cache_bytes=0)
    reference = cold.generate("<video>\nWhat moves?", videos=[media["video"]], max_new_tokens=6)
    assert second["token_ids"] == reference.token_ids


def test_demo_model_second_question_is_the_cold_answer(tmp_path):
    pipe = longvita.load(longvita.DEMO_MODEL)
    cold = longvita.load(longvita.DEMO_MODEL, prefix_cache_bytes=0)
    video = make_video(tmp_path / "clip.mp4", num_frames=24, fps=4)
    generate(pipe, "<video>\nWhat colour is the bar?", videos=[video])
    got = generate(pipe, "<video>\nHow many frames are there?", videos=[video])
    assert got.cached_tokens > 0 and got.tiles_encoded_per_rank == [0]
    assert_same_answer(got, generate(cold, "<video>\nHow many frames are there?", videos=[video]))


def test_turning_the_cache_off_and_bad_settings(tiny_checkpoint, media):
    pipe = longvita.load(tiny_checkpoint, prefix_cache_bytes=0)
    assert pipe.prompt_prefix(pipe.process("hi")) is None
    for _ in range(2):
        assert generate(pipe, "<image>\nWhat?", [media["image"]]).cached_tokens == 0
    with pytest.raises(ValueError, match="prefix_cache_bytes"):
        longvita.load(tiny_checkpoint, prefix_cache_bytes=-1)
    with pytest.raises(ValueError, match="prefix_cache_dir_bytes"):
        longvita.load(tiny_checkpoint, prefix_cache_dir="x", prefix_cache_dir_bytes=0)
