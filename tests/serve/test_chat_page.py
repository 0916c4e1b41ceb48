"""The chat page (`longvita/serve/static/index.html`) in a real headless Chromium.

A stand-in server (stdlib `http.server`, in a thread on 127.0.0.1) serves the page at "/",
`GET /v1/models` and a `POST /v1/chat/completions` that streams OpenAI-style SSE chunks or
answers with OpenAI's error JSON; it records every request body. Chromium is driven through the
DevTools protocol over a small websocket client written here (no selenium, no playwright, no
new dependency): typing is real key input, the attachment goes through the file input.

Skipped where Debian's chromium is absent (`apt-get install chromium`; or set LONGVITA_CHROMIUM
to a Chromium binary). With LONGVITA_WRITE_SCREENSHOT=1 the first test writes
docs/images/chat_page.png.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "longvita/serve/static/index.html"
SCREENSHOT = REPO / "docs/images/chat_page.png"
MODEL_ID = "long-vita-stub"
PIECES = ["Hello", " from", " the", " stub"]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
    "--window-size=960,640",
]
# A 1x1 PNG: the page only reads it as a data URL.
TINY_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def chromium_path() -> str | None:
    path = os.environ.get("LONGVITA_CHROMIUM") or shutil.which("chromium")
    return path if path and os.access(path, os.X_OK) else None


# --- the stand-in server --------------------------------------------------------------------


class Stub:
    """What the stand-in server answers, and the chat request bodies it received."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.error: tuple[int, str] | None = None  # (status, message): answer with an error
        self.hold = threading.Event()  # cleared: stream the first piece, wait for it to be set
        self.hold.set()
        self.url = ""  # set once the server listens

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def reply(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/":
                    self.reply(200, "text/html; charset=utf-8", PAGE.read_bytes())
                elif self.path == "/v1/models":
                    models = {"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]}
                    self.reply(200, "application/json", json.dumps(models).encode())
                else:
                    self.reply(404, "text/plain", b"not found")

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                if stub.error:
                    status, message = stub.error
                    error = {"message": message, "type": "invalid_request_error", "code": None}
                    self.reply(status, "application/json", json.dumps({"error": error}).encode())
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()  # HTTP/1.0: the body ends when the connection closes
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # Stop pressed
                    self.stream()

            def stream(self) -> None:
                for i, piece in enumerate(PIECES):
                    delta = (
                        {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
                    )
                    self.event({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                    if i == 0:
                        stub.hold.wait(timeout=10)
                self.event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                usage = {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}
                self.event({"choices": [], "usage": usage})
                self.wfile.write(b"data: [DONE]\n\n")

            def event(self, chunk: dict) -> None:
                chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", **chunk}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

        return Handler


# --- a tiny DevTools protocol client ----------------------------------------------------------


class DevTools:
    """One page of Chromium driven over its DevTools websocket (RFC 6455 text frames)."""

    def __init__(self, ws_url: str) -> None:
        host_port, path = ws_url.removeprefix("ws://").split("/", 1)
        host, port = host_port.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=20)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            response += self.sock.recv(1)
        assert response.startswith(b"HTTP/1.1 101"), response
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        """Send one command; return its result (events arriving meanwhile are dropped)."""
        self.next_id += 1
        self.send_frame(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.read_message())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0):
        """Poll a JS expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                log = self.evaluate("document.body.innerText")
                raise AssertionError(f"timed out waiting for {expression!r}; page text:\n{log}")
            time.sleep(0.03)
        return value

    def type_text(self, selector: str, text: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def press_enter(self) -> None:
        key = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13}
        self.call("Input.dispatchKeyEvent", type="keyDown", text="\r", **key)
        self.call("Input.dispatchKeyEvent", type="keyUp", **key)

    def send_frame(self, text: str) -> None:
        payload = text.encode()
        n = len(payload)
        header = bytes([0x81])  # FIN, text
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def read_message(self) -> str:
        data = b""
        while True:
            first, second = self.read_exactly(2)
            n = second & 0x7F
            if n == 126:
                n = struct.unpack(">H", self.read_exactly(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self.read_exactly(8))[0]
            data += self.read_exactly(n)  # the server does not mask its frames
            if first & 0x0F == 0x8:
                raise ConnectionError("Chromium closed the DevTools connection")
            if first & 0x80:  # FIN: the last fragment
                return data.decode()

    def read_exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ConnectionError("Chromium closed the DevTools connection")
            buf += chunk
        return bytes(buf)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stub():
    stub = Stub()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), stub.handler())
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stub.url = f"http://127.0.0.1:{server.server_address[1]}/"
    yield stub
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = chromium_path()
    if chromium is None:
        pytest.skip("chromium not found (apt-get install chromium, or set LONGVITA_CHROMIUM)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    log = (profile.parent / "chromium.log").open("wb")
    process = subprocess.Popen(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=log,
        stderr=log,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 20
        while not (port_file.is_file() and port_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start; see {log.name}")
            time.sleep(0.05)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        devtools = DevTools(pages[0]["webSocketDebuggerUrl"])
        yield devtools
        devtools.sock.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture
def page(browser, stub):
    """The chat page freshly loaded, the stub reset to stream its answer."""
    stub.requests.clear()
    stub.error = None
    stub.hold.set()
    browser.call("Page.navigate", url=stub.url)
    browser.wait_for(f"document.getElementById('model')?.textContent === {json.dumps(MODEL_ID)}")
    return browser


ANSWERS = "[...document.querySelectorAll('.msg.assistant')].map(e => e.textContent)"
IDLE = "!document.getElementById('send').disabled && document.getElementById('stop').disabled"


def attach(page: DevTools, path: Path) -> None:
    """Choose `path` in the page's file input, as a user picking it would."""
    document = page.call("DOM.getDocument")
    node = page.call("DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#file")
    page.call("DOM.setFileInputFiles", files=[str(path)], nodeId=node["nodeId"])
    name = json.dumps(path.name)
    page.wait_for(f"document.getElementById('attachment-name').textContent === {name}")


# --- tests ------------------------------------------------------------------------------------


def test_streams_the_answer_and_sends_openai_requests(page, stub, tmp_path):
    stub.hold.clear()  # the stub sends "Hello", then waits: the page must show it already
    page.type_text("#prompt", "What is in the picture?")
    page.press_enter()
    assert page.wait_for(f"{ANSWERS}[0] === 'Hello'")
    assert page.evaluate("!document.getElementById('stop').disabled")
    stub.hold.set()
    page.wait_for(f"{ANSWERS}[0] === 'Hello from the stub' && {IDLE}")
    assert page.evaluate("document.getElementById('prompt').value") == ""

    (request,) = stub.requests
    assert request["model"] == MODEL_ID
    assert request["stream"] is True
    assert request["max_tokens"] == 64 and request["temperature"] == 0
    assert request["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "What is in the picture?"}]}
    ]

    page.type_text("#prompt", "And the colours?")
    page.press_enter()
    page.wait_for(f"{ANSWERS}.length === 2 && {ANSWERS}[1] === 'Hello from the stub' && {IDLE}")
    assert stub.requests[1]["messages"] == [
        {"role": "user", "content": "What is in the picture?"},
        {"role": "assistant", "content": "Hello from the stub"},
        {"role": "user", "content": [{"type": "text", "text": "And the colours?"}]},
    ]
    assert "prompt + 4 answer tokens" in page.evaluate("document.getElementById('log').innerText")

    if os.environ.get("LONGVITA_WRITE_SCREENSHOT") == "1":
        video = tmp_path / "street.mp4"
        video.write_bytes(b"not decoded by the page")
        attach(page, video)
        page.type_text("#prompt", "Now describe this video.")
        png = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(png)


def test_attached_image_is_sent_before_the_text(page, stub, tmp_path):
    image = tmp_path / "dot.png"
    image.write_bytes(TINY_PNG)
    attach(page, image)
    page.type_text("#prompt", "Describe it.")
    page.press_enter()
    page.wait_for(f"{ANSWERS}[0] === 'Hello from the stub' && {IDLE}")

    (message,) = stub.requests[0]["messages"]
    data_url = "data:image/png;base64," + base64.b64encode(TINY_PNG).decode()
    assert message["content"] == [
        {"type": "image_url", "image_url": {"url": data_url}},
        {"type": "text", "text": "Describe it."},
    ]
    assert page.evaluate("document.getElementById('attachment').hidden") is True


def test_error_response_is_shown_and_the_page_stays_usable(page, stub):
    stub.error = (400, "max_tokens must be at least 1, got 0")
    page.type_text("#prompt", "Hi")
    page.press_enter()
    error = "document.getElementById('error')"
    shown = page.wait_for(f"!{error}.hidden && {error}.textContent")
    assert shown == "max_tokens must be at least 1, got 0"
    page.wait_for(IDLE)
    assert page.evaluate("document.getElementById('prompt').value") == "Hi"  # given back
    assert page.evaluate("document.querySelectorAll('.msg').length") == 0

    stub.error = None
    page.press_enter()  # the focus is back in the textarea
    page.wait_for(f"{ANSWERS}[0] === 'Hello from the stub' && {IDLE}")
    assert page.evaluate("document.getElementById('error').hidden") is True


def test_stop_keeps_the_partial_answer_and_new_chat_clears(page, stub):
    stub.hold.clear()
    page.type_text("#prompt", "Tell me a long story.")
    page.press_enter()
    page.wait_for(f"{ANSWERS}[0] === 'Hello'")
    page.evaluate("document.getElementById('stop').click()")
    page.wait_for(IDLE)
    stub.hold.set()
    assert page.evaluate(ANSWERS) == ["Hello"]
    assert "stopped" in page.evaluate("document.getElementById('log').innerText")

    page.type_text("#prompt", "Go on.")
    page.press_enter()
    page.wait_for(f"{ANSWERS}.length === 2 && {IDLE}")
    assert stub.requests[1]["messages"][:2] == [
        {"role": "user", "content": "Tell me a long story."},
        {"role": "assistant", "content": "Hello"},
    ]

    page.evaluate("document.getElementById('new-chat').click()")
    assert page.evaluate("document.querySelectorAll('.msg').length") == 0
    page.type_text("#prompt", "Hi again.")
    page.press_enter()
    page.wait_for(f"{ANSWERS}.length === 1 && {IDLE}")
    assert len(stub.requests[2]["messages"]) == 1
