"""What a generation is asked to do, and what it gives back: one request type, one result type.

`GenerationRequest` carries everything a generation needs besides the model (messages, media,
sampling, video sampling, chunk sizes), validated once where it is built, picklable so that
context-parallel ranks receive it as is. `GenerationOutput` is the one result of every path
(the Pipeline, the command line, a context-parallel group); `to_record` is what
`longvita generate --json` prints, the same fields at any `--cp`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longvita.checks import check_int, check_number
from longvita.infer.detokenize import check_stop_sequences
from longvita.processing.chat import Messages

DEFAULT_PREFILL_CHUNK = 4096
"""Prompt tokens per prefill forward."""
DEFAULT_VISION_BATCH = 16
"""Tiles per ViT forward (about the frames of one 4096-token chunk at 258 tokens per frame)."""


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How many tokens to generate and how to choose them."""

    max_new_tokens: int = 64
    """Upper bound on generated tokens (the stop token is not counted)."""
    temperature: float = 0.0
    """0 is greedy decoding; above 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1.0 disables it."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 disables it."""
    seed: int | None = None
    """Seed of the sampling generator, for reproducible samples."""
    ignore_eos: bool = False
    """Generate past the stop token (vLLM's `ignore_eos`), so that every answer has
    max_new_tokens tokens (benchmarks); stop sequences still end it."""

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        check_number("temperature", self.temperature, at_least=0.0)
        check_number("top_p", self.top_p, above=0.0, at_most=1.0)
        check_int("top_k", self.top_k, minimum=0)
        if self.seed is not None:
            check_int("seed", self.seed)
            if not -(2**63) <= self.seed < 2**64:  # what torch.Generator.manual_seed takes
                raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")


SAMPLING_OPTIONS = tuple(f.name for f in dataclasses.fields(SamplingParams))


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """One prompt to answer: messages with `<image>`/`<video>` tags, their media, and how."""

    messages: Messages
    """A string (one user turn) or a list of {"role", "content"} turns."""
    images: tuple = ()
    """Paths or PIL images, one per `<image>` tag, in order."""
    videos: tuple = ()
    """Video files or frame directories, one per `<video>` tag, in order."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    """Stop sequences: the answer ends right before the first one generated (not included)."""
    max_frames: int | None = None
    """Frames per video; None = the model's default (4096)."""
    fps: float | None = None
    """Video sampling rate; None = the default (1 frame per second)."""
    return_scores: bool = False
    """Keep the raw logits of every step (`GenerationOutput.scores`)."""
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    """Prompt tokens per prefill forward (per rank and round under context parallelism)."""
    vision_batch: int = DEFAULT_VISION_BATCH
    """Tiles per ViT forward."""

    def __post_init__(self) -> None:
        for name in ("images", "videos"):
            value = getattr(self, name)
            if isinstance(value, str | Path) or not isinstance(value, Sequence):
                raise ValueError(f"{name} must be a list (one per tag), got {value!r}")
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "stop", check_stop_sequences(self.stop))
        if self.max_frames is not None:
            check_int("max_frames", self.max_frames, minimum=1)
        if self.fps is not None:
            check_number("fps", self.fps, above=0.0)
        check_int("prefill_chunk", self.prefill_chunk, minimum=1)
        check_int("vision_batch", self.vision_batch, minimum=1)
        if not isinstance(self.return_scores, bool):
            raise ValueError(f"return_scores must be True or False, got {self.return_scores!r}")

    @classmethod
    def create(
        cls,
        messages: Messages,
        images: Sequence | None = None,
        videos: Sequence | None = None,
        **options: Any,
    ) -> GenerationRequest:
        """From flat keyword options, as `Pipeline.generate` takes them: the sampling ones
        (max_new_tokens, temperature, top_p, top_k, seed, ignore_eos) and the request's own
        fields."""
        own = {f.name for f in dataclasses.fields(cls)} - {"messages", "images", "videos"}
        unknown = sorted(set(options) - own - set(SAMPLING_OPTIONS) - {"sampling"})
        if unknown:
            allowed = sorted((own - {"sampling"}) | set(SAMPLING_OPTIONS))
            raise TypeError(f"unknown generation option(s) {unknown}; expected some of {allowed}")
        flat = {k: options.pop(k) for k in SAMPLING_OPTIONS if k in options}
        base = options.pop("sampling", None) or SamplingParams()
        if not isinstance(base, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(base).__name__}")
        return cls(
            messages=messages,
            images=() if images is None else images,  # __post_init__ checks, makes tuples
            videos=() if videos is None else videos,
            sampling=dataclasses.replace(base, **flat),  # flat options override `sampling`
            **options,
        )


@dataclass
class GenerationOutput:
    """The answer to one GenerationRequest, from one process or a context-parallel group."""

    token_ids: list[int]
    """The new tokens (stop token not included)."""
    text: str = ""
    """The new tokens decoded without special tokens, up to the first stop sequence."""
    scores: torch.Tensor | None = None
    """With return_scores: float32 [len(token_ids), vocab], raw logits of each step."""
    stop_reason: str = ""
    """"stop_token", "stop_sequence" (one of the request's `stop` strings) or "length"."""
    prompt_tokens: int = 0
    """Tokens in the expanded prompt."""
    num_tiles: int = 0
    """Image tiles plus video frames encoded by the ViT."""
    image_grids: list[tuple[int, int]] = field(default_factory=list)
    """(cols, rows) of each image's tiling, in tag order."""
    video_frames: list[int] = field(default_factory=list)
    """Frames taken from each video, in tag order."""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cp: int = 1
    """Processes the prompt and KV cache were split over."""
    prefill_rounds: int = 1
    """Prefill forwards per process (chunks at cp 1, rounds under context parallelism)."""
    kv_cache_bytes_per_rank: list[int] = field(default_factory=list)
    """Bytes of each rank's KV cache (allocated once for prompt + max_new_tokens)."""
    kv_cache_tokens_per_rank: list[int] = field(default_factory=list)
    """Tokens each rank had cached at the end."""
    tiles_encoded_per_rank: list[int] = field(default_factory=list)
    """Tiles each rank's ViT encoded."""
    cached_tokens: int = 0
    """Prompt tokens whose keys and values came from the prefix cache (not prefilled)."""

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the whole KV cache, all ranks together."""
        return sum(self.kv_cache_bytes_per_rank)

    def to_record(self) -> dict[str, Any]:
        """Plain JSON-able fields (scores left out), what `longvita generate --json` prints."""
        fields = (f.name for f in dataclasses.fields(self) if f.name != "scores")
        record = {name: getattr(self, name) for name in fields}
        record["image_grids"] = [list(grid) for grid in self.image_grids]
        record["new_tokens"] = len(self.token_ids)
        record["kv_cache_bytes"] = self.kv_cache_bytes
        for key in ("prefill_seconds", "decode_seconds"):
            record[key] = round(record[key], 4)
        return record
