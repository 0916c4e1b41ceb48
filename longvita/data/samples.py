"""Sample files: JSONL and JSON-list files indexed by byte span, read one record at a time.

Owns the on-disk format (reference/LONGVITA.md section 4, the official DATA.md):

    {"messages": [{"role": "user", "content": "<image>\\nWhat is it?"},
                  {"role": "assistant", "content": "A cat."}],
     "images": ["cat.jpg"], "videos": ["clip.mp4" or "frames_dir/"]}

`conversations` with ShareGPT turns (`{"from": "human"/"gpt"/"system", "value": ...}`) is read
as `messages`; LLaVA's singular `image` / `video` as `images` / `videos`; a top-level `system`
text (LLaMA-Factory's layout) as a first system turn. Media paths are absolute or relative to
the directory of the data file.

A file is never loaded whole: indexing records the byte span and line number of each record
(JSONL: one record per non-blank line, found with numpy over 16 MiB chunks; JSON list: each
top-level element, found by a regex scan of a memory map, which runs a Python step per JSON
string or bracket, so prefer JSONL for multi-GB files). Reading a record seeks to its span.
A file whose first non-blank byte (after a UTF-8 byte-order mark, if any) is `[` is a JSON
list; anything else is JSONL. A file that cannot be either as a whole (compressed, UTF-16, a
list followed by more text, a pretty-printed object) is a ValueError when it is indexed.

Knows nothing of tokens, media decoding, mixtures or packing. A bad record raises SampleError
with its reason; it never stops the caller. A data file that can no longer be read as it was
indexed (gone, unreadable, shorter) raises DataFileError: that is the run's problem, not the
record's.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from longvita.data.stats import SampleError
from longvita.processing.chat import normalize_messages

CHUNK_BYTES = 1 << 24
BOM = b"\xef\xbb\xbf"
"""The UTF-8 byte-order mark some editors and exporters write at the start of a file."""
SHAREGPT_KEYS = ("from", "value")
# A JSON string (escapes included) or a bracket: enough to find the top-level elements.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)
_SEPARATORS = b" \t\r\n,"
_BLANK_BYTES = np.frombuffer(b" \t\r\x0b\x0c", dtype=np.uint8)
_NON_BLANK = re.compile(rb"[^ \t\r\n]")
_GAP_VALUE = re.compile(rb'(?:"(?:[^"\\]|\\.)*"?|[^,"])+', re.DOTALL)
"""One comma-separated value between a JSON list's objects (commas inside strings kept; an
unterminated string runs to the end)."""


class DataFileError(ValueError):
    """A data file that vanished, became unreadable or shrank after it was indexed.

    Not a bad record: every record of the file would fail alike and the mixture's proportions
    would change silently, so it stops the run (restore the file and resume)."""


@dataclass(frozen=True)
class RawSample:
    """One record, validated: normalized messages and resolved media paths."""

    messages: list[dict[str, str]]
    """Turns with roles user/assistant/system, at least one assistant turn."""
    images: list[str]
    """Image paths, one per `<image>` tag, in order."""
    videos: list[str]
    """Video files or frame directories, one per `<video>` tag, in order."""
    location: str
    """`file:line` of the record."""


class SampleFile:
    """An indexed JSONL or JSON-list file: record i is bytes [starts[i], ends[i])."""

    def __init__(
        self, path: str | os.PathLike, *, starts: np.ndarray, ends: np.ndarray, lines: np.ndarray
    ) -> None:
        if not (starts.shape == ends.shape == lines.shape) or starts.ndim != 1:
            raise ValueError(
                f"starts, ends, lines must be equal 1-D arrays, got {starts.shape}, "
                f"{ends.shape}, {lines.shape}"
            )
        self.path = Path(path)
        self.starts = starts  # [num_records] int64 byte offsets
        self.ends = ends  # [num_records] int64, exclusive
        self.lines = lines  # [num_records] int64, 1-based line of each record's first byte

    @classmethod
    def index(cls, path: str | os.PathLike) -> SampleFile:
        """Index a file; raises ValueError if it is missing or is a broken JSON list."""
        path = Path(path)
        if path.is_dir():
            raise ValueError(
                f"data file {str(path)!r} is a directory; expected a JSONL or JSON-list file"
            )
        if not path.is_file():
            raise ValueError(f"data file {str(path)!r} does not exist or is not a file")
        _check_utf8_text(path)
        if _first_byte(path) == b"[":
            starts, ends, lines = _index_json_list(path)
        else:
            starts, ends, lines = _index_jsonl(path)
        return cls(path, starts=starts, ends=ends, lines=lines)

    def __len__(self) -> int:
        return self.starts.shape[0]

    def location(self, i: int) -> str:
        """`file:line`, and the element's index when other records share its line (a JSON list
        written on one line, as LLaVA's files are)."""
        line = int(self.lines[i])
        shared = (i > 0 and self.lines[i - 1] == line) or (
            i + 1 < len(self) and self.lines[i + 1] == line
        )
        return f"{self.path}:{line} (element {i})" if shared else f"{self.path}:{line}"

    def read_record(self, i: int) -> object:
        """The JSON value of record i; SampleError('malformed_json') if it does not parse,
        DataFileError if the file cannot be read as it was indexed."""
        start, end = int(self.starts[i]), int(self.ends[i])
        try:
            with open(self.path, "rb") as f:
                f.seek(start)
                data = f.read(end - start)
        except OSError as err:
            raise DataFileError(
                f"data file {str(self.path)!r} can no longer be read (record {self.location(i)}): "
                f"{err}; restore it and resume"
            ) from err
        if len(data) != end - start:
            raise DataFileError(
                f"data file {str(self.path)!r} is shorter than when it was indexed (record "
                f"{self.location(i)} ends at byte {end}): it changed during the run"
            )
        return _decode_json(data)

    def read(self, i: int) -> RawSample:
        """Record i parsed and validated; raises SampleError with the reason."""
        return parse_record(
            self.read_record(i), base_dir=self.path.parent, location=self.location(i)
        )


