"""Packing: greedy bins per source / across sources, and the packed tensors (properties)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longvita.data.packing import GreedyPacker, pack_sequence, skip_positions
from longvita.ops.loss import IGNORE_INDEX

TOKENS_PER_TILE = 4
PAD_ID = 1
ID_BASE = 10_000  # token id = ID_BASE * (sample + 1) + index in sample: unique, never PAD_ID


@dataclass
class FakeSample:
    """What the packer and pack_sequence see of an EncodedSample."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    visual_mask: torch.Tensor
    pixel_values: torch.Tensor
    source: str
    group: str = "g"

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]


def make_sample(number: int, pieces: list[int | None], supervised: list[bool], source: str):
    """pieces: text runs of k tokens, or None for one tile (TOKENS_PER_TILE slots)."""
    mask = []
    for piece in pieces:
        mask += [True] * TOKENS_PER_TILE if piece is None else [False] * piece
    n = len(mask)
    ids = torch.arange(n) + ID_BASE * (number + 1)
    keep = torch.tensor([supervised[i % len(supervised)] for i in range(n)])
    num_tiles = pieces.count(None)
    tiles = torch.arange(num_tiles, dtype=torch.float32) + 100 * number  # tile value = identity
    return FakeSample(
        input_ids=ids,
        labels=torch.where(keep, ids, IGNORE_INDEX),
        visual_mask=torch.tensor(mask, dtype=torch.bool),
        pixel_values=tiles[:, None, None, None].expand(num_tiles, 3, 2, 2).clone(),
        source=source,
    )


piece = st.one_of(st.integers(1, 6), st.none())
sample_spec = st.tuples(
    st.lists(piece, min_size=1, max_size=4),
    st.lists(st.booleans(), min_size=1, max_size=5),
    st.sampled_from(["a", "b", "c"]),
)


def _owner(token_id: int) -> tuple[int, int]:
    return token_id // ID_BASE - 1, token_id % ID_BASE


def _check_sequence(packed, samples, seq_len: int, reset: bool) -> list[int]:
    """Every property of one packed sequence; returns the sample numbers it holds, in order."""
    ids, targets = packed.input_ids.tolist(), packed.targets.tolist()
    real = [i for i in ids if i != PAD_ID]
    assert ids[len(real) :] == [PAD_ID] * (seq_len - len(real))  # padding only at the end
    order = list(dict.fromkeys(_owner(i)[0] for i in real))
    expected = torch.cat([samples[s].input_ids for s in order]).tolist()
    assert real == expected  # whole samples, each contiguous and in order
    for p, token in enumerate(ids):
        if token == PAD_ID:
            assert targets[p] == IGNORE_INDEX and not packed.visual_mask[p]
            continue
        s, j = _owner(token)
        own = samples[s]
        last = j == own.input_ids.shape[0] - 1
        # labels never cross a sample boundary: the last token of a sample predicts nothing
        assert targets[p] == (IGNORE_INDEX if last else int(own.labels[j + 1]))
        assert int(packed.position_ids[p]) == (j if reset else p)
    lengths = [samples[s].input_ids.shape[0] for s in order]
    bounds = torch.cumsum(torch.tensor([0] + lengths), 0).tolist()
    if reset:
        assert packed.cu_seqlens.tolist() == bounds + ([seq_len] if bounds[-1] < seq_len else [])
        pad_positions = packed.position_ids[bounds[-1] :].tolist()
        assert pad_positions == list(range(seq_len - bounds[-1]))
    else:
        assert packed.cu_seqlens.tolist() == [0, seq_len]
    _check_tiles(packed, samples)
    return order


