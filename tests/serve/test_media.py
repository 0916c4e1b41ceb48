"""The server's media policy (longvita.serve.media): data URLs, local files under allowed
directories, remote downloads with SSRF checks. Remote tests use a local HTTP server on
127.0.0.1 reached through an injected resolver and address predicate; no other network."""

from __future__ import annotations

import base64
import io
import itertools
import ssl
import struct
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path

import pytest
from PIL import Image

from longvita.processing.video import plan_video
from longvita.serve import media
from longvita.serve.media import (
    MediaPolicy,
    MediaRefused,
    fetch_image,
    fetch_video,
    is_public_address,
    resolve_host,
)
from longvita.testing import make_image, make_video

TEST_HOST = "media.test"  # resolved to 127.0.0.1 by the injected resolver only


def png_bytes(size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature, IHDR and IEND, no pixel data: decoding it fails, its header reads."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def refused(status: int, call, *args) -> str:
    """The message of the MediaRefused `call(*args)` raises, checked to carry `status`."""
    with pytest.raises(MediaRefused) as info:
        call(*args)
    assert info.value.status == status, str(info.value)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- data URLs --------------------------------------------------------------------------------


def test_data_url_image_is_decoded_to_a_file(tmp_path):
    path = fetch_image(data_url(png_bytes((8, 6))), MediaPolicy(), tmp_path)
    assert path.parent == tmp_path and path.suffix == ".png"
    with Image.open(path) as image:
        assert image.size == (8, 6)


def test_data_url_video_is_written_to_the_workdir(tmp_path):
    clip = make_video(tmp_path / "clip.mp4", num_frames=4, fps=2)
    workdir = tmp_path / "request"
    workdir.mkdir()
    path = fetch_video(data_url(clip.read_bytes(), "video/mp4"), MediaPolicy(), workdir)
    assert path.parent == workdir and path.suffix == ".mp4"
    assert path.read_bytes() == clip.read_bytes()
    assert plan_video(path).source.num_frames == 4


def test_data_url_over_the_byte_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("base64 was decoded")

    monkeypatch.setattr(media.base64, "b64decode", no_decoding)
    policy = MediaPolicy(max_data_url_bytes=1000)
    message = refused(413, fetch_image, data_url(bytes(2000)), policy, tmp_path)
    assert "limit of 1,000" in message
    assert list(tmp_path.iterdir()) == []


def test_malformed_data_urls_are_refused(tmp_path):
    policy = MediaPolicy()
    assert "base64" in refused(400, fetch_image, "data:image/png;base64,abc$%^", policy, tmp_path)
    refused(400, fetch_image, "data:image/png;base64,abcde", policy, tmp_path)  # bad padding
    refused(400, fetch_image, "data:image/png,rawbytes", policy, tmp_path)  # not base64
    refused(400, fetch_image, "data:image/png;base64", policy, tmp_path)  # no comma
    refused(400, fetch_image, "data:image/png;base64,", policy, tmp_path)  # empty
    refused(400, fetch_image, data_url(png_bytes(), "text/plain"), policy, tmp_path)
    refused(400, fetch_video, data_url(png_bytes(), "image/png"), policy, tmp_path)


def test_data_url_that_is_not_an_image_is_refused(tmp_path):
    message = refused(400, fetch_image, data_url(b"hello, not a png"), MediaPolicy(), tmp_path)
    assert "not an image" in message and str(tmp_path) not in message


@pytest.mark.parametrize("kind", ["PNG", "JPEG"])
def test_image_whose_data_is_cut_short_is_refused_before_answering(tmp_path, kind):
    """Its header reads (size, format): only decoding finds the missing pixels."""
    buffer = io.BytesIO()
    noise = Image.effect_noise((64, 48), 60).convert("RGB")
    noise.save(buffer, kind)
    cut = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    url = data_url(cut, f"image/{kind.lower()}")
    message = refused(400, fetch_image, url, MediaPolicy(), tmp_path)
    assert "not an image the server can read (" in message
    assert str(tmp_path) not in message


def test_data_url_message_does_not_echo_the_payload(tmp_path):
    url = data_url(b"x" * 3000)
    message = refused(413, fetch_image, url, MediaPolicy(max_data_url_bytes=100), tmp_path)
    assert url[40:80] not in message and len(message) < 300


# --- pixel limit --------------------------------------------------------------------------------


def test_pixel_bomb_is_refused_from_its_header(tmp_path):
    """A 20000x20000 PNG of 45 bytes: 413 (too large), from the header, since the file holds
    no pixel data at all (decoding it would fail with a 400 instead)."""
    bomb = png_header_only(20000, 20000)
    assert len(bomb) < 100
    message = refused(413, fetch_image, data_url(bomb), MediaPolicy(), tmp_path)
    assert "before decoding" in message


def test_image_over_the_policy_pixel_limit_is_refused(tmp_path):
    image = make_image(tmp_path / "a.png", (100, 50))
    policy = MediaPolicy(allowed_local_paths=(str(tmp_path),), max_pixels=4999)
    refused(413, fetch_image, str(image), policy, tmp_path)
    policy = MediaPolicy(allowed_local_paths=(str(tmp_path),), max_pixels=5000)
    assert fetch_image(str(image), policy, tmp_path) == image.resolve()


# --- local files ----------------------------------------------------------------------------------


@pytest.fixture
def local(tmp_path) -> dict[str, Path]:
    """An allowed directory with an image, a video and a frame directory, and an outside one."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "frames").mkdir(parents=True)
    outside.mkdir()
    for k in range(3):
        make_image(allowed / "frames" / f"{k}.png", (32, 32), seed=k)
    return {
        "allowed": allowed,
        "outside": outside,
        "image": make_image(allowed / "a.png", (40, 30)),
        "video": make_video(allowed / "clip.mp4", num_frames=4, fps=2),
        "frames": allowed / "frames",
        "secret": make_image(outside / "secret.png", (40, 30)),
        "workdir": tmp_path,
    }


def allow(local) -> MediaPolicy:
    return MediaPolicy(allowed_local_paths=(str(local["allowed"]),))


def test_files_inside_the_allowed_directory_are_accepted(local):
    policy, workdir = allow(local), local["workdir"]
    assert fetch_image(str(local["image"]), policy, workdir) == local["image"]
    assert fetch_image(local["image"].as_uri(), policy, workdir) == local["image"]
    assert fetch_video(str(local["video"]), policy, workdir) == local["video"]
    assert fetch_video(local["video"].as_uri(), policy, workdir) == local["video"]
    assert fetch_video(str(local["frames"]), policy, workdir) == local["frames"]
    assert fetch_image(f"file://localhost{local['image']}", policy, workdir) == local["image"]


def test_file_url_percent_escapes_are_decoded(local):
    spaced = make_image(local["allowed"] / "a b.png", (8, 8))
    assert fetch_image(spaced.as_uri(), allow(local), local["workdir"]) == spaced


def test_etc_passwd_is_refused(local):
    message = refused(403, fetch_image, "file:///etc/passwd", allow(local), local["workdir"])
    assert "--allowed-local-media-path" in message
    assert str(local["allowed"]) not in message  # server directories are not revealed
    refused(403, fetch_video, "/etc/passwd", allow(local), local["workdir"])


def test_dotdot_escape_is_refused(local):
    escape = f"{local['allowed']}/../outside/secret.png"
    refused(403, fetch_image, escape, allow(local), local["workdir"])
    refused(403, fetch_image, f"file://{escape}", allow(local), local["workdir"])
    # a sibling whose name starts with the allowed directory's name is outside too
    sibling = local["workdir"] / "allowed-not"
    sibling.mkdir()
    image = make_image(sibling / "a.png", (8, 8))
    refused(403, fetch_image, str(image), allow(local), local["workdir"])


def test_symlink_escape_is_refused(local):
    link = local["allowed"] / "link.png"
    link.symlink_to(local["secret"])
    refused(403, fetch_image, str(link), allow(local), local["workdir"])
    dir_link = local["allowed"] / "dir-link"
    dir_link.symlink_to(local["outside"], target_is_directory=True)
    refused(403, fetch_image, f"{dir_link}/secret.png", allow(local), local["workdir"])
    refused(403, fetch_video, str(dir_link), allow(local), local["workdir"])


def test_frame_directory_with_a_frame_outside_is_refused(local):
    (local["frames"] / "9.png").symlink_to(local["secret"])
    message = refused(403, fetch_video, str(local["frames"]), allow(local), local["workdir"])
    assert "9.png" in message and str(local["outside"]) not in message


def test_missing_file_inside_the_allowed_directory_is_a_400(local):
    missing = local["allowed"] / "missing.png"
    assert "no such file" in refused(400, fetch_image, str(missing), allow(local), local["workdir"])
    refused(400, fetch_video, str(missing), allow(local), local["workdir"])
    # outside, a missing file and an existing one get the same 403: no existence oracle
    refused(403, fetch_image, str(local["outside"] / "missing.png"), allow(local), local["workdir"])
    # a directory is not an image
    refused(400, fetch_image, str(local["frames"]), allow(local), local["workdir"])


def test_no_allowed_directory_refuses_every_local_path(local):
    policy, workdir = MediaPolicy(), local["workdir"]
    for url in (str(local["image"]), local["image"].as_uri(), "file:///etc/passwd"):
        assert "--allowed-local-media-path" in refused(403, fetch_image, url, policy, workdir)
    refused(403, fetch_video, str(local["video"]), policy, workdir)
    refused(403, fetch_video, str(local["frames"]), policy, workdir)


def test_relative_paths_and_remote_file_urls_are_refused(local):
    policy, workdir = allow(local), local["workdir"]
    assert "relative" in refused(400, fetch_image, "a.png", policy, workdir)
    refused(400, fetch_image, "../allowed/a.png", policy, workdir)
    refused(400, fetch_image, f"file://otherhost{local['image']}", policy, workdir)
    refused(400, fetch_image, "file:a.png", policy, workdir)


def test_policy_checks_its_fields(tmp_path):
    with pytest.raises(ValueError, match="allowed_local_paths"):
        MediaPolicy(allowed_local_paths=(str(tmp_path / "missing"),))
    with pytest.raises(ValueError, match="single path"):
        MediaPolicy(allowed_local_paths=str(tmp_path))
    with pytest.raises(ValueError, match="max_download_bytes"):
        MediaPolicy(max_download_bytes=0)
    with pytest.raises(ValueError, match="max_redirects"):
        MediaPolicy(max_redirects=-1)
    with pytest.raises(ValueError, match="download_timeout_s"):
        MediaPolicy(download_timeout_s=0)


# --- schemes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["ftp://example.com/a.png", "gopher://example.com/", "javascript:alert(1)", "C:\\a.png"]
)
def test_unknown_schemes_are_refused(url, tmp_path):
    policy = MediaPolicy(allow_remote=True, allowed_local_paths=(str(tmp_path),))
    assert "not supported" in refused(400, fetch_image, url, policy, tmp_path)


def test_empty_url_is_refused(tmp_path):
    refused(400, fetch_image, "", MediaPolicy(), tmp_path)


# --- remote: address checks (no connection is made) ----------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("127.0.0.1", False),
        ("127.8.9.10", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),  # shared address space (carrier-grade NAT)
        ("169.254.169.254", False),  # link-local: cloud metadata
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
    ],
)
def test_is_public_address(address, public):
    assert is_public_address(ip_address(address)) is public


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x.png",
        "http://localhost:9/x.png",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/x.png",
        "http://[::1]:9/",
        "http://0.0.0.0/",
        "http://0/",
        "http://2130706433/",  # 127.0.0.1 as one number
        "http://[::ffff:127.0.0.1]/",
        "https://10.0.0.1/x.png",
    ],
)
def test_non_public_hosts_are_refused(url, tmp_path):
    message = refused(403, fetch_image, url, MediaPolicy(allow_remote=True), tmp_path)
    assert "non-public address" in message


def test_every_resolved_address_must_be_public(tmp_path):
    policy = MediaPolicy(allow_remote=True, resolver=lambda host, port: ["8.8.8.8", "10.0.0.1"])
    refused(403, fetch_image, "http://mixed.test/x.png", policy, tmp_path)


def test_remote_urls_are_refused_unless_allowed(tmp_path):
    for url in ("http://example.com/a.png", "https://8.8.8.8/a.png", "http://127.0.0.1/"):
        message = refused(403, fetch_image, url, MediaPolicy(), tmp_path)
        assert "--allow-remote-media" in message
    refused(403, fetch_video, "https://example.com/a.mp4", MediaPolicy(), tmp_path)


def test_unresolvable_host_and_bad_urls_are_400(tmp_path):
    def fail(host, port):
        raise OSError("no such host")

    policy = MediaPolicy(allow_remote=True, resolver=fail)
    assert "cannot resolve" in refused(400, fetch_image, "http://nowhere.test/", policy, tmp_path)
    refused(400, fetch_image, "http://user:pw@example.com/", policy, tmp_path)
    refused(400, fetch_image, "http://example.com:99999/", policy, tmp_path)
    refused(400, fetch_image, "http:///x.png", policy, tmp_path)


# --- remote: a local HTTP server --------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    routes: dict[str, object] = {}
    hosts: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        type(self).hosts.append(self.headers["Host"])
        path = self.path.split("?")[0]
        route = self.routes.get(path)
        if route is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif callable(route):
            route(self)
        elif isinstance(route, str):  # a redirect
            self.send_response(302)
            self.send_header("Location", route)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(route)))
            self.end_headers()
            self.wfile.write(route)


def send_chunked(num_bytes: int):
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for _ in range(num_bytes // 1000):
            handler.wfile.write(b"3e8\r\n" + bytes(1000) + b"\r\n")
        handler.wfile.write(b"0\r\n\r\n")

    return route


def send_slowly(handler: BaseHTTPRequestHandler) -> None:
    """100 bytes, one each 50 ms: every read is quick, the whole body takes 5 s."""
    handler.send_response(200)
    handler.send_header("Content-Length", "100")
    handler.end_headers()
    try:
        for _ in range(100):
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.05)
    except OSError:  # the client gave up
        pass


class QuietServer(ThreadingHTTPServer):
    """A client that stops reading (a size limit hit) is what these tests want: no traceback."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def server():
    """(port, handler class) of an HTTP/1.1 server on 127.0.0.1, routes set per test."""
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def routes(server):
    Handler.routes = {}
    Handler.hosts = []
    return Handler.routes


def local_policy(*, address_allowed=lambda address: True, **kwargs) -> MediaPolicy:
    """Remote media allowed; TEST_HOST resolves to 127.0.0.1 (other hosts as usual)."""

    def resolver(host: str, port: int) -> list[str]:
        return ["127.0.0.1"] if host == TEST_HOST else resolve_host(host, port)

    return MediaPolicy(
        allow_remote=True, resolver=resolver, address_allowed=address_allowed, **kwargs
    )


def first_check_only():
    """An address predicate that allows the first address it is asked about, then only public
    ones: the first hop reaches the local server, later hops get the real check."""
    calls = itertools.count()
    return lambda address: next(calls) == 0 or is_public_address(address)


def test_download_connects_to_the_checked_address_with_the_host_header(server, routes, tmp_path):
    routes["/a.png"] = png_bytes((5, 4))
    path = fetch_image(f"http://{TEST_HOST}:{server}/a.png?v=1", local_policy(), tmp_path)
    with Image.open(path) as image:
        assert image.size == (5, 4)
    assert path.parent == tmp_path and path.suffix == ".png"
    assert Handler.hosts == [f"{TEST_HOST}:{server}"]  # no DNS for media.test: pinned


def test_download_of_a_video(server, routes, tmp_path):
    clip = make_video(tmp_path / "clip.mp4", num_frames=4, fps=2)
    routes["/v.mp4"] = clip.read_bytes()
    workdir = tmp_path / "request"
    workdir.mkdir()
    path = fetch_video(f"http://{TEST_HOST}:{server}/v.mp4", local_policy(), workdir)
    assert path.read_bytes() == clip.read_bytes() and path.suffix == ".mp4"


def test_redirects_are_followed_and_checked_per_hop(server, routes, tmp_path):
    routes["/a.png"] = png_bytes()
    routes["/hop"] = "/a.png"
    routes["/hop2"] = "/hop"
    assert fetch_image(f"http://{TEST_HOST}:{server}/hop2", local_policy(), tmp_path).is_file()
    assert len(Handler.hosts) == 3
    routes["/to-loopback"] = f"http://127.0.0.1:{server}/a.png"
    policy = local_policy(address_allowed=first_check_only())
    message = refused(
        403, fetch_image, f"http://{TEST_HOST}:{server}/to-loopback", policy, tmp_path
    )
    assert "'127.0.0.1'" in message and "non-public" in message
    assert len(Handler.hosts) == 4  # the refused hop was never requested
    routes["/to-metadata"] = "http://169.254.169.254/latest/meta-data"
    policy = local_policy(address_allowed=first_check_only())
    refused(403, fetch_image, f"http://{TEST_HOST}:{server}/to-metadata", policy, tmp_path)


def test_redirects_to_other_schemes_are_refused(server, routes, tmp_path):
    routes["/to-file"] = "file:///etc/passwd"
    routes["/to-ftp"] = "ftp://example.com/a.png"
    for route in ("/to-file", "/to-ftp"):
        url = f"http://{TEST_HOST}:{server}{route}"
        assert "non-http(s)" in refused(403, fetch_image, url, local_policy(), tmp_path)


def test_redirect_limit(server, routes, tmp_path):
    routes["/loop"] = "/loop"
    url = f"http://{TEST_HOST}:{server}/loop"
    assert "more than 3 redirects" in refused(400, fetch_image, url, local_policy(), tmp_path)
    assert len(Handler.hosts) == 4
    routes["/a.png"] = png_bytes()
    routes["/hop"] = "/a.png"
    url = f"http://{TEST_HOST}:{server}/hop"
    refused(400, fetch_image, url, local_policy(max_redirects=0), tmp_path)


def test_download_over_the_limit_is_refused(server, routes, tmp_path):
    routes["/big"] = bytes(5000)
    routes["/chunked"] = send_chunked(5000)
    routes["/small"] = send_chunked(3000)
    policy = local_policy(max_download_bytes=4000)
    for route in ("/big", "/chunked"):  # from Content-Length, and counted without it
        url = f"http://{TEST_HOST}:{server}{route}"
        assert "download limit" in refused(413, fetch_video, url, policy, tmp_path)
    path = fetch_video(f"http://{TEST_HOST}:{server}/small", policy, tmp_path)
    assert path.read_bytes() == bytes(3000)


def test_download_past_the_time_limit_is_refused(server, routes, tmp_path):
    routes["/slow"] = send_slowly
    policy = local_policy(download_timeout_s=0.5)
    start = time.monotonic()
    message = refused(400, fetch_video, f"http://{TEST_HOST}:{server}/slow", policy, tmp_path)
    assert "more than 0.5 s" in message
    assert time.monotonic() - start < 4.0  # the whole body takes 5 s


def test_http_errors_and_non_images_are_400(server, routes, tmp_path):
    routes["/text.png"] = b"not an image"
    url = f"http://{TEST_HOST}:{server}/missing.png"
    assert "HTTP 404" in refused(400, fetch_image, url, local_policy(), tmp_path)
    url = f"http://{TEST_HOST}:{server}/text.png"
    assert "not an image" in refused(400, fetch_image, url, local_policy(), tmp_path)


def test_remote_pixel_bomb_is_refused(server, routes, tmp_path):
    routes["/bomb.png"] = png_header_only(20000, 20000)
    url = f"http://{TEST_HOST}:{server}/bomb.png"
    refused(413, fetch_image, url, local_policy(), tmp_path)


def test_https_sends_the_host_name_as_sni(server, routes, tmp_path, monkeypatch):
    """The TLS handshake is made for the URL's host name on the pinned address (the local
    server speaks plain HTTP, so the handshake fails: a 400)."""
    seen = []

    class RecordingContext:
        def wrap_socket(self, sock, server_hostname):
            seen.append((sock.getpeername()[0], server_hostname))
            raise ssl.SSLError("handshake refused by the test")

    monkeypatch.setattr(media, "_ssl_context", RecordingContext)
    url = f"https://{TEST_HOST}:{server}/a.png"
    assert "cannot connect" in refused(400, fetch_image, url, local_policy(), tmp_path)
    assert seen == [("127.0.0.1", TEST_HOST)]
