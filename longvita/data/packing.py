"""Packing: which samples share a sequence (greedy bins), and the packed tensors.

Two official modes (reference/LONGVITA.md section 4):
- per source (stages 1-2): samples are binned with samples of the same data file only;
- across sources (stages 3-4): one pool of bins for all files.

`GreedyPacker` keeps up to `num_bins` open bins per pool (official: 1 per source, 2 across
sources; our default across sources is 4, which packs tighter). A sample goes into the fullest
open bin of its pool that still has room; when none
has, the fullest bin of the pool is emitted (once the pool has num_bins bins) and a new bin is
opened with the sample. A bin that is exactly full is emitted at once. (The official code puts
a sample into the *shortest* of its two bins; taking the fullest that fits packs tighter and is
otherwise the same rule.)

`pack_sequence` turns a bin's samples into one PackedSequence of exactly seq_len tokens with
tensor ops only (no per-token Python): ids padded with the pad id, labels shifted *within* each
sample (the last token of a sample predicts nothing, never the next sample's first token),
positions and attention boundaries reset per sample or continuous, tiles concatenated in
placeholder order. `skip_positions` (optional, PoSE) then stretches each segment's positions.
Knows nothing of files, the Processor or loaders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from longvita.data.packed import PackedSequence
from longvita.ops.loss import IGNORE_INDEX, shift_labels

PACKING_MODES = ("per_source", "cross_source")
# The official code keeps 2 open bins across sources; 4 packs a realistic image/video/text mix
# at 32K from 92.6% to 97.2% non-pad tokens (benchmarks/results/data_throughput.md).
DEFAULT_NUM_BINS = {"per_source": 1, "cross_source": 4}


class Packable(Protocol):
    input_ids: torch.Tensor
    labels: torch.Tensor
    visual_mask: torch.Tensor
    pixel_values: torch.Tensor


@dataclass
class Bin:
    """An open (or emitted) bin: items in arrival order and their total tokens."""

    key: str
    """The pool: the source for per-source packing, "" across sources."""
    items: list[Any] = field(default_factory=list)
    num_tokens: int = 0


class GreedyPacker:
    """Greedy online binning of samples into sequences of seq_len tokens."""

    def __init__(self, seq_len: int, *, mode: str = "per_source", num_bins: int | None = None):
        if mode not in PACKING_MODES:
            raise ValueError(f"packing mode {mode!r}; expected one of {PACKING_MODES}")
        num_bins = DEFAULT_NUM_BINS[mode] if num_bins is None else num_bins
        if seq_len < 1 or num_bins < 1:
            raise ValueError(f"need seq_len >= 1 and num_bins >= 1, got {seq_len=}, {num_bins=}")
        self.seq_len = seq_len
        self.mode = mode
        self.num_bins = num_bins
        self.bins: list[Bin] = []
        """Open bins, in the order they were opened (restorable by appending)."""

    def add(self, item: Any, *, num_tokens: int, key: str = "") -> list[Bin]:
        """Place an item of num_tokens tokens; returns the bins emitted by it (0 to 2)."""
        if not 1 <= num_tokens <= self.seq_len:
            raise ValueError(f"an item of {num_tokens} tokens cannot fit seq_len {self.seq_len}")
        pool = key if self.mode == "per_source" else ""
        candidates = [b for b in self.bins if b.key == pool]
        fitting = [b for b in candidates if b.num_tokens + num_tokens <= self.seq_len]
        emitted: list[Bin] = []
        if fitting:
            target = max(fitting, key=lambda b: b.num_tokens)  # the first of equals
        else:
            if len(candidates) >= self.num_bins:
                fullest = max(candidates, key=lambda b: b.num_tokens)
                self.bins.remove(fullest)
                emitted.append(fullest)
            target = Bin(pool)
            self.bins.append(target)
        target.items.append(item)
        target.num_tokens += num_tokens
        if target.num_tokens == self.seq_len:
            self.bins.remove(target)
            emitted.append(target)
        return emitted

    def flush(self) -> list[Bin]:
        """Emit every open bin, in opening order (end of an epoch)."""
        out, self.bins = self.bins, []
        return out


def pack_sequence(
    samples: Sequence[Packable],
    *,
    seq_len: int,
    pad_id: int,
    reset_per_sample: bool,
    tokens_per_tile: int,
) -> PackedSequence:
    """Concatenate samples into one PackedSequence of exactly seq_len tokens.

    With reset_per_sample, cu_seqlens holds each sample's boundaries (plus one segment for the
    padding, if any) and positions restart at 0 in each segment; without, cu_seqlens is the
    single segment [0, seq_len] and positions run 0..seq_len-1.
    """
    if not samples:
        raise ValueError("cannot pack an empty list of samples")
    lengths = torch.tensor([s.input_ids.shape[0] for s in samples], dtype=torch.int64)  # [k]
    num_real = int(lengths.sum())
    if num_real > seq_len or int(lengths.min()) < 1:
        raise ValueError(
            f"samples of {lengths.tolist()} tokens (total {num_real}) do not fit {seq_len=}"
        )
    input_ids = torch.full((seq_len,), pad_id, dtype=torch.int64)  # [S]
    input_ids[:num_real] = torch.cat([s.input_ids for s in samples])
    labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.int64)  # [S]
    labels[:num_real] = torch.cat([s.labels for s in samples])
    ends = torch.cumsum(lengths, 0)  # [k] exclusive end of each sample
    targets = shift_labels(labels)  # [S]
    targets[ends - 1] = IGNORE_INDEX  # a sample's last token predicts nothing
    visual_mask = torch.zeros(seq_len, dtype=torch.bool)  # [S]
    visual_mask[:num_real] = torch.cat([s.visual_mask for s in samples])
    if reset_per_sample:
        cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), ends])  # [k + 1]
        if num_real < seq_len:
            cu_seqlens = torch.cat([cu_seqlens, torch.tensor([seq_len])])  # padding segment
        # position = p - start of p's segment; the start is the running sum of the lengths of
        # the segments before, which jump in at each boundary (cheaper than repeat_interleave)
        jumps = torch.zeros(seq_len, dtype=torch.int64)  # [S]
        jumps[cu_seqlens[1:-1]] = cu_seqlens.diff()[:-1]
        position_ids = torch.arange(seq_len, dtype=torch.int64) - torch.cumsum(jumps, 0)
    else:
        cu_seqlens = torch.tensor([0, seq_len], dtype=torch.int64)
        position_ids = torch.arange(seq_len, dtype=torch.int64)
    tiles = [s.pixel_values for s in samples if s.pixel_values.shape[0]]
    return PackedSequence(
        input_ids=input_ids,
        targets=targets,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        visual_mask=visual_mask,
        pixel_values=torch.cat(tiles) if tiles else None,
        tokens_per_tile=tokens_per_tile,
    )


def skip_positions(
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    max_position: int,
    rngs: Sequence[np.random.Generator],
) -> torch.Tensor:
    """PoSE (positional skip-wise training, Zhu et al. 2023): long distances in short sequences.

    Segment k of `cu_seqlens` ([cu[k], cu[k+1]), one per `rngs[k]`; segments past the last rng,
    the padding, are left alone) is cut at a point drawn uniformly inside it, and the positions
    after the cut move on by an offset drawn uniformly in [0, room], room = max_position - 1 -
    the segment's last position. A model trained on n-token samples so sees the relative
    distances of samples up to max_position tokens long, and must match content with the RoPE
    dimensions that stay put over them (a needle far back in a long video), not with those that
    only look still over n tokens. Every draw comes from the segment's own generator, so a
    sequence packed again (a resumed run) gets the same positions. Returns new position ids [S].
    """
    out = position_ids.clone()  # [S]
    bounds = cu_seqlens.tolist()
    if len(rngs) > len(bounds) - 1:
        raise ValueError(f"{len(rngs)} generators for {len(bounds) - 1} segments")
    for k, rng in enumerate(rngs):
        start, end = bounds[k], bounds[k + 1]
        room = max_position - 1 - int(out[end - 1])
        if end - start < 2 or room <= 0:
            continue
        cut = start + int(rng.integers(1, end - start))
        out[cut:end] += int(rng.integers(0, room + 1))
    return out
