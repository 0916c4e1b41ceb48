"""The serving benchmark's clients: closed-loop streaming clients in a process of their own.

Each of N clients sends its requests back to back, all clients at once (or from staggered start
times), every request a greedy stream of exactly `max_tokens` tokens (vLLM's `ignore_eos`) with
its usage chunk; per request the time to first token (sending to the first chunk with text),
tokens, start and end; per level the aggregate tokens/s and TTFT percentiles (`summarize`). The
clients run in their own process (`ClientProcess`), as real clients do: their HTTP and SSE
parsing take that process's GIL, not the server's. Two load generators:
`sse_client.ChatConnection` ("raw", the default: it costs the shared cores little) and openai's
`AsyncOpenAI` ("openai").
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import openai
from sse_client import ChatConnection


def request_body(model_id: str, messages: list, max_tokens: int) -> dict:
    """A streamed, greedy request that generates `max_tokens` tokens, with its usage chunk."""
    return {
        "model": model_id,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }


def record(start: float, first: float | None, usage: dict) -> dict:
    end = time.perf_counter()
    return {
        "start": start,
        "end": end,
        "ttft": (first if first is not None else end) - start,
        "completion_tokens": usage["completion_tokens"],
        "prompt_tokens": usage["prompt_tokens"],
    }


async def openai_request(client, body: dict) -> dict:
    """Stream one chat completion with openai's client: TTFT, tokens, start and end times."""
    start = time.perf_counter()
    first, usage = None, None
    ignore_eos = {"ignore_eos": body["ignore_eos"]}
    rest = {k: v for k, v in body.items() if k != "ignore_eos"}
    async for chunk in await client.chat.completions.create(**rest, extra_body=ignore_eos):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    return record(start, first, usage)


async def raw_request(connection: ChatConnection, body: dict) -> dict:
    """The same over `sse_client` (this benchmark's default load generator)."""
    start = time.perf_counter()
    result = await connection.stream(body)
    return record(start, result.first_content, result.usage)


async def run_clients(
    url: str,
    model_id: str,
    work: list[list],
    max_tokens: int,
    kind: str,
    start_offsets: list[float] | None = None,
):
    """Every client sends its requests back to back, all clients at once, or client i from
    `start_offsets[i]` seconds after the start; `kind`: "raw" (a connection each,
    `sse_client`) or "openai" (one `AsyncOpenAI` for all)."""
    shared = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)
    offsets = start_offsets or [0.0] * len(work)

    async def closed_loop(requests: list, offset: float) -> list[dict]:
        bodies = [request_body(model_id, messages, max_tokens) for messages in requests]
        await asyncio.sleep(offset)
        if kind == "openai":
            return [await openai_request(shared, body) for body in bodies]
        connection = ChatConnection(url)
        try:
            return [await raw_request(connection, body) for body in bodies]
        finally:
            await connection.close()

    started = time.perf_counter()
    per_client = await asyncio.gather(*map(closed_loop, work, offsets))
    wall = time.perf_counter() - started
    await shared.close()
    records = [r for client_records in per_client for r in client_records]
    short = [r["completion_tokens"] for r in records if r["completion_tokens"] != max_tokens]
    if short:  # ignore_eos: every answer has max_tokens tokens, else the figures mean nothing
        raise RuntimeError(f"{len(short)} answers had {short[:5]} tokens, not {max_tokens}")
    return summarize(records, wall)


def clients_level(
    url: str, model_id: str, work: list[list], max_tokens: int, kind: str, start_offsets=None
) -> dict:
    """One level's clients to the end (what the client process runs), with the CPU seconds
    that process spent on them."""
    cpu_before = time.process_time()
    result = asyncio.run(run_clients(url, model_id, work, max_tokens, kind, start_offsets))
    result["client_process_cpu_s"] = round(time.process_time() - cpu_before, 2)
    return result


class ClientProcess:
    """The clients' own process: their HTTP and SSE parsing take the GIL of that process, not
    the server's, as real clients do. kind: the load generator, "raw" or "openai"."""

    def __init__(self, kind: str = "raw") -> None:
        self.kind = kind

    def __enter__(self) -> ClientProcess:
        context = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(max_workers=1, mp_context=context)
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown()

    def run(
        self,
        url: str,
        model_id: str,
        work: list[list],
        max_tokens: int,
        start_offsets: list[float] | None = None,
    ) -> dict:
        """`work`'s requests to the end (`run_clients`); start_offsets: when each client starts,
        in seconds after the first (None: all at once)."""
        job = self.pool.submit(
            clients_level, url, model_id, work, max_tokens, self.kind, start_offsets
        )
        return job.result()


def summarize(records: list[dict], wall: float) -> dict:
    ttft = [r["ttft"] for r in records]
    latency = [r["end"] - r["start"] for r in records]
    tokens = sum(r["completion_tokens"] for r in records)
    return {
        "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
        "ttft_p95_s": round(float(np.percentile(ttft, 95)), 3),
        "latency_p50_s": round(float(np.percentile(latency, 50)), 3),
        "tokens_per_s": round(tokens / wall, 2),
        "requests": len(records),
        "completion_tokens": tokens,
        "prompt_tokens_mean": round(sum(r["prompt_tokens"] for r in records) / len(records), 1),
        "wall_s": round(wall, 2),
    }
