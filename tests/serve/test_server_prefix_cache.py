"""The server reuses the prompt prefixes of earlier requests (another question about the same
video, the next turn of a conversation) and says so in OpenAI's
`usage.prompt_tokens_details.cached_tokens`; the answers are those of a cold run."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

import longvita  # noqa: E402
from longvita.serve.app import ServerSettings  # noqa: E402
from longvita.serve.media import MediaPolicy  # noqa: E402
from tests.serve.test_server import MODEL, Server, text_part  # noqa: E402


@pytest.fixture(scope="module")
def video(tmp_path_factory, media):
    directory = tmp_path_factory.mktemp("allowed-prefix")
    path = directory / "clip.mp4"
    path.write_bytes(media["video"].read_bytes())
    return path


def video_turn(video, question: str) -> dict:
    part = {"type": "video_url", "video_url": {"url": f"file://{video}"}}
    return {"role": "user", "content": [part, text_part(question)]}


def test_requests_about_one_video_reuse_its_prefix(tiny_checkpoint, video):
    pipe = longvita.load(tiny_checkpoint)
    cold = longvita.load(tiny_checkpoint, prefix_cache_bytes=0)
    settings = ServerSettings(
        model_id=MODEL, media=MediaPolicy(allowed_local_paths=(str(video.parent),))
    )
    with Server(pipe, settings, max_batch=4, max_queue=4) as server:
        client = server.client()
        first = client.chat.completions.create(
            model=MODEL, messages=[video_turn(video, "What happens?")], max_tokens=6
        )
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        chunks = list(
            client.chat.completions.create(
                model=MODEL,
                messages=[video_turn(video, "What moves?")],
                max_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        turns = [
            video_turn(video, "What happens?"),
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "And then?"},
        ]
        next_turn = client.chat.completions.create(model=MODEL, messages=turns, max_tokens=6)
    second = cold.generate("<video>\nWhat moves?", videos=[video], max_new_tokens=6)
    usage = chunks[-1].usage
    assert 0 < usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == second.text
    history = [
        {"role": "user", "content": "<video>\nWhat happens?"},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    expected = cold.generate(history, videos=[video], max_new_tokens=6)
    assert next_turn.choices[0].message.content == expected.text
    first_prompt = cold.process("<video>\nWhat happens?", [], [video]).num_tokens
    assert next_turn.usage.prompt_tokens_details.cached_tokens >= first_prompt - 1
