"""An answer's server-sent events from its job's queue, without a model or a socket: text events
queued together go out as one chunk, and the end (finish, usage, [DONE]) in one write; the
model thread's events reach the loop a step at a time."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

pytest.importorskip("fastapi")

from longvita.serve.app import Answer, ServerSettings  # noqa: E402
from longvita.serve.metrics import ServerMetrics  # noqa: E402
from longvita.serve.protocol import parse_chat_request  # noqa: E402
from longvita.serve.worker import Event, Job, Outbox  # noqa: E402


class ConnectedRequest:
    async def is_disconnected(self) -> bool:
        return False


def stream_answer(queued: list[Event], later: list[Event] = ()) -> list[bytes]:
    """The writes of a streamed answer whose job has `queued` events before it starts and
    gets `later` ones one at a time, each after the answer's last write of text."""

    async def run() -> list[bytes]:
        job = Job(asyncio.get_running_loop())
        for event in queued:
            job.events.put_nowait(event)
        chat = parse_chat_request(
            {
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        answer = Answer(
            job,
            ConnectedRequest(),
            chat,
            7,
            time.monotonic(),
            ServerMetrics(),
            ServerSettings(model_id="m"),
        )
        writes = []
        pending = list(later)
        async for write in answer.events():
            writes.append(write)
            if pending and len(writes) > 1:  # not after the role chunk
                job.events.put_nowait(pending.pop(0))
        return writes

    return asyncio.run(run())


def payloads(write: bytes) -> list:
    """The JSON of each `data:` event in one write ("[DONE]" kept as a string)."""
    events = write.decode().strip().split("\n\n")
    assert all(event.startswith("data: ") for event in events), events
    return [event[6:] if event == "data: [DONE]" else json.loads(event[6:]) for event in events]


def test_text_events_queued_together_go_out_as_one_chunk():
    texts = ["The", " quick", " fox", "é", "."]
    queued = [Event(text=text, tokens=1) for text in texts] + [Event(finish="length")]
    writes = stream_answer(queued)
    assert len(writes) == 3  # the role, the text merged, the end
    assert payloads(writes[0])[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    (content,) = payloads(writes[1])
    assert content["choices"][0]["delta"]["content"] == "The quick foxé."
    finish, usage, done = payloads(writes[2])
    assert finish["choices"][0]["finish_reason"] == "length"
    assert usage["usage"]["completion_tokens"] == 5 and usage["usage"]["prompt_tokens"] == 7
    assert done == "[DONE]"


def test_events_that_come_one_by_one_go_out_one_by_one():
    first, *rest = [Event(text=f"t{i}", tokens=1) for i in range(4)]
    writes = stream_answer([first], [*rest, Event(text="!", tokens=0), Event(finish="stop_token")])
    texts = [payloads(write)[0]["choices"][0]["delta"]["content"] for write in writes[1:-1]]
    assert texts == ["t0", "t1", "t2", "t3", "!"]
    finish, usage, done = payloads(writes[-1])
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert usage["usage"]["completion_tokens"] == 4 and done == "[DONE]"


def test_an_error_ends_the_stream_in_one_write_after_the_text():
    queued = [Event(text="partial", tokens=1), Event(finish="error", error=ValueError("bad frame"))]
    writes = stream_answer(queued)
    assert payloads(writes[1])[0]["choices"][0]["delta"]["content"] == "partial"
    error, done = payloads(writes[2])
    assert error["error"]["type"] == "invalid_request_error"  # a user error: a 400
    assert error["error"]["message"] == "bad frame"
    assert done == "[DONE]"


def test_a_step_s_events_reach_the_loop_in_one_wake_up_and_in_order():
    """The model thread's events of one engine step, for any number of requests, are handed to
    the event loop by one call (each call wakes the loop), and each job gets its own in order."""

    async def run() -> tuple[int, list[list[str]]]:
        loop = asyncio.get_running_loop()
        calls = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: (calls.append(args), real(*args))[1]
        outbox = Outbox()
        jobs = [Job(loop) for _ in range(3)]
        for job in jobs:
            job.outbox = outbox
        for token in ("a", "b"):
            for job in jobs:
                job.emit(Event(text=token, tokens=1))
        jobs[1].end("length")
        assert all(job.events.empty() for job in jobs)  # nothing before the step ends
        outbox.flush()
        outbox.flush()  # nothing left: no call
        await asyncio.sleep(0)
        return len(calls), [_drain(job) for job in jobs]

    calls, texts = asyncio.run(run())
    assert calls == 1
    assert texts == [["a", "b"], ["a", "b", "length"], ["a", "b"]]


def _drain(job: Job) -> list[str]:
    out = []
    while not job.events.empty():
        event = job.events.get_nowait()
        out.append(event.finish or event.text)
    return out
