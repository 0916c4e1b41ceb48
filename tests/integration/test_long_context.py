"""Long prompts on a tiny model (CPU, fp32): chunked prefill, streaming vision, bad input.

Chunked prefill must give the greedy tokens and raw logits of one whole-prompt forward for any
chunk size, including chunk boundaries inside a tile; the ViT must see each tile once, at most
`vision_batch` at a time, and video frames must be decoded lazily, one pass, batch by batch.
"""

from __future__ import annotations

import pytest
import torch

import longvita
from longvita.errors import MediaError, PromptError
from longvita.infer.engine import allocate_cache, prefill
from longvita.processing import tiles as tiles_module
from longvita.processing.image import to_pixel_values
from longvita.processing.tiles import TileSource, VideoFrameTiles
from longvita.processing.video import iter_video_frames, plan_video
from longvita.testing import make_image, make_video

WHOLE = 1 << 20  # a prefill chunk longer than any prompt here: one forward
PROMPTS = {  # name: (text, image keys, video keys)
    "text": (" ".join(["The quick brown fox jumps over the lazy dog."] * 3), [], []),
    "image": ("<image>\nWhat is in this image?", ["wide"], []),
    "video": ("<video>\nWhat happens?", [], ["long_video"]),
    "video+image": ("<video> then <image>?", ["image"], ["long_video"]),
}
VIDEO_FPS = 4.0  # take every frame of the 4 fps test video


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    """Without the prefix cache: every test here measures a prompt's whole prefill."""
    return longvita.load(tiny_checkpoint, device="cpu", dtype="float32", prefix_cache_bytes=0)


@pytest.fixture(scope="module")
def files(media, tmp_path_factory):
    root = tmp_path_factory.mktemp("long-media")
    return {
        **media,
        "long_video": make_video(root / "long.mp4", num_frames=24, fps=4),
        "frames": _frame_dir(root / "frames", 9),
    }


def _frame_dir(directory, count):
    directory.mkdir()
    for k in range(count):
        make_image(directory / f"frame{k}.png", (80, 60), seed=k)
    return directory


def _run(pipe, files, name, **kwargs):
    text, image_keys, video_keys = PROMPTS[name]
    return pipe.generate(
        text,
        images=[files[k] for k in image_keys],
        videos=[files[k] for k in video_keys],
        fps=VIDEO_FPS,
        **kwargs,
    )


@pytest.fixture(scope="module")
def whole(pipe, files):
    """The unchunked run of every prompt: greedy tokens and raw logits."""
    return {
        name: _run(pipe, files, name, max_new_tokens=6, return_scores=True, prefill_chunk=WHOLE)
        for name in PROMPTS
    }


