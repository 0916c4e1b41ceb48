"""V-NIAH: the protocol and its scoring on a stub that answers right at known depths, the
report, and the real pipeline end to end on a tiny random model (it runs; nothing to learn)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from longvita.eval.vniah import (
    VniahConfig,
    needle_index,
    rendered_haystack,
    run_vniah,
    summary,
    write_report,
)


class StubAnswerer:
    """Needles (the first frames it encodes) are marked 1..N, haystack frames 0. It answers
    right only when the needle sits at one of `right_depths`; the digit of needle n is n % 10
    (the protocol's cycle)."""

    def __init__(self, right_depths: set[float]) -> None:
        self.right_depths = right_depths
        self.calls = 0
        self.encoded_frames = 0

    def encode(self, frames: list[Image.Image]) -> torch.Tensor:
        self.calls += 1
        self.encoded_frames += len(frames)
        marks = torch.arange(1, len(frames) + 1) if self.calls == 1 else torch.zeros(len(frames))
        return marks.float()[:, None, None]  # [n, 1, 1]

    def _needle(self, features: torch.Tensor) -> tuple[int, int]:
        (position,) = features[:, 0, 0].nonzero()[0].tolist()
        return position, int(features[position, 0, 0]) - 1

    def answer(self, features: torch.Tensor, question: str) -> str:
        position, needle = self._needle(features)
        depth = position / (features.shape[0] - 1)
        return str(needle % 10) if round(depth, 2) in self.right_depths else "no idea"

    def best_of(self, features, question, candidates):
        return self.answer(features, question)


def test_scoring_counts_right_answers_per_cell():
    config = VniahConfig(frames=(5, 9), depths=(0.0, 0.25, 0.5, 1.0), needles=7)
    stub = StubAnswerer(right_depths={0.0, 0.5})
    cells = run_vniah(stub, config, haystack_frames=rendered_haystack(0))
    got = {(c.frames, c.depth): c.accuracy for c in cells}
    assert got == {(f, d): 1.0 if d in (0.0, 0.5) else 0.0 for f in (5, 9) for d in config.depths}
    assert all(c.n == 7 for c in cells)
    report = summary(cells, config)
    assert report["accuracy"] == 0.5
    assert report["accuracy_by_frames"] == {"5": 0.5, "9": 0.5}
    # each haystack encoded once (4 and 8 frames) plus the needles once: not once per question
    assert stub.encoded_frames == 7 + 4 + 8


class HaystackRecorder(StubAnswerer):
    """The stub, also told which haystack each needle was asked in: `haystack(count, which)`
    gives frames that `encode` marks -(which + 1) (the needles 1..N as before)."""

    def __init__(self) -> None:
        super().__init__(right_depths={0.0, 1.0})
        self.which = -1
        self.drawn: list[tuple[int, int]] = []
        self.asked: dict[int, set[int]] = {}

    def haystack(self, count: int, which: int) -> list[Image.Image]:
        self.which = which
        self.drawn.append((count, which))
        return [Image.new("RGB", (2, 2))] * count

    def encode(self, frames):
        marks = super().encode(frames)
        return marks if self.calls == 1 else marks - 1 - self.which

    def _needle(self, features):
        (position,) = (features[:, 0, 0] > 0).nonzero()[0].tolist()
        return position, int(features[position, 0, 0]) - 1

    def answer(self, features, question):
        position, needle = self._needle(features)
        others = torch.cat([features[:position], features[position + 1 :]])[:, 0, 0]
        self.asked.setdefault(needle, set()).update(int(-v) - 1 for v in others.unique())
        return super().answer(features, question)


def test_several_haystacks_each_take_their_needles():
    config = VniahConfig(frames=(5, 9), depths=(0.0, 1.0), needles=7, haystacks=3)
    stub = HaystackRecorder()
    cells = run_vniah(stub, config, haystack_frames=stub.haystack)
    assert stub.drawn == [(4, 0), (4, 1), (4, 2), (8, 0), (8, 1), (8, 2)]  # each encoded once
    assert stub.asked == {n: {n % 3} for n in range(7)}
    assert {(c.frames, c.depth): c.accuracy for c in cells} == {
        (f, d): 1.0 for f in (5, 9) for d in (0.0, 1.0)
    }


def test_rendered_haystacks_differ_and_keep_their_prefix():
    haystack = rendered_haystack(0)
    first, second = haystack(6, 0), haystack(6, 1)
    assert [f.tobytes() for f in haystack(3, 0)] == [f.tobytes() for f in first[:3]]
    assert all(a.tobytes() != b.tobytes() for a, b in zip(first, second, strict=True))


def test_needles_go_where_the_depth_says():
    assert [needle_index(9, d) for d in (0.0, 0.25, 0.5, 1.0)] == [0, 2, 4, 8]


def test_report_files(tmp_path):
    config = VniahConfig(frames=(4, 8), depths=(0.0, 1.0), needles=3, teacher_forced=True)
    cells = run_vniah(StubAnswerer({1.0}), config, haystack_frames=rendered_haystack(1))
    report = write_report(cells, config, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["accuracy"] == report["accuracy"] == 0.5
    assert {"frames", "depth", "accuracy", "n"} == set(saved["grid"][0])
    with Image.open(tmp_path / "heatmap.png") as heatmap:
        assert heatmap.format == "PNG"


def test_a_length_or_depth_given_twice_is_one_row_or_column():
    config = VniahConfig(frames=(4, 8, 4), depths=(0.0, 1.0, 0.0))
    assert config.frames == (4, 8) and config.depths == (0.0, 1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"frames": (1,)}, "frames must be >= 2"), ({"depths": (1.5,)}, "depths must be <= 1.0"),
     ({"needles": 0}, "needles must be >= 1"), ({"frames": ()}, "at least one"),
     ({"needles": 2, "haystacks": 3}, r"haystacks \(3\) > needles \(2\)"),
     ({"haystacks": 2, "haystack": "video.mkv"}, "needs rendered haystacks")],
)  # fmt: skip
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VniahConfig(**kwargs)


