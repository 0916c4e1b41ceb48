"""What the harness adapters share: content parts joined as the server joins them, visual kinds,
and the context-parallel group answering as one process does."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import longvita
from longvita.data.synth import NEEDLE_QUESTION, Renderer, write_lossless_video
from longvita.eval.harness import HarnessModel, join_parts, media_kind, rank_device
from longvita.serve.protocol import parse_chat_request


def test_parts_are_joined_as_the_server_joins_them():
    parts = [("text", "Compare "), ("image", "a.png"), ("video", "v.mp4"), ("text", "now."),
             ("image", "b.jpg")]  # fmt: skip
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare "},
                    {"type": "image_url", "image_url": {"url": "a.png"}},
                    {"type": "video_url", "video_url": {"url": "v.mp4"}},
                    {"type": "text", "text": "now."},
                    {"type": "image_url", "image_url": {"url": "b.jpg"}},
                ],
            }
        ]  # fmt: skip
    }
    served = parse_chat_request(body)
    turn = join_parts(parts)
    assert turn.text == served.messages[0]["content"] == "Compare <image>\n<video>\nnow.<image>\n"
    assert turn.images == ["a.png", "b.jpg"] and turn.videos == ["v.mp4"]
    with pytest.raises(ValueError, match="audio"):
        join_parts([("audio", "a.wav")])


def test_media_kinds(tmp_path):
    frame = Image.new("RGB", (4, 4))
    assert media_kind(frame) == "image"
    assert media_kind("x/photo.JPG") == "image"
    assert media_kind(tmp_path / "clip.mp4") == "video"
    assert media_kind(str(tmp_path)) == "video"  # a frame directory
    assert media_kind([frame, frame]) == "video"
    with pytest.raises(ValueError, match="audio is not supported"):
        media_kind({"array": [0.0], "sampling_rate": 16000})


def test_rank_device(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert rank_device("cuda") == "cuda"
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 8)
    assert (rank_device("cuda"), rank_device("cuda:1"), rank_device("cpu")) == (
        "cuda:3", "cuda:1", "cpu")  # fmt: skip
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)  # its own GPU only
    assert rank_device("cuda") == "cuda"


@pytest.mark.parametrize("hidden", [False, True])
def test_context_parallel_is_refused_under_a_data_parallel_launch(monkeypatch, hidden):
    """VLMEvalKit hides WORLD_SIZE while building models; LOCAL_WORLD_SIZE still tells."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    if hidden:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ValueError, match="cp=2 starts its own 2 ranks"):
        HarnessModel.load("demo", cp=2)


@pytest.mark.slow
@pytest.mark.distributed
def test_context_parallel_group_answers_as_one_process(tmp_path):
    renderer = Renderer(9)
    frames = [renderer.render(renderer.item("letter")) for _ in range(10)]
    frames[6] = renderer.render(renderer.item("digit", "8"))
    video = str(write_lossless_video(tmp_path / "needle.mkv", frames))
    turn = join_parts([("video", video), ("text", NEEDLE_QUESTION)])
    one = HarnessModel(longvita.load(longvita.DEMO_MODEL), max_frames=10)
    expected = one.generate(turn, max_new_tokens=4)
    group = HarnessModel.load("demo", cp=2, max_frames=10)
    try:
        output = group.generate(turn, max_new_tokens=4)
        assert output.token_ids == expected.token_ids and output.text == expected.text == "8"
        assert output.cp == 2
        with pytest.raises(ValueError, match="does not exist|No such file|not found"):
            group.generate(join_parts([("video", str(tmp_path / "gone.mkv")), ("text", "?")]))
        assert group.generate(turn, max_new_tokens=4).text == "8"  # still serving
        with pytest.raises(ValueError, match="cp=1"):
            group.loglikelihood(turn, ["8"])
    finally:
        group.close()
    assert not group.group._helper.is_alive()
