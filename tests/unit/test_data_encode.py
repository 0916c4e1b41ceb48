"""Training samples through the one Processor: labels on every assistant turn, errors mapped
to skip reasons (reserved tokens in text, anything unforeseen), over-long samples skipped, skips
logged with file:line (rate-limited); only a vanished data file and interrupts go through."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from longvita.config import tiny
from longvita.data import encode as encode_module
from longvita.data.encode import SampleReader, encode_sample
from longvita.data.mixture import Mixture
from longvita.data.samples import DataFileError, parse_record
from longvita.data.stats import DataStats, SampleError
from longvita.processing.processor import Processor
from longvita.processing.tokens import load_tokenizer
from longvita.testing import (
    conversation,
    make_image,
    write_jsonl,
    write_mixture,
    write_tiny_tokenizer,
)


@pytest.fixture(scope="module")
def processor(tmp_path_factory) -> Processor:
    directory = write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return Processor(load_tokenizer(directory), tiny().vision)


def _spans(labels: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs of supervised positions."""
    supervised = (labels != -100).tolist() + [False]
    spans, start = [], None
    for i, flag in enumerate(supervised):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_every_assistant_turn_is_supervised_with_im_end_and_newline(processor, tmp_path):
    make_image(tmp_path / "a.png", (56, 56))
    record = conversation(
        "<image>\nWhat?",
        ["A red square.", "A blue circle."],
        system="Be brief.",
        images=["a.png"],
        sharegpt=True,
    )
    raw = parse_record(record, base_dir=tmp_path, location="f:1")
    sample = encode_sample(processor, raw)
    decode = processor.tokenizer.decode
    answers = [decode(sample.labels[lo:hi].tolist()) for lo, hi in _spans(sample.labels)]
    assert answers == ["A red square.<|im_end|>\n", "A blue circle.<|im_end|>\n"]
    assert torch.equal(
        sample.labels[sample.labels != -100], sample.input_ids[sample.labels != -100]
    )
    assert sample.num_tiles == 1 and int(sample.visual_mask.sum()) == 4
    assert not bool((sample.labels[sample.visual_mask] != -100).any())


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (conversation("<image>\nq", "a", images=["none.png"]), "media_error"),
        (conversation("<video>\nq", "a", videos=["none.mp4"]), "media_error"),
        (conversation("<image>\nq", "a"), "tag_media_mismatch"),
        (conversation("q", "a", images=["x.png"]), "tag_media_mismatch"),
    ],
)
def test_processor_errors_become_skip_reasons(processor, tmp_path, record, reason):
    raw = parse_record(record, base_dir=tmp_path, location="f:1")
    with pytest.raises(SampleError) as err:
        encode_sample(processor, raw)
    assert err.value.reason == reason


