"""One worker's stream: resuming from the state of any item gives exactly the rest (property)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longvita.data.config import DataConfig
from longvita.data.stats import DataStats
from longvita.data.stream import PackingStream, StreamSpec
from tests.unit.test_data_packing import FakeSample

PAD_ID = 0


class FakeMixture:
    def __init__(self, num_records: int) -> None:
        self.num_records = num_records

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([7, epoch]).permutation(self.num_records)


class FakeReader:
    """Record r has lengths[r] tokens (ids r*1000 + j); length 0 is a bad record."""

    def __init__(self, lengths: list[int], seq_len: int) -> None:
        self.lengths = lengths
        self.seq_len = seq_len
        self.mixture = FakeMixture(len(lengths))
        self.processor = SimpleNamespace(tokens=SimpleNamespace(pad=PAD_ID), tokens_per_tile=4)

    def read(self, record_id: int, stats: DataStats):
        n = self.lengths[record_id]
        if n == 0:
            stats.record_skip("malformed_json", f"f:{record_id}", "bad")
            return None
        ids = torch.arange(n) + 1000 * (record_id + 1)
        return FakeSample(
            ids,
            ids.clone(),
            torch.zeros(n, dtype=torch.bool),
            torch.zeros(0, 3, 2, 2),
            group="g",
            source=f"s{record_id % 2}",
        )


def _items(stream: PackingStream, state, limit: int):
    out = []
    for item in stream.iterate(state):
        if item.done or len(out) == limit:
            break
        out.append(item)
    return out


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=25),
    mode=st.sampled_from(["per_source", "cross_source"]),
    num_bins=st.sampled_from([None, 1, 2, 4]),
    stop_fraction=st.floats(0, 1),
)
def test_resume_from_any_item_gives_exactly_the_rest(lengths, mode, num_bins, stop_fraction):
    seq_len = 12  # lengths include exactly seq_len: one sample can emit two bins
    config = DataConfig(seq_len=seq_len, packing=mode, num_bins=num_bins, num_epochs=2)
    spec = StreamSpec(config=config)
    make = lambda: PackingStream(FakeReader(lengths, seq_len), spec)  # noqa: E731
    reference = _items(make(), None, 10_000)
    stop = int(stop_fraction * len(reference))
    head = reference[:stop]
    state = head[-1].state if head else None
    tail = _items(make(), state, 10_000)
    assert len(head) + len(tail) == len(reference)
    for got, want in zip(tail, reference[stop:], strict=True):
        assert (got.epoch, got.epoch_end) == (want.epoch, want.epoch_end)
        assert (got.packed is None) == (want.packed is None)
        if got.packed is not None:
            assert torch.equal(got.packed.input_ids, want.packed.input_ids)
    total, resumed = DataStats(), DataStats()
    for item in reference:
        total.merge(item.stats)
    for item in head + tail:
        resumed.merge(item.stats)
    assert resumed.to_dict() == total.to_dict()  # every sample and skip counted once
    num_good = sum(1 for n in lengths if n)
    assert total.num_samples == 2 * num_good and total.skipped["malformed_json"] == 2 * (
        len(lengths) - num_good
    )
