"""Continuous batching: sequences of different lengths, media and limits, stepped together,
each get the tokens and text they get alone; they join and leave between steps."""

from __future__ import annotations

import random

import pytest

import longvita
from longvita.infer.batch import MIN_POOLED_ROWS, BatchEngine, BatchSequence
from longvita.infer.decode_pool import DEFAULT_POOL_TOKENS, DecodePool
from longvita.infer.request import GenerationRequest


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return longvita.load(tiny_checkpoint, device="cpu", dtype="float32")


class Client:
    """What a server's client receives for one sequence."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.text = ""
        self.reason: str | None = None

    def on_step(self, step) -> None:
        assert self.reason is None, "a token after the end"
        if step.token_id is not None:
            self.token_ids.append(step.token_id)
        self.text += step.text

    def on_finish(self, reason: str, error: Exception | None) -> None:
        assert self.reason is None, "finished twice"
        assert (reason == "error") == (error is not None)
        self.reason = reason if error is None else f"error: {error}"


def sequence(pipe, request: GenerationRequest, client: Client, **fields) -> BatchSequence:
    prompt, sampling = pipe.prepare(request)
    runner, continuation = pipe.sequence(
        prompt.input_ids, prompt.visual_mask, prompt.tiles, sampling, stop=request.stop
    )
    return BatchSequence(runner, continuation, client.on_step, client.on_finish, **fields)


def requests(media) -> list[GenerationRequest]:
    create = GenerationRequest.create
    return [
        create("Describe a quiet morning.", max_new_tokens=9),
        create("<image>\nWhat is in this image?", [media["wide"]], max_new_tokens=5),
        create("<video>\nWhat happens?", videos=[media["video"]], max_new_tokens=12),
        create("Hi", max_new_tokens=3),
        create("Tell me a story.", max_new_tokens=7, temperature=0.9, top_k=20, seed=3),
        create("<image> and <video>?", [media["image"]], [media["video"]], max_new_tokens=6),
    ]


@pytest.fixture(scope="module")
def alone(pipe, media) -> list:
    """Each request's output run by itself."""
    return [pipe.run(request) for request in requests(media)]


@pytest.mark.parametrize(
    ("step_tokens", "pool_tokens"),
    [(512, DEFAULT_POOL_TOKENS), (16, DEFAULT_POOL_TOKENS), (512, 0), (512, 48)],
    ids=["pooled", "small-steps", "pool-off", "some-pooled"],
)
def test_batched_sequences_get_the_tokens_they_get_alone(
    pipe, media, alone, step_tokens, pool_tokens, monkeypatch
):
    """Whether their caches decode in the pool (`infer.decode_pool`), some of them (48 tokens:
    the three text prompts), or none, every sequence gets its tokens alone."""
    pooled_steps = []
    attend = DecodePool.attend
    monkeypatch.setattr(
        DecodePool, "attend", lambda self, *a: pooled_steps.append(a[-1].count) or attend(self, *a)
    )
    engine = BatchEngine(pipe.model, max_batch=4, step_tokens=step_tokens, pool_tokens=pool_tokens)
    batch = requests(media)
    clients = [Client() for _ in batch]
    added = [sequence(pipe, r, c) for r, c in zip(batch, clients, strict=True)]
    for added_sequence in added:
        engine.add(added_sequence)
    steps, pooled = 0, set()
    while not engine.idle:
        assert len(engine.running) <= 4
        engine.step()
        steps += 1
        if engine.pool is not None:
            pooled |= {i for i, s in enumerate(added) if engine.pool.holds(s.runner.cache)}
    for client, output in zip(clients, alone, strict=True):
        assert client.token_ids == output.token_ids
        assert client.text == output.text and client.reason == output.stop_reason
    longest = max(r.sampling.max_new_tokens for r in batch)
    assert steps < sum(r.sampling.max_new_tokens for r in batch)  # the decodes were batched
    assert steps >= longest
    expected = {DEFAULT_POOL_TOKENS: set(range(len(batch))), 0: set(), 48: {0, 3, 4}}
    assert pooled == expected[pool_tokens]
    assert all(count >= MIN_POOLED_ROWS for count in pooled_steps)
    if (step_tokens, pool_tokens) == (512, DEFAULT_POOL_TOKENS):  # 3-4 decode at once
        assert pooled_steps


