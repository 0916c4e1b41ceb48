"""The demo's synthetic curriculum: readable by the ordinary data pipeline without a skip,
needles where they should be, splits that share no render, a tokenizer with one-token digits."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from longvita.config import demo
from longvita.data.encode import SampleReader
from longvita.data.mixture import Mixture
from longvita.data.stats import DataStats
from longvita.data.synth import (
    BANK_SIZE,
    COLOURS,
    DIGITS,
    FIND_AMONG,
    LETTERS,
    MIN_BANK_SIZE,
    NEEDLE_QUESTION,
    TEXT_TASKS,
    Renderer,
    Writer,
    synthesize,
    text_sample,
)
from longvita.processing.processor import Processor
from longvita.processing.tokens import load_tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    mixtures = synthesize(out, scale=0.003, seed=0, bank_size=300)
    return out, mixtures


def test_every_stage_reads_without_a_skip(data):
    out, mixtures = data
    processor = Processor(load_tokenizer(out / "tokenizer"), demo().vision)
    for stage, mixture in mixtures.items():
        reader = SampleReader(Mixture.from_yaml(mixture, data_root=mixture.parent), processor,
                              seq_len=16384, max_frames=64)  # fmt: skip
        stats = DataStats()
        samples = [reader.read(i, stats) for i in range(len(reader.mixture))]
        assert stats.num_skipped == 0, (stage, stats.summary())
        assert all(s is not None and int((s.labels != -100).sum()) > 0 for s in samples)


def test_needles_are_one_digit_among_bank_letters(data):
    out, _ = data
    records = [json.loads(line) for line in (out / "stage3" / "samples.jsonl").open()]
    needles = [r for r in records if NEEDLE_QUESTION in r["messages"][0]["content"]]
    assert needles
    bank = {os.stat(p).st_ino for p in (out / "bank-seed0").iterdir()}
    for record in needles:
        video = out / "stage3" / record["videos"][0]
        if video.is_dir():
            frames = sorted(video.iterdir())
            assert 16 <= len(frames) <= 512
            fresh = [f for f in frames if os.stat(f).st_ino not in bank]  # the needle render
            assert len(fresh) == 1
        assert record["messages"][1]["content"] in DIGITS


def test_stage0_tasks_come_in_their_shares_with_the_right_answers(tmp_path):
    writer = Writer(tmp_path, Renderer(3), bank=[])
    answers = {"digit": DIGITS, "letter": LETTERS, "colour": list(COLOURS)}
    found = dict.fromkeys(TEXT_TASKS, 0)
    for _ in range(1000):
        question, answer = (m["content"] for m in text_sample(writer)["messages"])
        if question.startswith("Repeat: "):
            task = "repeat" if answer.startswith("a ") else "copy"
            assert answer == question[len("Repeat: ") :], question
        elif question.startswith("How many digits"):
            task = "count"
            assert sum(s in DIGITS for s in question.split(": ")[1].rstrip("?").split()) == int(
                answer
            )
        else:
            task, symbols = question[len("Which ") :].split(" is in: ")
            symbols = symbols.rstrip("?").split(" ")
            assert answer in answers[task] and symbols.count(answer) == 1, question
            assert all(s in FIND_AMONG[task] for s in symbols if s != answer), question
        found[task] += 1
    shares = {task: count / 1000 for task, count in found.items()}
    assert all(abs(shares[task] - TEXT_TASKS[task]) < 0.05 for task in TEXT_TASKS), shares


def test_splits_share_no_render():
    a, b = Renderer(0), Renderer(1)
    item = a.item("digit", "7", "red")
    assert not np.array_equal(np.asarray(a.render(item)), np.asarray(b.render(item)))
    again = Renderer(0)
    assert np.array_equal(np.asarray(again.render(item)), np.asarray(Renderer(0).render(item)))


def test_digits_are_one_token_each(data):
    out, _ = data
    tokenizer = load_tokenizer(out / "tokenizer")
    assert all(len(tokenizer.encode(d, add_special_tokens=False)) == 1 for d in DIGITS)
    assert len(tokenizer) <= demo().vocab_size


def test_renders_are_tiles(data):
    out, _ = data
    image = next((out / "stage1" / "media").glob("*.png"))
    with Image.open(image) as opened:
        assert opened.size == (demo().vision.image_size,) * 2


def test_the_letter_bank_scales_with_the_data(tmp_path):
    synthesize(tmp_path / "small", stages=(0,), scale=0.001)
    assert len(list((tmp_path / "small" / "bank-seed0").iterdir())) == MIN_BANK_SIZE
    synthesize(tmp_path / "given", stages=(0,), scale=0.001, bank_size=7)
    assert len(list((tmp_path / "given" / "bank-seed0").iterdir())) == 7
    assert BANK_SIZE * 0.001 < MIN_BANK_SIZE  # the first case was the floor
