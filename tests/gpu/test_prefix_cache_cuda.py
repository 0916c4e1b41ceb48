"""The prefix cache on a CUDA device: a second question reused from memory and from a bf16 or
fp32 file (written from GPU tensors, read into a GPU cache) answers as a cold run. Skipped
without a GPU; `make gpu-check` runs it on a lent one."""

from __future__ import annotations

import pytest
import torch

import longvita
from longvita.testing import make_video

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FIRST, SECOND = "<video>\nWhat colour is the bar?", "<video>\nHow many frames are there?"


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [("float32", {}), ("bfloat16", {"atol": 0.1, "rtol": 0.05})]
)
def test_second_question_on_cuda_from_memory_and_disk(tmp_path, dtype, tolerance):
    video = [make_video(tmp_path / "clip.mp4", num_frames=24, fps=4)]
    options = {"max_new_tokens": 8, "return_scores": True, "prefill_chunk": 7}

    def load(**cache):
        return longvita.load(longvita.DEMO_MODEL, device="cuda", dtype=dtype, **cache)

    cold = load(prefix_cache_bytes=0).generate(SECOND, videos=video, **options)
    directory = tmp_path / "prefix"
    load(prefix_cache_bytes=0, prefix_cache_dir=directory).generate(FIRST, videos=video, **options)
    reader = load(prefix_cache_bytes=0, prefix_cache_dir=directory)
    disk = reader.generate(SECOND, videos=video, **options)
    pipe = load()
    pipe.generate(FIRST, videos=video, **options)
    memory = pipe.generate(SECOND, videos=video, **options)
    for got in (memory, disk):
        assert got.cached_tokens > 0 and got.tiles_encoded_per_rank == [0]
        assert got.token_ids == cold.token_ids
        torch.testing.assert_close(got.scores, cold.scores, **tolerance)