def _decode_json(data: bytes) -> object:
    """The JSON value of one record's bytes; SampleError('malformed_json') for anything that is
    not JSON: bad syntax or UTF-8, nesting deeper than the parser's recursion limit, integers
    longer than Python converts."""
    try:
        return json.loads(data)
    except RecursionError as err:
        raise SampleError("malformed_json", f"not valid JSON: nested too deeply ({err})") from err
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise SampleError("malformed_json", f"not valid JSON: {err}") from err


COMPRESSED = {
    b"\x1f\x8b": ("gzip", "gunzip"),
    b"BZh": ("bzip2", "bunzip2"),
    b"\xfd7zXZ\x00": ("xz", "unxz"),
    b"\x28\xb5\x2f\xfd": ("zstd", "unzstd"),
    b"PK\x03\x04": ("zip", "unzip"),
}
"""Magic bytes of compressed files: (format, the command that decompresses it)."""


def _check_utf8_text(path: Path) -> None:
    """Refuse compressed, UTF-16 and UTF-32 files: their records would half-parse (json.loads
    detects the encoding of a line's bytes, and the NUL byte after each newline became a bad
    record)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    for magic, (kind, command) in COMPRESSED.items():
        if head.startswith(magic):
            raise ValueError(
                f"data file {str(path)!r} is {kind}-compressed; decompress it first "
                f"(`{command} FILE`) and list the result"
            )
    if b"\x00" in head:  # never in UTF-8 JSON: a control character must be escaped there
        raise ValueError(
            f"data file {str(path)!r} is not UTF-8 text (it holds NUL bytes: UTF-16 or "
            "UTF-32?); convert it, e.g. `iconv -f UTF-16 -t UTF-8 IN > OUT`"
        )


def _first_byte(path: Path) -> bytes:
    """The first non-blank byte, after a byte-order mark."""
    with open(path, "rb") as f:
        chunk = f.read(4096).removeprefix(BOM)
        while chunk:
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1]
            chunk = f.read(4096)
    return b""


def _newline_offsets(path: Path) -> np.ndarray:
    """Byte offsets of every b"\\n" in the file, [num_newlines] int64."""
    found, offset = [], 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            found.append(np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + offset)
            offset += len(chunk)
    return np.concatenate(found).astype(np.int64) if found else np.zeros(0, dtype=np.int64)


def _index_jsonl(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, lines) of the non-blank lines."""
    size = path.stat().st_size
    newlines = _newline_offsets(path)  # [num_newlines]
    if newlines.size == 0:
        with open(path, "rb") as f:
            if b"\r" in f.read(CHUNK_BYTES).strip():
                raise ValueError(
                    f"data file {str(path)!r} separates its lines by \\r alone (old Mac line "
                    "endings): convert them to \\n (or \\r\\n)"
                )
    starts = np.concatenate([[0], newlines + 1]).astype(np.int64)  # [num_newlines + 1]
    ends = np.concatenate([newlines, [size]]).astype(np.int64)
    lines = np.arange(1, starts.shape[0] + 1, dtype=np.int64)
    with open(path, "rb") as f:
        if f.read(len(BOM)) == BOM:
            starts[0] = len(BOM)  # the first line is at least the mark
    keep = ends > starts
    if keep.any():  # a line that begins with a blank may be blank all through ("\r", spaces)
        first_bytes = np.memmap(path, dtype=np.uint8, mode="r")[starts[keep]]
        maybe_blank = np.flatnonzero(keep)[np.isin(first_bytes, _BLANK_BYTES)]
        with open(path, "rb") as f:
            for i in maybe_blank:
                f.seek(int(starts[i]))
                if not f.read(int(ends[i] - starts[i])).strip():
                    keep[i] = False
    _check_not_pretty_printed(path, starts[keep], ends[keep])
    return starts[keep], ends[keep], lines[keep]


