"""The server's media policy: which `image_url` / `video_url` URLs are fetched, and how.

This module turns the URL of a chat request's media part into a local path the Processor
reads, under a `MediaPolicy` that is safe by default:
- `data:` URLs (base64 only): the decoded size is checked from the string length before
  decoding; the bytes go to a file in the request's work directory;
- local files (absolute paths, `file://` URLs): only under the `--allowed-local-media-path`
  directories (none by default: no local file is read), checked after resolving `..` and
  symlinks (`os.path.realpath`); a frame directory's every frame file must resolve inside too;
- remote `http(s)://` URLs: refused unless `allow_remote`; then every address the host resolves
  to must be public (`is_public_address`: no loopback, private, link-local such as the cloud
  metadata address 169.254.169.254, shared, reserved, multicast, unspecified, nor an IPv6 form
  of those), the connection goes to an address that was checked (no second DNS lookup that
  could rebind) with the Host header and TLS SNI set to the URL's host, redirects are followed
  by hand and each hop is checked again, and the download is capped in bytes and total time;
- any other scheme: refused.
An image is checked before it is handed on (`image_size`: at most `max_pixels` from its header,
then every pixel decoded, so a truncated file is refused before any answer starts), and comes
back as a file path, not a decoded image, so that EXIF orientation and decoding follow the same
code (`load_image`) as every other image. A video is not probed here:
the Processor plans it from its header with the same pixel limit.

Every refusal is a `MediaRefused` carrying the HTTP status to answer with and a one-line
message for the client: it names the URL as given (a data URL by its media type and length),
never a file's contents, a server directory or the address a host resolved to. Nothing here
logs media or request bodies. The caller owns the work directory and removes it after the
request. This module knows nothing about HTTP requests, the chat format or the model.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import ipaddress
import os
import re
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit
from urllib.request import url2pathname

from longvita.errors import MediaError
from longvita.processing.frame_dirs import list_frame_files
from longvita.processing.image import DEFAULT_MAX_PIXELS, PixelLimitError, image_size

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

LOCAL_MEDIA_HINT = (
    "local media must be under a directory the server allows (--allowed-local-media-path)"
)
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,8}")
_READ_BYTES = 1 << 16
_SHOWN_URL_CHARS = 200
# IPv6 prefixes that carry an IPv4 address a gateway may forward to: 6to4, NAT64 (well-known
# and local-use). Refused outright, as vLLM does: the embedded address is not checked.
_EMBEDDED_IPV4_NETWORKS = tuple(
    ipaddress.IPv6Network(n) for n in ("2002::/16", "64:ff9b::/96", "64:ff9b:1::/48")
)
_VIDEO_SUFFIXES = {"quicktime": ".mov", "x-matroska": ".mkv", "x-msvideo": ".avi", "mpeg": ".mpg"}


class MediaRefused(MediaError):
    """A media URL the server does not fetch, with the HTTP status to answer: 400 (malformed,
    unreadable or unfetchable), 403 (not allowed by the policy), 413 (too large)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to for a TCP connection (`socket.getaddrinfo`), in order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_public_address(address: Address) -> bool:
    """Whether a remote media download may connect to `address`: a globally routable unicast
    address. IPv4-mapped IPv6 addresses are judged by their IPv4 address; 6to4 and NAT64
    addresses are refused."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return is_public_address(address.ipv4_mapped)
        if any(address in network for network in _EMBEDDED_IPV4_NETWORKS):
            return False
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


@dataclass(frozen=True, kw_only=True)
class MediaPolicy:
    """Which media URLs the server fetches; the defaults read no local file and no remote URL."""

    allowed_local_paths: tuple[str, ...] = ()
    """Directories local media (absolute paths, `file://` URLs) must resolve into
    (`--allowed-local-media-path`); none: local media are refused. Stored resolved."""
    allow_remote: bool = False
    """Fetch `http://` and `https://` URLs (to public addresses only)."""
    max_download_bytes: int = 64 * 2**20
    """The most bytes a remote download may have; larger ones are refused (413)."""
    max_data_url_bytes: int = 32 * 2**20
    """The most decoded bytes a `data:` URL may carry, checked before decoding (413)."""
    download_timeout_s: float = 30.0
    """The most seconds a remote download takes, redirects included (DNS lookups excepted)."""
    max_redirects: int = 3
    """The most redirects a remote download follows, each hop checked as the first."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """The most pixels (width * height) an image may have, checked from its header (413); use
    the Processor's setting."""
    resolver: Callable[[str, int], Sequence[str]] = field(
        default=resolve_host, repr=False, compare=False
    )
    """(host, port) -> the addresses to check and connect to (tests inject their own)."""
    address_allowed: Callable[[Address], bool] = field(
        default=is_public_address, repr=False, compare=False
    )
    """Whether a resolved address may be connected to (tests inject their own)."""

    def __post_init__(self) -> None:
        if isinstance(self.allowed_local_paths, str | os.PathLike):
            raise ValueError(
                "allowed_local_paths must be a sequence of directories, "
                f"got the single path {self.allowed_local_paths!r}"
            )
        for path in self.allowed_local_paths:
            if not os.path.isdir(path):
                raise ValueError(f"allowed_local_paths: {path!r} is not a directory")
        resolved = tuple(os.path.realpath(path) for path in self.allowed_local_paths)
        object.__setattr__(self, "allowed_local_paths", resolved)
        for name in ("max_download_bytes", "max_data_url_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects must be >= 0, got {self.max_redirects}")
        if not self.download_timeout_s > 0:
            raise ValueError(f"download_timeout_s must be positive, got {self.download_timeout_s}")