def _check_tiles(packed, samples) -> None:
    """Tile k fills slots [k*T, (k+1)*T) of the placeholder positions, one to one."""
    slots = torch.nonzero(packed.visual_mask).flatten().tolist()
    num_tiles = 0 if packed.pixel_values is None else packed.pixel_values.shape[0]
    assert len(slots) == num_tiles * TOKENS_PER_TILE
    for k in range(num_tiles):
        owners = [_owner(int(packed.input_ids[p])) for p in slots[k * 4 : (k + 1) * 4]]
        s = owners[0][0]
        assert all(o[0] == s for o in owners)
        own_slots = torch.nonzero(samples[s].visual_mask).flatten().tolist()
        m = own_slots.index(owners[0][1]) // TOKENS_PER_TILE  # which tile of its sample
        assert [o[1] for o in owners] == own_slots[m * 4 : (m + 1) * 4]
        assert torch.equal(packed.pixel_values[k], samples[s].pixel_values[m])


@settings(max_examples=150, deadline=None)
@given(
    specs=st.lists(sample_spec, min_size=1, max_size=12),
    seq_len=st.integers(4, 40),
    mode=st.sampled_from(["per_source", "cross_source"]),
    num_bins=st.sampled_from([None, 1, 3]),
    reset=st.booleans(),
)
def test_packing_properties(specs, seq_len, mode, num_bins, reset):
    samples = [make_sample(i, *spec) for i, spec in enumerate(specs)]
    packer = GreedyPacker(seq_len, mode=mode, num_bins=num_bins)
    bins, skipped = [], set()
    for number, sample in enumerate(samples):
        n = sample.input_ids.shape[0]
        if n > seq_len:  # the reader skips these before packing
            skipped.add(number)
            continue
        bins += packer.add(number, num_tokens=n, key=sample.source)
        assert all(0 < b.num_tokens < seq_len for b in packer.bins)  # full bins leave at once
    bins += packer.flush()
    seen = []
    for full in bins:
        packed = pack_sequence(
            [samples[i] for i in full.items],
            seq_len=seq_len,
            pad_id=PAD_ID,
            reset_per_sample=reset,
            tokens_per_tile=TOKENS_PER_TILE,
        )
        order = _check_sequence(packed, samples, seq_len, reset)
        assert order == full.items
        if mode == "per_source":
            assert len({samples[i].source for i in order}) == 1
        seen += order
    # every non-skipped sample (so every one of its tokens) appears exactly once
    assert sorted(seen) == sorted(set(range(len(samples))) - skipped)


def test_per_source_official_rule():
    """One bin per source; a sample that does not fit emits its source's bin."""
    packer = GreedyPacker(10, mode="per_source")
    assert packer.add("a1", num_tokens=6, key="a") == []
    assert packer.add("b1", num_tokens=6, key="b") == []
    emitted = packer.add("a2", num_tokens=5, key="a")
    assert [b.items for b in emitted] == [["a1"]]
    emitted = packer.add("a3", num_tokens=5, key="a")  # exactly full: emitted at once
    assert [b.items for b in emitted] == [["a2", "a3"]]
    assert [b.items for b in packer.flush()] == [["b1"]]


def test_cross_source_fills_the_fullest_bin_that_fits():
    packer = GreedyPacker(10, mode="cross_source", num_bins=2)  # the official count
    for name, n in [("x", 6), ("y", 5)]:  # y does not fit with x: second bin
        assert packer.add(name, num_tokens=n, key=name) == []
    packer.add("z", num_tokens=3, key="z")  # fits both: goes to the fuller (x, 6)
    assert [b.items for b in packer.bins] == [["x", "z"], ["y"]]
    emitted = packer.add("w", num_tokens=6, key="w")  # fits none: emit the fullest
    assert [b.items for b in emitted] == [["x", "z"]]
    assert [b.items for b in packer.bins] == [["y"], ["w"]]


def test_a_sample_of_exactly_seq_len_can_emit_two_bins():
    packer = GreedyPacker(8, mode="per_source")
    packer.add("a", num_tokens=3, key="s")
    emitted = packer.add("b", num_tokens=8, key="s")
    assert [b.items for b in emitted] == [["a"], ["b"]] and packer.bins == []


