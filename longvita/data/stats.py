"""What happened to the data: skipped samples by reason, and what was packed.

Owns the skip reasons, the `SampleError` that carries one, and `DataStats`, a mergeable record
of counts (skips by reason with a few `file:line` examples, samples per group, packed
sequences, real and pad tokens). Workers produce deltas, the loader merges them into epoch
summaries, and a trainer may merge the summaries of several data-parallel ranks (through
`to_dict`/`from_dict` and its own collective: this module knows nothing of torch.distributed).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

SKIP_REASONS = (
    "malformed_json",
    "invalid_sample",
    "no_assistant_turn",
    "media_error",
    "tag_media_mismatch",
    "too_long",
    "encode_error",
)
"""Why a sample is skipped: not valid JSON (nested too deeply included) or not a JSON object; a
record without usable messages (missing key, bad role, non-string content or content that is
not valid Unicode, bad media list or media path, reserved tokens such as `<IMG_CONTEXT>` typed
as text); no assistant turn to supervise; a missing or unreadable image/video (or one without a
decodable frame); `<image>`/`<video>` tags that do not match the number of media; more tokens
than the sequence length; any other exception raised while reading, validating or encoding the
record (its type and message are kept: a bug or a library's surprise, not the run's end)."""

MAX_EXAMPLES = 5
"""`file:line: message` examples kept per reason."""
MAX_MESSAGE_CHARS = 500
"""Longer skip messages are cut (a record's repr can be megabytes)."""


class SampleError(ValueError):
    """A sample that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        super().__init__(message)
        self.reason = reason


def printable(text: str, *, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` safe to log, print and JSON-encode anywhere: lone surrogates (what invalid UTF-8
    decodes to) as backslash escapes, and cut to `limit` characters."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


@dataclass
class DataStats:
    """Counts over some stretch of data (a worker's delta, an epoch, a whole inspect run)."""

    num_samples: int = 0
    """Samples packed into sequences."""
    num_sequences: int = 0
    """Packed sequences emitted."""
    num_tokens: int = 0
    """Non-pad tokens in the packed sequences."""
    num_pad_tokens: int = 0
    """Pad tokens in the packed sequences."""
    skipped: Counter = field(default_factory=Counter)
    """Skipped samples by reason (SKIP_REASONS)."""
    examples: dict[str, list[str]] = field(default_factory=dict)
    """Up to MAX_EXAMPLES `file:line: message` per reason."""
    samples_per_group: Counter = field(default_factory=Counter)
    """Packed samples by mixture group."""

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def packing_efficiency(self) -> float:
        """Share of non-pad tokens in the packed sequences (0 when nothing was packed)."""
        total = self.num_tokens + self.num_pad_tokens
        return self.num_tokens / total if total else 0.0

    def record_skip(self, reason: str, location: str, message: str) -> None:
        """Count a skipped sample (logging it is the reader's job, which rate-limits)."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        self.skipped[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < MAX_EXAMPLES:
            kept.append(f"{location}: {message}")

    def record_sequence(self, *, groups: list[str], num_tokens: int, seq_len: int) -> None:
        """Count one packed sequence holding samples of `groups` (one entry per sample)."""
        if num_tokens > seq_len:
            raise ValueError(f"a sequence of {seq_len} tokens cannot hold {num_tokens} tokens")
        self.num_sequences += 1
        self.num_samples += len(groups)
        self.num_tokens += num_tokens
        self.num_pad_tokens += seq_len - num_tokens
        self.samples_per_group.update(groups)

    def merge(self, other: DataStats) -> None:
        """Add `other` into this record (examples kept up to MAX_EXAMPLES per reason)."""
        self.num_samples += other.num_samples
        self.num_sequences += other.num_sequences
        self.num_tokens += other.num_tokens
        self.num_pad_tokens += other.num_pad_tokens
        self.skipped.update(other.skipped)
        self.samples_per_group.update(other.samples_per_group)
        for reason, examples in other.examples.items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(examples[: MAX_EXAMPLES - len(kept)])

    def to_dict(self) -> dict[str, Any]:
        """Plain Python data (for a state dict, JSON, or an all-gather across ranks)."""
        return {
            "num_samples": self.num_samples,
            "num_sequences": self.num_sequences,
            "num_tokens": self.num_tokens,
            "num_pad_tokens": self.num_pad_tokens,
            "skipped": dict(self.skipped),
            "examples": {k: list(v) for k, v in self.examples.items()},
            "samples_per_group": dict(self.samples_per_group),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataStats:
        return cls(
            num_samples=data["num_samples"],
            num_sequences=data["num_sequences"],
            num_tokens=data["num_tokens"],
            num_pad_tokens=data["num_pad_tokens"],
            skipped=Counter(data["skipped"]),
            examples={k: list(v) for k, v in data["examples"].items()},
            samples_per_group=Counter(data["samples_per_group"]),
        )

    def summary(self) -> str:
        """One paragraph: packed samples and sequences, efficiency, skips with examples."""
        lines = [
            f"{self.num_samples} samples in {self.num_sequences} sequences, "
            f"{self.num_tokens} tokens + {self.num_pad_tokens} pad "
            f"(packing efficiency {100 * self.packing_efficiency:.1f}%), "
            f"{self.num_skipped} skipped"
        ]
        for reason in SKIP_REASONS:
            if self.skipped[reason]:
                first = self.examples.get(reason, ["?"])[0]
                lines.append(f"  {reason}: {self.skipped[reason]} (first: {first})")
        return "\n".join(lines)
