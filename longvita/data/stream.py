"""One loader worker's stream: its share of each epoch, read, encoded, packed, with its state.

A stream is fixed by (mixture seed, epoch, dp_rank, dp_size, worker, num_workers): it reads
`mixture.shard(...)` of each epoch's order, in order, skips bad samples into its stats, packs
the rest greedily and yields one `StreamItem` per packed sequence. Each item carries the
stream's state *after* it: the epoch, the cursor (the next position to read) and the positions
of the samples sitting in open bins (and in bins emitted by the same sample but not yet
yielded). Restarting from that state re-reads those few samples into their bins and goes on at
the cursor, so the continuation is exactly what would have followed: nothing seen twice,
nothing lost. At the end of an epoch the open bins are flushed and an epoch-end marker is
yielded; after the last epoch (if any) the stream yields done markers forever, so that a
DataLoader's strict round robin over workers is never disturbed (the loader stops on them).

Each item also carries the stats delta since the previous item (skips, packed samples and
tokens), so that a consumer that merges the deltas of the items it consumed counts every
sample once. Knows nothing of DataLoader or ranks beyond the two ints; no torch.distributed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from longvita.data.config import DataConfig
from longvita.data.encode import SampleReader
from longvita.data.mixture import shard
from longvita.data.packed import PackedSequence
from longvita.data.packing import Bin, GreedyPacker, pack_sequence, skip_positions
from longvita.data.stats import DataStats

logger = logging.getLogger(__name__)


def initial_state() -> dict[str, Any]:
    """The state of a stream that has read nothing."""
    return {"epoch": 0, "cursor": 0, "bins": [], "ready": []}


@dataclass
class StreamItem:
    """What a stream yields: a packed sequence or a marker, with the state after it."""

    worker: int
    """Logical worker that produced it."""
    epoch: int
    """Epoch the sequence (or marker) belongs to."""
    packed: PackedSequence | None
    """The sequence; None for a marker."""
    state: dict[str, Any]
    """The stream's state once this item is consumed."""
    stats: DataStats = field(default_factory=DataStats)
    """What happened since the stream's previous item."""
    epoch_end: bool = False
    """Marker: this worker has finished `epoch`."""
    done: bool = False
    """Marker: this worker has finished every epoch."""


@dataclass(frozen=True, kw_only=True)
class StreamSpec:
    """How a stream packs (the loader's config), and which share of the data it reads."""

    config: DataConfig
    dp_rank: int = 0
    dp_size: int = 1
    worker: int = 0
    num_workers: int = 1


class PackingStream:
    """The items of one worker, from a given state on."""

    def __init__(self, reader: SampleReader, spec: StreamSpec) -> None:
        if reader.seq_len != spec.config.seq_len:
            raise ValueError(
                f"reader seq_len {reader.seq_len} != stream seq_len {spec.config.seq_len}"
            )
        self.reader = reader
        self.spec = spec
        self._delta = DataStats()

    def iterate(self, state: dict[str, Any] | None = None) -> Iterator[StreamItem]:
        state = initial_state() if state is None else state
        epoch, num_epochs = state["epoch"], self.spec.config.num_epochs
        while num_epochs is None or epoch < num_epochs:
            yield from self._epoch(epoch, state)
            epoch += 1
            state = {**initial_state(), "epoch": epoch}
            yield self._item(epoch - 1, None, state, epoch_end=True)
        while True:
            yield self._item(epoch, None, state, done=True)

    def _epoch(self, epoch: int, state: dict[str, Any]) -> Iterator[StreamItem]:
        """The sequences of one epoch, resuming at `state` (cursor and buffered bins)."""
        spec, config = self.spec, self.spec.config
        positions = shard(
            self.reader.mixture.epoch_order(epoch),
            dp_rank=spec.dp_rank,
            dp_size=spec.dp_size,
            worker=spec.worker,
            num_workers=spec.num_workers,
        )  # [n] global record ids this worker reads in this epoch
        packer = GreedyPacker(config.seq_len, mode=config.packing, num_bins=config.num_bins)
        packer.bins = [b for b in self._rebuild(state["bins"], positions) if b.items]
        ready = [b for b in self._rebuild(state["ready"], positions) if b.items]
        yield from self._emit(ready, packer, epoch, state["cursor"])
        for cursor in range(state["cursor"], len(positions)):
            sample = self.reader.read(int(positions[cursor]), self._delta)
            if sample is None:
                continue
            emitted = packer.add((cursor, sample), num_tokens=sample.num_tokens, key=sample.source)
            yield from self._emit(emitted, packer, epoch, cursor + 1)
        yield from self._emit(packer.flush(), packer, epoch, len(positions))

    def _rebuild(self, saved: list, positions) -> list[Bin]:
        """Bins of a saved state, their samples read again (a sample now unreadable is a skip)."""
        bins = []
        for key, cursors in saved:
            rebuilt = Bin(key)
            for cursor in cursors:
                sample = self.reader.read(int(positions[cursor]), self._delta)
                if sample is not None:
                    rebuilt.items.append((cursor, sample))
                    rebuilt.num_tokens += sample.num_tokens
            bins.append(rebuilt)
        return bins

    def _emit(
        self, bins: list[Bin], packer: GreedyPacker, epoch: int, cursor: int
    ) -> Iterator[StreamItem]:
        """One item per bin; the state after each lists the bins still to emit as ready."""
        for k, full in enumerate(bins):
            state = {
                "epoch": epoch,
                "cursor": cursor,
                "bins": _snapshot(packer.bins),
                "ready": _snapshot(bins[k + 1 :]),
            }
            samples = [sample for _, sample in full.items]
            packed = pack_sequence(
                samples,
                seq_len=self.spec.config.seq_len,
                pad_id=self.reader.processor.tokens.pad,
                reset_per_sample=self.spec.config.reset_per_sample,
                tokens_per_tile=self.reader.processor.tokens_per_tile,
            )
            if self.spec.config.pose_max_position is not None:
                packed = self._skip_positions(packed, epoch, [c for c, _ in full.items])
            self._delta.record_sequence(
                groups=[s.group for s in samples],
                num_tokens=full.num_tokens,
                seq_len=self.spec.config.seq_len,
            )
            yield self._item(epoch, packed, state)

    def _skip_positions(
        self, packed: PackedSequence, epoch: int, cursors: list[int]
    ) -> PackedSequence:
        """PoSE on a packed sequence; each segment's draws are seeded by the stream and the
        cursor of its (first) sample, so a resumed stream packs the same positions."""
        if not self.spec.config.reset_per_sample:
            cursors = cursors[:1]  # one segment: the whole sequence
        spec = self.spec
        rngs = [
            np.random.default_rng([self.reader.mixture.seed, epoch, spec.dp_rank, spec.worker, c])
            for c in cursors
        ]
        position_ids = skip_positions(
            packed.position_ids,
            packed.cu_seqlens,
            max_position=spec.config.pose_max_position,
            rngs=rngs,
        )
        return dataclasses.replace(packed, position_ids=position_ids)

    def _item(self, epoch: int, packed: PackedSequence | None, state, **flags) -> StreamItem:
        delta, self._delta = self._delta, DataStats()
        return StreamItem(self.spec.worker, epoch, packed, state, delta, **flags)


def _snapshot(bins: list[Bin]) -> list[list]:
    """[key, [cursor of each sample]] per bin: enough to rebuild them."""
    return [[b.key, [cursor for cursor, _ in b.items]] for b in bins]
