"""`make demo` end to end: the shipped demo model answers questions about three images and a
1,024-frame video rendered now (never seen in training), printing answer and truth.

The shipped model gets all 4 right with the demo's seed (benchmarks/results/demo_model.md)."""

from __future__ import annotations

import re
import subprocess
import sys

from longvita import DEMO_MODEL


def test_the_shipped_demo_model_answers_about_unseen_media(tmp_path):
    assert (DEMO_MODEL / "config.json").is_file(), f"no demo model at {DEMO_MODEL}"
    done = subprocess.run(
        [sys.executable, "-m", "longvita", "demo", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answers = re.findall(r"A: '(.*?)'\s+truth: '(.*?)'", done.stdout)
    assert len(answers) == 4, done.stdout
    right = sum(answer == truth for answer, truth in answers)
    assert right == 4, done.stdout
    assert f"{right} of 4 right" in done.stdout, done.stdout


def test_a_frame_count_below_one_is_refused_before_any_question(tmp_path, capsys):
    from longvita.cli import main

    assert main(["demo", "--frames", "0", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--frames must be >= 1, got 0" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # no image rendered, no question asked


def test_the_shipped_demo_model_has_the_official_layout():
    """What `Pipeline.save` writes (DESIGN.md's checkpoint layout): the slow tokenizer's files
    too, which transformers 4 (the official code's) needs, and no transformers-5-only keys."""
    import json

    from longvita.processing.tokens import V5_ONLY_CONFIG_KEYS

    names = {path.name for path in DEMO_MODEL.iterdir()}
    official = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert official | {"vocab.json", "merges.txt"} <= names
    config = json.loads((DEMO_MODEL / "tokenizer_config.json").read_text())
    assert "added_tokens_decoder" in config
    assert not set(V5_ONLY_CONFIG_KEYS) & set(config)
