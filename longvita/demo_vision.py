"""The demo's stand-in for the pretrained InternViT: its tiny ViT trained to name what a render
shows, before the four stages.

The official schema starts stage 1 from a pretrained LLM (Qwen2.5) and a pretrained ViT
(InternViT-300M); stage 1 then trains only the projector between them. The demo has neither, so
it makes both: stage 0 (`configs/tiny/stage0.yaml`, our trainer) the LLM on text, and this the
ViT. Supervised classification of fresh renders (`data.synth.Renderer`): linear heads on the
features the projector will read (patch tokens, pixel-shuffled) name the glyph or shape (36
classes) and the colour (7), cross-entropy on both; the heads are then dropped. Learning to see
through the LLM's one answer token per image instead takes thousands of steps (docs/demo.md).

A third head, digit or not (`digit_weight`), serves the long stages: their one question is
which frame of thousands is a digit, answered by one attention head that scores every frame with
a linear function of its token, so one letter in 4,096 taken for a digit costs the answer. Then
rounds of hard-example mining (`hard_rounds`): score fresh renders with that head, train more on
those nearest to the wrong side. The tails of the head's scores decide the long rows of V-NIAH,
so the report estimates them (`digit_head_estimate`): the share of fresh needles the head alone
ranks above every fresh letter of a 1,024- and a 4,096-frame haystack. At 4,096 frames, in
one-off runs on 100,000 letters: 98.9% after 3 rounds, 99.9% after 10, and the trained models
found 91.8% and 98.8% of needles (100 per cell; docs/demo.md, "Finding the needle"); the
shipped run's report, on 50,000 other letters, says 99.4% (the tail of a sample moves it by
about half a point).

Two steps, so that the tower trains while the curriculum is rendered (it needs nothing of the
run's data): `pretrain_tower` trains the ViT alone and writes its weights and report;
`write_vision_model` then writes an export (official layout) of the whole demo model with it: a
random LLM and projector (`train.init.random_model`), the demo tokenizer. Stage 0 starts
`from` that export.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from longvita.checks import check_int, check_number
from longvita.data.synth import COLOURS, DIGITS, LETTERS, SHAPES, Renderer
from longvita.model.projector import pixel_shuffle
from longvita.processing.image import to_pixel_values

logger = logging.getLogger(__name__)

CLASSES = (
    [("digit", d) for d in DIGITS]
    + [("letter", c) for c in LETTERS]
    + [("shape", s) for s in SHAPES]
)
COLOUR_NAMES = list(COLOURS)
IS_DIGIT = torch.tensor([kind == "digit" for kind, _ in CLASSES])
REPORT = "vision_pretraining.json"
HARD_SEED_OFFSET = 1000
"""Round r of hard-example mining renders its pool from seed + HARD_SEED_OFFSET + r."""
TOWER = "vision_model.safetensors"


@dataclass(frozen=True)
class VisionPretraining:
    train_renders: int = 60_000
    test_renders: int = 2_000
    steps: int = 2400
    batch: int = 256
    lr: float = 3e-3
    digit_weight: float = 1.0
    """Weight of an is-it-a-digit head's loss against the class and colour losses; 0: no such
    head."""
    hard_rounds: int = 10
    """Rounds of hard-example mining after `steps` (needs the digit head): each scores
    `hard_pool` fresh renders with the digit head, keeps the `hard_keep` nearest to the wrong
    side (letters most like a digit, digits least like one) and trains `hard_steps` more steps
    on batches half of all kept so far, half of the training renders."""
    hard_pool: int = 60_000
    hard_keep: int = 2_000
    hard_steps: int = 400
    estimate_renders: int = 50_000
    """Fresh letters (and a fifth as many digits) for `needle_found_share`, in the report when
    the digit head is on; 0: no estimate."""
    seed: int = 0
    test_seed: int = 99

    def __post_init__(self) -> None:
        for name in ("train_renders", "test_renders", "steps", "batch", "hard_pool", "hard_keep"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("hard_rounds", "hard_steps", "estimate_renders"):
            check_int(name, getattr(self, name), minimum=0)
        check_number("lr", self.lr, above=0.0)
        check_number("digit_weight", self.digit_weight, at_least=0.0)
        if self.hard_rounds and not self.digit_weight:
            raise ValueError(
                f"hard_rounds={self.hard_rounds} mines with the digit head: set digit_weight > 0"
            )
        if self.hard_keep > self.hard_pool:
            raise ValueError(f"hard_keep ({self.hard_keep}) > hard_pool ({self.hard_pool})")


def render_set(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`count` random renders: pixels [count, 3, 28, 28], class ids [count], colour ids [count]."""
    renderer = Renderer(seed)
    images, classes, colours = [], [], []
    for _ in range(count):
        k = int(renderer.rng.integers(len(CLASSES)))
        item = renderer.item(*CLASSES[k])
        images.append(renderer.render(item))
        classes.append(k)
        colours.append(COLOUR_NAMES.index(item.colour))
    pixels = to_pixel_values(images, tile_size=images[0].width)
    return pixels, torch.tensor(classes), torch.tensor(colours)


