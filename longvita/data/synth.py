"""Synthetic curriculum data for the demo model: glyphs, colours and shapes rendered with
Pillow, videos as frame directories and (lossless) PyAV files, written in the official JSONL
format with one mixture per stage, so the ordinary data pipeline trains on them.

What each stage teaches (reference/LONGVITA.md section 4, at toy scale):
  0  language (the stand-in for the pretrained Qwen2.5 the official stage 1 starts from):
     text only, the LLM alone: repeating captions, finding the one digit among letters
     ("Which digit is in: K P 7 Z?"), the one letter among digits, counting digits;
  1  alignment: captions of single images ("a red digit 7", "a blue circle");
  2  general knowledge: questions about images (which digit, letter, colour, shape), short
     videos (which digit appears among letters; how many frames show a digit);
  3  long videos: a digit (the needle) among 16-512 frames of letters, at any depth;
  4  longer videos: 256-4,096 frames; stages 3-4 keep a share of image questions so the short
     skills stay.
Haystack frames come from a bank of letter renders (hard-linked into each video's frame
directory: a 4,096-frame video costs 4,096 links, not 4,096 renders); every needle, image and
short video is rendered fresh, with random colour, position jitter and noise, from the split's
own seed: the test split (another seed and another bank) never shares a render with training.
Also owns the demo tokenizer (BPE trained on the questions and answers of these tasks).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from longvita.processing.tokens import train_bpe_tokenizer

logger = logging.getLogger(__name__)

TILE = 28
"""Side of a render: one 28-px tile, one LLM token of the demo model."""
COLOURS = {
    "red": (220, 50, 47),
    "green": (60, 170, 60),
    "blue": (60, 100, 230),
    "yellow": (235, 200, 40),
    "purple": (160, 80, 200),
    "orange": (245, 140, 30),
    "white": (235, 235, 235),
}
DIGITS = "0123456789"
LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"
"""Distractor glyphs: no I, O or Q, which look like 1 and 0."""
SHAPES = ("circle", "square", "triangle")
NEEDLE_QUESTION = "What digit appears in the video?"
COUNT_QUESTION = "How many frames of the video show a digit?"
BANK_SIZE = 100_000
"""Letter renders the training haystacks draw from. Every test haystack frame is a fresh render,
and one letter that the model takes for a digit takes the answer of the whole haystack: trained
on a bank of 4,000, the model scored a few fresh letters in 4,096 (a green P, a blue Z) as high
as a needle."""
MIN_BANK_SIZE = 256


@dataclass(frozen=True)
class Item:
    """What a render shows."""

    kind: str
    """digit, letter or shape."""
    value: str
    """The digit, the letter or the shape's name."""
    colour: str

    def caption(self) -> str:
        if self.kind == "shape":
            return f"a {self.colour} {self.value}"
        return f"a {self.colour} {self.kind} {self.value}"


