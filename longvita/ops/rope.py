"""Rotary position embedding (rotate-half form, full head dimension), as pure functions.

Angles are computed in float32 from the positions given, so every token can carry its global
position (packed samples, shards of a context-parallel sequence, a decode step).
"""

from __future__ import annotations

import torch


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for `positions` [batch, seq] -> two [batch, seq, head_dim] tensors."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device)
    inv_freq = 1.0 / (theta ** (exponents.float() / head_dim))  # [head_dim / 2]
    angles = positions.float()[..., None] * inv_freq  # [batch, seq, head_dim / 2]
    angles = torch.cat((angles, angles), dim=-1)  # [batch, seq, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [batch, heads, seq, head_dim] by the tables [batch, seq, head_dim]."""
    cos, sin = cos[:, None], sin[:, None]  # [batch, 1, seq, head_dim]
    return x * cos + rotate_half(x) * sin
