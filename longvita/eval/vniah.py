"""V-NIAH, LongVA's visual needle-in-a-haystack: can the model find one frame among thousands?

For each haystack length F (frames) and depth d in [0, 1], a needle frame (a rendered digit,
from the test split: its own seed, never a training render) is put at frame round(d * (F - 1))
of a haystack of F - 1 frames (rendered letters, or frames sampled evenly from a video the user
gives), and the model is asked which digit appears; an answer is right when it is the digit
(exact match after stripping), or, with `teacher_forced`, when the digit has the highest
next-token logit among the ten. A cell of the grid (F, d) is `needles` such questions.

Each haystack's frames go through the ViT and projector once and are reused, with each needle
inserted at each depth, as precomputed features (`infer.engine.EncodedTiles`); the LLM runs one
prefill per question. Owns the protocol, the scoring and the report (results.json and a
LongVA-style heatmap: depth by frames, red at 0% to green at 100%). The model is reached through
`Answerer` (the Pipeline, or a stub in tests).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageDraw

from longvita.checks import check_int, check_number
from longvita.data.synth import DIGITS, NEEDLE_QUESTION, Renderer
from longvita.infer.engine import EncodedTiles
from longvita.infer.request import SamplingParams
from longvita.processing.image import to_pixel_values

logger = logging.getLogger(__name__)

DEFAULT_FRAMES = (16, 64, 256, 1024, 4096)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
TEST_SEED = 20261130
"""The test split's renders: a seed no training split uses."""


@dataclass(frozen=True, kw_only=True)
class VniahConfig:
    frames: tuple[int, ...] = DEFAULT_FRAMES
    """Haystack lengths, in frames (needle included)."""
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    """Where the needle goes: 0 the first frame, 1 the last."""
    needles: int = 20
    """Questions per cell (needle digits cycle through 0-9)."""
    haystacks: int = 1
    """Haystacks per length (rendered ones only): needle n is asked in haystack n % haystacks.
    With one, a single letter that the model takes for a digit fails most of a row."""
    seed: int = TEST_SEED
    haystack: str | None = None
    """A video whose frames, sampled evenly, form the haystacks; None: rendered letters."""
    teacher_forced: bool = False
    """Score by the digits' next-token logits instead of the generated text."""
    question: str = NEEDLE_QUESTION

    def __post_init__(self) -> None:
        if not self.frames or not self.depths:
            raise ValueError("give at least one --frames and one --depths value")
        for name in ("frames", "depths"):  # a value given twice is one row, one column
            object.__setattr__(self, name, tuple(dict.fromkeys(getattr(self, name))))
        for count in self.frames:
            check_int("frames", count, minimum=2)
        for depth in self.depths:
            check_number("depths", depth, at_least=0.0, at_most=1.0)
        check_int("needles", self.needles, minimum=1)
        check_int("haystacks", self.haystacks, minimum=1)
        if self.haystacks > self.needles:
            raise ValueError(f"haystacks ({self.haystacks}) > needles ({self.needles}): "
                             "each haystack needs a needle")  # fmt: skip
        if self.haystack is not None and self.haystacks > 1:
            raise ValueError(f"haystacks={self.haystacks} needs rendered haystacks: a video "
                             f"({self.haystack}) gives one")  # fmt: skip


@dataclass
class Cell:
    frames: int
    depth: float
    accuracy: float
    n: int
    answers: list[str] = field(default_factory=list)
    """The model's answers, for inspection (not in results.json's grid)."""


class Answerer(Protocol):
    """What the eval needs from a model."""

    def encode(self, frames: list[Image.Image]) -> torch.Tensor:
        """Frames through the vision tower: [num_frames, tokens_per_tile, hidden]."""
        ...

    def answer(self, features: torch.Tensor, question: str) -> str:
        """The generated answer to `question` about the video of these frame features."""
        ...

    def best_of(self, features: torch.Tensor, question: str, candidates: list[str]) -> str:
        """The candidate whose (single) token has the highest next-token logit."""
        ...


def needle_index(num_frames: int, depth: float) -> int:
    return round(depth * (num_frames - 1))


