"""`longvita data inspect MIXTURE.yaml --seq-len N`: what a mixture gives before training on it.

Owns the command's arguments, the inspection loop (read, encode and pack the first samples of
epoch 0's seeded order, with a tqdm bar when stderr is a terminal) and the report: samples per
group, the token-length distribution, skips by reason with their first `file:line`, and the
packing efficiency (share of non-pad tokens). The command line wiring (`longvita.cli`) calls
`add_parser`; errors are raised as ValueError with a one-line message for it to print.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from longvita.data.encode import SampleReader
from longvita.data.mixture import MAX_SEED, Mixture, MixtureConfig, data_root_of
from longvita.data.packing import GreedyPacker
from longvita.data.stats import SKIP_REASONS, DataStats
from longvita.data.synth import add_parser as add_synth_parser
from longvita.processing.processor import Processor

PERCENTILES = (0, 50, 90, 99, 100)


@dataclass
class InspectReport:
    """What inspecting a mixture found."""

    seq_len: int
    packing: str
    groups: dict[str, dict[str, int]]
    """Per group: files, records, selected (by ratio/num) and, after the run, packed."""
    stats: DataStats = field(default_factory=DataStats)
    lengths: list[int] = field(default_factory=list)
    """Token count of every sample that encoded (over-long ones included)."""
    num_read: int = 0
    """Samples read (the first of epoch 0's order)."""

    def length_summary(self) -> dict[str, float]:
        if not self.lengths:
            return {}
        values = np.asarray(self.lengths)
        out = {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}
        return {**out, "mean": float(values.mean())}

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "packing": self.packing,
            "samples_read": self.num_read,
            "groups": self.groups,
            "token_lengths": self.length_summary(),
            "skipped": {r: self.stats.skipped[r] for r in SKIP_REASONS},
            "skip_examples": self.stats.examples,
            "sequences": self.stats.num_sequences,
            "packing_efficiency": self.stats.packing_efficiency,
        }

    def format(self) -> str:
        lines = [f"{'group':<32} {'files':>6} {'records':>10} {'selected':>10} {'packed':>8}"]
        for name, row in self.groups.items():
            lines.append(
                f"{name:<32} {row['files']:>6} {row['records']:>10} {row['selected']:>10} "
                f"{row['packed']:>8}"
            )
        lengths = self.length_summary()
        described = ", ".join(f"{k} {v:.0f}" for k, v in lengths.items()) or "none"
        lines.append(f"token lengths of {len(self.lengths)} encoded samples: {described}")
        lines.append(f"samples read: {self.num_read}, skipped: {self.stats.num_skipped}")
        for reason in SKIP_REASONS:
            if self.stats.skipped[reason]:
                first = self.stats.examples[reason][0]
                lines.append(f"  {reason}: {self.stats.skipped[reason]} (first: {first})")
        lines.append(
            f"packing ({self.packing}, seq_len {self.seq_len}): {self.stats.num_samples} samples "
            f"in {self.stats.num_sequences} sequences, efficiency "
            f"{100 * self.stats.packing_efficiency:.1f}% non-pad tokens"
        )
        return "\n".join(lines)


def inspect_mixture(
    mixture: Mixture,
    processor: Processor,
    *,
    seq_len: int,
    packing: str = "per_source",
    num_bins: int | None = None,
    max_frames: int | None = None,
    fps: float | None = None,
    max_samples: int | None = None,
    progress: bool = False,
) -> InspectReport:
    """Read, encode and pack the first max_samples of epoch 0 (all by default)."""
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"--max-samples must be >= 1, got {max_samples}")
    reader = SampleReader(mixture, processor, seq_len=seq_len, max_frames=max_frames, fps=fps)
    packer = GreedyPacker(seq_len, mode=packing, num_bins=num_bins)
    report = InspectReport(seq_len, packing, mixture.group_summary())
    order = mixture.epoch_order(0)[:max_samples]
    for record_id in _progress(order, enabled=progress):
        report.num_read += 1
        sample = reader.read(int(record_id), report.stats, on_length=report.lengths.append)
        if sample is not None:
            emitted = packer.add(sample.group, num_tokens=sample.num_tokens, key=sample.source)
            _count(emitted, report.stats, seq_len)
    _count(packer.flush(), report.stats, seq_len)
    for name, row in report.groups.items():
        row["packed"] = report.stats.samples_per_group[name]
    return report