def test_bad_arguments_name_the_values():
    with pytest.raises(ValueError, match="packing mode"):
        GreedyPacker(8, mode="best")
    with pytest.raises(ValueError, match="cannot fit"):
        GreedyPacker(8).add("x", num_tokens=9)
    sample = make_sample(0, [5], [True], "a")
    with pytest.raises(ValueError, match="do not fit"):
        pack_sequence([sample], seq_len=4, pad_id=0, reset_per_sample=True, tokens_per_tile=4)
    with pytest.raises(ValueError, match="empty"):
        pack_sequence([], seq_len=4, pad_id=0, reset_per_sample=True, tokens_per_tile=4)


def test_skip_positions_jumps_once_inside_each_segment():
    lengths = [5, 7, 4]  # the last segment is padding: no generator, no jump
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    cu_seqlens = torch.tensor([0, 5, 12, 16])
    top = 0
    for seed in range(200):
        rngs = [np.random.default_rng([seed, k]) for k in range(2)]
        out = skip_positions(position_ids, cu_seqlens, max_position=64, rngs=rngs)
        again = skip_positions(
            position_ids,
            cu_seqlens,
            max_position=64,
            rngs=[np.random.default_rng([seed, k]) for k in range(2)],
        )
        assert torch.equal(out, again)
        assert torch.equal(out[12:], position_ids[12:])
        for start, end in [(0, 5), (5, 12)]:
            steps = out[start:end].diff()
            assert out[start] == 0 and bool((steps >= 1).all()) and int((steps > 1).sum()) <= 1
            assert int(out[end - 1]) <= 63
            top = max(top, int(out[end - 1] - out[start]))
    assert top >= 60  # distances up to max_position are drawn


def test_skip_positions_leaves_segments_without_room():
    position_ids = torch.arange(8)
    out = skip_positions(
        position_ids, torch.tensor([0, 8]), max_position=8, rngs=[np.random.default_rng(0)]
    )
    assert torch.equal(out, position_ids)
    with pytest.raises(ValueError, match="3 generators for 1 segments"):
        skip_positions(
            position_ids,
            torch.tensor([0, 8]),
            max_position=64,
            rngs=[np.random.default_rng(k) for k in range(3)],
        )


@pytest.mark.parametrize("reset", [True, False])
def test_million_token_sequence(reset):
    """1M tokens of 64 samples with 4-token tiles: built with tensor ops, checked in bulk."""
    seq_len, num_samples = 1 << 20, 64
    length = seq_len // num_samples - 3  # leaves 192 pad tokens
    samples = []
    for s in range(num_samples):
        mask = torch.zeros(length, dtype=torch.bool)
        mask[8 : 8 + 4 * 1000] = True  # 1000 tiles per sample
        ids = torch.arange(length) + ID_BASE * (s + 1)
        tiles = torch.zeros(1000, 3, 1, 1)
        samples.append(FakeSample(ids, ids.clone(), mask, tiles, "a"))
    packed = pack_sequence(
        samples, seq_len=seq_len, pad_id=PAD_ID, reset_per_sample=reset, tokens_per_tile=4
    )
    ends = torch.arange(1, num_samples + 1) * length
    assert packed.seq_len == seq_len and packed.num_tiles == 64_000
    assert bool((packed.targets[ends - 1] == IGNORE_INDEX).all())
    num_real = int(ends[-1])
    keep = torch.ones(num_real, dtype=torch.bool)
    keep[ends - 1] = False  # elsewhere, the target is the next token (labels = ids here)
    assert torch.equal(packed.targets[:num_real][keep], packed.input_ids[1 : num_real + 1][keep])
    assert bool((packed.targets[num_real:] == IGNORE_INDEX).all())
    expected_cu = 2 + num_samples if reset else 2
    assert packed.cu_seqlens.shape[0] == expected_cu
