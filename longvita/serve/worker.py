"""The model worker of `longvita serve`: the one thread that runs the model, and the handles
(`Job`) through which HTTP handlers receive their tokens.

- `BatchWorker` (one process): a thread steps `infer.batch.BatchEngine`, so concurrent requests
  share each forward; a request joins between steps, leaves when finished, cancelled (the
  client went away) or past its deadline.
- `ContextParallelWorker` (`--cp N`, on cp rank 0): runs requests one at a time on every rank of
  the context-parallel group; the other ranks wait in `follow_requests`. Between requests cp
  rank 0 sends a heartbeat so that an idle group never reaches its collective timeout. A
  request's generation is not interrupted under CP: a cancelled or late request runs to its end
  and its tokens are dropped.
Both bound how many requests they hold (`capacity`: running + waiting); `reserve` refuses past
it (`ServerBusy`: HTTP 503 with Retry-After). Tokens cross from the worker thread to the event
loop with `call_soon_threadsafe` (the batch worker's once a step, `Outbox`); nothing here knows
HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from longvita.errors import MediaError, PromptError
from longvita.infer.batch import DEFAULT_STEP_TOKENS, BatchEngine, BatchSequence
from longvita.infer.decode import TokenStep
from longvita.infer.decode_pool import DEFAULT_POOL_TOKENS
from longvita.infer.request import GenerationRequest

logger = logging.getLogger(__name__)

USER_ERRORS = (PromptError, MediaError, ValueError)
"""Errors that are the request's fault (unreadable media, a prompt too long...)."""
HEARTBEAT_S = 30.0
"""Under CP, how often an idle cp rank 0 tells the other ranks it is still there."""


class ServerBusy(Exception):
    """Every slot and queue place is taken: answer 503 and ask the client to retry."""


@dataclass
class Event:
    """What a client receives: text (with the number of new tokens it came with), or the end."""

    text: str = ""
    tokens: int = 0
    finish: str | None = None
    """At the end: "stop_token", "stop_sequence", "length", "cancelled", "timeout" or
    "error"; then `error` is what went wrong: the request's fault (a 4xx) when a
    `USER_ERRORS`, the server's (a 5xx) otherwise."""
    error: Exception | None = None
    cached_tokens: int = 0
    """At the end: prompt tokens taken from the prefix cache (`usage.prompt_tokens_details`)."""

    def merged(self, following: Event) -> Event:
        """This text event and the text event after it, as one."""
        return Event(text=self.text + following.text, tokens=self.tokens + following.tokens)


class Job:
    """One request's handle: events arrive on `events` (an asyncio queue of the handler's
    loop); `cancel` asks the worker to drop it; `workdir` (fetched media) is removed when it
    ends."""

    def __init__(self, loop: asyncio.AbstractEventLoop, workdir: Path | None = None) -> None:
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.outbox: Outbox | None = None
        """Set by a worker that delivers its events a step at a time (`Outbox`)."""
        self.workdir = workdir
        self.cancelled = threading.Event()
        self.sequence: BatchSequence | None = None
        self.finished = False
        self.media_names: dict[str, str] = {}
        """The request's media parts' names (`messages[0].content[1]`) by the file each was
        fetched to: error messages name the part, not a server path."""

    def emit(self, event: Event) -> None:
        """Deliver `event` to the handler: at once from any thread, or with the worker's
        step through its outbox."""
        if self.outbox is not None:
            self.outbox.put(self, event)
        else:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()
        if self.sequence is not None:
            self.sequence.cancelled = True

    def on_step(self, step: TokenStep) -> None:
        self.emit(Event(text=step.text, tokens=int(step.token_id is not None)))

    def end(self, reason: str, error: Exception | None = None, cached_tokens: int = 0) -> None:
        """The last event; then the work directory goes."""
        self.emit(Event(finish=reason, error=error, cached_tokens=cached_tokens))
        self.finished = True
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


class Outbox:
    """The events of one engine step, handed to the event loop in one call when the step ends.

    Waking the loop costs a write to its self-pipe and, on a busy CPU, a hand-over of the GIL
    each way; at 8 streaming requests that was 8 wake-ups a step, one per token. Used by the
    model thread only.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Job, Event]] = []

    def put(self, job: Job, event: Event) -> None:
        self._pending.append((job, event))

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event]]] = {}
        for job, event in pending:
            by_loop.setdefault(job.loop, []).append((job, event))
        for loop, events in by_loop.items():
            loop.call_soon_threadsafe(_deliver, events)


def _deliver(events: list[tuple[Job, Event]]) -> None:
    for job, event in events:
        job.events.put_nowait(event)


class _Slots:
    """Requests held (running + waiting) against a capacity, thread-safe."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.held = 0
        self._lock = threading.Lock()

    def reserve(self) -> None:
        with self._lock:
            if self.held >= self.capacity:
                raise ServerBusy(
                    f"the server holds {self.held} requests, its limit (running + queued); "
                    "retry later"
                )
            self.held += 1

    def release(self) -> None:
        with self._lock:
            self.held -= 1


class _Worker:
    """What every worker shares: the slots the app reserves before preparing a request, and the
    model thread. A subclass gives `running`, `stop`, `submit` and the thread's `_loop`."""

    def __init__(self, capacity: int, thread_name: str) -> None:
        self.slots = _Slots(capacity)
        self._thread = threading.Thread(target=self._loop, name=thread_name, daemon=True)

    @property
    def running(self) -> int:
        raise NotImplementedError

    @property
    def queued(self) -> int:
        return max(self.slots.held - self.running, 0)

    @property
    def decode_pool_bytes(self) -> int:
        """Memory of the batch engine's decode pool (0 without one)."""
        return 0

    def start(self) -> None:
        self._thread.start()

    def reserve(self) -> None:
        self.slots.reserve()

    def release(self) -> None:
        self.slots.release()

    def _loop(self) -> None:
        raise NotImplementedError