def test_a_sequence_joins_a_running_batch(pipe, media):
    engine = BatchEngine(pipe.model, max_batch=8)
    first, second = Client(), Client()
    engine.add(sequence(pipe, GenerationRequest.create("Hi there", max_new_tokens=10), first))
    for _ in range(4):
        engine.step()
    late = GenerationRequest.create("<image>\nWhat?", [media["image"]], max_new_tokens=4)
    engine.add(sequence(pipe, late, second))
    while not engine.idle:
        engine.step()
    assert second.token_ids == pipe.run(late).token_ids and second.reason == "length"
    assert len(first.token_ids) == 10


def test_stop_sequences_apply_per_sequence(pipe):
    full = pipe.generate("Tell me a story.", max_new_tokens=16).text
    stop = full[3:5]
    request = GenerationRequest.create("Tell me a story.", max_new_tokens=16, stop=[stop])
    engine, client = BatchEngine(pipe.model), Client()
    engine.add(sequence(pipe, request, client))
    while not engine.idle:
        engine.step()
    assert client.text == full[: full.index(stop)] and client.reason == "stop_sequence"


def test_cancelled_and_timed_out_sequences_leave_and_free_their_slot(pipe):
    engine = BatchEngine(pipe.model, max_batch=1)
    gone, late, waiting = Client(), Client(), Client()
    cancelled = sequence(pipe, GenerationRequest.create("Hi", max_new_tokens=50), gone)
    engine.add(cancelled)
    engine.add(
        sequence(pipe, GenerationRequest.create("Hi", max_new_tokens=50), late, deadline=0.0)
    )
    engine.add(sequence(pipe, GenerationRequest.create("Hi", max_new_tokens=2), waiting))
    engine.step()
    assert gone.token_ids and waiting.reason is None
    cancelled.cancelled = True
    while not engine.idle:
        engine.step()
    assert gone.reason == "cancelled" and late.reason == "timeout" and not late.token_ids
    assert waiting.reason == "length" and len(waiting.token_ids) == 2


def test_a_failing_forward_ends_only_that_step_with_an_error(pipe, monkeypatch):
    engine, client = BatchEngine(pipe.model), Client()
    engine.add(sequence(pipe, GenerationRequest.create("Hi", max_new_tokens=5), client))

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "_forward", broken)
    engine.step()
    assert client.reason == "error: device lost" and engine.idle


def test_media_failing_mid_prompt_ends_that_sequence_only(pipe, media):
    engine = BatchEngine(pipe.model, step_tokens=8)  # the video's prompt takes several steps
    healthy, broken = Client(), Client()
    engine.add(sequence(pipe, GenerationRequest.create("Hi", max_new_tokens=6), healthy))
    bad = sequence(
        pipe,
        GenerationRequest.create("<video>\nWhat?", videos=[media["video"]], max_new_tokens=4),
        broken,
    )

    def corrupt(positions, encoded=None):
        raise OSError("frame 3 is corrupt")

    bad.runner.stream.features = corrupt
    engine.add(bad)
    while not engine.idle:
        engine.step()
    assert broken.reason == "error: frame 3 is corrupt" and not broken.token_ids
    assert healthy.reason == "length" and len(healthy.token_ids) == 6


def image_requests(media) -> list[GenerationRequest]:
    create = GenerationRequest.create
    return [
        create("<image>\nWhat is in this image?", [media["wide"]], max_new_tokens=5),
        create("<image>\nDescribe it.", [media["image"]], max_new_tokens=4),
        create("<image> and <image>?", [media["image"], media["wide"]], max_new_tokens=6),
    ]


def count_vit_calls(pipe, monkeypatch) -> list[int]:
    """The number of tiles of each call of the model's ViT, from now on."""
    calls = []
    encode = pipe.model.model.encode_tiles
    monkeypatch.setattr(
        pipe.model.model, "encode_tiles", lambda pixels: calls.append(len(pixels)) or encode(pixels)
    )
    return calls