def fetch_image(url: str, policy: MediaPolicy, workdir: Path) -> Path:
    """The local image file `url` names or was fetched to (under `workdir`), its header read
    and its size checked against `policy.max_pixels`. Raises MediaRefused."""
    path = _fetch(url, "image", policy, workdir)
    what = _describe(url, "image")
    try:
        image_size(path, max_pixels=policy.max_pixels, decode=True)
    except PixelLimitError as e:
        raise MediaRefused(
            f"{what} has more than the server's limit of {policy.max_pixels:,} pixels "
            "(width x height); refused from its header, before decoding",
            413,
        ) from e
    except MediaError as e:
        reason = str(e.__cause__ or "").replace(str(path), "the file")
        detail = f" ({reason})" if reason else ""
        raise MediaRefused(f"{what} is not an image the server can read{detail}", 400) from e
    return path


def fetch_video(url: str, policy: MediaPolicy, workdir: Path) -> Path:
    """The local video file or frame directory `url` names, or the file it was fetched to
    (under `workdir`). Raises MediaRefused."""
    return _fetch(url, "video", policy, workdir)


def _fetch(url: str, kind: str, policy: MediaPolicy, workdir: Path) -> Path:
    """The URL dispatched on its scheme (see the module docstring)."""
    if not isinstance(url, str) or not url:
        raise MediaRefused(f"{kind}_url needs a non-empty url string", 400)
    what = _describe(url, kind)
    if url.startswith("/"):
        return _local_media(url, kind, what, policy)
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else ""
    if scheme == "data":
        return _data_url(url, kind, what, policy, workdir)
    if scheme == "file":
        return _local_media(_file_url_path(url, what), kind, what, policy)
    if scheme in ("http", "https"):
        return _download(url, what, policy, workdir)
    if not scheme:
        raise MediaRefused(
            f"{what} is neither a URL nor an absolute path (relative paths are refused)", 400
        )
    raise MediaRefused(
        f"{what}: the scheme {scheme!r} is not supported (use data:, http(s):, file: "
        "or an absolute path)",
        400,
    )


def _describe(url: str, kind: str) -> str:
    """The URL as messages name it: a data URL by its header and length, others cut short."""
    if url[:5].lower() == "data:":
        comma = url.find(",")
        header = url[: comma if 0 <= comma < 64 else 64]
        return f"{kind}_url {header + ',...'!r} ({len(url):,} characters)"
    shown = url if len(url) <= _SHOWN_URL_CHARS else url[:_SHOWN_URL_CHARS] + "..."
    return f"{kind}_url {shown!r}"


