"""Training samples through the one Processor: labels on every assistant turn, errors mapped
to skip reasons, over-long samples skipped, skips logged with file:line (rate-limited)."""

from __future__ import annotations

import logging

import pytest
import torch

from longvita.config import tiny
from longvita.data import encode as encode_module
from longvita.data.encode import SampleReader, encode_sample
from longvita.data.mixture import Mixture
from longvita.data.samples import parse_record
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