def run_vniah(
    answerer: Answerer,
    config: VniahConfig,
    *,
    haystack_frames: Callable[[int, int], list[Image.Image]],
    progress: Callable[[Iterable], Iterable] | None = None,
) -> list[Cell]:
    """The grid: for each length, each haystack (`haystack_frames(count, which)`) encoded once,
    each needle encoded once, then every (depth, needle) asked, needle n in haystack
    n % config.haystacks."""
    renderer = Renderer(config.seed + 1)  # the needles: test renders
    needle_images = [
        renderer.render(renderer.item("digit", DIGITS[n % 10])) for n in range(config.needles)
    ]
    needles = answerer.encode(needle_images)  # [needles, tpt, hidden]
    answers = {(f, d): [""] * config.needles for f in config.frames for d in config.depths}
    runs = [
        (f, h, d) for f in config.frames for h in range(config.haystacks) for d in config.depths
    ]
    iterator = progress(runs) if progress is not None else runs
    encoded: dict[tuple[int, int], torch.Tensor] = {}
    for num_frames, which, depth in iterator:
        if (num_frames, which) not in encoded:
            encoded.clear()  # one haystack in memory at a time
            frames = haystack_frames(num_frames - 1, which)
            encoded[num_frames, which] = answerer.encode(frames)
        hay = encoded[num_frames, which]  # [F - 1, tpt, hidden]
        at = needle_index(num_frames, depth)
        for n in range(which, config.needles, config.haystacks):
            features = torch.cat([hay[:at], needles[n : n + 1], hay[at:]])  # [F, tpt, hidden]
            if config.teacher_forced:
                answer = answerer.best_of(features, config.question, list(DIGITS))
            else:
                answer = answerer.answer(features, config.question)
            answers[num_frames, depth][n] = answer
    cells = []
    for (num_frames, depth), given in answers.items():
        right = sum(a.strip() == DIGITS[n % 10] for n, a in enumerate(given))
        cells.append(Cell(num_frames, depth, right / config.needles, config.needles, given))
    return cells


HAYSTACK_SEED_STRIDE = 1000
"""Rendered haystack h > 0 draws from seed + h x this (haystack 0 from the seed itself, the
needles from seed + 1)."""


def rendered_haystack(seed: int) -> Callable[[int, int], list[Image.Image]]:
    """Letter frames of the test split: `haystack(count, which)`, as many as asked of haystack
    `which` (the same prefix for every length)."""
    drawn_so_far: dict[int, tuple[Renderer, list[Image.Image]]] = {}

    def haystack(count: int, which: int = 0) -> list[Image.Image]:
        if which not in drawn_so_far:
            drawn_so_far[which] = (Renderer(seed + which * HAYSTACK_SEED_STRIDE), [])
        renderer, drawn = drawn_so_far[which]
        while len(drawn) < count:
            drawn.append(renderer.render(renderer.item("letter")))
        return drawn[:count]

    return haystack


def video_haystack(path: str, *, max_pixels: int) -> Callable[[int, int], list[Image.Image]]:
    """`count` frames sampled evenly over all the frames of a video file or frame directory."""
    from longvita.processing.frame_dirs import list_frame_files
    from longvita.processing.video import iter_video_frames, plan_video

    probe = plan_video(path, max_frames=1, max_fps=1.0, max_pixels=max_pixels)  # headers only
    if probe.source.is_directory:
        total, fps = len(list_frame_files(path)), 1.0  # a directory is taken as 1 fps
    else:
        total, fps = probe.source.num_frames, probe.source.fps
    plan = plan_video(path, max_frames=total, max_fps=fps, max_pixels=max_pixels)  # every frame
    total = len(plan.indices)

    def haystack(count: int, which: int = 0) -> list[Image.Image]:  # one video: one haystack
        picks = np.linspace(0, total - 1, count).round().astype(int)
        wanted = [plan.indices[i] for i in picks]
        return list(iter_video_frames(path, wanted, max_pixels=max_pixels))

    return haystack


