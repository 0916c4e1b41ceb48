"""The demo's stand-in for the pretrained InternViT: its tiny ViT trained to name what a render
shows, before the four stages.

The official schema starts stage 1 from a pretrained LLM (Qwen2.5) and a pretrained ViT
(InternViT-300M); stage 1 then trains only the projector between them. The demo has neither, so
it makes both: stage 0 (`configs/tiny/stage0.yaml`, our trainer) the LLM on text, and this the
ViT. Supervised classification of fresh renders (`data.synth.Renderer`): a linear head on the
features the projector will read (patch tokens, pixel-shuffled) names the glyph or shape (36
classes) and the colour (7), cross-entropy on both; the head is then dropped. Learning to see
through the LLM's one answer token per image instead takes thousands of steps (docs/demo.md).

Writes an export (official layout) of the whole demo model: this ViT, a random LLM and
projector (`train.init.random_model`), the demo tokenizer; stage 0 starts `from` it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

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
REPORT = "vision_pretraining.json"


@dataclass(frozen=True)
class VisionPretraining:
    train_renders: int = 60_000
    test_renders: int = 2_000
    steps: int = 2400
    batch: int = 256
    lr: float = 3e-3
    seed: int = 0
    test_seed: int = 99


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
    """The ViT and a linear head on the pixel-shuffled patch tokens (what the projector reads)."""

    def __init__(self, vision_model: nn.Module, grid_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.grid_size = grid_size
        self.head = nn.Linear(hidden_size * grid_size**2, len(CLASSES) + len(COLOUR_NAMES))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [n, 3, S, S] -> class logits [n, 36], colour logits [n, 7]."""
        patches = self.vision_model(pixels)[:, 1:]  # [n, g*g, C], CLS dropped
        g = self.grid_size
        grid = patches.reshape(len(pixels), g, g, patches.shape[-1])
        logits = self.head(pixel_shuffle(grid).flatten(1))  # [n, 36 + 7]
        return logits[:, : len(CLASSES)], logits[:, len(CLASSES) :]


def pretrain_vision(out: str | Path, tokenizer_dir: str | Path, spec: VisionPretraining) -> dict:
    """Train the demo ViT (`spec`), write the demo model with it to `out`; the test accuracies."""
    from longvita.infer.pipeline import Pipeline
    from longvita.processing.processor import Processor
    from longvita.train.init import init_random

    start = time.perf_counter()
    model, tokenizer = init_random("demo", tokenizer_dir, seed=spec.seed)
    vision = model.config.vision
    classifier = RenderClassifier(model.model.vision_model, vision.grid_size, vision.hidden_size)
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
        class_logits, colour_logits = classifier(pixels[rows])
        loss = F.cross_entropy(class_logits, classes[rows]) + F.cross_entropy(
            colour_logits, colours[rows]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0:
            logger.warning(
                "vision pretraining: step %d/%d, loss %.3f", step, spec.steps, loss.item()
            )
    report = {**accuracy(classifier, *test), "seconds": round(time.perf_counter() - start, 1)}
    Pipeline(model.eval(), Processor(tokenizer, vision)).save(out)
    (Path(out) / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    logger.warning("vision pretraining: %s", report)
    return report


@torch.no_grad()
def accuracy(
    classifier: RenderClassifier, pixels: torch.Tensor, classes: torch.Tensor, colours: torch.Tensor
) -> dict[str, float]:
    classifier.eval()
    class_logits, colour_logits = classifier(pixels)
    return {
        "test_class_accuracy": round(float((class_logits.argmax(1) == classes).float().mean()), 4),
        "test_colour_accuracy": round(
            float((colour_logits.argmax(1) == colours).float().mean()), 4
        ),
    }