def _data_url(url: str, kind: str, what: str, policy: MediaPolicy, workdir: Path) -> Path:
    """A base64 `data:` URL's bytes, size-checked before decoding, written under workdir."""
    comma = url.find(",")
    if comma < 0:
        raise MediaRefused(f"{what} is not a data URL (no comma before the data)", 400)
    media_type, *params = (part.strip().lower() for part in url[5:comma].split(";"))
    if "base64" not in params:
        raise MediaRefused(f"{what}: only base64 data URLs are supported", 400)
    if not media_type.startswith(f"{kind}/"):
        raise MediaRefused(f"{what}: {kind}_url needs a {kind}/* media type", 400)
    num_bytes = (len(url) - comma - 1) * 3 // 4  # the most bytes this much base64 decodes to
    if num_bytes > policy.max_data_url_bytes:
        raise MediaRefused(
            f"{what} carries about {num_bytes:,} bytes, more than the server's limit of "
            f"{policy.max_data_url_bytes:,}",
            413,
        )
    try:
        data = base64.b64decode("".join(url[comma + 1 :].split()), validate=True)
    except binascii.Error as e:
        raise MediaRefused(f"{what} is not valid base64 ({e})", 400) from e
    if not data:
        raise MediaRefused(f"{what} is empty", 400)
    subtype = media_type.partition("/")[2]
    suffix = _VIDEO_SUFFIXES.get(subtype, f".{subtype}")
    fd, name = tempfile.mkstemp(dir=workdir, prefix="media-", suffix=_safe_suffix(suffix))
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return Path(name)


def _safe_suffix(suffix: str) -> str:
    """suffix when it is a short alphanumeric file suffix ('.png'), else ''."""
    return suffix if _SUFFIX.fullmatch(suffix) else ""


def _file_url_path(url: str, what: str) -> str:
    """The local path of a `file:` URL (percent-escapes decoded); only local hosts."""
    parts = urlsplit(url)
    if parts.netloc.lower() not in ("", "localhost"):
        raise MediaRefused(f"{what}: a file URL must name a local path (file:///path)", 400)
    return url2pathname(parts.path)


def _inside(path: str, directories: Sequence[str]) -> bool:
    """Whether the resolved `path` is one of `directories` (resolved) or under one."""
    return any(path == d or path.startswith(d.rstrip(os.sep) + os.sep) for d in directories)


def _local_media(path: str, kind: str, what: str, policy: MediaPolicy) -> Path:
    """A local path resolved and checked against the allowed directories, before any other
    check (so that a refused path reveals nothing about the file system)."""
    if not policy.allowed_local_paths:
        raise MediaRefused(
            f"{what}: local media files are not allowed (the server was started without "
            "--allowed-local-media-path)",
            403,
        )
    if not os.path.isabs(path):
        raise MediaRefused(f"{what}: relative paths are refused, give an absolute path", 400)
    if "\0" in path:
        raise MediaRefused(f"{what}: the path contains a NUL character", 400)
    resolved = os.path.realpath(path)
    if not _inside(resolved, policy.allowed_local_paths):
        raise MediaRefused(f"{what}: {LOCAL_MEDIA_HINT}", 403)
    if os.path.isfile(resolved):
        return Path(resolved)
    if kind == "video" and os.path.isdir(resolved):
        for frame in list_frame_files(resolved):
            if not _inside(os.path.realpath(frame), policy.allowed_local_paths):
                shown = os.path.relpath(frame, resolved)
                raise MediaRefused(f"{what}: frame file {shown!r}: {LOCAL_MEDIA_HINT}", 403)
        return Path(resolved)
    if os.path.exists(resolved):
        raise MediaRefused(f"{what} is not a {kind} file", 400)
    raise MediaRefused(f"{what}: no such file", 400)


def _download(url: str, what: str, policy: MediaPolicy, workdir: Path) -> Path:
    """A remote http(s) file downloaded under workdir, every hop checked (module docstring)."""
    if not policy.allow_remote:
        raise MediaRefused(
            f"{what}: remote media URLs are not allowed (the server was started without "
            "--allow-remote-media)",
            403,
        )
    deadline = time.monotonic() + policy.download_timeout_s
    for _ in range(policy.max_redirects + 1):
        connection = _connect(url, what, policy, deadline)
        watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), _abort, (connection,))
        watchdog.daemon = True
        watchdog.start()
        try:
            response = _get(connection, url)
            if response.status in REDIRECT_STATUSES:
                url = _redirect_target(url, response.getheader("Location"), what)
                continue
            if response.status != 200:
                raise MediaRefused(
                    f"{what}: the remote server answered HTTP {response.status}", 400
                )
            return _save(response, what, policy.max_download_bytes, workdir, _url_suffix(url))
        except (OSError, http.client.HTTPException) as e:
            if time.monotonic() >= deadline:
                message = f"{what}: the download took more than {policy.download_timeout_s:g} s"
                raise MediaRefused(message, 400) from e
            raise MediaRefused(f"{what}: the download failed ({e})", 400) from e
        finally:
            watchdog.cancel()
            connection.close()
    raise MediaRefused(f"{what}: more than {policy.max_redirects} redirects", 400)