class Renderer:
    """Random renders of glyphs and shapes on a TILE x TILE canvas, from one generator."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.font = ImageFont.load_default(size=20)

    def item(self, kind: str, value: str | None = None, colour: str | None = None) -> Item:
        choices = {"digit": DIGITS, "letter": LETTERS, "shape": SHAPES}[kind]
        value = value if value is not None else str(self.rng.choice(list(choices)))
        colour = colour if colour is not None else str(self.rng.choice(list(COLOURS)))
        return Item(kind, value, colour)

    def render(self, item: Item) -> Image.Image:
        """The item in its colour on a dark noisy background, jittered by up to 3 px."""
        level = int(self.rng.integers(0, 70))
        image = Image.new("RGB", (TILE, TILE), (level, level, level))
        draw = ImageDraw.Draw(image)
        dx, dy = (int(v) for v in self.rng.integers(-3, 4, size=2))
        colour = COLOURS[item.colour]
        if item.kind == "shape":
            self._shape(draw, item.value, colour, dx, dy)
        else:
            left, top, right, bottom = draw.textbbox((0, 0), item.value, font=self.font)
            x = (TILE - (right - left)) // 2 - left + dx
            y = (TILE - (bottom - top)) // 2 - top + dy
            draw.text((x, y), item.value, fill=colour, font=self.font)
        noise = self.rng.normal(0, 10, (TILE, TILE, 3))
        pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        return Image.fromarray(pixels)

    def _shape(self, draw: ImageDraw.ImageDraw, shape: str, colour, dx: int, dy: int) -> None:
        c, r = TILE // 2, 8 + int(self.rng.integers(0, 3))
        box = (c - r + dx, c - r + dy, c + r + dx, c + r + dy)
        if shape == "circle":
            draw.ellipse(box, fill=colour)
        elif shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(c + dx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)


def letter_bank(directory: Path, renderer: Renderer, size: int = BANK_SIZE) -> list[Path]:
    """`size` letter renders (the haystacks' frames), written once."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(size):
        path = directory / f"letter{i:05d}.png"
        renderer.render(renderer.item("letter")).save(path)
        paths.append(path)
    return paths


def _link(source: Path, target: Path) -> None:
    """A hard link (a copy where the file system has none)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@dataclass
class Writer:
    """Writes the media of one stage's samples under `media/` and their JSON records."""

    root: Path
    renderer: Renderer
    bank: list[Path]
    count: int = 0

    def _new(self, suffix: str) -> tuple[Path, str]:
        self.count += 1
        relative = f"media/{self.count:06d}{suffix}"
        return self.root / relative, relative

    def image(self, item: Item) -> str:
        path, relative = self._new(".png")
        self.renderer.render(item).save(path)
        return relative

    def haystack(self, num_frames: int, needles: dict[int, Item], *, as_file: bool) -> str:
        """A video of letters from the bank with `needles` at their frame indices: a frame
        directory of links, or (as_file) a lossless ffv1 .mkv."""
        picks = self.renderer.rng.integers(0, len(self.bank), size=num_frames)
        if as_file:
            path, relative = self._new(".mkv")
            frames = [
                self.renderer.render(needles[k]) if k in needles else Image.open(self.bank[p])
                for k, p in enumerate(picks)
            ]
            write_lossless_video(path, frames)
            return relative
        directory, relative = self._new("")
        directory.mkdir()
        for k, p in enumerate(picks):
            frame = directory / f"f{k:05d}.png"
            if k in needles:
                self.renderer.render(needles[k]).save(frame)
            else:
                _link(self.bank[p], frame)
        return relative


def write_lossless_video(path: Path, frames: list[Image.Image], fps: int = 1) -> Path:
    """An ffv1 Matroska video of RGB frames, pixel-exact when decoded (1 fps by default: one
    frame is taken per second)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "bgr0"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame.convert("RGB"))))
        container.mux(stream.encode())
    return path


def _turn(question: str, answer: str, tag: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{tag}\n{question}"},
            {"role": "assistant", "content": answer}]  # fmt: skip


TEXT_TASKS = {"repeat": 0.2, "copy": 0.1, "digit": 0.3, "letter": 0.15, "colour": 0.1,
              "count": 0.15}  # fmt: skip
"""Stage 0's tasks and their shares: repeat a caption; repeat a few digits and letters; which
digit is in a list of letters, which letter (colour) in a list of digits; how many digits are
in a list of letters."""
FIND_AMONG = {"digit": LETTERS, "letter": DIGITS, "colour": DIGITS}
"""What each "which ... is in" task's one answer hides among."""


def text_sample(writer: Writer) -> dict:
    """Stage 0: the language the later stages speak, and retrieval, in plain text.

    Each "which digit / letter / colour is in" task grows the head that later reads that
    attribute off an image token: without the letter task the LLM never learned to name (or even
    repeat) a letter, since letters are only ever the haystack the digit task teaches it to pass
    over, and stages 1-2 then could not learn letters from images either (docs/demo.md).
    """
    rng, renderer = writer.renderer.rng, writer.renderer
    task = str(rng.choice(list(TEXT_TASKS), p=list(TEXT_TASKS.values())))
    if task == "repeat":
        item = renderer.item(str(rng.choice(["digit", "letter", "shape"])))
        return {"messages": _text_turn(f"Repeat: {item.caption()}", item.caption())}
    if task == "copy":
        symbols = " ".join(_symbols(rng, DIGITS + LETTERS, high=8))
        return {"messages": _text_turn(f"Repeat: {symbols}", symbols)}
    if task == "count":
        symbols = _symbols(rng, LETTERS)
        count = int(rng.integers(1, 4))
        for _ in range(count):
            _insert(rng, symbols, str(rng.choice(list(DIGITS))))
        question = f"How many digits are in: {' '.join(symbols)}?"
        return {"messages": _text_turn(question, str(count))}
    answer = str(rng.choice(list({"digit": DIGITS, "letter": LETTERS, "colour": COLOURS}[task])))
    symbols = _symbols(rng, FIND_AMONG[task])
    _insert(rng, symbols, answer)
    return {"messages": _text_turn(f"Which {task} is in: {' '.join(symbols)}?", answer)}


def _symbols(rng: np.random.Generator, alphabet: str, high: int = 64) -> list[str]:
    """1 to `high` (log-uniform) random characters of `alphabet`."""
    return [str(c) for c in rng.choice(list(alphabet), size=log_uniform(rng, 1, high))]


def _insert(rng: np.random.Generator, symbols: list[str], symbol: str) -> None:
    symbols.insert(int(rng.integers(0, len(symbols) + 1)), symbol)


def _text_turn(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def caption_sample(writer: Writer) -> dict:
    item = writer.renderer.item(str(writer.renderer.rng.choice(["digit", "letter", "shape"])))
    return {"messages": _turn("Describe the image.", item.caption(), "<image>"),
            "images": [writer.image(item)]}  # fmt: skip


def image_question_sample(writer: Writer) -> dict:
    rng = writer.renderer.rng
    kind = str(rng.choice(["digit", "letter", "shape"]))
    item = writer.renderer.item(kind)
    if rng.random() < 0.3:
        question, answer = "What colour is it?", item.colour
    else:
        question, answer = f"What {kind} is this?", item.value
    return {"messages": _turn(question, answer, "<image>"), "images": [writer.image(item)]}


def needle_sample(writer: Writer, num_frames: int, *, as_file: bool = False) -> dict:
    """A digit at a uniformly random depth of `num_frames` frames of letters."""
    rng = writer.renderer.rng
    needle = writer.renderer.item("digit")
    depth = int(rng.integers(0, num_frames))
    video = writer.haystack(num_frames, {depth: needle}, as_file=as_file)
    return {"messages": _turn(NEEDLE_QUESTION, needle.value, "<video>"), "videos": [video]}


def count_sample(writer: Writer, num_frames: int) -> dict:
    rng = writer.renderer.rng
    count = int(rng.integers(1, 4))
    where = rng.choice(num_frames, size=count, replace=False)
    needles = {int(k): writer.renderer.item("digit") for k in where}
    video = writer.haystack(num_frames, needles, as_file=bool(rng.random() < 0.5))
    return {"messages": _turn(COUNT_QUESTION, str(count), "<video>"), "videos": [video]}


@dataclass(frozen=True)
class StageRecipe:
    """How many samples of each kind a stage gets, and its haystack sizes."""

    samples: int
    mix: dict[str, float]
    """Share of each kind: caption, image, needle, count."""
    frames: tuple[int, int] = (1, 1)
    """Haystack sizes of the needle videos, drawn log-uniformly in [low, high]."""


RECIPES = {
    0: StageRecipe(samples=8000, mix={"text": 1.0}),
    1: StageRecipe(samples=4000, mix={"caption": 1.0}),
    2: StageRecipe(
        samples=24000, mix={"image": 0.4, "needle": 0.45, "count": 0.15}, frames=(1, 64)
    ),
    3: StageRecipe(samples=8000, mix={"image": 0.4, "needle": 0.6}, frames=(16, 512)),
    4: StageRecipe(samples=1200, mix={"image": 0.4, "needle": 0.6}, frames=(256, 4096)),
}


def log_uniform(rng: np.random.Generator, low: int, high: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def stage_samples(writer: Writer, recipe: StageRecipe, num_samples: int) -> Iterator[dict]:
    rng = writer.renderer.rng
    kinds, shares = zip(*recipe.mix.items(), strict=True)
    makers: dict[str, Callable[[], dict]] = {
        "text": lambda: text_sample(writer),
        "caption": lambda: caption_sample(writer),
        "image": lambda: image_question_sample(writer),
        "needle": lambda: needle_sample(
            writer, log_uniform(rng, *recipe.frames), as_file=bool(rng.random() < 0.05)
        ),  # fmt: skip
        "count": lambda: count_sample(writer, int(rng.integers(4, 17))),
    }
    for kind in rng.choice(kinds, size=num_samples, p=np.asarray(shares) / sum(shares)):
        yield makers[str(kind)]()


def tokenizer_corpus() -> list[str]:
    """Every question and answer the tasks produce, for the BPE."""
    answers = [Item(k, v, c).caption() for c in COLOURS for k, vs in
               (("digit", DIGITS), ("letter", LETTERS), ("shape", SHAPES)) for v in vs]  # fmt: skip
    questions = ["Describe the image.", "What colour is it?", NEEDLE_QUESTION, COUNT_QUESTION,
                 "Repeat:", "How many digits are in:"]  # fmt: skip
    questions += [f"Which {kind} is in:" for kind in FIND_AMONG]
    questions += [f"What {kind} is this?" for kind in ("digit", "letter", "shape")]
    return answers + questions + list(DIGITS) + list(LETTERS) + list(COLOURS) + list(SHAPES)


def write_demo_tokenizer(directory: Path) -> Path:
    return train_bpe_tokenizer(directory, tokenizer_corpus() * 4, vocab_size=320)


def synthesize(
    out: str | Path,
    *,
    stages: tuple[int, ...] = (0, 1, 2, 3, 4),
    seed: int = 0,
    scale: float = 1.0,
    bank_size: int | None = None,
    progress: Callable[[Iterator], Iterator] | None = None,
) -> dict[int, Path]:
    """Write the demo tokenizer (`out/tokenizer`), the letter bank and each stage's samples
    (`out/stageN/samples.jsonl`, `media/`, `mixture.yaml`); returns {stage: mixture}.

    scale multiplies every stage's sample count (tests use a small one); seed selects the
    split: a different seed renders a different bank and different samples; bank_size is the
    number of letter renders the haystacks draw from (default: BANK_SIZE times scale, at least
    MIN_BANK_SIZE).
    """
    out = Path(out)
    write_demo_tokenizer(out / "tokenizer")
    renderer = Renderer(seed)
    if bank_size is None:
        bank_size = max(MIN_BANK_SIZE, round(BANK_SIZE * scale))
    bank = letter_bank(out / f"bank-seed{seed}", renderer, bank_size)
    mixtures = {}
    for stage in stages:
        if stage not in RECIPES:
            raise ValueError(f"stage {stage} is not one of {sorted(RECIPES)}")
        root = out / f"stage{stage}"
        shutil.rmtree(root, ignore_errors=True)
        (root / "media").mkdir(parents=True)
        writer = Writer(root, renderer, bank)
        recipe = RECIPES[stage]
        count = max(1, round(recipe.samples * scale))
        samples = stage_samples(writer, recipe, count)
        if progress is not None:
            samples = progress(samples, total=count, desc=f"stage {stage}")
        with open(root / "samples.jsonl", "w") as f:
            for sample in samples:
                f.write(json.dumps(sample) + "\n")
        mixture = root / "mixture.yaml"
        mixture.write_text(f"dataset:\n  stage{stage}:\n    ratio: 1.0\n"
                           f"    data_paths: [samples.jsonl]\n")  # fmt: skip
        mixtures[stage] = mixture
        logger.info("stage %d: %d samples in %s", stage, count, root)
    return mixtures


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `data synth` to the `longvita data` subcommands."""
    p = subparsers.add_parser(
        "synth",
        help="write the demo model's synthetic curriculum data (stages 0-4) and tokenizer",
        description=(
            "Render the demo model's training data in the official JSONL format: stage 1 "
            "captions of single images; stage 2 questions about images and short videos; "
            "stages 3-4 a digit among 16-512 / 256-4,096 frames of letters. Writes "
            "OUT/tokenizer, OUT/bank-seedS (the haystacks' letter frames) and OUT/stageN/"
            "{samples.jsonl, media/, mixture.yaml}. A test split: another --seed."
        ),
        epilog="example: longvita data synth --out runs/demo/data --scale 0.1",
    )
    p.add_argument("--out", required=True, help="the data directory")
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="default: all")
    p.add_argument("--seed", type=int, default=0, help="the split's seed (default 0)")
    p.add_argument(
        "--scale", type=float, default=1.0, help="x the samples of every stage and of the bank"
    )
    p.add_argument(
        "--bank-size",
        type=int,
        default=None,
        help=f"letter renders the haystacks draw from (default {BANK_SIZE:,} x --scale, at "
        f"least {MIN_BANK_SIZE})",
    )
    p.set_defaults(func=run_synth)
    return p


def run_synth(args: argparse.Namespace) -> int:
    if not args.scale > 0:
        raise ValueError(f"--scale must be > 0, got {args.scale}")
    if args.bank_size is not None and args.bank_size < 1:
        raise ValueError(f"--bank-size must be >= 1, got {args.bank_size}")
    progress = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        progress = partial(tqdm, unit="sample", file=sys.stderr)
    mixtures = synthesize(
        args.out,
        stages=tuple(args.stages),
        seed=args.seed,
        scale=args.scale,
        bank_size=args.bank_size,
        progress=progress,
    )
    for stage, mixture in mixtures.items():
        print(f"stage {stage}: {mixture}")
    return 0
