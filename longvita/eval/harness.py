"""What the benchmark-harness adapters (lmms-eval, VLMEvalKit) share.

Owns two things the adapters would otherwise each write:
- `join_parts`: a harness's interleaved input (text, images, videos in order) as one user turn,
  each image part a `<image>\\n` tag and each video part a `<video>\\n` tag, the way
  `longvita serve` joins an OpenAI message's content parts (`serve.protocol.MEDIA_TAGS`), so the
  same question gets the same prompt through every route;
- `HarnessModel`: a checkpoint loaded once, answering through `Pipeline.run` (or, with cp > 1,
  a context-parallel group of local processes: `eval.cp_group`) and scoring continuations
  through `eval.likelihood`, with the video sampling (max_frames, fps) fixed for the whole run.
The adapters own only their harness's request formats and defaults.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from longvita.assets import resolve_model_dir
from longvita.checks import check_int, check_number
from longvita.eval.likelihood import ContinuationScore, score_continuations
from longvita.infer.pipeline import load
from longvita.infer.request import GenerationOutput, GenerationRequest
from longvita.serve.protocol import MEDIA_TAGS

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
)
"""A media path with one of these suffixes is an image; any other file or a directory a video."""
DEFAULT_MAX_NEW_TOKENS = 1024
"""The official VLMEvalKit wrapper's limit, also used when an lmms-eval task sets none."""


@dataclass
class UserTurn:
    """One user message with its media, ready for `Pipeline.generate`."""

    text: str
    """The message, with one `<image>` / `<video>` tag per medium, in order."""
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)


def media_kind(value: object) -> str:
    """ "image" or "video" for what a harness hands over as a visual: a PIL image is an image;
    a path is an image by its suffix (IMAGE_SUFFIXES), else a video (file or frame directory);
    a list of PIL images is a video's frames."""
    if isinstance(value, Image.Image):
        return "image"
    if isinstance(value, str | os.PathLike):
        return "image" if Path(value).suffix.lower() in IMAGE_SUFFIXES else "video"
    if isinstance(value, Sequence) and value and all(isinstance(v, Image.Image) for v in value):
        return "video"
    raise ValueError(
        f"unsupported visual input {type(value).__name__} ({str(value)[:80]!r}): give PIL images, "
        "image or video paths, or lists of PIL frames (audio is not supported)"
    )


def join_parts(parts: Iterable[tuple[str, Any]], tags: Mapping[str, str] = MEDIA_TAGS) -> UserTurn:
    """(kind, value) parts in order, kind "text", "image" or "video" -> one user turn: a text
    part is its text, a media part its tag (`tags`: by default an image `<image>\\n`, a video
    `<video>\\n`, as `longvita serve` joins content parts)."""
    turn = UserTurn("")
    pieces = []
    for kind, value in parts:
        if kind == "text":
            pieces.append(value)
        elif kind in tags:
            pieces.append(tags[kind])
            (turn.images if kind == "image" else turn.videos).append(value)
        else:
            raise ValueError(f"unknown content part type {kind!r}: expected text, image or video")
    turn.text = "".join(pieces)
    return turn


def rank_device(device: str) -> str:
    """Under a data-parallel launch (torchrun, accelerate: LOCAL_RANK set), local rank r takes
    accelerator r when it sees it; when it sees fewer (VLMEvalKit's run.py narrows each process
    to its own GPUs), the first it sees. "cpu" and devices with an index stay as given."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None or device == "cpu" or ":" in device:
        return device
    import torch

    if int(local_rank) >= torch.accelerator.device_count():
        return device
    return f"{device}:{local_rank}"


def launched_processes() -> int:
    """The processes of the data-parallel launch this one is part of (1 when none): torchrun
    and accelerate set WORLD_SIZE and LOCAL_WORLD_SIZE; VLMEvalKit hides WORLD_SIZE while it
    builds its models, not LOCAL_WORLD_SIZE."""
    return max(int(os.environ.get(name, "1")) for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"))


class HarnessModel:
    """A model behind the two calls harnesses make: generate an answer, score continuations.

    Holds a Pipeline (one process) or a context-parallel group (generation only), and the video
    sampling of every request: max_frames, fps (None: the model's defaults). `load` builds one
    from a checkpoint directory.
    """

    def __init__(
        self,
        pipe=None,
        *,
        group=None,
        max_frames: int | None = None,
        fps: float | None = None,
    ) -> None:
        if (pipe is None) == (group is None):
            raise ValueError("give a Pipeline or a context-parallel group, not both or neither")
        if max_frames is not None:
            check_int("max_frames", max_frames, minimum=1)
        if fps is not None:
            check_number("fps", fps, above=0.0)
        self.pipe, self.group = pipe, group
        self.max_frames, self.fps = max_frames, fps

    @classmethod
    def load(
        cls,
        model: str | Path,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        max_frames: int | None = None,
        fps: float | None = None,
        cp: int = 1,
    ) -> HarnessModel:
        """From a checkpoint directory or "demo"; device, dtype as `longvita.load`; cp > 1
        starts that many context-parallel ranks on this machine for generation."""
        check_int("cp", cp, minimum=1)
        model_dir = resolve_model_dir(model)
        if cp == 1:
            pipe = load(model_dir, device=device, dtype=dtype)
            return cls(pipe, max_frames=max_frames, fps=fps)
        if launched_processes() > 1:
            raise ValueError(
                f"cp={cp} starts its own {cp} ranks: run the harness as one process "
                "(not under torchrun/accelerate with several processes)"
            )
        from longvita.eval.cp_group import ContextParallelGroup

        group = ContextParallelGroup(model_dir, cp=cp, device=device, dtype=dtype)
        return cls(group=group, max_frames=max_frames, fps=fps)

    def generate(
        self,
        turn: UserTurn,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
    ) -> GenerationOutput:
        """The answer to one user turn (greedy unless temperature > 0)."""
        request = GenerationRequest.create(
            [{"role": "user", "content": turn.text}],
            turn.images,
            turn.videos,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=tuple(stop),
            max_frames=self.max_frames,
            fps=self.fps,
        )
        if self.group is not None:
            return self.group.run(request)
        return self.pipe.run(request)

    def loglikelihood(
        self, turn: UserTurn, continuations: Sequence[str]
    ) -> list[ContinuationScore]:
        """How likely each continuation is as the answer to the turn (`eval.likelihood`)."""
        if self.pipe is None:
            raise ValueError(
                "likelihood scoring runs in one process: load the model with cp=1 "
                "(generation tasks can keep cp > 1)"
            )
        return score_continuations(
            self.pipe,
            [{"role": "user", "content": turn.text}],
            continuations,
            turn.images,
            turn.videos,
            max_frames=self.max_frames,
            fps=self.fps,
        )

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
