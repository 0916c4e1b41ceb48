"""A lean load generator for the serving benchmark: streamed chat completions over raw HTTP/1.1.

The benchmark's clients share the server's cores (two on the machine of record), so the CPU they
spend per token is taken from the server they measure. openai's client builds pydantic objects
for every chunk: at 8 clients its process spent 1.4 CPU-seconds on 8,192 streamed tokens
(`results/serve.md`), 170 us a token, more than the server's event loop spends on it. A load
generator should cost little, as vLLM's `benchmark_serving` does (aiohttp, one `json.loads` per
event, no objects); this one goes further down, to asyncio streams: one kept-alive connection per
client, the request written in one piece, the chunked body and its server-sent events parsed here.

It reads only what `longvita serve` answers (HTTP/1.1, `Transfer-Encoding: chunked`, SSE) and
raises `ProtocolError` on anything else; a non-200 answer raises with its body. The tests check
the server with the real `openai` client; this module is for measuring it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


class ProtocolError(RuntimeError):
    """The server answered something this client does not read, or an error status."""


@dataclass
class StreamResult:
    first_content: float | None
    """perf_counter() when the first chunk with text arrived (None: no text came)."""
    usage: dict | None
    """The usage chunk's `usage` (needs stream_options.include_usage)."""


class ChatConnection:
    """One client's connection to `base_url` (http://host:port/v1), opened on first use and
    reopened when the server closes it between requests."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"an http://host:port/... URL is needed, got {base_url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.path = parts.path.rstrip("/") + "/chat/completions"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
            self._reader = self._writer = None

    async def stream(self, body: dict) -> StreamResult:
        """POST `body` (stream=True) and read its events to `[DONE]`."""
        payload = json.dumps(body).encode()
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode()
        reused = self._writer is not None
        try:
            status, headers = await self._send(head + payload)
        except (asyncio.IncompleteReadError, ConnectionError):
            if not reused:
                raise
            await self.close()  # the server closed the idle connection: once more, afresh
            status, headers = await self._send(head + payload)
        if status != 200:
            text = await self._read_body(headers)
            await self.close()
            raise ProtocolError(f"HTTP {status}: {text[:500]!r}")
        if headers.get("transfer-encoding") != "chunked":
            raise ProtocolError(f"expected a chunked event stream, got headers {headers}")
        result = StreamResult(None, None)
        pending = b""
        async for data in self._chunks():
            pending += data
            *events, pending = pending.split(b"\n\n")
            for event in events:
                self._take(event, result)
        if headers.get("connection") == "close":
            await self.close()
        return result

    async def _send(self, request: bytes) -> tuple[int, dict[str, str]]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._writer.write(request)
        return await self._read_head()

    @staticmethod
    def _take(event: bytes, result: StreamResult) -> None:
        """One server-sent event: note the first text and the usage."""
        if not event.startswith(b"data: ") or event == b"data: [DONE]":
            return
        chunk = json.loads(event[6:])
        if result.first_content is None:
            choices = chunk.get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                result.first_content = time.perf_counter()
        if chunk.get("usage"):
            result.usage = chunk["usage"]

    async def _read_head(self) -> tuple[int, dict[str, str]]:
        raw = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw.decode("latin-1").split("\r\n")
        try:
            status = int(status_line.split()[1])
        except (IndexError, ValueError):
            raise ProtocolError(f"not an HTTP status line: {status_line!r}") from None
        headers = {}
        for line in lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip().lower()
        return status, headers

    async def _chunks(self):
        """The data of each chunk of a chunked body, to its last (empty) chunk."""
        while True:
            size_line = await self._reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                await self._reader.readuntil(b"\r\n")  # no trailers from uvicorn
                return
            data = await self._reader.readexactly(size + 2)
            yield data[:-2]

    async def _read_body(self, headers: dict[str, str]) -> bytes:
        if headers.get("transfer-encoding") == "chunked":
            return b"".join([data async for data in self._chunks()])
        return await self._reader.readexactly(int(headers.get("content-length", "0")))
