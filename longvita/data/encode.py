"""From a plan entry to an encoded training sample, or a counted and logged skip.

Owns the one call into the Processor for training (`Processor.encode_conversation`, which
supervises every assistant turn as `{answer}<|im_end|>\\n` and leaves everything else at
-100), the mapping of its errors to skip reasons, and the over-long check.

Owns the line between a skip and a run error. Nothing about one record ever raises out of
`SampleReader.read`: the expected failures keep their precise reasons, and any other
`Exception` raised while reading, validating or encoding it (a bug, a surprise from the
tokenizer, PIL, PyAV or numpy, a MemoryError from an allocation sized by a corrupt header,
a RecursionError) is the skip `encode_error`. Every skip is counted in the caller's DataStats
and logged with its `file:line`. Only `DataFileError` (the data file itself vanished or
changed after indexing) and the BaseExceptions that are not Exceptions (KeyboardInterrupt,
SystemExit) go through. Knows nothing of packing or loaders.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from longvita.data.mixture import Mixture
from longvita.data.samples import DataFileError, RawSample
from longvita.data.stats import DataStats, SampleError, printable
from longvita.errors import MediaError, PromptError, ReservedTokenError
from longvita.processing.processor import Processor

logger = logging.getLogger(__name__)

MAX_WARNINGS = 20
"""Skips logged at WARNING per reason by one reader; the rest go to DEBUG."""


@dataclass
class EncodedSample:
    """One conversation as token ids, unshifted labels, and its tiles."""

    input_ids: torch.Tensor
    """[n] int64, tags expanded into placeholders."""
    labels: torch.Tensor
    """[n] int64, the token id on supervised positions, -100 elsewhere (not shifted)."""
    visual_mask: torch.Tensor
    """[n] bool, True at placeholder positions (tokens_per_tile per tile, in tile order)."""
    pixel_values: torch.Tensor
    """[num_tiles, 3, S, S] float32, possibly zero tiles."""
    group: str = ""
    """Mixture group the sample comes from."""
    source: str = ""
    """The data file it comes from (the pool of per-source packing)."""
    location: str = ""
    """`file:line` of its record."""

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tiles(self) -> int:
        return self.pixel_values.shape[0]


def encode_sample(
    processor: Processor,
    sample: RawSample,
    *,
    max_frames: int | None = None,
    fps: float | None = None,
) -> EncodedSample:
    """Encode through the Processor; media, tag and text problems raise SampleError."""
    try:
        out = processor.encode_conversation(
            sample.messages, sample.images, sample.videos, max_frames=max_frames, fps=fps
        )
    except MediaError as err:
        raise SampleError("media_error", str(err)) from err
    except ReservedTokenError as err:  # a PromptError, but about the text: check it first
        raise SampleError("invalid_sample", str(err)) from err
    except PromptError as err:
        raise SampleError("tag_media_mismatch", str(err)) from err
    except ValueError as err:
        raise SampleError("invalid_sample", str(err)) from err
    return EncodedSample(
        input_ids=out.input_ids,
        labels=out.labels,
        visual_mask=out.visual_mask,
        pixel_values=out.pixel_values,
        location=sample.location,
    )


class SampleReader:
    """Reads, validates and encodes plan entries of a mixture; bad ones become counted skips."""

    def __init__(
        self,
        mixture: Mixture,
        processor: Processor,
        *,
        seq_len: int,
        max_frames: int | None = None,
        fps: float | None = None,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.mixture = mixture
        self.processor = processor
        self.seq_len = seq_len
        self.max_frames = max_frames
        self.fps = fps
        self._warned: Counter = Counter()

    def read(
        self,
        record_id: int,
        stats: DataStats,
        on_length: Callable[[int], None] | None = None,
    ) -> EncodedSample | None:
        """The encoded sample of a global record id, or None after recording why it is skipped.

        `on_length` is called with the token count of every sample that encodes (over-long
        ones included), for length statistics. Raises only DataFileError (and the
        BaseExceptions that are not Exceptions); see the module docstring.
        """
        file_index, index = self.mixture.locate(record_id)
        entry = self.mixture.files[file_index]
        location = entry.file.location(index)
        try:
            sample = encode_sample(
                self.processor,
                entry.file.read(index),
                max_frames=self.max_frames,
                fps=self.fps,
            )
        except SampleError as err:
            self._skip(stats, err.reason, location, str(err))
            return None
        except DataFileError:
            raise
        except Exception as err:  # unforeseen, but about this one record: a skip like the rest
            self._skip(stats, "encode_error", location, describe_exception(err))
            logger.debug("the encode_error at %s", printable(location), exc_info=err)
            return None
        if on_length is not None:
            on_length(sample.num_tokens)
        if sample.num_tokens > self.seq_len:
            message = f"{sample.num_tokens} tokens > sequence length {self.seq_len}"
            self._skip(stats, "too_long", location, message)
            return None
        sample.group, sample.source = entry.group, str(entry.file.path)
        return sample

    def _skip(self, stats: DataStats, reason: str, location: str, message: str) -> None:
        location, message = printable(location), printable(message)
        stats.record_skip(reason, location, message)
        self._warned[reason] += 1
        count = self._warned[reason]
        level = logging.WARNING if count <= MAX_WARNINGS else logging.DEBUG
        logger.log(level, "skipped sample (%s) %s: %s", reason, location, message)
        if count == MAX_WARNINGS:
            logger.warning("further %r skips of this reader are logged at DEBUG", reason)


def describe_exception(err: BaseException) -> str:
    """`module.Type: message` (just `Type` for builtins), for an unforeseen error."""
    kind = type(err)
    name = kind.__qualname__
    if kind.__module__ != "builtins":
        name = f"{kind.__module__}.{name}"
    return f"{name}: {err}" if str(err) else name
