"""`ops.sequence`: the slot index answers chunk after chunk in O(positions asked), and the
checks of sample boundaries."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from longvita.infer.engine import VisualFeatureStream
from longvita.ops.sequence import SlotIndex, check_cu_seqlens, tiles_for_positions
from longvita.processing.tiles import TileSource


class _ElementsMade(TorchDispatchMode):
    """Sums, per aten op, the elements of the tensors it produces (an op's work is at least
    that: a prefix sum over the mask makes S elements, an index into it makes what it picks)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        size = sum(t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        self.elements[name] = self.elements.get(name, 0) + size
        return out


def _mask(seq_len: int, tokens_per_tile: int, every: int) -> torch.Tensor:
    mask = torch.zeros(seq_len, dtype=torch.bool)
    for start in range(3, seq_len - tokens_per_tile, every):
        mask[start : start + tokens_per_tile] = True
    return mask


def test_a_prompt_streamed_in_chunks_costs_linear_work():
    """200K tokens in 1,000 chunks: the prefix sum over the mask runs once (S elements), not
    once per chunk (S^2 / chunk = 200M)."""
    seq_len, chunk, tokens_per_tile = 200_000, 200, 4
    mask = _mask(seq_len, tokens_per_tile, every=50)
    num_tiles = int(mask.sum()) // tokens_per_tile
    stream = VisualFeatureStream(
        lambda pixels: torch.zeros(pixels.shape[0], tokens_per_tile, 8),
        TileSource.from_tensor(torch.zeros(num_tiles, 3, 2, 2)),
        mask,
        tokens_per_tile=tokens_per_tile,
        vision_batch=16,
        device=torch.device("cpu"),
    )
    with _ElementsMade() as touched:
        for start in range(0, seq_len, chunk):
            stream.features(torch.arange(start, start + chunk))
    assert stream.num_encoded_tiles == num_tiles
    assert touched.elements.get("cumsum", 0) == 0  # the index was built before
    assert sum(touched.elements.values()) < 10 * seq_len  # linear; once per chunk: 1000x S


@pytest.mark.parametrize("tokens_per_tile", [1, 4])
def test_slot_index_answers_like_a_fresh_one(tokens_per_tile):
    mask = _mask(300, tokens_per_tile, every=7)
    index = SlotIndex(mask, tokens_per_tile)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        positions = torch.randperm(300, generator=gen)[:40].sort().values
        tiles, rows = index.tiles_at(positions)
        # the definition: slot ordinals by counting, tile = ordinal // tokens_per_tile
        ordinals = [int(mask[:p].sum()) for p in positions.tolist() if mask[p]]
        want_tiles = sorted({o // tokens_per_tile for o in ordinals})
        assert tiles.tolist() == want_tiles
        want_rows = [
            want_tiles.index(o // tokens_per_tile) * tokens_per_tile + o % tokens_per_tile
            for o in ordinals
        ]
        assert rows.tolist() == want_rows
        assert tiles_for_positions(mask, tokens_per_tile, positions)[1].tolist() == want_rows


@pytest.mark.parametrize(
    ("bounds", "allow_empty", "message"),
    [
        ([0, 5], True, "end at the sequence length 8"),
        ([1, 8], True, "must start at 0"),
        ([8], True, "must hold >= 2 boundaries"),
        ([0, 6, 3, 8], True, "must be non-decreasing"),
        ([0, 3, 3, 8], False, "must be strictly increasing"),
        (torch.tensor([0.0, 8.0]), True, "integer tensor"),
        (torch.tensor([[0, 8]]), True, "1-D integer tensor"),
    ],
)
def test_check_cu_seqlens(bounds, allow_empty, message):
    with pytest.raises(ValueError, match=message):
        check_cu_seqlens(bounds, 8, allow_empty=allow_empty)
    assert check_cu_seqlens(torch.tensor([0, 3, 3, 8]), 8) == [0, 3, 3, 8]