def test_prompts_that_start_together_share_one_vit_call(pipe, media, monkeypatch):
    """Three image prompts in one step: their tiles go through the ViT together, a full
    `vision_batch` at a time, and each sequence gets the tokens it gets alone."""
    batch = image_requests(media)
    alone = [pipe.run(request) for request in batch]
    prompts = [pipe.prepare(request)[0] for request in batch]
    calls = count_vit_calls(pipe, monkeypatch)
    engine = BatchEngine(pipe.model, max_batch=4)
    clients = [Client() for _ in batch]
    for request, client in zip(batch, clients, strict=True):
        engine.add(sequence(pipe, request, client))
    while not engine.idle:
        engine.step()
    tiles = sum(prompt.num_tiles for prompt in prompts)  # 30: more than one vision_batch
    batch_size = batch[0].vision_batch
    assert tiles > batch_size and sum(calls) == tiles  # each tile once
    assert calls == [batch_size] * (tiles // batch_size) + [tiles % batch_size]  # full batches
    for client, output in zip(clients, alone, strict=True):
        assert client.token_ids == output.token_ids and client.reason == output.stop_reason


def test_an_image_that_fails_to_load_in_a_shared_vit_call_ends_that_sequence_only(
    pipe, media, monkeypatch
):
    batch = image_requests(media)
    clients = [Client() for _ in batch]
    added = [sequence(pipe, r, c) for r, c in zip(batch, clients, strict=True)]

    def unreadable(tile_ids):
        raise OSError("truncated PNG")

    added[1].runner.stream.tiles.get = unreadable
    calls = count_vit_calls(pipe, monkeypatch)
    engine = BatchEngine(pipe.model, max_batch=4)
    for added_sequence in added:
        engine.add(added_sequence)
    while not engine.idle:
        engine.step()
    assert clients[1].reason == "error: truncated PNG" and not clients[1].token_ids
    assert [c.reason for c in (clients[0], clients[2])] == ["length", "length"]
    tiles = sum(pipe.prepare(batch[i])[0].num_tiles for i in (0, 2))
    size = batch[0].vision_batch
    assert calls == [size] * (tiles // size) + [tiles % size]  # the other two still share


@pytest.mark.parametrize("pool_tokens", [48, DEFAULT_POOL_TOKENS])
def test_random_arrivals_and_cancellations_keep_every_answer(pipe, media, pool_tokens):
    """24 requests of random lengths, some with an image, joining 0-3 a step, some cancelled
    mid-way, 6 at a time; the pool holds some (48 tokens) or all of them: every request that
    is not cancelled gets the tokens it gets alone, and the pool is empty at the end."""
    rng = random.Random(pool_tokens)
    words = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "far", "away")
    requests, clients, waiting, cancel_at = [], [], [], {}
    for i in range(24):
        text, images = " ".join(rng.choices(words, k=rng.randint(1, 25))), []
        if rng.random() < 0.3:
            text, images = "<image>\n" + text, [media["image"]]
        request = GenerationRequest.create(
            text, images, max_new_tokens=rng.randint(1, 30), ignore_eos=rng.random() < 0.5
        )
        requests.append(request)
        clients.append(Client())
        waiting.append(sequence(pipe, request, clients[-1]))
        if rng.random() < 0.15:
            cancel_at[i] = rng.randint(1, 40)
    added = list(waiting)
    engine = BatchEngine(pipe.model, max_batch=6, step_tokens=64, pool_tokens=pool_tokens)
    steps = 0
    while waiting or not engine.idle:
        for _ in range(rng.randint(0, 3)):
            if waiting:
                engine.add(waiting.pop(0))
        engine.step()
        steps += 1
        for i, step in cancel_at.items():
            if step == steps:
                added[i].cancelled = True
    for request, client in zip(requests, clients, strict=True):
        if client.reason != "cancelled":
            assert client.token_ids == pipe.run(request).token_ids
    assert any(client.reason == "cancelled" for client in clients)
    assert engine.pool.num_bytes == 0


def test_pooled_rows_lead_the_step_whatever_the_order_of_arrival(pipe, media, monkeypatch):
    """A sequence whose cache stays its own (67 + 16 tokens, over the pool's 48) arrived first;
    four pooled ones decode beside it: the step puts the pool's rows first, and all five get
    the tokens they get alone."""
    pooled_steps = []
    attend = DecodePool.attend
    monkeypatch.setattr(
        DecodePool, "attend", lambda self, *a: pooled_steps.append(a[-1].count) or attend(self, *a)
    )

    def create(*args, **options) -> GenerationRequest:  # each decodes to its length
        return GenerationRequest.create(*args, ignore_eos=True, **options)

    batch = [create("<image>\nWhat is in this image?", [media["wide"]], max_new_tokens=16)]
    batch += [create(f"Say {word}.", max_new_tokens=12) for word in ("one", "two", "six", "ten")]
    clients = [Client() for _ in batch]
    engine = BatchEngine(pipe.model, max_batch=8, pool_tokens=48)
    for request, client in zip(batch, clients, strict=True):
        engine.add(sequence(pipe, request, client))
    while not engine.idle:
        engine.step()
    assert pooled_steps and max(pooled_steps) == 4
    for request, client in zip(batch, clients, strict=True):
        assert client.token_ids == pipe.run(request).token_ids
