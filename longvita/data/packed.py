"""PackedSequence: one packed training (or inference) sequence, as a single process sees it.

The hand-off between data loading (which builds it) and the model step (which may cut it over
context-parallel ranks, `parallel.sharding`). A plain validated record: no torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longvita.ops.sequence import check_cu_seqlens


@dataclass(frozen=True, kw_only=True)
class PackedSequence:
    """One packed training or inference sequence of S tokens, as a single process sees it."""

    input_ids: torch.Tensor
    """[S] int64 token ids (placeholder ids at visual slots)."""
    targets: torch.Tensor
    """[S] int64 next-token targets, already shifted over the whole sequence; -100 = no loss."""
    position_ids: torch.Tensor
    """[S] int64 RoPE positions (may restart at each sample)."""
    cu_seqlens: torch.Tensor
    """[num_samples + 1] int64 sample boundaries 0 = b0 < b1 < ... = S; attention never crosses
    them. A single segment [0, S] when attention is not reset per sample."""
    visual_mask: torch.Tensor
    """[S] bool, True at visual placeholder slots: `tokens_per_tile` consecutive-in-order slots
    per tile, tiles in the order of their first slot."""
    pixel_values: torch.Tensor | None = None
    """[num_tiles, 3, H, W] float tiles, or None for a text-only sequence."""
    tokens_per_tile: int = 0
    """Placeholder slots (and feature rows) per tile."""

    def __post_init__(self) -> None:
        seq_len = self.input_ids.shape[0] if self.input_ids.dim() == 1 else -1
        shapes = {
            name: tuple(getattr(self, name).shape)
            for name in ("input_ids", "targets", "position_ids", "visual_mask")
        }
        if seq_len < 1 or any(shape != (seq_len,) for shape in shapes.values()):
            raise ValueError(f"input_ids, targets, position_ids, visual_mask must be [S]: {shapes}")
        if self.visual_mask.dtype != torch.bool:
            raise ValueError(f"visual_mask must be bool, got {self.visual_mask.dtype}")
        check_cu_seqlens(self.cu_seqlens, seq_len, allow_empty=False)
        self._check_tiles()

    def _check_tiles(self) -> None:
        num_slots = int(self.visual_mask.sum())
        num_tiles = 0
        if self.pixel_values is not None:
            if self.pixel_values.dim() != 4 or self.pixel_values.shape[1] != 3:
                raise ValueError(
                    f"pixel_values must be [num_tiles, 3, H, W], got "
                    f"{tuple(self.pixel_values.shape)}"
                )
            num_tiles = self.pixel_values.shape[0]
        if self.tokens_per_tile < 0 or num_slots != num_tiles * self.tokens_per_tile:
            raise ValueError(
                f"visual_mask has {num_slots} slots but {num_tiles} tile(s) x tokens_per_tile "
                f"{self.tokens_per_tile} = {num_tiles * self.tokens_per_tile}"
            )

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tiles(self) -> int:
        return 0 if self.pixel_values is None else self.pixel_values.shape[0]