class RenderClassifier(nn.Module):
    """The ViT and linear heads on the pixel-shuffled patch tokens (what the projector reads):
    the class, the colour and, with `digit_head`, whether it is a digit."""

    def __init__(
        self, vision_model: nn.Module, grid_size: int, hidden_size: int, *, digit_head: bool
    ) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.grid_size = grid_size
        outputs = len(CLASSES) + len(COLOUR_NAMES) + int(digit_head)
        self.head = nn.Linear(hidden_size * grid_size**2, outputs)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pixels [n, 3, S, S] -> class logits [n, 36], colour logits [n, 7], digit logit [n]
        (an empty [n, 0] without the digit head)."""
        patches = self.vision_model(pixels)[:, 1:]  # [n, g*g, C], CLS dropped
        g = self.grid_size
        grid = patches.reshape(len(pixels), g, g, patches.shape[-1])
        logits = self.head(pixel_shuffle(grid).flatten(1))  # [n, 36 + 7 (+ 1)]
        num_classes, num_colours = len(CLASSES), len(COLOUR_NAMES)
        colour_end = num_classes + num_colours
        return logits[:, :num_classes], logits[:, num_classes:colour_end], logits[:, colour_end:]


def pretrain_tower(out: str | Path, spec: VisionPretraining) -> dict:
    """Train the demo ViT (`spec`); write its weights (TOWER) and test accuracies (REPORT) to
    `out`, and return the accuracies."""
    from longvita.config import demo
    from longvita.train.init import random_model

    start = time.perf_counter()
    model = random_model(demo(), seed=spec.seed)
    vision = model.config.vision
    with torch.random.fork_rng(devices=[]):  # the heads' init: the same for the same seed
        torch.manual_seed(spec.seed)
        classifier = RenderClassifier(
            model.model.vision_model,
            vision.grid_size,
            vision.hidden_size,
            digit_head=spec.digit_weight > 0,
        )
    pixels, classes, colours = render_set(spec.train_renders, spec.seed)
    test = render_set(spec.test_renders, spec.test_seed)
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=spec.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.05
    )
    train = TensorBatches(pixels, classes, colours, generator=generator)
    classifier.train()
    for step in range(spec.steps):
        loss = train_step(classifier, optimizer, train.sample(spec.batch), spec.digit_weight)
        schedule.step()
        if step % 400 == 0:
            logger.warning("vision pretraining: step %d/%d, loss %.3f", step, spec.steps, loss)
    wrong_side = train_on_hard_examples(classifier, optimizer, train, spec, generator)
    report = accuracy(classifier, *test)
    if wrong_side:
        report["hard_pool_wrong_side"] = wrong_side
    if spec.digit_weight > 0 and spec.estimate_renders:
        report["digit_head_finds_needle"] = digit_head_estimate(
            classifier, spec.estimate_renders, spec.test_seed + 1
        )
    report["seconds"] = round(time.perf_counter() - start, 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.model.vision_model.state_dict(), str(out / TOWER))
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")  # written last: the marker
    logger.warning("vision pretraining: %s", report)
    return report


class TensorBatches:
    """Random batches (with replacement) of rows of equally long tensors."""

    def __init__(self, *tensors: torch.Tensor, generator: torch.Generator) -> None:
        self.tensors = tensors
        self.generator = generator

    def sample(self, size: int) -> list[torch.Tensor]:
        rows = torch.randint(len(self.tensors[0]), (size,), generator=self.generator)
        return [tensor[rows] for tensor in self.tensors]


def train_step(
    classifier: RenderClassifier,
    optimizer: torch.optim.Optimizer,
    batch: list[torch.Tensor],
    digit_weight: float,
) -> float:
    """One step on a batch of (pixels, class ids, colour ids): cross-entropy of the class and the
    colour, plus `digit_weight` x the digit head's binary cross-entropy."""
    pixels, classes, colours = batch
    class_logits, colour_logits, digit_logit = classifier(pixels)
    loss = F.cross_entropy(class_logits, classes) + F.cross_entropy(colour_logits, colours)
    if digit_weight > 0:
        is_digit = IS_DIGIT[classes].float()
        loss = loss + digit_weight * F.binary_cross_entropy_with_logits(digit_logit[:, 0], is_digit)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def train_on_hard_examples(
    classifier: RenderClassifier,
    optimizer: torch.optim.Optimizer,
    train: TensorBatches,
    spec: VisionPretraining,
    generator: torch.Generator,
) -> list[int]:
    """`spec.hard_rounds` rounds of hard-example mining (see `VisionPretraining.hard_rounds`) at
    a tenth of the learning rate; returns how many of each round's pool were on the wrong side
    of the digit head before that round trained."""
    for group in optimizer.param_groups:
        group["lr"] = spec.lr / 10  # a fine-tune at the tail of the one-cycle schedule
    kept: list[tuple[torch.Tensor, ...]] = []
    wrong_side = []
    for round_ in range(spec.hard_rounds):
        pool = render_set(spec.hard_pool, spec.seed + HARD_SEED_OFFSET + round_)
        hardest_now, wrong = hardest(classifier, pool, spec.hard_keep)
        kept.append(hardest_now)
        wrong_side.append(wrong)
        hard = TensorBatches(*(torch.cat(parts) for parts in zip(*kept, strict=True)),
                             generator=generator)  # fmt: skip
        classifier.train()
        for _ in range(spec.hard_steps):
            halves = zip(hard.sample(spec.batch // 2), train.sample(spec.batch - spec.batch // 2),
                         strict=True)  # fmt: skip
            train_step(classifier, optimizer, [torch.cat(pair) for pair in halves],
                       spec.digit_weight)  # fmt: skip
        logger.warning("vision pretraining: hard round %d/%d done (%d of %d were on the wrong "
                       "side)", round_ + 1, spec.hard_rounds, wrong, spec.hard_pool)  # fmt: skip
    return wrong_side


@torch.no_grad()
def hardest(
    classifier: RenderClassifier, renders: tuple[torch.Tensor, ...], keep: int
) -> tuple[tuple[torch.Tensor, ...], int]:
    """The `keep` renders (pixels, classes, colours) whose digit logit is nearest to, or past,
    the wrong side (the letters and shapes most like a digit, the digits least like one), and
    how many of all were past it."""
    pixels, classes, _ = renders
    logits = digit_logits(classifier, pixels)
    margin = torch.where(IS_DIGIT[classes], logits, -logits)  # > 0: right side
    rows = margin.argsort()[:keep]
    return tuple(tensor[rows] for tensor in renders), int((margin < 0).sum())


@torch.no_grad()
def digit_logits(classifier: RenderClassifier, pixels: torch.Tensor) -> torch.Tensor:
    """The digit head's logit of each render, pixels [n, 3, S, S] -> [n], 4,096 at a time."""
    classifier.eval()
    return torch.cat([classifier(chunk)[2][:, 0] for chunk in pixels.split(4096)])


ESTIMATE_FRAMES = (1024, 4096)
"""Haystack lengths of the digit head's needle estimate (`digit_head_estimate`)."""


@torch.no_grad()
def digit_head_estimate(classifier: RenderClassifier, letters: int, seed: int) -> dict[str, float]:
    """{frames: `needle_found_share`} for ESTIMATE_FRAMES, from the digit head's scores of
    `letters` fresh letters and a fifth as many fresh digits (renders of `seed`)."""
    renderer = Renderer(seed)
    scores = {}
    for kind, count in (("letter", letters), ("digit", max(1, letters // 5))):
        chunks = []
        for start in range(0, count, 4096):  # rendered a chunk at a time: 50,000 are 470 MB
            images = [renderer.render(renderer.item(kind)) for _ in range(min(4096, count - start))]
            pixels = to_pixel_values(images, tile_size=images[0].width)
            chunks.append(digit_logits(classifier, pixels))
        scores[kind] = torch.cat(chunks)
    return {
        str(frames): round(needle_found_share(scores["digit"], scores["letter"], frames), 4)
        for frames in ESTIMATE_FRAMES
    }


def needle_found_share(
    digit_scores: torch.Tensor, letter_scores: torch.Tensor, frames: int
) -> float:
    """How many needles the digit head alone would rank first in a haystack of `frames` frames
    (frames - 1 letters): the mean over the digits of P(every letter scores lower), with P from
    the letters' empirical distribution. The tails of both decide it: one letter in 4,096 that
    outscores a needle takes its answer."""
    below = torch.searchsorted(letter_scores.sort().values, digit_scores) / len(letter_scores)
    return float((below ** (frames - 1)).mean())


def write_vision_model(out: str | Path, tower: str | Path, tokenizer_dir: str | Path, seed: int):
    """The demo model with the pretrained ViT of `tower` (what `pretrain_tower` wrote), a random
    LLM and projector of `seed` and the tokenizer of `tokenizer_dir`, exported to `out`."""
    from longvita.infer.pipeline import Pipeline
    from longvita.processing.processor import Processor
    from longvita.train.init import init_random

    model, tokenizer = init_random("demo", tokenizer_dir, seed=seed)
    model.model.vision_model.load_state_dict(load_file(str(Path(tower) / TOWER)))
    Pipeline(model.eval(), Processor(tokenizer, model.config.vision)).save(out)


@torch.no_grad()
def accuracy(
    classifier: RenderClassifier, pixels: torch.Tensor, classes: torch.Tensor, colours: torch.Tensor
) -> dict[str, float]:
    classifier.eval()
    class_logits, colour_logits, _ = classifier(pixels)
    named = class_logits.argmax(1)
    return {
        "test_class_accuracy": round(float((named == classes).float().mean()), 4),
        "test_colour_accuracy": round(
            float((colour_logits.argmax(1) == colours).float().mean()), 4
        ),
        "test_digit_accuracy": round(
            float((IS_DIGIT[named] == IS_DIGIT[classes]).float().mean()), 4
        ),
    }
