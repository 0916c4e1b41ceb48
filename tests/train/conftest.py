"""A tiny training setup: a tokenizer, a small mixture of text and image samples, a stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from longvita.testing import (
    conversation,
    make_image,
    write_jsonl,
    write_mixture,
    write_tiny_tokenizer,
)

STAGE = """\
init: {{model: tiny, tokenizer: {tokenizer}}}
trainable: {{vision: true, projector: true, llm: true}}
optim: {{lr: 1.0e-3, min_lr: 1.0e-4}}
schedule: {{steps: 6, warmup_fraction: 0.2}}
batch: {{global_sequences: 2}}
data: {{mixture: {mixture}, seq_len: 128}}
checkpoint: {{interval: 2, keep_latest: 2}}
log: {{interval: 1, tensorboard: false}}
seed: 7
"""


@pytest.fixture(scope="session")
def train_setup(tmp_path_factory) -> dict[str, Path]:
    """{"tokenizer", "mixture", "stage"}: 40 samples, half of them with an image."""
    root = tmp_path_factory.mktemp("train-setup")
    tokenizer = write_tiny_tokenizer(root / "tokenizer")
    data = root / "data"
    data.mkdir()
    for i in range(4):
        make_image(data / f"img{i}.png", (64 + 8 * i, 48), seed=i)
    records = [
        conversation("<image>\nWhat is this?", "A red square.", images=[f"img{i % 4}.png"])
        if i % 2
        else conversation("Describe a quiet morning.", "The quick brown fox.")
        for i in range(40)
    ]
    write_jsonl(data / "samples.jsonl", records)
    mixture = write_mixture(data / "mixture.yaml", {"g": {"data_paths": ["samples.jsonl"]}})
    stage = root / "stage.yaml"
    stage.write_text(STAGE.format(tokenizer=tokenizer, mixture=mixture))
    return {"tokenizer": tokenizer, "mixture": mixture, "stage": stage, "root": root}