def _count(bins, stats: DataStats, seq_len: int) -> None:
    for full in bins:
        stats.record_sequence(groups=full.items, num_tokens=full.num_tokens, seq_len=seq_len)


def _progress(items, *, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="inspect", unit="sample", file=sys.stderr)


def _is_terminal(stream) -> bool:
    """Whether `stream` is an interactive terminal (not a file, pipe or captured stream)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `data inspect` to the `longvita` command's subparsers; returns the inspect parser."""
    data = subparsers.add_parser(
        "data", help="training data tools", description="Training data tools."
    )
    sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    add_synth_parser(sub)
    p = sub.add_parser(
        "inspect",
        help="report what a mixture YAML gives at a sequence length",
        description=(
            "Read, encode and pack the samples of a mixture YAML (the official format: groups "
            "with ratio, optional num, data_paths) in the seeded order of epoch 0, and report "
            "samples per group, the token-length distribution, skipped samples by reason with "
            "their first file:line, and the packing efficiency (share of non-pad tokens). "
            "Give the tokenizer with --tokenizer (tiles as in the official 448-px model) or a "
            "checkpoint with --model (its tokenizer and vision settings)."
        ),
        epilog="example: longvita data inspect data/stage1.yaml --seq-len 32768 "
        "--model Long-VITA-16K_HF --max-samples 2000 (a mixture file: a stage file's "
        "data.mixture, not the stage file itself)",
    )
    p.add_argument("mixture", metavar="MIXTURE.yaml", help="the mixture file")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per packed sequence")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (Qwen2 files)")
    p.add_argument(
        "--model", metavar="DIR", help="checkpoint directory (config + tokenizer), or demo"
    )
    p.add_argument("--max-samples", type=int, default=None, help="read only the first K samples")
    p.add_argument(
        "--data-root",
        default=None,
        help="base of relative data paths (default: the mixture file's directory, as in train)",
    )
    p.add_argument(
        "--packing",
        type=lambda mode: mode.replace("-", "_"),  # per-source works too
        choices=("per_source", "cross_source"),
        default="per_source",
        help="bins per data file (stages 1-2, default) or one pool (stages 3-4), as a stage "
        "file's data.packing",
    )
    p.add_argument(
        "--num-bins",
        type=int,
        default=None,
        help="open bins per pool (default: 1 per file for per_source, 4 for cross_source)",
    )
    p.add_argument("--seed", type=int, default=0, help="mixture seed (default 0)")
    p.add_argument("--max-frames", type=int, default=None, help="frames per video (default 4096)")
    p.add_argument("--fps", type=float, default=None, help="video sampling rate (default 1)")
    p.add_argument(
        "--allow-missing-files", action="store_true", help="warn about missing data files"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (there is none when stderr is not a terminal)",
    )
    p.set_defaults(func=run_inspect)
    return p


def _processor(args: argparse.Namespace) -> Processor:
    from longvita.assets import resolve_model_dir
    from longvita.config import LongVITAConfig, VisionConfig
    from longvita.processing.tokens import load_tokenizer

    if (args.tokenizer is None) == (args.model is None):
        raise ValueError("give exactly one of --tokenizer DIR or --model DIR")
    directory = resolve_model_dir(args.model) if args.model else Path(args.tokenizer)
    if not directory.is_dir():
        raise ValueError(f"{str(directory)!r} is not a directory")
    vision = LongVITAConfig.from_pretrained(directory).vision if args.model else VisionConfig()
    return Processor(load_tokenizer(directory), vision)


def run_inspect(args: argparse.Namespace) -> int:
    """The `data inspect` command: prints the report (text or --json) to stdout."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    if args.seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {args.seq_len}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.fps is not None and not (args.fps > 0 and math.isfinite(args.fps)):
        raise ValueError(f"--fps must be a finite number > 0, got {args.fps}")
    config = MixtureConfig.from_yaml(args.mixture)  # the cheap checks first
    processor = _processor(args)
    mixture = Mixture(
        config,
        data_root=data_root_of(args.mixture, args.data_root),
        seed=args.seed,
        allow_missing_files=args.allow_missing_files,
    )
    with logging_redirect_tqdm():
        report = inspect_mixture(
            mixture,
            processor,
            seq_len=args.seq_len,
            packing=args.packing,
            num_bins=args.num_bins,
            max_frames=args.max_frames,
            fps=args.fps,
            max_samples=args.max_samples,
            progress=not args.no_progress and _is_terminal(sys.stderr),
        )
    print(json.dumps(report.to_dict()) if args.json else report.format())
    return 0