class BatchWorker(_Worker):
    """One process: a thread steps the batch engine while there is work."""

    def __init__(
        self,
        pipeline,
        *,
        max_batch: int = 32,
        max_queue: int = 64,
        step_tokens: int = DEFAULT_STEP_TOKENS,
        pool_tokens: int = DEFAULT_POOL_TOKENS,
    ) -> None:
        super().__init__(max_batch + max_queue, "longvita-model")
        self.pipeline = pipeline
        self.engine = BatchEngine(
            pipeline.model, max_batch=max_batch, step_tokens=step_tokens, pool_tokens=pool_tokens
        )
        self._incoming: queue.SimpleQueue[BatchSequence | None] = queue.SimpleQueue()
        self._outbox = Outbox()
        self._stopping = False

    @property
    def running(self) -> int:
        return len(self.engine.running)

    @property
    def decode_pool_bytes(self) -> int:
        pool = self.engine.pool
        return 0 if pool is None else pool.num_bytes

    def stop(self) -> None:
        self._stopping = True
        self._incoming.put(None)
        self._thread.join(timeout=30)

    def submit(
        self, job: Job, request: GenerationRequest, prepared, *, deadline: float, prefix=None
    ) -> None:
        """Queue a request whose prompt `prepared` = `Pipeline.prepare(request)` (checked, its
        tiles lazy); its reservation is released when it ends. prefix: the prompt's use of the
        prefix cache (`Pipeline.prompt_prefix`), so that its start is reused when cached."""
        prompt, sampling = prepared
        runner, continuation = self.pipeline.sequence(
            prompt.input_ids,
            prompt.visual_mask,
            prompt.tiles,
            sampling,
            stop=request.stop,
            prefill_chunk=request.prefill_chunk,
            vision_batch=request.vision_batch,
            prefix=prefix,
        )

        def on_finish(reason: str, error: Exception | None) -> None:
            self.release()
            job.end(reason, error, runner.cached_tokens)

        job.outbox = self._outbox
        job.sequence = BatchSequence(
            runner, continuation, job.on_step, on_finish, deadline=deadline
        )
        if job.cancelled.is_set():
            job.sequence.cancelled = True
        self._incoming.put(job.sequence)

    def _loop(self) -> None:
        engine = self.engine
        while not self._stopping:
            try:
                sequence = self._incoming.get(timeout=None if engine.idle else 0)
            except queue.Empty:
                sequence = None
            while sequence is not None:
                engine.add(sequence)
                try:
                    sequence = self._incoming.get_nowait()
                except queue.Empty:
                    sequence = None
            if not engine.idle:
                engine.step()
            self._outbox.flush()
        engine.close()
        self._outbox.flush()


class ContextParallelWorker(_Worker):
    """cp rank 0 of a context-parallel group: requests one at a time on every rank."""

    def __init__(self, pipeline, state, *, max_queue: int = 64) -> None:
        super().__init__(1 + max_queue, "longvita-cp")
        self.pipeline = pipeline
        self.state = state
        self._jobs: queue.SimpleQueue[tuple[Job, GenerationRequest, float] | None] = (
            queue.SimpleQueue()
        )
        self._busy = False

    @property
    def running(self) -> int:
        return int(self._busy)

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=60)

    def submit(
        self, job: Job, request: GenerationRequest, prepared, *, deadline: float, prefix=None
    ) -> None:
        """Queue a request; `prepared` (rank 0's check) and `prefix` are dropped: every rank
        prepares its own share when the request's turn comes."""
        prepared[0].tiles.close()
        self._jobs.put((job, request, deadline))

    def _loop(self) -> None:
        from longvita.parallel.collectives import broadcast_object

        while True:
            try:
                item = self._jobs.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                broadcast_object("heartbeat", self.state, what="serving: heartbeat")
                continue
            if item is None:  # shutting down: the other ranks may be ending already (Ctrl-C)
                with contextlib.suppress(RuntimeError):
                    broadcast_object(None, self.state, what="serving: shutdown")
                return
            job, request, deadline = item
            self._busy = True
            try:
                if job.cancelled.is_set() or time.monotonic() > deadline:
                    job.end("cancelled" if job.cancelled.is_set() else "timeout")
                    continue
                broadcast_object(request, self.state, what="serving: sending a request")
                job.end(*run_request(self.pipeline, request, self.state, job))
            finally:
                self._busy = False
                self.release()


def run_request(
    pipeline, request: GenerationRequest, state, job: Job | None
) -> tuple[str, Exception | None, int]:
    """One request on this rank (its share under CP): (stop reason, None, prompt tokens from
    the prefix cache), or ("error", the user error, 0), which is the same on every rank, so
    every rank stays in step."""
    try:
        stream = pipeline.open(request, state=state)
        for step in stream:
            if job is not None and not job.cancelled.is_set():
                job.on_step(step)
        return stream.output.stop_reason, None, stream.output.cached_tokens
    except USER_ERRORS as err:
        return "error", err, 0


def follow_requests(pipeline, state) -> None:
    """cp ranks other than 0: run each request cp rank 0 sends, until it sends None."""
    from longvita.parallel.collectives import broadcast_object

    while True:
        request = broadcast_object(None, state, what="serving: waiting for a request")
        if request is None:
            return
        if isinstance(request, GenerationRequest):
            run_request(pipeline, request, state, None)
