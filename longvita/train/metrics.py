"""What a person watching a run sees: a progress bar or log lines, metrics.jsonl, TensorBoard
events, and a loss / learning-rate curve at the end.

Owns the record of each optimizer step (`StepRecord`: the fields DESIGN.md fixes for
metrics.jsonl), where it goes, and the PNG chart (drawn with Pillow, no plotting library).
Only global rank 0 makes a `MetricsLog`. A progress bar (step, loss, lr, tokens/s, ETA) shows
when stderr is a terminal; otherwise a plain line every `log.interval` steps. Both go to stderr
whatever the logging level (they are the run's progress, not log records), as do the lines of
`note` (the run's start, its checkpoints).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)


@dataclass
class StepRecord:
    """One optimizer step (or a skipped one)."""

    step: int
    """Optimizer steps done after this one (1 for the first)."""
    loss: float
    """Mean next-token loss over the supervised tokens of the whole step."""
    lr: float
    """Learning rate of the step (the LLM's; the ViT's groups are scaled from it)."""
    grad_norm: float
    """Global gradient L2 norm before clipping."""
    tokens: int
    """Non-pad tokens of the step over all data-parallel ranks."""
    supervised_tokens: int
    """Tokens with a loss (the normalizer of the step's loss)."""
    tokens_per_s: float
    seconds: float
    """Wall time of the step."""
    skipped: bool = False
    """True when the loss or the gradient was not finite and the update was not applied."""


class MetricsLog:
    """metrics.jsonl + TensorBoard + progress, for global rank 0.

    A run resumed at `start_step` redoes the steps after its checkpoint: their records from
    the run that was stopped (and a line a kill cut short) are dropped first, so the file
    holds one record per step, and TensorBoard purges its events after that step.
    """

    def __init__(
        self, path: Path, *, total_steps: int, start_step: int, interval: int, tensorboard: bool
    ) -> None:
        self.path = path
        self.interval = interval
        self.total_steps = total_steps
        _keep_records_up_to(path, start_step)
        self._file = open(path, "a")  # noqa: SIM115 (closed by close())
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", file=sys.stderr)
        self._writer = None
        if tensorboard:
            self._writer = _tensorboard_writer(path.parent / "tensorboard", start_step)

    def record(self, entry: StepRecord) -> None:
        self._file.write(json.dumps(asdict(entry)) + "\n")
        self._file.flush()
        if self._writer is not None and not entry.skipped:
            for name in ("loss", "lr", "grad_norm", "tokens_per_s"):
                self._writer.add_scalar(f"train/{name}", getattr(entry, name), entry.step)
        if self._bar is not None:
            self._bar.update(0 if entry.skipped else 1)
            self._bar.set_postfix(
                loss=f"{entry.loss:.4f}", lr=f"{entry.lr:.2e}", tok_s=f"{entry.tokens_per_s:.0f}"
            )
        elif entry.skipped or entry.step % self.interval == 0 or entry.step == self.total_steps:
            self.note(
                f"step {entry.step}/{self.total_steps} loss {entry.loss:.4f} lr {entry.lr:.3e} "
                f"grad_norm {entry.grad_norm:.3f} tokens/s {entry.tokens_per_s:.0f} "
                f"({entry.seconds:.1f} s)" + (" (skipped: not finite)" if entry.skipped else "")
            )

    def note(self, message: str) -> None:
        """A line of progress on stderr (above the bar when there is one)."""
        if self._bar is not None:
            self._bar.write(f"train: {message}", file=sys.stderr)
        else:
            print(f"train: {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()


def _keep_records_up_to(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl with only its whole records of steps <= `step` (atomically)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if _step_of(line) is not None]
    kept = [line for line in kept if _step_of(line) <= step]
    staged = path.with_name(path.name + ".tmp")
    staged.write_text("".join(line + "\n" for line in kept))
    staged.replace(path)


def _step_of(line: str) -> int | None:
    """The step of a metrics line, None for one that is not a whole record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def _tensorboard_writer(directory: Path, start_step: int):
    """A SummaryWriter when the tensorboard package is installed (events after `start_step`,
    which the resumed run writes again, purged), else None (said once)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info("tensorboard is not installed: no TensorBoard events (metrics.jsonl has all)")
        return None
    return SummaryWriter(str(directory), purge_step=start_step + 1)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (the last record of a step wins); a line that is not a
    whole record (cut by a kill) is skipped with a warning."""
    if not path.is_file():
        return []
    by_step: dict[tuple[int, bool], dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if _step_of(line) is None:
            logger.warning("%s:%d: not a whole record (cut by a kill?), skipped", path, number)
            continue
        record = json.loads(line)
        by_step[record["step"], record.get("skipped", False)] = record
    return [by_step[key] for key in sorted(by_step)]


def plot_curves(records: list[dict], path: Path, *, title: str = "") -> Path | None:
    """A PNG of the loss and the learning rate against the step; None without records."""
    points = [(r["step"], r["loss"], r["lr"]) for r in records if not r.get("skipped")]
    points = [p for p in points if math.isfinite(p[1])]
    if not points:
        return None
    width, height, margin = 900, 420, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    box = (margin, 30, width - margin, height - margin)
    draw.rectangle(box, outline="black")
    steps = [p[0] for p in points]
    _curve(draw, box, steps, [p[1] for p in points], "#1f77b4")
    _curve(draw, box, steps, [p[2] for p in points], "#d62728")
    losses, lrs = [p[1] for p in points], [p[2] for p in points]
    draw.text((margin, 8), title or "training", fill="black")
    draw.text((margin, height - margin + 8), f"step {min(steps)}", fill="black")
    draw.text((width - margin - 80, height - margin + 8), f"step {max(steps)}", fill="black")
    draw.text((6, 30), f"{max(losses):.3g}", fill="#1f77b4")
    draw.text((6, height - margin - 12), f"{min(losses):.3g}", fill="#1f77b4")
    draw.text((width - margin + 4, 30), f"{max(lrs):.1e}", fill="#d62728")
    draw.text((width - margin + 4, height - margin - 12), f"{min(lrs):.1e}", fill="#d62728")
    draw.text((width // 2 - 60, height - 24), "loss (blue), lr (red)", fill="black")
    image.save(path)
    return path


def _curve(draw: ImageDraw.ImageDraw, box, xs: list[float], ys: list[float], colour: str) -> None:
    """ys against xs, each scaled to fill the box."""
    left, top, right, bottom = box
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)

    def scale(value: float, lo: float, hi: float, start: float, end: float) -> float:
        return start if hi == lo else start + (value - lo) / (hi - lo) * (end - start)

    coords = [
        (scale(x, x_lo, x_hi, left, right), scale(y, y_lo, y_hi, bottom, top))
        for x, y in zip(xs, ys, strict=True)
    ]
    if len(coords) == 1:
        draw.ellipse([coords[0][0] - 2, coords[0][1] - 2, coords[0][0] + 2, coords[0][1] + 2],
                     fill=colour)  # fmt: skip
    else:
        draw.line(coords, fill=colour, width=2)
