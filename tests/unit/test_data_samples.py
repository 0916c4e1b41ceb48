"""Sample files: indexing JSONL and JSON lists by byte span, and validating records."""

from __future__ import annotations

import gzip
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longvita.data import samples as samples_module
from longvita.data.samples import BOM, DataFileError, SampleFile, parse_record
from longvita.data.stats import SampleError
from longvita.testing import conversation, write_json_list, write_jsonl

json_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20
)  # any unicode but lone surrogates: brackets, quotes, backslashes, newlines included
records = st.lists(
    st.fixed_dictionaries(
        {"messages": st.lists(st.fixed_dictionaries({"role": json_text, "content": json_text}))},
        optional={"images": st.lists(json_text, max_size=2), "extra": st.lists(st.integers())},
    ),
    max_size=8,
)


@settings(max_examples=40, deadline=None)
@given(records=records, indent=st.sampled_from([None, 1]), tiny_chunks=st.booleans())
def test_index_reads_back_every_record(tmp_path_factory, records, indent, tiny_chunks):
    directory = tmp_path_factory.mktemp("idx")
    jsonl = write_jsonl(directory / "a.jsonl", records)
    listed = write_json_list(directory / "a.json", records, indent=indent)
    chunk = samples_module.CHUNK_BYTES
    samples_module.CHUNK_BYTES = 7 if tiny_chunks else chunk
    try:
        for path in (jsonl, listed):
            indexed = SampleFile.index(path)
            assert [indexed.read_record(i) for i in range(len(indexed))] == records
    finally:
        samples_module.CHUNK_BYTES = chunk


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\r\n\r\n   \n{"a": 2}\n\n{broken\n{"a": 3}')
    indexed = SampleFile.index(path)
    assert len(indexed) == 4
    assert [indexed.location(i) for i in range(4)] == [f"{path}:{n}" for n in (1, 4, 6, 7)]
    assert indexed.read_record(3) == {"a": 3}
    with pytest.raises(SampleError, match="not valid JSON") as err:
        indexed.read_record(2)
    assert err.value.reason == "malformed_json"


def test_jsonl_lines_of_blanks_of_any_length_are_no_records(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\n' + b" " * 12 + b"\n" + b"\t" * 9 + b'\r\n  {"a": 2}\n')
    indexed = SampleFile.index(path)
    assert [indexed.read_record(i) for i in range(len(indexed))] == [{"a": 1}, {"a": 2}]
    assert [indexed.location(i) for i in range(2)] == [f"{path}:1", f"{path}:4"]


@pytest.mark.parametrize(
    ("text", "closed", "more"),
    [
        ('["id", "messages"]\n{"a": 1}\n{"a": 2}\n', 1, 2),  # JSONL with a header row
        ('[\n  {"a": 1}},\n  {"a": 2}\n]\n', 2, 2),  # a stray brace closes the list
        ('[{"a": 1}]\n\n[{"a": 2}]\n', 1, 3),  # two lists one after the other
    ],
)
def test_text_after_a_json_list_is_a_value_error(tmp_path, text, closed, more):
    """The records after the list would be cut at their commas into broken pieces."""
    path = tmp_path / "a.json"
    path.write_text(text)
    with pytest.raises(
        ValueError,
        match=rf"a.json' starts with '\[' but its JSON list closes on line {closed} "
        rf"and more follows on line {more}",
    ):
        SampleFile.index(path)
    path.write_text('[{"a": 1}]\n \n\t\n')  # blanks after it are fine
    assert len(SampleFile.index(path)) == 1


def test_a_pretty_printed_object_is_no_jsonl(tmp_path):
    record = conversation("q", "a")
    path = tmp_path / "one.json"
    path.write_text(json.dumps(record, indent=2))
    with pytest.raises(ValueError, match=r"one.json' holds a JSON object spread over several"):
        SampleFile.index(path)
    path.write_text(json.dumps(record))  # on one line it is one record
    assert SampleFile.index(path).read_record(0) == record


@pytest.mark.parametrize(
    ("compress", "kind"), [(gzip.compress, "gzip"), (__import__("bz2").compress, "bzip2")]
)
def test_a_compressed_file_is_a_value_error_saying_so(tmp_path, compress, kind):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(compress(json.dumps(conversation("q", "a")).encode() + b"\n"))
    with pytest.raises(ValueError, match=rf"d.jsonl.gz' is {kind}-compressed; decompress it"):
        SampleFile.index(path)


def test_records_sharing_a_line_are_located_by_element(tmp_path):
    records = [{"a": i} for i in range(3)]
    compact = tmp_path / "compact.json"  # LLaVA's files: the whole list on one line
    compact.write_text(json.dumps(records))
    indexed = SampleFile.index(compact)
    assert [indexed.location(i) for i in range(3)] == [
        f"{compact}:1 (element {i})" for i in range(3)
    ]
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(records, indent=1))
    indexed = SampleFile.index(pretty)
    assert [indexed.location(i) for i in range(3)] == [f"{pretty}:{n}" for n in (2, 5, 8)]


def test_json_list_elements_lines_and_garbage(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"t": "]}[{\\""},\n  7,\n  {"t": [1, {"x": 2}]}\n]\n')
    indexed = SampleFile.index(path)
    assert len(indexed) == 3
    assert [int(line) for line in indexed.lines] == [2, 3, 4]
    assert indexed.read_record(0) == {"t": ']}[{"'}
    assert indexed.read_record(2) == {"t": [1, {"x": 2}]}
    with pytest.raises(SampleError) as err:  # 7 is read, but is no object
        parse_record(indexed.read_record(1), base_dir=tmp_path, location="x")
    assert err.value.reason == "malformed_json"


def test_each_value_between_json_list_objects_is_a_record_of_its_own(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"a": 1}, 5, "s, t",\n null, {"a": 2}, tru]')
    indexed = SampleFile.index(path)
    assert len(indexed) == 6  # 5, "s, t", null and tru are skipped one by one
    assert [int(line) for line in indexed.lines] == [1, 1, 1, 2, 2, 2]
    assert [indexed.read_record(i) for i in (1, 2, 3)] == [5, "s, t", None]
    with pytest.raises(SampleError, match="not valid JSON"):
        indexed.read_record(5)


def test_jsonl_with_carriage_returns_alone_is_a_value_error(tmp_path):
    path = tmp_path / "mac.jsonl"
    path.write_bytes(b'{"a": 1}\r{"a": 2}\r')
    with pytest.raises(ValueError, match=r"mac.jsonl' separates its lines by \\r alone"):
        SampleFile.index(path)
    path.write_bytes(b'{"a": 1}\r')  # one record and a stray \r is one record
    assert len(SampleFile.index(path)) == 1


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
@pytest.mark.parametrize("layout", ["jsonl", "json list"])
def test_utf16_and_utf32_files_are_a_value_error(tmp_path, encoding, layout):
    """json.loads reads a UTF-16 line's bytes, so such a file half-parsed: each record, and a
    bad one for the NUL byte after each newline."""
    records = [{"messages": [{"role": "user", "content": "hi"}]}] * 2
    text = "\n".join(map(json.dumps, records)) if layout == "jsonl" else json.dumps(records)
    path = tmp_path / "wide.jsonl"
    path.write_bytes(text.encode(encoding))
    with pytest.raises(ValueError, match=r"wide.jsonl' is not UTF-8 text .*UTF-16 or UTF-32"):
        SampleFile.index(path)
    path.write_bytes(text.encode("utf-8-sig"))  # UTF-8, with or without its mark, is read
    assert len(SampleFile.index(path)) == 2


def test_broken_json_list_and_missing_file_are_value_errors(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"a": 1}, {"a": ')
    with pytest.raises(ValueError, match="not a complete JSON list"):
        SampleFile.index(path)
    with pytest.raises(ValueError, match="does not exist"):
        SampleFile.index(tmp_path / "nope.jsonl")


def test_empty_files_have_no_records(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    (tmp_path / "e.json").write_text(" [ ] ")
    assert len(SampleFile.index(tmp_path / "e.jsonl")) == 0
    assert len(SampleFile.index(tmp_path / "e.json")) == 0


def test_parse_messages_and_sharegpt_with_resolved_media(tmp_path):
    plain = conversation("<image>q", "a", images=["x.png", "/abs/y.png"], system="s")
    sharegpt = conversation(
        "<image>q", "a", images=["x.png", "/abs/y.png"], system="s", sharegpt=True
    )
    parsed = [parse_record(r, base_dir=tmp_path, location="f:1") for r in (plain, sharegpt)]
    assert parsed[0] == parsed[1]
    assert [t["role"] for t in parsed[0].messages] == ["system", "user", "assistant"]
    assert parsed[0].images == [os.path.join(tmp_path, "x.png"), "/abs/y.png"]
    single = parse_record({**plain, "videos": "frames/"}, base_dir=tmp_path, location="f:1")
    assert single.videos == [os.path.join(tmp_path, "frames/")]


def test_neighbouring_formats_keys_are_read(tmp_path):
    plain = parse_record(
        conversation("<image>q", "a", images=["x.png"], system="s"), base_dir=tmp_path, location="f"
    )
    llava = conversation("<image>q", "a", sharegpt=True)  # LLaVA: one "image", no system
    llava["image"] = "x.png"
    llama_factory = {**conversation("<image>q", "a"), "images": ["x.png"], "system": "s"}
    exported = {**conversation("<image>q", "a", images=["x.png"], system="s", sharegpt=True)}
    exported.update(messages=None, videos=None)  # columns another record has, written as null
    for record in (llama_factory, exported):
        assert parse_record(record, base_dir=tmp_path, location="f") == plain
    llava_parsed = parse_record(llava, base_dir=tmp_path, location="f")
    assert llava_parsed.images == plain.images and llava_parsed.messages == plain.messages[1:]


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({**conversation("q", "a", images=["x.png"]), "image": "y.png"}, "both 'images' and"),
        ({**conversation("q", "a"), "video": "v.mp4", "videos": ["v.mp4"]}, "both 'videos'"),
        ({**conversation("q", "a", system="s"), "system": "t"}, "a 'system' key and a system"),
        ({**conversation("q", "a"), "system": ["s"]}, "'system' must be text"),
    ],
)
def test_ambiguous_neighbouring_keys_are_invalid(tmp_path, record, match):
    with pytest.raises(SampleError, match=match) as err:
        parse_record(record, base_dir=tmp_path, location="f:1")
    assert err.value.reason == "invalid_sample"


@pytest.mark.parametrize(
    ("record", "reason", "match"),
    [
        ([1, 2], "malformed_json", "JSON object"),
        ({"text": "hi"}, "invalid_sample", "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "invalid_sample", "role"),
        ({"messages": [{"role": "user", "content": 3}]}, "invalid_sample", "string"),
        ({"messages": [{"role": "user", "content": "q"}]}, "no_assistant_turn", "assistant"),
        ({**conversation("q", "a"), "images": [3]}, "invalid_sample", "images"),
        ({**conversation("q", "a"), "videos": {"a": 1}}, "invalid_sample", "videos"),
    ],
)
def test_bad_records_raise_sample_error_with_reason(tmp_path, record, reason, match):
    with pytest.raises(SampleError, match=match) as err:
        parse_record(json.loads(json.dumps(record)), base_dir=tmp_path, location="f:1")
    assert err.value.reason == reason


@pytest.mark.parametrize(
    "record",
    [
        {"messages": [{"role": "user", "content": "q"}], "images": ["a\0.png"]},
        {"messages": [{"role": "user", "content": "q"}], "videos": ["\ud800.mp4"]},
    ],
)
def test_media_paths_the_os_cannot_take_are_invalid(tmp_path, record):
    with pytest.raises(SampleError, match="NUL character|not a valid file name") as err:
        parse_record({**record, **conversation("q", "a")}, base_dir=tmp_path, location="f:1")
    assert err.value.reason == "invalid_sample"


def test_surrogates_from_invalid_utf8_bytes_are_caught_where_they_matter(tmp_path):
    path = tmp_path / "a.jsonl"  # json decodes surrogates encoded as UTF-8 bytes ("surrogatepass")
    path.write_bytes(
        json.dumps(conversation("caf\udce9", "a"), ensure_ascii=False).encode(
            "utf-8", "surrogatepass"
        )
    )
    with pytest.raises(SampleError, match="lone surrogate") as err:
        SampleFile.index(path).read(0)
    assert err.value.reason == "invalid_sample"


def test_a_surrogate_standing_for_a_file_name_byte_is_a_valid_path(tmp_path):
    record = {**conversation("<image>q", "a"), "images": ["caf\udce9.png"]}  # b"caf\xe9.png"
    parsed = parse_record(record, base_dir=tmp_path, location="f:1")
    assert os.fsencode(parsed.images[0]) == os.fsencode(tmp_path) + b"/caf\xe9.png"


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"messages": ' + b"7" * 5000 + b"}", "digits"),
        (b'{"messages": "caf\xe9"}', "can't decode"),  # Latin-1, not UTF-8
        (b"\xff\xfe{}", "can't decode|Expecting"),
    ],
)
def test_records_json_cannot_take_are_malformed(tmp_path, line, match):
    path = tmp_path / "a.jsonl"
    path.write_bytes(line + b"\n")
    with pytest.raises(SampleError, match=match) as err:
        SampleFile.index(path).read(0)
    assert err.value.reason == "malformed_json"


