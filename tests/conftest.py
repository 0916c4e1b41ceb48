"""Shared fixtures: a tiny random checkpoint, synthetic media, the real Qwen2 tokenizer, gloo
ranks."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch.distributed as dist

from longvita.testing import make_image, make_tiny_checkpoint, make_video

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared/reference/qwen2-tokenizer"


def pytest_configure(config) -> None:
    """A shell that starts the tests in the background (`make test &`, nohup: POSIX ignores
    SIGINT for a background job when job control is off) would hand every Ctrl-C test, and
    every process they start, an ignored SIGINT: give this process the interpreter's usual
    handler back, as in a terminal."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"), seed=0)


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    return {
        "image": make_image(root / "scene.png", (640, 360)),
        "wide": make_image(root / "wide.png", (1000, 200), seed=1),
        "video": make_video(root / "clip.mp4", num_frames=12, fps=4),
    }


@pytest.fixture(scope="session")
def qwen2_tokenizer_dir() -> Path:
    if not (SHARED_TOKENIZER / "vocab.json").is_file():
        pytest.skip(f"the real Qwen2.5 tokenizer is not at {SHARED_TOKENIZER} (../shared absent)")
    return SHARED_TOKENIZER


@pytest.fixture
def ranks():
    """`run_on_ranks` from tests.distributed.spawn: a function run on N gloo ranks spawned on
    this machine; skips the test where gloo is missing."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    from tests.distributed.spawn import run_on_ranks

    return run_on_ranks
