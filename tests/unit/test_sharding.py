"""The 2*CP zigzag cut: round trip, padding, global label shift, global positions, tiles."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longvita.ops.loss import IGNORE_INDEX, shift_labels
from longvita.parallel.sharding import (
    PackedSequence,
    pad_to_multiple,
    shard_sequence,
    shard_tensor,
    unshard,
    zigzag_chunks,
    zigzag_index,
)

PAD_ID = 151643
PLACEHOLDER_ID = 7
HIDDEN = 3
PROPERTY = settings(deadline=None, max_examples=50)


def random_sequence(
    seed: int, seq_len: int, *, num_samples: int, num_tiles: int, tokens_per_tile: int
) -> tuple[PackedSequence, torch.Tensor]:
    """A packed sequence with random boundaries, slots and labels; returns it and its labels."""
    gen = torch.Generator().manual_seed(seed)
    num_slots = num_tiles * tokens_per_tile
    assert num_slots <= seq_len and num_samples <= seq_len
    cuts = torch.randperm(seq_len - 1, generator=gen)[: num_samples - 1].sort().values + 1
    cu_seqlens = torch.cat([torch.tensor([0]), cuts, torch.tensor([seq_len])])  # [n + 1]
    starts = torch.repeat_interleave(cu_seqlens[:-1], cu_seqlens.diff())  # [S]
    position_ids = torch.arange(seq_len) - starts  # restart per sample
    visual_mask = torch.zeros(seq_len, dtype=torch.bool)
    visual_mask[torch.randperm(seq_len, generator=gen)[:num_slots]] = True
    input_ids = torch.randint(10, 1000, (seq_len,), generator=gen)
    input_ids[visual_mask] = PLACEHOLDER_ID
    supervised = torch.rand(seq_len, generator=gen) < 0.5
    labels = torch.where(supervised & ~visual_mask, input_ids, IGNORE_INDEX)  # [S]
    pixel_values = None
    if num_tiles:
        pixel_values = torch.arange(num_tiles, dtype=torch.float32)[:, None, None, None]
        pixel_values = pixel_values.expand(num_tiles, 3, 2, 2).clone()  # tile t is all t
    seq = PackedSequence(
        input_ids=input_ids,
        targets=shift_labels(labels),
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        visual_mask=visual_mask,
        pixel_values=pixel_values,
        tokens_per_tile=tokens_per_tile,
    )
    return seq, labels


def tile_features(tile_ids: torch.Tensor, tokens_per_tile: int) -> torch.Tensor:
    """Stand-in ViT output [T, tokens_per_tile, HIDDEN]: a function of (tile, row) only."""
    rows = torch.arange(tokens_per_tile)
    tile = tile_ids[:, None].expand(-1, tokens_per_tile).float()
    row = rows[None, :].expand(len(tile_ids), -1).float()
    return torch.stack([tile, row, tile * 1000 + row], dim=-1)


def spliced_features(seq: PackedSequence) -> torch.Tensor:
    """[S, HIDDEN] the single-process splice: slot j takes feature row j, in order."""
    out = torch.zeros(seq.seq_len, HIDDEN)
    features = tile_features(torch.arange(seq.num_tiles), seq.tokens_per_tile)
    return out.masked_scatter(seq.visual_mask[:, None], features.reshape(-1, HIDDEN))


sequences = st.builds(
    lambda seed, seq_len, num_samples, tokens_per_tile, tile_frac: random_sequence(
        seed,
        seq_len,
        num_samples=min(num_samples, seq_len),
        num_tiles=int(tile_frac * seq_len) // tokens_per_tile,
        tokens_per_tile=tokens_per_tile,
    ),
    seed=st.integers(0, 2**31 - 1),
    seq_len=st.integers(1, 97),
    num_samples=st.integers(1, 5),
    tokens_per_tile=st.integers(1, 4),
    tile_frac=st.floats(0.0, 0.8),
)
cps = st.sampled_from([1, 2, 4])


@PROPERTY
@given(case=sequences, cp=cps)
def test_pad_then_round_trip(case, cp):
    seq, _ = case
    padded = pad_to_multiple(seq, 2 * cp, PAD_ID)
    num_pad = padded.seq_len - seq.seq_len
    assert padded.seq_len % (2 * cp) == 0 and 0 <= num_pad < 2 * cp
    for name in ("input_ids", "targets", "position_ids", "visual_mask"):
        assert torch.equal(getattr(padded, name)[: seq.seq_len], getattr(seq, name))
    assert (padded.input_ids[seq.seq_len :] == PAD_ID).all()
    assert (padded.targets[seq.seq_len :] == IGNORE_INDEX).all()
    assert not padded.visual_mask[seq.seq_len :].any()
    assert (padded.position_ids.diff()[seq.seq_len - 1 :] == 1).all()
    expected_cu = seq.cu_seqlens.tolist() + ([padded.seq_len] if num_pad else [])
    assert padded.cu_seqlens.tolist() == expected_cu

    shards = [shard_sequence(padded, cp, rank) for rank in range(cp)]
    for name in ("input_ids", "targets", "position_ids", "visual_mask", "global_index"):
        whole = unshard([getattr(shard, name) for shard in shards], cp)
        if name == "global_index":
            assert torch.equal(whole, torch.arange(padded.seq_len))
        else:
            assert torch.equal(whole, getattr(padded, name)), name
    for shard in shards:
        assert torch.equal(shard.cu_seqlens, padded.cu_seqlens)
        assert len(shard.input_ids) == 2 * shard.chunk_len == padded.seq_len // cp


@PROPERTY
@given(case=sequences, cp=cps)
def test_label_shift_is_global_across_seams(case, cp):
    seq, labels = case
    padded = pad_to_multiple(seq, 2 * cp, PAD_ID)
    padded_labels = torch.cat([labels, torch.full((padded.seq_len - seq.seq_len,), -100)])
    shards = [shard_sequence(padded, cp, rank) for rank in range(cp)]
    chunk_len = shards[0].chunk_len
    owner = {}  # chunk id -> (rank, local offset of its first token)
    for rank, shard in enumerate(shards):
        for half, chunk in enumerate(shard.chunk_ids):
            owner[chunk] = (rank, half * chunk_len)
    for chunk in range(2 * cp - 1):
        rank, start = owner[chunk]
        next_rank, next_start = owner[chunk + 1]
        next_label = shard_tensor(padded_labels, cp, next_rank)[next_start]
        assert shards[rank].targets[start + chunk_len - 1] == next_label
    last_rank, last_start = owner[2 * cp - 1]
    assert shards[last_rank].targets[last_start + chunk_len - 1] == IGNORE_INDEX


@PROPERTY
@given(case=sequences, cp=cps)
def test_positions_are_global(case, cp):
    seq, _ = case
    padded = pad_to_multiple(seq, 2 * cp, PAD_ID)
    for rank in range(cp):
        shard = shard_sequence(padded, cp, rank)
        assert torch.equal(shard.position_ids, padded.position_ids[shard.global_index])
        assert torch.equal(shard.global_index, zigzag_index(padded.seq_len, cp, rank))


def check_tiles(padded: PackedSequence, cp: int) -> None:
    """Each rank's tiles reproduce the single-process splice; every slot covered exactly once."""
    spliced = spliced_features(padded)  # [S, HIDDEN]
    covered = []
    for rank in range(cp):
        shard = shard_sequence(padded, cp, rank)
        tpt = shard.tokens_per_tile
        if padded.pixel_values is not None:
            assert torch.equal(shard.pixel_values, padded.pixel_values[shard.tile_ids])
        assert torch.equal(shard.tile_ids, shard.tile_ids.unique())  # ascending, no repeats
        features = tile_features(shard.tile_ids, tpt).reshape(-1, HIDDEN)  # [T_local*tpt, H]
        local_spliced = spliced[shard.global_index][shard.visual_mask]
        assert torch.equal(features[shard.feature_index], local_spliced)
        if len(shard.feature_index):  # every local tile is used by some local slot
            assert set((shard.feature_index // tpt).tolist()) == set(range(len(shard.tile_ids)))
            tile, row = shard.feature_index // tpt, shard.feature_index % tpt
            covered.append(shard.tile_ids[tile] * tpt + row)  # global feature rows
    num_rows = padded.num_tiles * padded.tokens_per_tile
    covered_rows = torch.cat(covered).sort().values if covered else torch.zeros(0, dtype=torch.long)
    assert torch.equal(covered_rows, torch.arange(num_rows))


@PROPERTY
@given(case=sequences, cp=cps)
def test_tiles_follow_their_slots(case, cp):
    seq, _ = case
    check_tiles(pad_to_multiple(seq, 2 * cp, PAD_ID), cp)


def test_tile_straddling_a_seam_is_encoded_by_both_ranks():
    # S = 16, cp = 2: chunks of 4; rank 0 holds chunks 0, 3; rank 1 holds chunks 1, 2.
    # Tile 0 at tokens 2..5 straddles the seam 0|1, tile 1 at 6..9 the seam 1|2 (both on rank 1),
    # tile 2 at 11..14 the seam 2|3.
    visual_mask = torch.zeros(16, dtype=torch.bool)
    for start in (2, 6, 11):
        visual_mask[start : start + 4] = True
    seq = PackedSequence(
        input_ids=torch.where(visual_mask, PLACEHOLDER_ID, 11),
        targets=torch.full((16,), IGNORE_INDEX),
        position_ids=torch.arange(16),
        cu_seqlens=torch.tensor([0, 16]),
        visual_mask=visual_mask,
        pixel_values=torch.arange(3.0)[:, None, None, None].expand(3, 3, 2, 2).clone(),
        tokens_per_tile=4,
    )
    rank0, rank1 = (shard_sequence(seq, 2, rank) for rank in range(2))
    assert rank0.tile_ids.tolist() == [0, 2]
    assert rank0.feature_index.tolist() == [0, 1, 5, 6, 7]  # tile 0 rows 0-1, tile 2 rows 1-3
    assert rank1.tile_ids.tolist() == [0, 1, 2]
    # tile 0 rows 2-3, tile 1 rows 0-3, tile 2 row 0
    assert rank1.feature_index.tolist() == [2, 3, 4, 5, 6, 7, 8]
    assert rank1.pixel_values[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    check_tiles(seq, 2)


def test_text_only_sequence_has_no_tiles():
    seq, _ = random_sequence(0, 10, num_samples=2, num_tiles=0, tokens_per_tile=0)
    shard = shard_sequence(pad_to_multiple(seq, 4, PAD_ID), 2, 1)
    assert shard.pixel_values is None and len(shard.tile_ids) == len(shard.feature_index) == 0


def test_million_tokens_is_fast_enough():
    seq_len, cp = 1 << 20, 8
    seq, _ = random_sequence(0, seq_len, num_samples=4, num_tiles=1000, tokens_per_tile=256)
    shard = shard_sequence(seq, cp, 3)
    assert len(shard.input_ids) == seq_len // cp
    assert 0 < len(shard.tile_ids) <= 1000


def test_zigzag_layout():
    assert [zigzag_chunks(4, rank) for rank in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert zigzag_index(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert zigzag_index(8, 2, 0).tolist() == [0, 1, 6, 7]
    x = torch.arange(24).reshape(2, 12)
    parts = [shard_tensor(x, 3, rank, dim=1) for rank in range(3)]
    assert parts[2].tolist() == [[4, 5, 6, 7], [16, 17, 18, 19]]
    assert torch.equal(unshard(parts, 3, dim=1), x)


def test_bad_lengths_and_ranks():
    with pytest.raises(ValueError, match="not a multiple of 2\\*cp = 4"):
        zigzag_index(10, 2, 0)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        zigzag_chunks(2, 2)
    with pytest.raises(ValueError, match="expected 2 shards"):
        unshard([torch.zeros(4)], 2)
    seq, _ = random_sequence(0, 10, num_samples=1, num_tiles=0, tokens_per_tile=0)
    with pytest.raises(ValueError, match="pad it first"):
        shard_sequence(seq, 2, 0)
    assert pad_to_multiple(seq, 5, PAD_ID) is seq


def make(seq_len: int = 8, **overrides) -> PackedSequence:
    fields = dict(
        input_ids=torch.arange(seq_len),
        targets=torch.full((seq_len,), IGNORE_INDEX),
        position_ids=torch.arange(seq_len),
        cu_seqlens=torch.tensor([0, seq_len]),
        visual_mask=torch.zeros(seq_len, dtype=torch.bool),
    )
    return PackedSequence(**(fields | overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cu_seqlens": torch.tensor([0, 5])}, "end at the sequence length 8"),
        ({"cu_seqlens": torch.tensor([1, 8])}, "\\[1, 8\\] must start at 0"),
        ({"cu_seqlens": torch.tensor([0, 5, 5, 8])}, "strictly increasing"),
        ({"cu_seqlens": torch.tensor([0, 6, 3, 8])}, "strictly increasing"),
        ({"cu_seqlens": torch.tensor([8])}, "must hold >= 2 boundaries"),
        ({"cu_seqlens": torch.tensor([0.0, 8.0])}, "integer tensor"),
        ({"targets": torch.zeros(7, dtype=torch.long)}, "'targets': \\(7,\\)"),
        ({"visual_mask": torch.zeros(8)}, "must be bool"),
        (
            {"visual_mask": torch.arange(8) < 5, "pixel_values": torch.zeros(1, 3, 2, 2)},
            "5 slots but 1 tile\\(s\\) x tokens_per_tile 0",
        ),
        (
            {"visual_mask": torch.arange(8) < 4, "tokens_per_tile": 4},
            "4 slots but 0 tile",
        ),
        ({"pixel_values": torch.zeros(1, 2, 2)}, "must be \\[num_tiles, 3, H, W\\]"),
    ],
)
def test_packed_sequence_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        make(**overrides)
