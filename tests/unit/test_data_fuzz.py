"""Garbage in, never an exception out: every record read is encoded or skipped, exactly once.

Generated data files (random bytes, random JSON shapes, records that look almost valid, lone
surrogates through JSON escapes and as invalid UTF-8, NUL characters, reserved tokens, deep
nesting, byte-order marks) are read through a Mixture and the SampleReader, and through
`inspect_mixture` (the loader reads through the same `SampleReader.read`; its own garbage test is
in tests/integration/test_data_loader.py). Derandomized: the same examples on every run.
"""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longvita.config import tiny
from longvita.data.encode import SampleReader
from longvita.data.inspect import inspect_mixture
from longvita.data.mixture import Mixture
from longvita.data.samples import BOM
from longvita.data.stats import SKIP_REASONS, DataStats
from longvita.processing.processor import Processor
from longvita.processing.tokens import RESERVED_TOKENS, load_tokenizer
from longvita.testing import (
    conversation,
    make_image,
    make_video,
    write_mixture,
    write_tiny_tokenizer,
)

SEQ_LEN = 256
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies ---------------------------------------------------------------------------------

pieces = st.one_of(
    st.text(max_size=6),  # any unicode but surrogates
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),  # lone surrogates
    st.sampled_from(
        ["<image>", "<video>", "\0", "\\", '"', "\n", "\r", "\ufeff", *RESERVED_TOKENS]
    ),
)
nasty_text = st.lists(pieces, max_size=4).map("".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | nasty_text,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(nasty_text, children, max_size=3)
    ),
    max_leaves=8,
)
media_path = st.one_of(  # nothing outside the test's directory is ever opened
    st.sampled_from(
        ["a.png", "frames", "v.mp4", "missing.png", ".", "frames/..", "~nobody/x", "a.png\0"]
    ),
    nasty_text,
    json_values,
)
media_value = st.one_of(st.none(), media_path, st.lists(media_path, max_size=3))
good_question = st.sampled_from(
    [
        ("What?", [], []),
        ("<image>\nWhat?", ["a.png"], []),
        ("<video>\nWhat?", [], ["frames"]),
        ("<image><video> both", ["a.png"], ["v.mp4"]),
        ("<image> where?", ["missing.png"], []),
        ("<video> where?", [], ["a.png"]),  # an image is not a video
    ]
)


@st.composite
def almost_valid(draw) -> dict:
    """A well-formed record (ShareGPT or not) with up to two fields replaced by garbage."""
    question, images, videos = draw(good_question)
    answers = draw(st.lists(st.sampled_from(["A red square.", "Yes."]), min_size=1, max_size=2))
    record = conversation(
        question, answers, images=images, videos=videos, sharegpt=draw(st.booleans())
    )
    turns = record.get("messages") or record["conversations"]
    for _ in range(draw(st.integers(0, 2))):
        where = draw(st.sampled_from(["content", "role", "turn", "images", "videos", "key"]))
        garbage = draw(st.one_of(nasty_text, json_values))
        if where in ("images", "videos"):
            record[where] = draw(media_value)
        elif where == "key":
            record[draw(st.sampled_from(["messages", "conversations", "x"]))] = garbage
        elif where == "turn":
            turns[draw(st.integers(0, len(turns) - 1))] = garbage
        else:  # a field of a turn that is still a mapping
            turn = draw(st.sampled_from([t for t in turns if isinstance(t, dict)] or [{}]))
            names = ("role", "content") if "role" in turn else ("from", "value")
            turn[names[0] if where == "role" else names[1]] = garbage
    return record


records = st.one_of(almost_valid(), almost_valid(), almost_valid(), json_values)


def _as_json(record: object, raw_unicode: bool) -> bytes:
    """ASCII with escapes, or raw UTF-8 where lone surrogates become invalid UTF-8 bytes."""
    if not raw_unicode:
        return json.dumps(record).encode()
    return json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def jsonl_lines(draw) -> bytes:
    kind = draw(st.sampled_from(["record"] * 5 + ["bytes", "deep", "number"]))
    if kind == "bytes":
        line = draw(st.binary(max_size=40))
    elif kind == "deep":  # beyond json's recursion limit
        depth = draw(st.sampled_from([990, 5000]))
        line = b"[" * depth + b"]" * depth
    elif kind == "number":  # beyond Python's int digit limit
        line = b'{"messages": ' + b"7" * 5000 + b"}"
    else:
        line = _as_json(draw(records), draw(st.booleans()))
    return line.replace(b"\n", b" ")