def test_the_command_on_a_tiny_model(tiny_checkpoint, tmp_path, capsys):
    from longvita.cli import main

    out = tmp_path / "vniah"
    argv = ["eval", "vniah", "--model", str(tiny_checkpoint), "--out", str(out),
            "--frames", "4", "12", "--depths", "0", "1", "--needles", "2"]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert 0.0 <= printed["accuracy"] <= 1.0
    assert len(json.loads((out / "results.json").read_text())["grid"]) == 4
    assert main([*argv, "--teacher-forced", "--out", str(tmp_path / "tf")]) == 0  # digits: 1 token


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_video_haystack_takes_frames_evenly_from_all_of_the_video(tmp_path, kind):
    from longvita.eval.vniah import video_haystack
    from longvita.testing import make_video

    if kind == "file":
        source = make_video(tmp_path / "hay.mp4", num_frames=10, fps=5, size=(32, 24))
    else:
        source = tmp_path / "frames"
        source.mkdir()
        for i in range(10):
            Image.new("RGB", (32, 24), (25 * i, 0, 0)).save(source / f"{i}.png")
    haystack = video_haystack(str(source), max_pixels=10**6)  # planned from headers, at once
    frames = haystack(4)
    assert len(frames) == 4 and all(frame.size == (32, 24) for frame in frames)
    if kind == "directory":  # linspace(0, 9, 4) rounded: frames 0, 3, 6, 9
        assert [frame.getpixel((0, 0))[0] for frame in frames] == [0, 75, 150, 225]


def test_lengths_past_the_model_s_positions_are_refused_before_any_encoding(tiny_checkpoint):
    import longvita
    from longvita.errors import PromptError
    from longvita.eval.vniah import PipelineAnswerer

    pipe = longvita.load(tiny_checkpoint)
    answerer = PipelineAnswerer(pipe)
    answerer.check_lengths([4], "Which digit?")
    too_many = pipe.config.max_position_embeddings // pipe.processor.tokens_per_tile + 1
    with pytest.raises(PromptError, match=rf"; use haystacks shorter than {too_many:,} frames"):
        answerer.check_lengths([4, too_many], "Which digit?")
