"""A training stage as data: the stage YAML, validated, with `--set a.b=value` overrides.

Owns the schema of a stage file (DESIGN.md, "Training"; one keyword-only dataclass per section,
a docstring under every field), reading it (unknown keys, wrong types and impossible values are
a `StageConfigError` naming the key, e.g. `optim.lr: must be > 0, got -1.0`), the overrides of
the command line, and the checks that need the number of processes (the batch must divide over
the data-parallel ranks, cp must divide the ranks). Knows nothing of models or processes.

    init:       {llm: DIR, vision: DIR} | {from: RUN_OR_EXPORT_DIR}
                | {model: PRESET_OR_CONFIG, tokenizer: DIR}   (random weights: toy runs)
    trainable:  {vision, projector, llm}
    optim:      {lr, min_lr, betas, eps, weight_decay, clip, vision_lr_mult, vision_layer_decay,
                 max_nonfinite_steps}
    schedule:   {warmup_fraction, steps}
    batch:      {global_sequences, micro}
    data:       {mixture, data_root, seq_len, max_frames, fps, packing, num_bins, reset_per_sample,
                 pose_max_position, seed, num_workers}
    parallel:   {cp, activation_checkpointing}
    loss:       {logits_masked, chunk_size}
    checkpoint: {interval, keep_latest}
    log:        {interval, tensorboard}
    seed, stage, description
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from longvita.data.mixture import MAX_SEED


class StageConfigError(ValueError):
    """A stage file (or override) that cannot be run; the message names the key."""


@dataclass(frozen=True, kw_only=True)
class TrainableConfig:
    vision: bool = False
    """Train the InternViT (stage 2)."""
    projector: bool = True
    """Train the projector (every official stage)."""
    llm: bool = False
    """Train the Qwen2 decoder, embeddings and LM head (stages 2-4)."""


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate, reached at the end of the warmup."""
    min_lr: float = 1e-5
    """Learning rate at the end of the cosine decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (beta1, beta2)."""
    eps: float = 1e-8
    """Adam's epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW); 0 in every official stage."""
    clip: float = 1.0
    """Gradient clipping: the global L2 norm of all gradients is scaled down to this."""
    vision_lr_mult: float = 0.1
    """Learning-rate multiplier of the ViT (stage 2: 0.1)."""
    vision_layer_decay: float = 0.9
    """Layer-wise decay of the ViT's learning rate: block i gets decay**(L - i), the patch and
    position embeddings decay**(L + 1), for L blocks (official: 0.1 * 0.9**(25 - layer_id))."""
    max_nonfinite_steps: int = 10
    """Steps in a row whose loss or gradient is not finite (each skipped, counted, logged)
    after which the run stops with an error."""

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        _at_least("optim.min_lr", self.min_lr, 0.0)
        if self.min_lr > self.lr:
            raise StageConfigError(f"optim.min_lr: {self.min_lr} is above optim.lr {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise StageConfigError(f"optim.betas: need two numbers in [0, 1), got {self.betas}")
        _positive("optim.eps", self.eps)
        _at_least("optim.weight_decay", self.weight_decay, 0.0)
        _positive("optim.clip", self.clip)
        _positive("optim.vision_lr_mult", self.vision_lr_mult)
        _positive("optim.vision_layer_decay", self.vision_layer_decay)
        _at_least("optim.max_nonfinite_steps", self.max_nonfinite_steps, 1)


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    steps: int = 1000
    """Optimizer steps of the stage."""
    warmup_fraction: float = 0.03
    """Share of the steps with a linear warmup from 0 to optim.lr; then cosine to min_lr."""

    def __post_init__(self) -> None:
        _at_least("schedule.steps", self.steps, 1)
        if not 0 <= self.warmup_fraction < 1:
            raise StageConfigError(
                f"schedule.warmup_fraction: must be in [0, 1), got {self.warmup_fraction}"
            )


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    global_sequences: int = 8
    """Packed sequences per optimizer step, over all data-parallel ranks."""
    micro: int = 1
    """Packed sequences per forward (official: 1); the rest is gradient accumulation."""

    def __post_init__(self) -> None:
        _at_least("batch.global_sequences", self.global_sequences, 1)
        _at_least("batch.micro", self.micro, 1)
        if self.micro != 1:
            raise StageConfigError(
                f"batch.micro: only 1 packed sequence per forward is supported (as the "
                f"official stages), got {self.micro}; pack longer sequences instead"
            )


@dataclass(frozen=True, kw_only=True)
class DataSection:
    mixture: str = ""
    """The mixture YAML (the official format); relative paths from the current directory."""
    data_root: str | None = None
    """Base of the mixture's relative data paths; None = the mixture file's directory."""
    seq_len: int = 32768
    """Tokens per packed sequence."""
    max_frames: int | None = None
    """Frames per video; None = 4096."""
    fps: float | None = None
    """Video sampling rate; None = 1 frame per second."""
    packing: str = "per_source"
    """per_source (stages 1-2) or cross_source (stages 3-4)."""
    num_bins: int | None = None
    """Open bins per packing pool; None = the default of the mode."""
    reset_per_sample: bool = True
    """Positions and attention restart at each sample (stages 1-2)."""
    pose_max_position: int | None = None
    """PoSE: each sample's positions (the sequence's without reset) jump once at a random
    point, so that short samples teach distances up to this many positions; None = off (the
    official stages)."""
    seed: int = 0
    """Seed of the mixture's selection and order."""
    num_workers: int = 0
    """DataLoader workers per rank."""

    def __post_init__(self) -> None:
        if not self.mixture:
            raise StageConfigError("data.mixture: a mixture YAML is required")
        _at_least("data.seq_len", self.seq_len, 2)
        if self.max_frames is not None:
            _at_least("data.max_frames", self.max_frames, 1)
        if self.fps is not None:
            _positive("data.fps", self.fps)
        if isinstance(self.packing, str):  # per-source too, as `data inspect --packing` takes
            object.__setattr__(self, "packing", self.packing.replace("-", "_"))
        if self.packing not in ("per_source", "cross_source"):
            raise StageConfigError(
                f"data.packing: per_source or cross_source, got {self.packing!r}"
            )
        if self.num_bins is not None:
            _at_least("data.num_bins", self.num_bins, 1)
        if self.pose_max_position is not None and self.pose_max_position < self.seq_len:
            raise StageConfigError(
                f"data.pose_max_position: must be >= data.seq_len {self.seq_len}, "
                f"got {self.pose_max_position}"
            )
        _at_least("data.num_workers", self.num_workers, 0)
        _seed("data.seed", self.seed)


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    cp: int = 1
    """Context-parallel ranks per sequence (official: 1, 1, 2, 8)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (official stages 3-4)."""

    def __post_init__(self) -> None:
        _at_least("parallel.cp", self.cp, 1)


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    logits_masked: bool = True
    """Project only supervised rows to the vocabulary (official: stage 4); false computes the
    full [sequence, vocab] logits, as the official stages 1-3 (same values, more memory)."""
    chunk_size: int = 4096
    """Rows projected at once by the masked head."""

    def __post_init__(self) -> None:
        _at_least("loss.chunk_size", self.chunk_size, 1)


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    interval: int = 500
    """Optimizer steps between checkpoints (also written at the end and on SIGTERM/SIGINT)."""
    keep_latest: int = 3
    """Complete checkpoints kept; older ones are deleted once a newer one is complete."""

    def __post_init__(self) -> None:
        _at_least("checkpoint.interval", self.interval, 1)
        _at_least("checkpoint.keep_latest", self.keep_latest, 1)


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    interval: int = 10
    """Steps between log lines when stderr is not a terminal (a progress bar otherwise)."""
    tensorboard: bool = True
    """Write TensorBoard events too, when the tensorboard package is installed."""

    def __post_init__(self) -> None:
        _at_least("log.interval", self.interval, 1)


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """One training stage."""

    init: dict[str, Any]
    """Where the weights come from (`train.init.InitSpec`); weights only, the step restarts."""
    data: DataSection
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 0
    """Seed of the initialization and of every random number of the run."""
    stage: int | None = None
    """Which official stage this is (1-4), for the record."""
    description: str = ""
    """Free text, for the record."""
    source: str = ""
    """The stage file it was read from (for the record)."""

    def __post_init__(self) -> None:
        _seed("seed", self.seed)
        if not any(dataclasses.astuple(self.trainable)):
            raise StageConfigError("trainable: nothing to train (vision, projector, llm false)")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: list[str] = ()) -> StageConfig:
        """Read a stage file and apply `key.sub=value` overrides (values parsed as YAML)."""
        path = Path(path)
        if path.is_dir():
            raise StageConfigError(f"{path} is a directory: give a stage YAML file")
        if not path.is_file():
            raise StageConfigError(f"stage file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            message = " ".join(str(err).split())
            raise StageConfigError(f"{path} is not valid YAML: {message}") from None
        if not isinstance(data, dict):
            raise StageConfigError(f"{path}: a stage file is a mapping of sections")
        for override in overrides:
            apply_override(data, override)
        data["source"] = str(path.resolve())
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageConfig:
        return _build(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the run's record of its stage)."""
        out = dataclasses.asdict(self)
        out["optim"]["betas"] = list(self.optim.betas)
        return out

    def resolve(self, path: str) -> Path:
        """A path of the stage file: relative to the current directory, as the official
        launcher resolves its data paths (so the shipped stage files work from any run)."""
        return Path(os.path.expanduser(path))

    def check_world(self, world_size: int) -> None:
        """StageConfigError unless the ranks split into dp x cp and the batch over dp."""
        cp = self.parallel.cp
        if world_size % cp:
            raise StageConfigError(
                f"parallel.cp: {cp} does not divide the {world_size} processes "
                f"(the world is dp x cp ranks): run --nproc {cp} (or a multiple), or "
                f"--set parallel.cp=1"
            )
        dp = world_size // cp
        per_rank = self.batch.global_sequences / (dp * self.batch.micro)
        if per_rank != int(per_rank):
            raise StageConfigError(
                f"batch.global_sequences: {self.batch.global_sequences} sequences do not split "
                f"over {dp} data-parallel rank(s) x micro {self.batch.micro}"
            )

    def accumulation_steps(self, dp: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        return self.batch.global_sequences // (dp * self.batch.micro)


def apply_override(data: dict[str, Any], override: str) -> None:
    """`a.b=value` into nested `data` (the value parsed as YAML: 1e-5, true, [0.9, 0.99])."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise StageConfigError(f"--set {override!r}: expected key.sub=value")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or written as an empty section (`log:`)
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise StageConfigError(f"--set {override!r}: {part} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise StageConfigError(f"--set {override!r}: the value is not valid YAML: {err}") from None


def _build(cls: type, data: Any, prefix: str):
    """An instance of the dataclass `cls` from a mapping, every value checked against its
    field's type; StageConfigError naming `prefix.key` otherwise."""
    where = prefix.rstrip(".") or "the stage file"
    if data is None and prefix:  # a section left empty (`log:` with its keys commented out)
        data = {}
    if not isinstance(data, dict):
        raise StageConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise StageConfigError(
            f"{prefix}{unknown[0]}: unknown key"
            + (f" (also {unknown[1:]})" if unknown[1:] else "")
            + f"; {where} takes {sorted(names)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise StageConfigError(f"{prefix}{missing[0]}: required")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """`value` checked (and converted where YAML is ambiguous) against the type `hint`."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise StageConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise StageConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if hint is float:
        return _number(value, key)
    if hint is str:
        if not isinstance(value, str):
            raise StageConfigError(f"{key}: must be a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise StageConfigError(f"{key}: must be a list of {len(args)}, got {value!r}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise StageConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    raise AssertionError(f"unhandled type {hint} of {key}")


def _number(value: Any, key: str) -> float:
    """A finite float; YAML reads 1e-5 (no dot) as a string, so numeric strings are taken."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise StageConfigError(f"{key}: must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StageConfigError(f"{key}: must be a number, got {value!r}")
    if not math.isfinite(value):
        raise StageConfigError(f"{key}: must be finite, got {value}")
    return float(value)


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise StageConfigError(f"{key}: must be > 0, got {value}")


def _seed(key: str, value: int) -> None:
    if not 0 <= value <= MAX_SEED:
        raise StageConfigError(f"{key}: must be in [0, 2**63), got {value}")


def _at_least(key: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise StageConfigError(f"{key}: must be >= {minimum}, got {value}")
