"""The HTTP API of `longvita serve`: OpenAI's chat completions over the model worker.

Routes: `POST /v1/chat/completions` (streamed as server-sent events or whole), `GET /v1/models`
and `GET /v1/models/{id}`, `GET /health`, `GET /metrics` (Prometheus text) and `GET /` (the chat
page). A request goes:
body read under a size limit -> `protocol.parse_chat_request` (400 on anything malformed) ->
a slot reserved in the worker (503 with Retry-After when full) -> its media fetched under the
`MediaPolicy` into a per-request directory and the prompt planned and checked by
`Pipeline.prepare`, in a thread (4xx on bad media or a prompt too long) -> the worker -> tokens
out as they come. A client that disconnects has its sequence cancelled at the next step.
Every error is OpenAI's error JSON (unknown routes, wrong methods and unexpected failures
included); after a stream has started, an error is sent as an event. Messages name a media part
by its place in the request (`messages[0].content[1]`), never by the file it was fetched to.
Owns the HTTP side only: parsing and formatting are `protocol`'s, fetching `media`'s, running
the model `worker`'s.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from longvita.errors import MediaError, PositionsError, PromptError
from longvita.infer.request import GenerationRequest
from longvita.processing.image import PixelLimitError
from longvita.serve import protocol, responses
from longvita.serve.media import MediaPolicy, MediaRefused, fetch_image, fetch_video
from longvita.serve.metrics import CONTENT_TYPE, ServerMetrics
from longvita.serve.protocol import ApiError, ChatRequest
from longvita.serve.worker import USER_ERRORS, Event, Job, ServerBusy

logger = logging.getLogger(__name__)

CHAT_PAGE = Path(__file__).resolve().parent / "static" / "index.html"
DISCONNECT_POLL_S = 0.5
"""How often a handler checks that its client is still there, tokens flowing or not."""
CLIENT_CLOSED = 499
"""The status counted for a request whose client left before its answer (nginx's)."""
JSON_TYPES = ("application/json",)
"""Content types a request body may declare (also `application/*+json`); none declared is
taken as JSON too. Others are refused: a web page may send a form or text/plain to a local
server without asking first (a CORS "simple request"), but not JSON."""


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """What the server accepts and how long it waits (the `longvita serve` flags)."""

    model_id: str
    """The name clients use (`GET /v1/models`); requests naming another model get 404."""
    model_aliases: frozenset[str] = frozenset()
    """Other names requests may give the model (the `--model` value as typed, as vLLM
    serves it); answers name it `model_id`."""
    media: MediaPolicy = MediaPolicy()
    max_body_bytes: int = 64 * 2**20
    """Request bodies above this are refused (413) before being parsed."""
    default_max_tokens: int = 256
    """max_tokens of a request that gives none."""
    max_frames: int = 512
    """The most frames a request may ask per video (and the default when it asks none)."""
    max_media: int = 256
    """The most image and video parts a request may have."""
    max_prompt_tokens: int | None = None
    """The most tokens an expanded prompt may have; None: the model's positions."""
    request_timeout_s: float = 600.0
    """From arrival to the last token; later, the request ends with a timeout error."""
    escape_control_tokens: bool = True
    """Typed control tokens (`<|im_start|>`, `<image>`...) stay text; False for trusted
    clients who write them on purpose."""
    api_key: str | None = None
    """When set, /v1 routes need `Authorization: Bearer <api_key>`."""
    retry_after_s: int = 1
    """The Retry-After of a 503."""

    def serves(self, model: object) -> bool:
        """Whether a request's `model` names this server's model."""
        return model == self.model_id or model in self.model_aliases


def create_app(pipeline, worker, settings: ServerSettings) -> FastAPI:
    """The FastAPI application around a loaded Pipeline and its (not yet started) worker; the
    worker starts and stops with the application's lifespan."""
    metrics = ServerMetrics()
    created = int(time.time())
    control_tokens = tuple(pipeline.tokenizer.get_added_vocab())
    max_prompt = settings.max_prompt_tokens or pipeline.config.max_position_embeddings
    longest_token = max(map(len, pipeline.tokenizer.get_vocab()))  # in characters
    stopping = threading.Event()
    """Set when the server begins to shut down (`serve.cli.run_uvicorn`): requests in flight
    end with a 503 at once, inside uvicorn's grace period, instead of being cut off after it."""

    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="longvita", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.stopping = stopping

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        metrics.requests.inc(status=err.status)
        headers = {"Retry-After": str(settings.retry_after_s)} if err.status == 503 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def route_error(request: Request, err: HTTPException) -> JSONResponse:
        """An unknown route (404) or method (405, with its Allow header) as OpenAI's JSON."""
        metrics.requests.inc(status=err.status_code)
        message = f"{request.method} {request.url.path}: {err.detail}"
        body = ApiError(err.status_code, message).body()
        return JSONResponse(body, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        """A failure of the server's own (a bug): logged with its traceback, answered 500."""
        logger.error("%s %s failed", request.method, request.url.path, exc_info=err)
        metrics.requests.inc(status=500)
        body = ApiError(500, f"internal server error: {type(err).__name__}").body()
        return JSONResponse(body, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": settings.model_id,
            "running": worker.running,
            "queued": worker.queued,
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.queue_depth.set(worker.queued)
        metrics.running.set(worker.running)
        metrics.decode_pool_bytes.set(worker.decode_pool_bytes)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_api_key(request, settings)
        positions = pipeline.config.max_position_embeddings
        return responses.model_list_body(
            settings.model_id, created=created, max_model_len=positions
        )

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict:
        """OpenAI's model retrieval (`client.models.retrieve`): the served model's card."""
        check_api_key(request, settings)
        if not settings.serves(model_id):
            raise unknown_model(model_id, settings)
        positions = pipeline.config.max_position_embeddings
        cards = responses.model_list_body(
            settings.model_id, created=created, max_model_len=positions
        )
        return cards["data"][0]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrived = time.monotonic()
        check_api_key(request, settings)
        check_content_type(request)
        body = await read_body(request, settings.max_body_bytes)
        chat = await asyncio.to_thread(  # a large body's parsing would stall every stream
            parse_body, body, control_tokens, settings
        )
        if chat.model is not None and not settings.serves(chat.model):
            raise unknown_model(chat.model, settings)
        check_text_length(chat, max_prompt, longest_token)
        try:
            worker.reserve()
        except ServerBusy as err:
            raise ApiError(503, str(err)) from None
        job = Job(asyncio.get_running_loop(), Path(tempfile.mkdtemp(prefix="longvita-request-")))
        try:
            generation, prepared, prefix, media_names = await asyncio.to_thread(
                prepare, pipeline, chat, job.workdir, settings, max_prompt
            )
            metrics.prompt_tokens.inc(prepared[0].num_tokens)
            deadline = arrived + settings.request_timeout_s
            worker.submit(job, generation, prepared, deadline=deadline, prefix=prefix)
        except BaseException:
            worker.release()
            shutil.rmtree(job.workdir, ignore_errors=True)
            raise
        job.media_names = media_names
        answer = Answer(
            job,
            request,
            chat,
            prepared[0].num_tokens,
            arrived,
            metrics,
            settings,
            stopping=stopping,
        )
        if chat.stream:
            return StreamingResponse(
                answer.events(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return await answer.whole()

    return app


def unknown_model(model_id: object, settings: ServerSettings) -> ApiError:
    return ApiError(
        404,
        f"model {protocol.shown(model_id)} does not exist; this server serves "
        f"{settings.model_id!r}",
        param="model",
        code="model_not_found",
    )


def check_api_key(request: Request, settings: ServerSettings) -> None:
    if settings.api_key is None:
        return
    scheme, _, key = request.headers.get("authorization", "").strip().partition(" ")
    is_bearer = scheme.lower() == "bearer"  # the scheme is case-insensitive (RFC 7235)
    if not (is_bearer and hmac.compare_digest(key.strip().encode(), settings.api_key.encode())):
        raise ApiError(
            401,
            "a valid API key is needed: send Authorization: Bearer <key>",
            code="invalid_api_key",
        )


def check_text_length(chat: ChatRequest, max_prompt: int, longest_token: int) -> None:
    """400 for messages whose text alone must pass `max_prompt` tokens: no token spans more
    than `longest_token` characters, so that many characters make at least chars / longest
    tokens. Decided from lengths, where tokenizing 30 MB of text first took minutes and GBs."""
    chars = sum(len(message["content"]) for message in chat.messages)
    if chars > max_prompt * longest_token:
        raise ApiError(
            400,
            f"the messages hold {chars:,} characters, at least {chars // longest_token:,} "
            f"tokens (none spans more than {longest_token} characters); this server accepts "
            f"at most {max_prompt:,}",
            code="context_length_exceeded",
        )


def check_content_type(request: Request) -> None:
    """415 for a body declared as anything but JSON (see `JSON_TYPES`)."""
    declared = request.headers.get("content-type")
    if declared is None:
        return
    media_type = declared.partition(";")[0].strip().lower()
    if media_type in JSON_TYPES or (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        return
    raise ApiError(
        415,
        f"the request body is declared as {media_type!r}; send JSON with "
        "Content-Type: application/json",
    )


def parse_body(body: bytes, control_tokens: tuple[str, ...], settings: ServerSettings):
    """The ChatRequest of a request body, or an ApiError(400) naming what is wrong."""
    return protocol.parse_chat_request(
        json_body(body),
        control_tokens=control_tokens,
        escape=settings.escape_control_tokens,
        max_media=settings.max_media,
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past `limit` bytes, from Content-Length or while reading."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413,
            f"the request body has {int(declared):,} bytes; this server accepts at most {limit:,}",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over this server's limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def json_body(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:  # also: too deep, an int of > 4,300 digits
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None


def prepare(pipeline, chat: ChatRequest, workdir: Path, settings: ServerSettings, max_prompt):
    """Fetch the media and plan the prompt (headers only): (GenerationRequest, prepared, its
    use of the prefix cache: media files hashed here, off the event loop, the media parts'
    names by file path: `user_error`'s) or an ApiError saying what to fix."""
    images = [_fetch(fetch_image, part, settings.media, workdir) for part in chat.images]
    videos = [_fetch(fetch_video, part, settings.media, workdir) for part in chat.videos]
    fetched = zip([*images, *videos], [*chat.images, *chat.videos], strict=True)
    media_names = {str(path): part.param for path, part in fetched}
    options = chat.generation_options(default_max_tokens=settings.default_max_tokens)
    frames = options.setdefault("max_frames", settings.max_frames)
    if frames > settings.max_frames:
        raise ApiError(
            400,
            f"max_frames={frames}: this server takes at most "
            f"{settings.max_frames} frames per video",
            param="max_frames",
        )
    try:
        request = GenerationRequest.create(chat.messages, images, videos, stop=chat.stop, **options)
        # a max_tokens the client chose is refused when it does not fit (a default is trimmed)
        prepared = pipeline.prepare(request, trim=chat.max_tokens is None)
    except PositionsError as err:
        raise positions_error(err, chat.max_tokens) from None
    except PixelLimitError as err:  # a video's frames, checked from its header when planned
        named = user_error(err, media_names)  # 413, as an image over it (`media.fetch_image`)
        message = named.message.split("; ")[0].replace("the limit", "this server's limit")
        raise ApiError(413, message, param=named.param) from None
    except (PromptError, MediaError, ValueError) as err:
        raise user_error(err, media_names) from None
    prompt = prepared[0]
    if prompt.num_tokens > max_prompt:
        prompt.tiles.close()
        raise ApiError(
            400,
            f"the prompt has {prompt.num_tokens:,} tokens; this server accepts "
            f"at most {max_prompt:,} (send {prompt.how_to_shorten})",
            code="context_length_exceeded",
        )
    return request, prepared, pipeline.prompt_prefix(prompt), media_names


def positions_error(err: PositionsError, max_tokens: int | None) -> ApiError:
    """The 400 of a prompt, or a prompt and the client's max_tokens, past the model's
    positions."""
    if err.prompt_tokens >= err.positions:
        return ApiError(400, str(err), code="context_length_exceeded")
    return ApiError(
        400,
        f"max_tokens={max_tokens:,} does not fit: the prompt has {err.prompt_tokens:,} tokens "
        f"and the model {err.positions:,} positions (prompt + new tokens); ask at most "
        f"{err.positions - err.prompt_tokens:,}",
        param="max_tokens",
        code="context_length_exceeded",
    )


def user_error(err: Exception, media_names: dict[str, str]) -> ApiError:
    """The 400 of an error that is the request's fault, the files its media were fetched to
    named by their parts (`messages[0].content[1]`, also the `param` when one is named)."""
    message, param = str(err), None
    for path, name in media_names.items():
        if path in message:
            message, param = message.replace(path, name), name
    return ApiError(400, message, param=param)


def _fetch(fetch, part: protocol.MediaPart, policy: MediaPolicy, workdir: Path) -> Path:
    try:
        return fetch(part.url, policy, workdir)
    except MediaRefused as err:
        raise protocol.media_api_error(err, part) from None


class Answer:
    """The response to one chat request, from its job's events: streamed or whole."""

    def __init__(
        self,
        job: Job,
        request: Request,
        chat: ChatRequest,
        prompt_tokens: int,
        arrived: float,
        metrics: ServerMetrics,
        settings: ServerSettings,
        stopping: threading.Event | None = None,
    ) -> None:
        self.job = job
        self.request = request
        self.chat = chat
        self.prompt_tokens = prompt_tokens
        self.arrived = arrived
        self.metrics = metrics
        self.settings = settings
        self.stopping = stopping or threading.Event()
        self.deadline = arrived + settings.request_timeout_s
        self.completion_tokens = 0
        self.id = responses.new_completion_id()
        self.created = int(time.time())
        self._held: Event | None = None
        """The final event, taken while merging text events, for the next call."""

    async def next_events(self) -> AsyncIterator[Event]:
        """The job's events until its last; cancels the job if the client goes away."""
        first, checked = True, time.monotonic()
        try:
            while True:
                event = await self._next_event()
                if event is None or time.monotonic() - checked >= DISCONNECT_POLL_S:
                    # also while tokens flow: a non-streamed answer writes nothing until its
                    # end, so only asking tells that its client has gone
                    checked = time.monotonic()
                    if await self.request.is_disconnected():
                        self.job.cancel()
                        return
                    event = self._overdue() or event
                if event is None:
                    continue
                if event.tokens:
                    now = time.monotonic()
                    if first:
                        self.metrics.time_to_first_token.observe(now - self.arrived)
                        first = False
                    self.completion_tokens += event.tokens
                    self.metrics.record_tokens(event.tokens, now)
                yield event
                if event.finish is not None:
                    self.metrics.request_latency.observe(time.monotonic() - self.arrived)
                    return
        finally:
            if not self.job.finished:
                self.job.cancel()

    def _overdue(self) -> Event | None:
        """The final event of a request the handler ends itself: past its deadline while the
        worker cannot stop it (a context-parallel group runs a request to its end on every
        rank; a queued one waits its turn), or in flight when the server shuts down. Its job
        is cancelled (its tokens, if any still come, are dropped)."""
        if self.stopping.is_set():
            reason = "cancelled"
        elif time.monotonic() > self.deadline:
            reason = "timeout"
        else:
            return None
        self.job.cancel()
        return Event(finish=reason)

    async def _next_event(self) -> Event | None:
        """The job's next event: at once when one is queued (under load the next one is
        there), else when it comes; None after DISCONNECT_POLL_S without one. Text events
        queued behind it are merged into it (`Event.merged`): a loop that falls behind the
        model sends a stream's tokens in fewer, larger chunks instead of falling further
        behind, as vLLM's output collector does."""
        if self._held is not None:
            event, self._held = self._held, None
            return event
        events = self.job.events
        if events.empty():
            try:
                async with asyncio.timeout(DISCONNECT_POLL_S):
                    return await events.get()
            except TimeoutError:
                return None
        event = events.get_nowait()
        while event.finish is None and not events.empty():
            following = events.get_nowait()
            if following.finish is not None:
                self._held = following  # the end goes out after the text
                break
            event = event.merged(following)
        return event

    async def events(self) -> AsyncIterator[bytes]:
        """Server-sent events: the role, the text as it comes, the finish reason (or an error
        event), the usage when asked, [DONE]."""
        envelope = {"id": self.id, "created": self.created, "model": self.settings.model_id}
        yield responses.sse_event(
            responses.chunk_body(
                **envelope, delta={"role": "assistant", "content": ""}, finish_reason=None
            )
        )
        content = responses.ContentEvents(**envelope)
        # the end goes out in one write (finish or error, usage, [DONE]); the status is counted
        # however the stream ends, a client leaving included
        status, end = CLIENT_CLOSED, []
        try:
            async for event in self.next_events():
                if event.finish is None:
                    if event.text:
                        yield content.event(event.text)
                else:  # the last event
                    status, end = self.stream_end(event, envelope)
        finally:
            self.metrics.requests.inc(status=status)
        yield b"".join([*end, responses.sse_event("[DONE]")])

    def stream_end(self, event: Event, envelope: dict) -> tuple[int, list[bytes]]:
        """The status and the closing events of a stream whose job sent its final event."""
        error = self.error(event)
        if error is not None:
            return error.status, [responses.sse_event(error.body())]
        end = [
            responses.sse_event(
                responses.chunk_body(
                    **envelope, delta={}, finish_reason=responses.finish_reason_of(event.finish)
                )
            )
        ]
        if self.chat.include_usage:
            end.append(
                responses.sse_event(
                    responses.usage_chunk_body(
                        **envelope,
                        prompt_tokens=self.prompt_tokens,
                        completion_tokens=self.completion_tokens,
                        cached_tokens=event.cached_tokens,
                    )
                )
            )
        return 200, end

    async def whole(self) -> JSONResponse:
        text, finish = [], None
        async for event in self.next_events():
            text.append(event.text)
            finish = event
        if finish is None or finish.finish is None:  # the client went away
            self.metrics.requests.inc(status=CLIENT_CLOSED)
            return JSONResponse({}, status_code=CLIENT_CLOSED)
        error = self.error(finish)
        if error is not None:
            raise error
        self.metrics.requests.inc(status=200)
        return JSONResponse(
            responses.completion_body(
                id=self.id,
                created=self.created,
                model=self.settings.model_id,
                text="".join(text),
                finish_reason=responses.finish_reason_of(finish.finish),
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                cached_tokens=finish.cached_tokens,
            )
        )

    def error(self, event: Event) -> ApiError | None:
        """The ApiError of a final event that is not a normal end, else None."""
        if event.finish == "timeout":
            return ApiError(
                504,
                f"the request took longer than this server's limit of "
                f"{self.settings.request_timeout_s:g} s",
                code="timeout",
            )
        if event.finish == "cancelled":
            return ApiError(503, "the request was cancelled (the server is shutting down)")
        if event.finish == "error":
            if isinstance(event.error, USER_ERRORS):
                return user_error(event.error, self.job.media_names)
            logger.error("request %s failed: %r", self.id, event.error)
            return ApiError(500, f"generation failed: {event.error}")
        return None
