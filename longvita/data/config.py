"""DataConfig: how samples become packed sequences and how they are loaded.

Plain validated settings shared by the loader (`loader.py`) and each worker's stream
(`stream.py`); the training stages pick their values (reference/LONGVITA.md section 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from longvita.data.packing import PACKING_MODES


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """How samples become packed sequences and how they are loaded."""

    seq_len: int
    """Tokens per packed sequence (the stage's sequence length, 1K to 1M)."""
    packing: str = "per_source"
    """"per_source" (stages 1-2) or "cross_source" (stages 3-4)."""
    num_bins: int | None = None
    """Open bins per pool; None = official (1 per source, 2 across sources)."""
    reset_per_sample: bool = True
    """Positions and attention restart at each sample (stages 1-2); False = continuous."""
    pose_max_position: int | None = None
    """PoSE (`packing.skip_positions`): stretch each segment's positions (each sample's, or the
    whole sequence's without reset) over up to this many, by one random jump; None = off."""
    max_frames: int | None = None
    """Frames per video; None = the processor default (4096)."""
    fps: float | None = None
    """Video sampling rate; None = the processor default (1)."""
    num_epochs: int | None = None
    """Epochs to run; None = endless (the trainer stops after its iterations)."""
    num_workers: int = 0
    """DataLoader worker processes (0 = read in the main process)."""
    prefetch_factor: int | None = None
    """Sequences prefetched per worker; None = DataLoader default (2 with workers)."""

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.packing not in PACKING_MODES:
            raise ValueError(f"packing={self.packing!r}; expected one of {PACKING_MODES}")
        if self.num_bins is not None and self.num_bins < 1:
            raise ValueError(f"num_bins must be >= 1 or None, got {self.num_bins}")
        if self.pose_max_position is not None and self.pose_max_position < self.seq_len:
            raise ValueError(
                f"pose_max_position must be >= seq_len {self.seq_len} (or None), "
                f"got {self.pose_max_position}"
            )
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 or None, got {self.max_frames}")
        if self.fps is not None and not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f"fps must be a finite number > 0 or None, got {self.fps}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor is not None and self.num_workers == 0:
            raise ValueError("prefetch_factor needs num_workers > 0")