def _check_not_pretty_printed(path: Path, starts: np.ndarray, ends: np.ndarray) -> None:
    """ValueError for a JSONL file whose first line is a lone "{": one object spread over many
    lines (a pretty-printed .json), which would be read as one broken record per line."""
    if starts.size < 2:
        return
    with open(path, "rb") as f:
        f.seek(int(starts[0]))
        first = f.read(int(min(ends[0] - starts[0], 64))).strip()
    if first == b"{":
        raise ValueError(
            f"data file {str(path)!r} holds a JSON object spread over several lines (its first "
            "line is '{' alone); JSONL needs one object per line (`jq -c . IN > OUT`), or put "
            "the records in a JSON list [...]"
        )


def _index_json_list(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, lines) of the top-level elements of a JSON list.

    Objects and arrays are found by bracket depth; anything else between them (a number, a
    string, garbage) becomes a record of its own, which then fails as malformed. Text after
    the closing bracket is a ValueError (`_check_nothing_after`).
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        spans, list_end = _element_spans(mm, path)
        starts: list[int] = []
        ends: list[int] = []
        previous_end = mm.find(b"[") + 1
        for start, end in spans:
            _add_gap(mm, previous_end, start, starts, ends)
            starts.append(start)
            ends.append(end)
            previous_end = end
        _add_gap(mm, previous_end, list_end, starts, ends)
        _check_nothing_after(mm, list_end, path)
        lines, line, counted_to = [], 1, 0
        for start in starts:
            line += mm[counted_to:start].count(b"\n")
            counted_to = start
            lines.append(line)
    return tuple(np.asarray(v, dtype=np.int64) for v in (starts, ends, lines))


def _element_spans(mm: mmap.mmap, path: Path) -> tuple[list[tuple[int, int]], int]:
    """Byte spans of the objects/arrays at depth 1 of the top-level list, and the offset of
    the list's closing bracket."""
    spans: list[tuple[int, int]] = []
    depth, start = 0, -1
    for match in _JSON_TOKEN.finditer(mm):
        token = match.group()
        if token[:1] == b'"':
            continue
        if token in (b"{", b"["):
            depth += 1
            if depth == 2:
                start = match.start()
            continue
        depth -= 1
        if depth == 1:
            spans.append((start, match.end()))
        elif depth == 0:
            return spans, match.start()
    raise ValueError(
        f"data file {str(path)!r} starts with '[' but is not a complete JSON list "
        f"(unbalanced brackets after {len(spans)} elements); fix it or convert it to JSONL"
    )