def test_reader_skips_too_long_and_rate_limits_warnings(processor, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(encode_module, "MAX_WARNINGS", 2)
    long_answer = "The quick brown fox jumps over the lazy dog. " * 10
    write_jsonl(
        tmp_path / "d.jsonl",
        ["{oops"] * 4 + [conversation("q", long_answer), conversation("q", "ok")],
    )
    path = write_mixture(tmp_path / "m.yaml", {"g": {"data_paths": ["d.jsonl"]}})
    mixture = Mixture.from_yaml(path, data_root=tmp_path)
    reader = SampleReader(mixture, processor, seq_len=64)
    stats, lengths = DataStats(), []
    with caplog.at_level(logging.DEBUG, logger="longvita.data.encode"):
        results = [reader.read(i, stats, on_length=lengths.append) for i in range(6)]
    assert [r is None for r in results] == [True] * 5 + [False]
    assert results[-1].group == "g" and results[-1].source == str(tmp_path / "d.jsonl")
    assert dict(stats.skipped) == {"malformed_json": 4, "too_long": 1}
    assert len(lengths) == 2 and lengths[0] > 64  # over-long samples are measured too
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("(malformed_json)" in r.getMessage() for r in warnings) == 2
    assert any("logged at DEBUG" in r.getMessage() for r in warnings)
    assert f"{tmp_path / 'd.jsonl'}:5" in caplog.text  # the too-long record, with its line


RESERVED = [
    "<IMG_CONTEXT>",
    "<VID_CONTEXT>",
    "<PATCH_CONTEXT>",
    "<img>",
    "</img>",
    "<vid>",
    "</vid>",
    "<patch>",
    "</patch>",
]


def _reader(tmp_path, processor, records, *, seq_len: int = 4096):
    """A reader over one JSONL file of `records` (record id = line - 1), and the file."""
    path = write_jsonl(tmp_path / "d.jsonl", records)
    mixture = Mixture.from_yaml(
        write_mixture(tmp_path / "m.yaml", {"g": {"data_paths": ["d.jsonl"]}}), data_root=tmp_path
    )
    return SampleReader(mixture, processor, seq_len=seq_len), path


@pytest.mark.parametrize("speaker", ["user", "assistant"])
@pytest.mark.parametrize("token", RESERVED)
def test_reserved_tokens_typed_as_text_are_invalid_samples(processor, tmp_path, token, speaker):
    question, answer = (
        (f"What is {token}?", "A.") if speaker == "user" else ("What?", f"A {token}.")
    )
    records = [conversation("q", "ok"), conversation(question, answer), conversation("r", "ok")]
    reader, path = _reader(tmp_path, processor, records)
    stats = DataStats()
    results = [reader.read(i, stats) for i in range(3)]
    assert [r is None for r in results] == [False, True, False]
    assert dict(stats.skipped) == {"invalid_sample": 1}
    assert stats.examples["invalid_sample"][0].startswith(f"{path}:2: the text contains {token!r}")


@pytest.mark.parametrize("speaker", ["user", "assistant"])
@pytest.mark.parametrize("token", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
def test_chat_format_tokens_typed_in_a_turn_are_invalid_samples(
    processor, tmp_path, token, speaker
):
    # as text they would become the real ids: a turn ended or opened mid-text, and an answer
    # that teaches the model to stop (or pad) in the middle
    question, answer = (
        (f"hi{token}\nassistant\nFAKE", "A.") if speaker == "user" else ("Q?", f"A {token} B.")
    )
    records = [conversation("q", "ok"), conversation(question, answer), conversation("r", "ok")]
    reader, path = _reader(tmp_path, processor, records)
    stats = DataStats()
    assert [reader.read(i, stats) is None for i in range(3)] == [False, True, False]
    assert dict(stats.skipped) == {"invalid_sample": 1}
    assert stats.examples["invalid_sample"][0].startswith(
        f"{path}:2: the {speaker} turn's text contains {token!r}: the chat format's own tokens"
    )


def test_the_records_of_the_issue_are_skips(processor, tmp_path):
    surrogate = (
        '{"messages": [{"role": "user", "content": "caf\\udce9"}, '
        '{"role": "assistant", "content": "a"}]}'
    )  # the JSON text holds the escape: it decodes to a lone surrogate
    deep = "[" * 100_000 + "]" * 100_000
    reader, path = _reader(tmp_path, processor, [surrogate, deep, conversation("q", "a")])
    stats = DataStats()
    assert [reader.read(i, stats) is None for i in range(3)] == [True, True, False]
    assert dict(stats.skipped) == {"invalid_sample": 1, "malformed_json": 1}
    assert "lone surrogate" in stats.examples["invalid_sample"][0]
    assert stats.examples["malformed_json"][0].startswith(f"{path}:2: not valid JSON: nested too")


def test_a_surrogate_escaped_file_name_finds_its_file(processor, tmp_path):
    make_image(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png"), (56, 56))  # not UTF-8
    record = conversation("<image>\nq", "a", images=["caf\udce9.png"])
    reader, _ = _reader(tmp_path, processor, [record])
    sample = reader.read(0, DataStats())
    assert sample is not None and sample.num_tiles == 1


class Surprise(Exception):
    pass


@pytest.mark.parametrize(
    ("error", "described"),
    [
        (KeyError("boom"), "KeyError: 'boom'"),
        (ZeroDivisionError(), "ZeroDivisionError"),
        (RecursionError("maximum recursion depth exceeded"), None),
        (MemoryError("Unable to allocate 74.5 GiB for an array"), None),
        (Surprise("from a library"), f"{__name__}.Surprise: from a library"),
    ],
)
def test_any_other_exception_is_an_encode_error_skip(
    processor, tmp_path, monkeypatch, caplog, error, described
):
    def explode(*args, **kwargs):
        raise error

    reader, path = _reader(tmp_path, processor, [conversation("q", "a")] * 3)
    monkeypatch.setattr(processor, "encode_conversation", explode)
    stats = DataStats()
    with caplog.at_level(logging.DEBUG, logger="longvita.data.encode"):
        assert [reader.read(i, stats) for i in range(3)] == [None] * 3
    assert dict(stats.skipped) == {"encode_error": 3}
    described = described or f"{type(error).__name__}: {error}"
    assert stats.examples["encode_error"][1] == f"{path}:2: {described}"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"skipped sample (encode_error) {path}:2: {described}" in warnings
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
    assert any(f"{path}:2" in r.getMessage() and r.exc_info[1] is error for r in debug)
    assert "Traceback" in caplog.text and "in explode" in caplog.text


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(3)])
def test_interrupts_go_through(processor, tmp_path, monkeypatch, error):
    def explode(*args, **kwargs):
        raise error

    reader, _ = _reader(tmp_path, processor, [conversation("q", "a")])
    monkeypatch.setattr(processor, "encode_conversation", explode)
    stats = DataStats()
    with pytest.raises(type(error)):
        reader.read(0, stats)
    assert stats.num_skipped == 0


def test_a_data_file_gone_after_indexing_stops_the_run(processor, tmp_path):
    reader, path = _reader(tmp_path, processor, [conversation("q", "a")])
    path.unlink()
    with pytest.raises(DataFileError, match=f"{path}:1"):
        reader.read(0, DataStats())


def test_skip_messages_are_printable_and_bounded(processor, tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise Surprise("caf\udce9 " + "x" * 10_000)

    reader, _ = _reader(tmp_path, processor, [conversation("q", "a")])
    monkeypatch.setattr(processor, "encode_conversation", explode)
    stats = DataStats()
    reader.read(0, stats)
    example = stats.examples["encode_error"][0]
    assert "caf\\udce9" in example and example.encode("utf-8")
    assert len(example) < 700 and example.endswith("characters)")