def _connect(url: str, what: str, policy: MediaPolicy, deadline: float) -> _PinnedConnection:
    """An open connection to one of the URL's host's checked addresses (refusing the URL when
    any address is not allowed), its TLS (for https) verified for the host's name."""
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in ("http", "https"):
        raise MediaRefused(f"{what}: redirected to a non-http(s) URL; refused", 403)
    if not host:
        raise MediaRefused(f"{what}: the URL has no host", 400)
    if parts.username is not None or parts.password is not None:
        raise MediaRefused(f"{what}: credentials in media URLs are not supported", 400)
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as e:
        raise MediaRefused(f"{what}: invalid port ({e})", 400) from e
    try:
        addresses = [ipaddress.ip_address(a) for a in policy.resolver(host, port)]
    except OSError as e:
        raise MediaRefused(f"{what}: cannot resolve host {host!r}", 400) from e
    if not addresses or not all(policy.address_allowed(a) for a in addresses):
        raise MediaRefused(
            f"{what}: the host {host!r} resolves to a non-public address (loopback, private, "
            "link-local, reserved and multicast addresses are refused)",
            403,
        )
    tls = _ssl_context() if scheme == "https" else None
    error: OSError | None = None
    for address in addresses:
        timeout = max(deadline - time.monotonic(), 0.001)
        connection = _PinnedConnection(host, port, str(address), timeout, tls)
        try:
            connection.connect()
            return connection
        except OSError as e:
            connection.close()
            error = e
    raise MediaRefused(f"{what}: cannot connect to {host!r} ({error})", 400) from error


def _ssl_context() -> ssl.SSLContext:
    """The TLS settings of https downloads: certificates verified against the host name."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to one given address; `host` only names the server (Host header,
    TLS SNI and certificate check), it is never looked up again."""

    def __init__(
        self, host: str, port: int, address: str, timeout: float, tls: ssl.SSLContext | None
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address, self.tls = address, tls
        self.default_port = 443 if tls else 80  # the Host header omits the default port

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        if self.tls is None:
            self.sock = sock
            return
        try:
            self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def _abort(connection: _PinnedConnection) -> None:
    """Shut the connection's socket down (the total time limit): a blocked read returns."""
    sock = connection.sock
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed by the downloading thread
            sock.shutdown(socket.SHUT_RDWR)


def _get(connection: _PinnedConnection, url: str) -> http.client.HTTPResponse:
    """The response to a GET of the URL's path and query on an open connection."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {"User-Agent": "longvita-server", "Accept-Encoding": "identity"}
    connection.request("GET", target, headers=headers)
    return connection.getresponse()


def _redirect_target(url: str, location: str | None, what: str) -> str:
    """The absolute URL a redirect points to (its scheme and host are checked by `_connect`)."""
    if not location:
        raise MediaRefused(f"{what}: a redirect without a Location header", 400)
    return urljoin(url, location.strip())


def _url_suffix(url: str) -> str:
    """The file suffix of the URL's path ('.mp4'), or '' (decoders sniff the content)."""
    return _safe_suffix(os.path.splitext(urlsplit(url).path)[1])


def _save(
    response: http.client.HTTPResponse, what: str, max_bytes: int, workdir: Path, suffix: str
) -> Path:
    """The response body written under workdir, refused (413) past max_bytes: from its
    Content-Length when given, and counted as it is read in any case."""
    header = (response.getheader("Content-Length") or "").strip()
    length = int(header) if header.isdigit() else None
    too_large = f"{what} is larger than the server's download limit of {max_bytes:,} bytes"
    if length is not None and length > max_bytes:
        raise MediaRefused(too_large, 413)
    fd, name = tempfile.mkstemp(dir=workdir, prefix="media-", suffix=suffix)
    num_bytes = 0
    with os.fdopen(fd, "wb") as out:
        while chunk := response.read1(_READ_BYTES):
            num_bytes += len(chunk)
            if num_bytes > max_bytes:
                raise MediaRefused(too_large, 413)
            out.write(chunk)
    if length is not None and num_bytes < length:  # read1 ends quietly on a closed socket
        raise http.client.IncompleteRead(b"", length - num_bytes)
    return Path(name)