def _check_nothing_after(mm: mmap.mmap, list_end: int, path: Path) -> None:
    """ValueError when more than blanks follows the list's closing bracket: a stray bracket
    closed it early, or the file is JSONL whose first record is a JSON array. Either way the
    records after it would be cut into pieces at their commas."""
    rest = _NON_BLANK.search(mm, list_end + 1)
    if rest is None:
        return
    closed_at = mm[:list_end].count(b"\n") + 1
    more_at = mm[: rest.start()].count(b"\n") + 1
    raise ValueError(
        f"data file {str(path)!r} starts with '[' but its JSON list closes on line {closed_at} "
        f"and more follows on line {more_at}: a stray ']' or '}}' before it, or a JSONL file "
        "whose first line is a JSON array (remove that line); fix it and rerun"
    )


def _add_gap(mm: mmap.mmap, lo: int, hi: int, starts: list, ends: list) -> None:
    """Each comma-separated value between two elements (a number, a string, garbage) becomes
    a (malformed) record of its own, so each is counted as one skipped record."""
    for piece in _GAP_VALUE.finditer(mm, lo, hi):
        text = piece.group()
        if text.strip(_SEPARATORS):
            starts.append(piece.start() + len(text) - len(text.lstrip(_SEPARATORS)))
            ends.append(piece.start() + len(text.rstrip(_SEPARATORS)))


def parse_record(record: object, *, base_dir: str | os.PathLike, location: str) -> RawSample:
    """Validate one JSON record; raises SampleError with the reason of the first problem."""
    if not isinstance(record, Mapping):
        raise SampleError(
            "malformed_json", f"a record must be a JSON object, got {type(record).__name__}"
        )
    turns = record.get("messages")
    if turns is None:  # absent, or null as exports write a column a record lacks
        turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise SampleError(
            "invalid_sample",
            f"needs a non-empty 'messages' or 'conversations' list, has keys {sorted(record)}",
        )
    turns = [_as_message(turn) for turn in turns]
    system = record.get("system")
    if system is not None:  # LLaMA-Factory's ShareGPT layout: the system prompt beside them
        if not isinstance(system, str):
            got = reprlib.repr(system)
            raise SampleError("invalid_sample", f"'system' must be text, got {got}")
        if isinstance(turns[0], Mapping) and turns[0].get("role") == "system":
            raise SampleError("invalid_sample", "has a 'system' key and a system turn: keep one")
        turns = [{"role": "system", "content": system}, *turns]
    try:
        messages = normalize_messages(turns)
    except ValueError as err:
        raise SampleError("invalid_sample", str(err)) from err
    if not any(turn["role"] == "assistant" for turn in messages):
        raise SampleError("no_assistant_turn", "no assistant turn: nothing to supervise")
    images = _media_paths(record, "images", "image", base_dir)
    videos = _media_paths(record, "videos", "video", base_dir)
    return RawSample(messages=messages, images=images, videos=videos, location=location)


def _as_message(turn: object) -> object:
    """A ShareGPT turn {"from", "value"} as {"role", "content"}; anything else unchanged."""
    if isinstance(turn, Mapping) and "role" not in turn and all(k in turn for k in SHAREGPT_KEYS):
        return {"role": turn["from"], "content": turn["value"]}
    return turn


def _one_of(record: Mapping, key: str, alias: str) -> object:
    """record[key], else record[alias] (a null counts as absent); SampleError when both are
    given."""
    value, other = record.get(key), record.get(alias)
    if value is not None and other is not None:
        raise SampleError("invalid_sample", f"has both '{key}' and '{alias}': keep one")
    return other if value is None else value


def _media_paths(record: Mapping, key: str, alias: str, base_dir: str | os.PathLike) -> list[str]:
    """The record's `key` (or LLaVA's singular `alias`) list: absent, null, one string or a
    list of strings; resolved."""
    value = _one_of(record, key, alias)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise SampleError(
            "invalid_sample",
            f"'{key}' must be a path or a list of paths, got {reprlib.repr(value)}",
        )
    for path in value:
        _check_path(path, key)
    return [os.path.join(base_dir, os.path.expanduser(p)) for p in value]


def _check_path(path: str, key: str) -> None:
    """SampleError unless the OS can take `path` as a file name: no NUL character, and no lone
    surrogate other than those that stand for undecodable file-name bytes."""
    if "\0" in path:
        raise SampleError("invalid_sample", f"'{key}' path {path!r} contains a NUL character")
    try:
        os.fsencode(path)
    except UnicodeEncodeError as err:
        raise SampleError(
            "invalid_sample", f"'{key}' path {path!r} is not a valid file name: {err.reason}"
        ) from None
