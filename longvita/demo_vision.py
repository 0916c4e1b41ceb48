"""The demo's stand-in for the pretrained InternViT: its tiny ViT trained to name what a render
shows, before the four stages.

The official schema starts stage 1 from a pretrained LLM (Qwen2.5) and a pretrained ViT
(InternViT-300M); stage 1 then trains only the projector between them. The demo has neither, so
it makes both: stage 0 (`configs/tiny/stage0.yaml`, our trainer) the LLM on text, and this the
ViT. Supervised classification of fresh renders (`data.synth.Renderer`): linear heads on the
features the projector will read (patch tokens, pixel-shuffled) name the glyph or shape (36
classes) and the colour (7), cross-entropy on both; the heads are then dropped. Learning to see
through the LLM's one answer token per image instead takes thousands of steps (docs/demo.md).

`digit_weight` adds a third head, digit or not, for the long stages: their one question is which
frame of thousands is a digit, answered by one attention head that scores every frame with a
linear function of its token, so one letter in 4,096 taken for a digit costs the answer. With it
(weight 1) and twice the renders and steps, fresh letters the tower took for digits went from
41 to 6 in 40,000 and V-NIAH at 4,096 frames from 85% to 90% (95% with the head alone); but in
both runs the LLM then never learned to name letters (71.5-76.5% of single-image questions
right, against 89.5%), so it is off by default (docs/demo.md, "Finding the needle").

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
TOWER = "vision_model.safetensors"


@dataclass(frozen=True)
class VisionPretraining:
    train_renders: int = 60_000
    test_renders: int = 2_000
    steps: int = 2400
    batch: int = 256
    lr: float = 3e-3
    digit_weight: float = 0.0
    """Weight of an is-it-a-digit head's loss against the class and colour losses; 0: no such
    head (see the module's docstring for what it did)."""
    seed: int = 0
    test_seed: int = 99

    def __post_init__(self) -> None:
        for name in ("train_renders", "test_renders", "steps", "batch"):
            check_int(name, getattr(self, name), minimum=1)
        check_number("lr", self.lr, above=0.0)
        check_number("digit_weight", self.digit_weight, at_least=0.0)


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
    classifier.train()
    for step in range(spec.steps):
        rows = torch.randint(len(pixels), (spec.batch,), generator=generator)
        class_logits, colour_logits, digit_logit = classifier(pixels[rows])
        loss = F.cross_entropy(class_logits, classes[rows]) + F.cross_entropy(
            colour_logits, colours[rows]
        )
        if spec.digit_weight > 0:
            is_digit = IS_DIGIT[classes[rows]].float()
            loss = loss + spec.digit_weight * F.binary_cross_entropy_with_logits(
                digit_logit[:, 0], is_digit
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 400 == 0:
            logger.warning(
                "vision pretraining: step %d/%d, loss %.3f", step, spec.steps, loss.item()
            )
    report = {**accuracy(classifier, *test), "seconds": round(time.perf_counter() - start, 1)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.model.vision_model.state_dict(), str(out / TOWER))
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")  # written last: the marker
    logger.warning("vision pretraining: %s", report)
    return report


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
