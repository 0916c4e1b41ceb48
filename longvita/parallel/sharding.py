"""Sequence sharding for context parallelism: the 2*CP zigzag cut of one packed sequence.

Owns the layout and nothing else: a packed sequence of S tokens (padded to a multiple of
2*cp) is cut into 2*cp equal chunks of C = S / (2*cp) tokens; rank r holds chunks r and
2*cp-1-r, concatenated in that order ([2C] local tokens), which balances causal-attention work.
Everything that must be global is made global *before* the cut: targets are shifted over the
whole sequence (targets[p] = labels[p+1]), positions are the global RoPE positions, sample
boundaries (`cu_seqlens`) are replicated. Tiles travel with their placeholder tokens: a rank
encodes every tile with at least one slot in its tokens (a tile straddling two ranks is
encoded by both) and `feature_index` maps its local slots to rows of those tiles' features.

Pure tensor code, O(S) vectorized (S may be 1M): no torch.distributed, no model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from longvita.data.packed import PackedSequence
from longvita.ops.loss import IGNORE_INDEX
from longvita.ops.sequence import tiles_for_positions, zigzag_chunks, zigzag_index


def pad_to_multiple(seq: PackedSequence, multiple: int, pad_id: int) -> PackedSequence:
    """Pad at the end to a multiple of `multiple` tokens; never truncates.

    Padding: input `pad_id`, target -100, positions continuing after the last token's, not
    visual, and its own trailing segment in `cu_seqlens` (it attends only to itself).
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    num_pad = -seq.seq_len % multiple
    if num_pad == 0:
        return seq
    device = seq.input_ids.device

    def extend(tensor: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, tail.to(device=device, dtype=tensor.dtype)])

    last_position = seq.position_ids[-1:]
    pad_positions = last_position + torch.arange(1, num_pad + 1, device=device)  # [num_pad]
    return replace(
        seq,
        input_ids=extend(seq.input_ids, torch.full((num_pad,), pad_id)),
        targets=extend(seq.targets, torch.full((num_pad,), IGNORE_INDEX)),
        position_ids=extend(seq.position_ids, pad_positions),
        visual_mask=extend(seq.visual_mask, torch.zeros(num_pad, dtype=torch.bool)),
        cu_seqlens=extend(seq.cu_seqlens, torch.tensor([seq.seq_len + num_pad])),
    )


def shard_tensor(tensor: torch.Tensor, cp: int, rank: int, *, dim: int = 0) -> torch.Tensor:
    """The zigzag shard of any tensor along `dim`: [.., S, ..] -> [.., 2C, ..]."""
    index = zigzag_index(tensor.shape[dim], cp, rank, device=tensor.device)
    return tensor.index_select(dim, index)


def unshard(local: Sequence[torch.Tensor], cp: int, dim: int = 0) -> torch.Tensor:
    """Inverse of the zigzag cut: per-rank [.., 2C, ..] tensors in rank order -> [.., S, ..]."""
    if len(local) != cp:
        raise ValueError(f"expected {cp} shards (one per rank), got {len(local)}")
    sizes = {tensor.shape[dim] for tensor in local}
    if len(sizes) != 1 or next(iter(sizes)) % 2 != 0:
        raise ValueError(f"shards must all have the same even length along dim {dim}: {sizes}")
    chunks: list[torch.Tensor | None] = [None] * (2 * cp)
    for rank, tensor in enumerate(local):
        first, second = zigzag_chunks(cp, rank)
        chunks[first], chunks[second] = tensor.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


@dataclass(frozen=True, kw_only=True)
class SequenceShard:
    """What one context-parallel rank holds of a PackedSequence (local length 2C)."""

    input_ids: torch.Tensor
    """[2C] int64 local tokens: chunk a then chunk b."""
    targets: torch.Tensor
    """[2C] int64 targets, shifted globally before the cut."""
    position_ids: torch.Tensor
    """[2C] int64 global RoPE positions."""
    visual_mask: torch.Tensor
    """[2C] bool local placeholder slots."""
    global_index: torch.Tensor
    """[2C] int64 each local token's index in the whole sequence."""
    chunk_ids: tuple[int, int]
    """(rank, 2*cp - 1 - rank): the two chunks held, in local order."""
    chunk_len: int
    """C = S / (2*cp) tokens per chunk."""
    cu_seqlens: torch.Tensor
    """[num_samples + 1] global sample boundaries, replicated on every rank."""
    pixel_values: torch.Tensor | None
    """[T_local, 3, H, W] the tiles with at least one slot among the local tokens."""
    tile_ids: torch.Tensor
    """[T_local] int64 global indices of those tiles, ascending."""
    feature_index: torch.Tensor
    """[num_local_slots] int64: row of `features.reshape(-1, hidden)` (features of the local
    tiles, [T_local, tokens_per_tile, hidden]) for each local slot in order."""
    tokens_per_tile: int


def shard_sequence(seq: PackedSequence, cp: int, rank: int) -> SequenceShard:
    """Rank `rank`'s shard of `seq` under context parallelism `cp` (pad_to_multiple first)."""
    index = zigzag_index(seq.seq_len, cp, rank, device=seq.input_ids.device)  # [2C]
    local_visual = seq.visual_mask[index]  # [2C]
    tile_ids, feature_index = tiles_for_positions(seq.visual_mask, seq.tokens_per_tile, index)
    pixel_values = None if seq.pixel_values is None else seq.pixel_values[tile_ids]
    return SequenceShard(
        input_ids=seq.input_ids[index],
        targets=seq.targets[index],
        position_ids=seq.position_ids[index],
        visual_mask=local_visual,
        global_index=index,
        chunk_ids=zigzag_chunks(cp, rank),
        chunk_len=seq.seq_len // (2 * cp),
        cu_seqlens=seq.cu_seqlens,
        pixel_values=pixel_values,
        tile_ids=tile_ids,
        feature_index=feature_index,
        tokens_per_tile=seq.tokens_per_tile,
    )