class PipelineAnswerer:
    """A Pipeline as an Answerer: encoded features through `Pipeline.generate_tokens`, on this
    process or (with `state`) on the context-parallel group."""

    def __init__(self, pipe, *, state=None, vision_batch: int = 64, max_new_tokens: int = 4):
        self.pipe, self.state = pipe, state
        self.vision_batch, self.max_new_tokens = vision_batch, max_new_tokens
        self._prompts: dict[tuple[int, str], object] = {}

    @torch.inference_mode()
    def encode(self, frames: list[Image.Image]) -> torch.Tensor:
        model = self.pipe.model.model
        size = self.pipe.config.vision.image_size
        out = []
        for start in range(0, len(frames), self.vision_batch):
            pixels = to_pixel_values(frames[start : start + self.vision_batch], tile_size=size)
            out.append(model.encode_tiles(pixels.to(self.pipe.device)))
        return torch.cat(out)  # [n, tpt, hidden]

    def check_lengths(self, frame_counts: Iterable[int], question: str) -> None:
        """PromptError naming the first video length whose prompt does not fit in the model's
        positions (before any frame is encoded)."""
        for num_frames in frame_counts:
            self._prompt(num_frames, question)

    def _prompt(self, num_frames: int, question: str):
        """The token ids of a question about a video of `num_frames` frames (built once);
        PromptError when they and the answer do not fit in the model's positions."""
        key = (num_frames, question)
        if key not in self._prompts:
            placeholder = [Image.new("RGB", (1, 1))] * num_frames
            prompt = self.pipe.process(
                f"<video>\n{question}", videos=[placeholder], max_frames=num_frames
            )
            self.pipe.fit_to_positions(
                prompt,
                self.max_new_tokens,
                how_to_shorten=f"haystacks shorter than {num_frames:,} frames (--frames)",
            )
            self._prompts[key] = prompt
        return self._prompts[key]

    def _generate(self, features: torch.Tensor, question: str, *, new_tokens: int, scores: bool):
        prompt = self._prompt(features.shape[0], question)
        return self.pipe.generate_tokens(
            prompt.input_ids,
            prompt.visual_mask,
            EncodedTiles(features),
            SamplingParams(max_new_tokens=new_tokens),
            return_scores=scores,
            state=self.state,
        )

    def answer(self, features: torch.Tensor, question: str) -> str:
        output = self._generate(features, question, new_tokens=self.max_new_tokens, scores=False)
        return self.pipe.processor.decode(output.token_ids)

    def best_of(self, features: torch.Tensor, question: str, candidates: list[str]) -> str:
        ids = [self.pipe.processor.tokenize(c) for c in candidates]
        if any(len(i) != 1 for i in ids):
            raise ValueError("teacher-forced scoring needs candidates of one token each")
        output = self._generate(features, question, new_tokens=1, scores=True)
        if output.scores is None:  # a cp rank other than 0: rank 0's choice is what counts
            return ""
        logits = output.scores[0][[i[0] for i in ids]]
        return candidates[int(logits.argmax())]


def summary(cells: list[Cell], config: VniahConfig) -> dict:
    """results.json: the overall accuracy, the grid, the accuracy per length, the config."""
    by_length = {
        f: float(np.mean([c.accuracy for c in cells if c.frames == f])) for f in config.frames
    }
    grid = [{"frames": c.frames, "depth": c.depth, "accuracy": c.accuracy, "n": c.n}
            for c in cells]  # fmt: skip
    return {
        "accuracy": float(np.mean([c.accuracy for c in cells])),
        "grid": grid,
        "accuracy_by_frames": {str(k): v for k, v in by_length.items()},
        "config": asdict(config),
    }


def heatmap(cells: list[Cell], config: VniahConfig, path: Path, *, title: str = "") -> Path:
    """LongVA's picture: depth (rows) by haystack frames (columns), red 0% to green 100%."""
    cell_w, cell_h, left, top = 90, 36, 70, 40
    width = left + cell_w * len(config.frames) + 10
    height = top + cell_h * len(config.depths) + 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 10), title or "V-NIAH accuracy", fill="black")
    lookup = {(c.frames, c.depth): c.accuracy for c in cells}
    for row, depth in enumerate(config.depths):
        draw.text((6, top + row * cell_h + 12), f"depth {depth:g}", fill="black")
        for col, frames in enumerate(config.frames):
            accuracy = lookup[frames, depth]
            colour = (int(230 * (1 - accuracy)), int(190 * accuracy), 60)
            x, y = left + col * cell_w, top + row * cell_h
            draw.rectangle((x, y, x + cell_w - 2, y + cell_h - 2), fill=colour)
            draw.text((x + 28, y + 12), f"{100 * accuracy:.0f}%", fill="white")
    for col, frames in enumerate(config.frames):
        draw.text((left + col * cell_w + 20, height - 30), f"{frames} fr", fill="black")
    image.save(path)
    return path


def write_report(cells: list[Cell], config: VniahConfig, out: Path, *, title: str = "") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    report = summary(cells, config)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    heatmap(cells, config, out / "heatmap.png", title=title)
    return report
