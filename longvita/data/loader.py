"""The training data loader: packed sequences from a mixture, deterministic and resumable.

`PackedLoader` wraps a torch DataLoader (batch_size=None: one packed sequence per step, the
official micro-batch) over `PackedDataset`, whose W workers each run a `PackingStream` on
their own share of the rank's data (`mixture.shard`). The DataLoader hands out worker results
in strict round robin; every stream yields forever (done markers after its last epoch), so item
k always comes from logical worker k mod W and the order depends only on the seed, the rank and
W, never on timing.

Resume: the loader keeps, per logical worker, the stream state attached to the last item it
consumed from that worker, and the number of items consumed. A new iteration (after
`load_state_dict`, in this or a new process) starts each worker at its saved state and rotates
the worker ids so that the round robin goes on where it stopped: the sequence that follows is
exactly the one the interrupted run would have yielded next. Resuming needs the same mixture,
seed, sequence length, packing, dp_rank, dp_size and num_workers (checked).

Epochs: each worker flushes its bins and sends an epoch-end marker after its share of an
epoch; the stats deltas of the items consumed are merged per epoch and, once every worker has
finished the epoch, the summary is logged, stored in `epoch_summaries` and passed to
`on_epoch_end`. Ranks never talk to each other here: data-parallel ranks are the two ints
(dp_rank, dp_size), and a trainer that wants one summary for all ranks all-gathers
`DataStats.to_dict()` itself.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from longvita.data.config import DataConfig
from longvita.data.encode import SampleReader
from longvita.data.mixture import Mixture
from longvita.data.packed import PackedSequence
from longvita.data.packing import DEFAULT_NUM_BINS
from longvita.data.stats import DataStats
from longvita.data.stream import PackingStream, StreamItem, StreamSpec, initial_state
from longvita.processing.processor import Processor

logger = logging.getLogger(__name__)

STATE_FORMAT = 1


class PackedDataset(IterableDataset):
    """The streams of one data-parallel rank; each DataLoader worker runs one of them."""

    def __init__(self, reader: SampleReader, spec: StreamSpec) -> None:
        super().__init__()
        self.reader = reader
        self.spec = spec  # worker fields are filled in per worker
        self.states = [initial_state() for _ in range(spec.num_workers)]
        """Start state of each logical worker."""
        self.worker_offset = 0
        """Physical worker p runs logical worker (p + worker_offset) % num_workers."""

    def __iter__(self) -> Iterator[StreamItem]:
        info = get_worker_info()
        physical, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if num_workers != self.spec.num_workers:
            raise ValueError(
                f"PackedDataset built for {self.spec.num_workers} workers runs in {num_workers}"
            )
        logical = (physical + self.worker_offset) % num_workers
        spec = dataclasses.replace(self.spec, worker=logical)
        return PackingStream(self.reader, spec).iterate(copy.deepcopy(self.states[logical]))


WORKER_START_METHOD = "forkserver"
"""How loader workers start (see `PackedLoader.__iter__`)."""


def _keep(item: StreamItem) -> StreamItem:
    return item


class PackedLoader:
    """Iterate packed sequences of one data-parallel rank; resumable with `state_dict`."""

    def __init__(
        self,
        mixture: Mixture,
        processor: Processor,
        config: DataConfig,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        on_epoch_end: Callable[[int, DataStats], None] | None = None,
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got {dp_rank=}, {dp_size=}")
        self.mixture = mixture
        self.config = config
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.on_epoch_end = on_epoch_end
        self.num_streams = max(config.num_workers, 1)
        self.reader = SampleReader(
            mixture, processor, seq_len=config.seq_len, max_frames=config.max_frames, fps=config.fps
        )
        self.spec = StreamSpec(
            config=config, dp_rank=dp_rank, dp_size=dp_size, num_workers=self.num_streams
        )
        self.epoch_summaries: dict[int, DataStats] = {}
        """Finished epochs of this rank: what was packed and skipped."""
        self._consumed = 0
        self._states = [initial_state() for _ in range(self.num_streams)]
        self._partial: dict[int, DataStats] = {}
        self._finished: dict[int, set[int]] = {}

    def __iter__(self) -> Iterator[PackedSequence]:
        """Packed sequences from where the last consumed one left off."""
        if self._all_done():
            return
        dataset = PackedDataset(self.reader, self.spec)
        dataset.states = copy.deepcopy(self._states)
        dataset.worker_offset = self._consumed % self.num_streams
        workers = self.config.num_workers
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            collate_fn=_keep,
            prefetch_factor=self.config.prefetch_factor if workers else None,
            # workers start from a clean process, not a fork of this one: a fork copies the
            # state of the threads a training rank runs (gloo, OpenMP) but not the threads,
            # and each such worker ended with "terminate called without an active exception"
            multiprocessing_context=WORKER_START_METHOD if workers else None,
        )
        for item in loader:
            if self._all_done():
                return
            packed = self._consume(item)
            if packed is not None:
                yield packed

    def _all_done(self) -> bool:
        num_epochs = self.config.num_epochs
        return num_epochs is not None and all(s["epoch"] >= num_epochs for s in self._states)

    def _consume(self, item: StreamItem) -> PackedSequence | None:
        """Account for one item in round-robin order; returns its sequence, if any."""
        self._consumed += 1
        self._states[item.worker] = item.state
        if item.done:
            return None
        self._partial.setdefault(item.epoch, DataStats()).merge(item.stats)
        if item.epoch_end:
            finished = self._finished.setdefault(item.epoch, set())
            finished.add(item.worker)
            if len(finished) == self.num_streams:
                self._close_epoch(item.epoch)
        return item.packed

    def _close_epoch(self, epoch: int) -> None:
        summary = self._partial.pop(epoch)
        del self._finished[epoch]
        self.epoch_summaries[epoch] = summary
        logger.info(
            "data epoch %d (rank %d of %d): %s",
            epoch,
            self.dp_rank,
            self.dp_size,
            summary.summary(),
        )
        if summary.num_sequences == 0 and self.config.num_epochs is None:
            raise ValueError(
                f"epoch {epoch} gave no packed sequence on rank {self.dp_rank} of {self.dp_size}: "
                f"{summary.summary()}"
            )
        if self.on_epoch_end is not None:
            self.on_epoch_end(epoch, summary)

    def stats_so_far(self) -> DataStats:
        """What this rank has packed and skipped since the start (finished epochs and the
        one in progress, as far as consumed)."""
        total = DataStats()
        for stats in [*self.epoch_summaries.values(), *self._partial.values()]:
            total.merge(stats)
        return total

    def _identity(self) -> dict[str, Any]:
        """What a saved state must agree with to be resumed here."""
        return {
            "seq_len": self.config.seq_len,
            "packing": self.config.packing,
            "num_bins": self.config.num_bins or DEFAULT_NUM_BINS[self.config.packing],
            "reset_per_sample": self.config.reset_per_sample,
            "pose_max_position": self.config.pose_max_position,
            "num_workers": self.num_streams,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "mixture_seed": self.mixture.seed,
            "mixture_size": len(self.mixture),
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain Python data (torch.save or JSON) to resume at the next unseen sequence."""
        return {
            "format": STATE_FORMAT,
            **self._identity(),
            "consumed": self._consumed,
            "workers": copy.deepcopy(self._states),
            "partial": [[e, s.to_dict()] for e, s in sorted(self._partial.items())],
            "finished": [[e, sorted(w)] for e, w in sorted(self._finished.items())],
            "epoch_summaries": [[e, s.to_dict()] for e, s in sorted(self.epoch_summaries.items())],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"data state format {state.get('format')!r}; want {STATE_FORMAT}")
        mismatched = {
            k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v
        }
        if mismatched:
            details = ", ".join(f"{k}: saved {s!r}, now {n!r}" for k, (s, n) in mismatched.items())
            raise ValueError(f"cannot resume the data loader, settings differ: {details}")
        self._consumed = state["consumed"]
        self._states = copy.deepcopy(state["workers"])
        self._partial = {e: DataStats.from_dict(s) for e, s in state["partial"]}
        self._finished = {e: set(w) for e, w in state["finished"]}
        self.epoch_summaries = {e: DataStats.from_dict(s) for e, s in state["epoch_summaries"]}
