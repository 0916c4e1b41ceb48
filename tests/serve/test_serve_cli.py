"""`longvita serve` as users start it: a process that prints its address, answers the openai
client like the Pipeline, stops on Ctrl-C; under --cp 2, rank 0 serves and drives rank 1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import longvita

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")


def start(*args: str) -> tuple[subprocess.Popen, str]:
    """`longvita serve ... --port 0` in its own process group; (process, base URL)."""
    command = [sys.executable, "-m", "longvita", "serve", "--port", "0", *args]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, text=True
    )
    deadline = time.monotonic() + 180
    line = ""
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        found = re.search(r"on (http://\S+);", line)
        if found:
            return process, found.group(1)
    process.kill()
    raise AssertionError(f"the server did not start: {line!r} {process.stderr.read()}")


def stop(process: subprocess.Popen) -> tuple[int, str]:
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    return process.returncode, err


def ask(url: str, model: str, content: str = "Describe a quiet morning.") -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=6
    )
    return answer.choices[0].message.content


def test_serve_answers_like_the_pipeline_and_stops_on_ctrl_c(tiny_checkpoint):
    process, url = start("--model", str(tiny_checkpoint), "--served-model-name", "tiny")
    try:
        got = ask(url, "tiny")
    finally:
        code, err = stop(process)
    expected = (
        longvita.load(tiny_checkpoint).generate("Describe a quiet morning.", max_new_tokens=6).text
    )
    assert got == expected
    assert code in (0, 130) and "Traceback" not in err, err


def test_serve_keeps_its_kv_caches_in_the_dtype_asked(tiny_checkpoint):
    process, url = start(
        "--model", str(tiny_checkpoint), "--served-model-name", "tiny", "--kv-cache-dtype", "int8"
    )
    try:
        got = ask(url, "tiny")
    finally:
        code, err = stop(process)
    pipe = longvita.load(tiny_checkpoint, kv_cache_dtype="int8")
    assert got == pipe.generate("Describe a quiet morning.", max_new_tokens=6).text
    assert code in (0, 130) and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kv-cache-dtype", "fp4"], "invalid choice: 'fp4'"),
        (["--port", "-1"], "--port must be 0-65535"),
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--max-queue", "-1"], "--max-queue must be >= 0"),
        (["--max-media", "0"], "--max-media must be >= 1"),
        (["--allowed-local-media-path", "/no/such/dir"], "is not a directory"),
        (["--prefix-cache-gib", "-1"], "--prefix-cache-gib must be >= 0"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--decode-pool-tokens", "-1"], "--decode-pool-tokens must be >= 0"),
    ],
)
def test_bad_flags_are_one_line_errors(tiny_checkpoint, flags, message):
    done = subprocess.run(
        [sys.executable, "-m", "longvita", "serve", "--model", str(tiny_checkpoint), *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.distributed
def test_context_parallel_serving_answers_like_one_process(tiny_checkpoint):
    process, url = start(
        "--model", str(tiny_checkpoint), "--served-model-name", "tiny", "--cp", "2"
    )
    try:
        first = ask(url, "tiny")
        second = ask(url, "tiny", "Tell me a story.")
    finally:
        code, err = stop(process)
    pipe = longvita.load(tiny_checkpoint)
    assert first == pipe.generate("Describe a quiet morning.", max_new_tokens=6).text
    assert second == pipe.generate("Tell me a story.", max_new_tokens=6).text
    assert code in (0, 130) and "Traceback" not in err, err


def test_threads_go_to_this_process_or_to_each_cp_rank(monkeypatch):
    from longvita.serve.cli import set_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        set_threads(1, cp=1)
        assert torch.get_num_threads() == 1 and "OMP_NUM_THREADS" not in os.environ
        set_threads(3, cp=2)  # read by parallel.launch in the ranks it spawns
        assert os.environ["OMP_NUM_THREADS"] == "3" and torch.get_num_threads() == 1
        set_threads(None, cp=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_accepted_connections_send_small_writes_at_once():
    """Nagle's algorithm off on every connection of the default (asyncio) loop: with it on, a
    stream's second small write waited for the client's delayed ACK, 40 ms a request."""
    import asyncio
    import socket

    from longvita.serve.cli import bind

    async def accepted_nodelay() -> int:
        listen = bind("127.0.0.1", 0)
        accepted: asyncio.Future = asyncio.get_running_loop().create_future()

        class Record(asyncio.Protocol):
            def connection_made(self, transport) -> None:
                sock = transport.get_extra_info("socket")
                accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        server = await asyncio.get_running_loop().create_server(Record, sock=listen)
        _, writer = await asyncio.open_connection(*listen.getsockname()[:2])
        try:
            return await asyncio.wait_for(accepted, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0


def _settings(*flags: str):
    import argparse

    from longvita.assets import resolve_model_dir
    from longvita.serve.cli import add_parser, settings_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", *flags])
    return settings_from_args(args, resolve_model_dir(args.model))


def test_the_served_name_is_the_one_users_type(tiny_checkpoint, monkeypatch):
    """`--model demo` is served as `demo` (the README's client names it so); a directory by its
    own name, however it was written; the --model value as typed is accepted too (vLLM's
    name); --served-model-name replaces both."""
    demo = _settings("--model", "demo")
    assert demo.model_id == "demo" and demo.serves("demo") and not demo.serves("demo_model")
    monkeypatch.chdir(tiny_checkpoint)
    for typed in (".", f"{tiny_checkpoint}/", str(tiny_checkpoint)):
        settings = _settings("--model", typed)
        assert settings.model_id == tiny_checkpoint.name, typed
        assert settings.serves(typed) and settings.serves(tiny_checkpoint.name)
        assert not settings.serves("demo")
    named = _settings("--model", str(tiny_checkpoint), "--served-model-name", "tiny")
    assert named.model_id == "tiny" and not named.serves(str(tiny_checkpoint))


def test_the_demo_answers_the_readme_client():
    process, url = start("--model", "demo")
    try:
        got = ask(url, "demo", "What digit is shown?")
    finally:
        stop(process)
    assert (
        got
        == longvita.load(longvita.DEMO_MODEL)
        .generate("What digit is shown?", max_new_tokens=6)
        .text
    )