@pytest.mark.parametrize("indent", [None, 2])
def test_json_list_with_a_byte_order_mark_is_a_list(tmp_path, indent):
    records = [conversation("q", "a"), conversation("r", "b")]
    plain = SampleFile.index(write_json_list(tmp_path / "a.json", records, indent=indent))
    path = tmp_path / "bom.json"
    path.write_bytes(BOM + plain.path.read_bytes())
    indexed = SampleFile.index(path)
    assert [indexed.read_record(i) for i in range(len(indexed))] == records
    assert indexed.lines.tolist() == plain.lines.tolist()


@pytest.mark.parametrize("first_line", [b"", b"\r", b" "])
def test_jsonl_with_a_byte_order_mark_reads_its_first_record(tmp_path, first_line):
    path = tmp_path / "a.jsonl"
    path.write_bytes(BOM + first_line + b'{"a": 1}\n{"a": 2}\n')
    indexed = SampleFile.index(path)
    assert [indexed.read_record(i) for i in range(len(indexed))] == [{"a": 1}, {"a": 2}]
    assert indexed.location(0) == f"{path}:1"
    path.write_bytes(BOM + first_line + b'\n{"a": 1}\n')  # a first line that is only the mark
    indexed = SampleFile.index(path)
    assert len(indexed) == 1 and indexed.location(0) == f"{path}:2"


def test_a_directory_is_no_data_file(tmp_path):
    with pytest.raises(ValueError, match="is a directory; expected a JSONL or JSON-list file"):
        SampleFile.index(tmp_path)


def test_a_data_file_that_vanishes_or_shrinks_after_indexing_is_a_data_file_error(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [conversation("q", "a")] * 3)
    indexed = SampleFile.index(path)
    path.write_text(json.dumps(conversation("q", "a")) + "\n")
    assert indexed.read(0).location == f"{path}:1"
    with pytest.raises(DataFileError, match="shorter than when it was indexed") as err:
        indexed.read(2)
    assert f"{path}:3" in str(err.value)
    path.unlink()
    with pytest.raises(DataFileError, match="can no longer be read") as err:
        indexed.read(0)
    assert isinstance(err.value, ValueError) and not isinstance(err.value, SampleError)