def _boundaries_inside_tiles(visual_mask: torch.Tensor, chunk: int, tokens_per_tile: int) -> int:
    """Chunk boundaries k with positions k-1 and k slots of the same tile."""
    slot = torch.cumsum(visual_mask, 0) - 1  # [seq]
    count = 0
    for k in range(chunk, visual_mask.numel(), chunk):
        if visual_mask[k - 1] and visual_mask[k]:
            count += int(slot[k - 1] // tokens_per_tile == slot[k] // tokens_per_tile)
    return count


@pytest.mark.parametrize("prefill_chunk", [1, 3, 7, 38])
@pytest.mark.parametrize("name", list(PROMPTS))
def test_chunked_prefill_gives_the_tokens_and_logits_of_one_forward(
    pipe, files, whole, name, prefill_chunk
):
    expected = whole[name]
    assert expected.prompt_tokens > 64 and len(expected.token_ids) > 0
    out = _run(
        pipe,
        files,
        name,
        max_new_tokens=6,
        return_scores=True,
        prefill_chunk=prefill_chunk,
        vision_batch=3,
    )
    assert out.prompt_tokens == expected.prompt_tokens
    assert out.token_ids == expected.token_ids
    torch.testing.assert_close(out.scores, expected.scores)
    if name != "text":  # the comparison covers tiles cut by a chunk boundary
        text, image_keys, video_keys = PROMPTS[name]
        prompt = pipe.process(
            text, [files[k] for k in image_keys], [files[k] for k in video_keys], fps=VIDEO_FPS
        )
        tokens_per_tile = pipe.config.vision.tokens_per_tile
        assert _boundaries_inside_tiles(prompt.visual_mask, prefill_chunk, tokens_per_tile) > 0


@pytest.mark.parametrize("kv_block", [1, 5, WHOLE])
def test_cache_read_in_key_blocks_gives_the_logits_of_one_forward(pipe, kv_block):
    input_ids = pipe.process(PROMPTS["text"][0]).input_ids  # [seq]
    cache = allocate_cache(pipe.model, input_ids.numel())
    cache.kv_block = kv_block
    with torch.inference_mode():
        logits = prefill(pipe.model, input_ids, cache, prefill_chunk=7)  # [1, vocab]
        expected = pipe.model(input_ids[None])[:, -1]  # [1, vocab]
    torch.testing.assert_close(logits, expected)
    assert cache.length == input_ids.numel()


def _instrument(pipe, monkeypatch):
    """Record ViT batch sizes, pixel batches and video decoding, in one event log."""
    events: list[tuple[str, int]] = []
    vit = pipe.model.model.vision_model
    vit_forward = vit.forward

    def recording_vit(pixel_values):
        events.append(("vit", pixel_values.shape[0]))
        return vit_forward(pixel_values)

    def recording_pixels(images, *, tile_size):
        events.append(("pixels", len(images)))
        return to_pixel_values(images, tile_size=tile_size)

    iter_frames = tiles_module.iter_video_frames

    def recording_frames(path, indices, **kwargs):
        events.append(("pass", len(indices)))
        for frame in iter_frames(path, indices, **kwargs):
            events.append(("frame", 1))
            yield frame

    monkeypatch.setattr(vit, "forward", recording_vit)
    monkeypatch.setattr(tiles_module, "to_pixel_values", recording_pixels)
    monkeypatch.setattr(tiles_module, "iter_video_frames", recording_frames)
    return events


def _total(events, kind):
    return sum(n for k, n in events if k == kind)


@pytest.mark.parametrize(
    ("prefill_chunk", "vision_batch"), [(1, 1), (7, 4), (64, 5), (WHOLE, 3), (WHOLE, 64)]
)
def test_streaming_vision_encodes_each_tile_once_in_bounded_batches(
    pipe, files, monkeypatch, prefill_chunk, vision_batch
):
    events = _instrument(pipe, monkeypatch)
    out = _run(
        pipe,
        files,
        "video+image",
        max_new_tokens=2,
        prefill_chunk=prefill_chunk,
        vision_batch=vision_batch,
    )
    assert out.num_tiles == 24 + 9  # 24 frames, a 4x2 grid + thumbnail
    vit_batches = [n for k, n in events if k == "vit"]
    assert sum(vit_batches) == out.num_tiles  # every tile encoded exactly once
    assert max(vit_batches) <= vision_batch
    pixel_batches = [n for k, n in events if k == "pixels"]
    assert sum(pixel_batches) == out.num_tiles and max(pixel_batches) <= vision_batch
    assert [n for k, n in events if k == "pass"] == [24]  # one decoding pass over the video
    # frames are decoded as their batch comes up: never more than one batch ahead of the ViT
    decoded = encoded = 0
    for kind, n in events:
        decoded += n if kind == "frame" else 0
        encoded += n if kind == "vit" else 0
        assert decoded - encoded <= vision_batch
    assert decoded == 24


def test_nothing_is_decoded_before_the_prompt_runs(pipe, files, monkeypatch):
    events = _instrument(pipe, monkeypatch)
    text, image_keys, video_keys = PROMPTS["video+image"]
    prompt = pipe.process(
        text, [files[k] for k in image_keys], [files[k] for k in video_keys], fps=VIDEO_FPS
    )
    assert prompt.num_tiles == 33 and prompt.video_frames == [24]
    assert events == []  # grids and frame counts come from headers only
    torch.testing.assert_close(prompt.tiles.get([3, 4]), prompt.pixel_values[3:5])


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_lazy_video_tiles_equal_eager_frames_in_any_order(files, kind):
    path = files["long_video"] if kind == "file" else files["frames"]
    indices = plan_video(path, max_frames=7, max_fps=VIDEO_FPS).indices
    eager = to_pixel_values(list(iter_video_frames(path, indices)), tile_size=56)  # [7, 3, 56, 56]
    segment = VideoFrameTiles(path, indices, tile_size=56)
    source = TileSource([segment], tile_size=56)
    torch.testing.assert_close(source.get([0, 1, 2]), eager[:3], rtol=0, atol=0)
    torch.testing.assert_close(source.get([2, 3]), eager[2:4], rtol=0, atol=0)  # 2 again: kept
    assert segment.num_passes == 1
    torch.testing.assert_close(source.get([6, 1]), eager[[6, 1]], rtol=0, atol=0)  # backwards
    assert segment.num_passes == 2
    torch.testing.assert_close(source.get_all(), eager, rtol=0, atol=0)


def test_video_shorter_than_its_header_repeats_the_last_frame(files, caplog):
    [frame_23] = iter_video_frames(files["long_video"], [23])  # the last frame of the file
    segment = VideoFrameTiles(files["long_video"], [0, 10, 23, 45, 50], tile_size=56)
    with caplog.at_level("WARNING"):
        pixels = segment.load([0, 1, 2, 3, 4])
    last = to_pixel_values([frame_23], tile_size=56)[0]
    for k in (2, 3, 4):
        torch.testing.assert_close(pixels[k], last, rtol=0, atol=0)
    assert "decoded only 3 of the 5" in caplog.text
    with pytest.raises(MediaError, match="no decodable frame"):
        VideoFrameTiles(files["long_video"], [100], tile_size=56).load([0])


def test_oom_during_prefill_names_the_chunk_and_suggests_a_smaller_one(pipe, files, monkeypatch):
    mlp = pipe.model.model.layers[0].mlp
    forward, calls = mlp.forward, []

    def failing(x):
        calls.append(x.shape[1])
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(x)

    monkeypatch.setattr(mlp, "forward", failing)
    with pytest.raises(PromptError) as info:
        _run(pipe, files, "video", max_new_tokens=2, prefill_chunk=32)
    message = str(info.value)
    assert "out of memory during prefill of tokens 64-96" in message
    assert "prefill_chunk=32" in message and "smaller prefill_chunk (e.g. 16)" in message
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"prefill_chunk": 0}, "prefill_chunk must be >= 1"), ({"vision_batch": 0}, "vision_batch")],
)
def test_bad_chunk_settings_are_refused(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate("hi", max_new_tokens=2, **kwargs)