@st.composite
def list_elements(draw) -> bytes:
    """An element of a JSON list, or bracket-free garbage between elements."""
    kind = draw(st.sampled_from(["record"] * 5 + ["garbage", "deep"]))
    if kind == "garbage":
        return draw(st.text(alphabet="abc123 -.:tn\t", min_size=1, max_size=8)).encode()
    if kind == "deep":
        return b"[" * 3000 + b"]" * 3000
    return _as_json(draw(records), draw(st.booleans()))


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor(tmp_path_factory) -> Processor:
    directory = write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return Processor(load_tokenizer(directory), tiny().vision)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    make_image(root / "a.png", (56, 56))
    (root / "frames").mkdir()
    for k in range(2):
        make_image(root / "frames" / f"{k}.png", (32, 32), seed=k)
    make_video(root / "v.mp4", num_frames=4, fps=2, size=(32, 32))
    return root


_names = itertools.count()


WHOLE_FILE_REFUSALS = (
    "starts with '[' but is not a complete JSON list",
    "but its JSON list closes on line",
    "holds a JSON object spread over several lines",
)


def _mixture(root, suffix: str, data: bytes) -> Mixture | None:
    """A one-file mixture; the file goes next to the media (a.png, frames/, v.mp4). None for a
    file the mixture refuses as a whole, saying why: no record (an empty JSON list), or not one
    JSON list or JSONL (a list closed before more text, a first line '{' alone)."""
    name = f"data{next(_names)}{suffix}"
    (root / name).write_bytes(data)
    write_mixture(root / f"{name}.yaml", {"g": {"data_paths": [name]}})
    try:
        return Mixture.from_yaml(root / f"{name}.yaml", data_root=root)
    except ValueError as err:
        message = str(err)
        empty = "selects no sample" in message and "(0 records, 0 taken)" in message
        assert empty or any(why in message for why in WHOLE_FILE_REFUSALS), message
        return None


def _check_accounting(mixture: Mixture | None, processor: Processor) -> None:
    """Reader and inspect: no exception, each record encoded or skipped once."""
    if mixture is None:
        return
    reader = SampleReader(mixture, processor, seq_len=SEQ_LEN, max_frames=2)
    total = DataStats()
    encoded = 0
    for record_id in mixture.epoch_order(0):
        stats = DataStats()
        sample = reader.read(int(record_id), stats)
        assert stats.num_skipped == (0 if sample is not None else 1)
        assert set(stats.skipped) <= set(SKIP_REASONS) - {"encode_error"}  # precise reasons
        encoded += sample is not None
        total.merge(stats)
    assert encoded + total.num_skipped == len(mixture)

    report = inspect_mixture(mixture, processor, seq_len=SEQ_LEN, max_frames=2)
    assert report.num_read == len(mixture)
    assert report.stats.num_samples + report.stats.num_skipped == report.num_read
    assert report.stats.skipped == total.skipped
    report.format().encode("utf-8")  # printable: no lone surrogate reaches the report
    json.dumps(report.to_dict(), ensure_ascii=False).encode("utf-8")


# -- tests --------------------------------------------------------------------------------------


@FUZZ
@given(lines=st.lists(jsonl_lines(), min_size=1, max_size=5), bom=st.booleans())
def test_jsonl_garbage_is_encoded_or_skipped_exactly_once(processor, media_dir, lines, bom):
    data = (BOM if bom else b"") + b"\n".join(lines) + b"\n"
    mixture = _mixture(media_dir, ".jsonl", data)
    _check_accounting(mixture, processor)


@FUZZ
@given(elements=st.lists(list_elements(), min_size=1, max_size=5), bom=st.booleans())
def test_json_list_garbage_is_encoded_or_skipped_exactly_once(processor, media_dir, elements, bom):
    data = (BOM if bom else b"") + b"[\n" + b",\n".join(elements) + b"\n]\n"
    mixture = _mixture(media_dir, ".json", data)
    _check_accounting(mixture, processor)
