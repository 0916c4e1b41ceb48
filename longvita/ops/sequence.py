"""Index arithmetic over a token sequence: the zigzag cut and where visual slots find features.

Owns two pieces of pure, vectorized arithmetic that context parallelism, chunked prefill and
training all build on, so that none of them has to import the others:

- the 2*cp zigzag cut (LONGVITA.md section 6): a sequence of S tokens (a multiple of 2*cp) is
  cut into 2*cp chunks of C = S / (2*cp); rank r holds chunks r and 2*cp-1-r, in that order,
  which balances causal-attention work;
- sample boundaries of a packed sequence (`cu_seqlens`), checked in one place;
- `SlotIndex`: which tiles the visual slots at a set of positions belong to, and each slot's
  row in those tiles' flattened features. Its prefix sum over the visual mask is computed once,
  so asking chunk after chunk of a 1M-token prompt costs O(S) in all, not O(S^2 / chunk).

No state beyond that index, no torch.distributed, no model. Everything is O(positions asked)
after the one O(S) pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def zigzag_chunks(cp: int, rank: int) -> tuple[int, int]:
    """The two chunk ids (of 2*cp) that `rank` holds: (rank, 2*cp - 1 - rank)."""
    if cp < 1 or not 0 <= rank < cp:
        raise ValueError(f"rank {rank} is not in [0, cp) for cp {cp}")
    return rank, 2 * cp - 1 - rank


def zigzag_index(seq_len: int, cp: int, rank: int, *, device=None) -> torch.Tensor:
    """Global token indices [2C] held by `rank`: chunk a then chunk b, C = seq_len / (2*cp)."""
    first, second = zigzag_chunks(cp, rank)
    if seq_len % (2 * cp) != 0:
        raise ValueError(
            f"sequence length {seq_len} is not a multiple of 2*cp = {2 * cp}; "
            f"pad it first (pad_to_multiple)"
        )
    chunk_len = seq_len // (2 * cp)
    offsets = torch.arange(chunk_len, device=device)  # [C]
    return torch.cat([first * chunk_len + offsets, second * chunk_len + offsets])  # [2C]


class SlotIndex:
    """The visual slots of one sequence: `tokens_per_tile` slots per tile, tiles in slot order.

    visual_mask: [S] bool, True at placeholder positions. Built once per sequence (one cumsum);
    `tiles_at` then answers any subset of positions in time proportional to the subset.
    """

    def __init__(self, visual_mask: torch.Tensor, tokens_per_tile: int) -> None:
        if visual_mask.dim() != 1 or visual_mask.dtype != torch.bool:
            raise ValueError(
                f"visual_mask must be a 1-D bool tensor, got {visual_mask.dtype} "
                f"{tuple(visual_mask.shape)}"
            )
        if tokens_per_tile < 1 and bool(visual_mask.any()):
            raise ValueError(f"tokens_per_tile must be >= 1, got {tokens_per_tile}")
        self.visual_mask = visual_mask
        self.tokens_per_tile = tokens_per_tile
        self.slot_order = torch.cumsum(visual_mask, 0) - 1  # [S] ordinal of each slot (int64)

    def slots_through(self, position: int) -> int:
        """Number of visual slots at positions 0..position."""
        return int(self.slot_order[position]) + 1

    def tiles_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tiles whose slots lie at `positions`, and where each of those slots' feature is.

        positions: [n] int64 indices into the sequence (any subset: a context-parallel shard,
        a prefill chunk). Returns tile_ids [T] ascending, the tiles with at least one slot at
        `positions`, and feature_index [num_slots_at_positions]: for each slot at `positions`,
        in the order of `positions`, its row in the flattened features of those tiles
        ([T * tokens_per_tile], tile-major).
        """
        positions = positions.to(self.visual_mask.device)
        local_visual = self.visual_mask[positions]  # [n]
        if not bool(local_visual.any()):
            empty = torch.zeros(0, dtype=torch.long, device=positions.device)
            return empty, empty
        local_slots = self.slot_order[positions][local_visual]  # [num_local_slots] ordinals
        tile_of_slot = local_slots // self.tokens_per_tile  # [num_local_slots]
        tile_ids = torch.unique(tile_of_slot)  # [T] ascending
        local_tile = torch.searchsorted(tile_ids, tile_of_slot)  # [num_local_slots] in [0, T)
        row_in_tile = local_slots % self.tokens_per_tile
        return tile_ids, local_tile * self.tokens_per_tile + row_in_tile


def tiles_for_positions(
    visual_mask: torch.Tensor, tokens_per_tile: int, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`SlotIndex(visual_mask, tokens_per_tile).tiles_at(positions)`, for a one-off question
    (a training shard); ask a kept SlotIndex when positions come chunk after chunk."""
    return SlotIndex(visual_mask, tokens_per_tile).tiles_at(positions)


def check_cu_seqlens(
    cu_seqlens: torch.Tensor | Sequence[int], seq_len: int, *, allow_empty: bool = True
) -> list[int]:
    """Sample boundaries [num_samples + 1] as a list of ints, checked: integers, 0 first,
    `seq_len` last, non-decreasing (strictly increasing unless `allow_empty`, i.e. no sample
    of zero tokens). ValueError naming the problem otherwise."""
    if torch.is_tensor(cu_seqlens):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
            raise ValueError(
                f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} "
                f"{tuple(cu_seqlens.shape)}"
            )
        if cu_seqlens.dtype == torch.bool:
            raise ValueError("cu_seqlens must be integer, got torch.bool")
        bounds = cu_seqlens.tolist()
    else:
        bounds = [int(b) for b in cu_seqlens]
    if len(bounds) < 2:
        raise ValueError(f"cu_seqlens {bounds} must hold >= 2 boundaries: [0, ..., {seq_len}]")
    if bounds[0] != 0 or bounds[-1] != seq_len:
        raise ValueError(
            f"cu_seqlens {bounds} must start at 0 and end at the sequence length {seq_len}"
        )
    steps = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if min(steps) < (0 if allow_empty else 1):
        order = "non-decreasing" if allow_empty else "strictly increasing"
        raise ValueError(f"cu_seqlens {bounds} must be {order}")
    return bounds
