"""Vision projector: ViT hidden states -> LLM-width visual tokens, 4x fewer per tile.

Owns the 2x2 pixel shuffle (InternVL's scale-0.5 order) and the LayerNorm + 2-layer GELU MLP
whose keys are the official `model.vision_projection.*`. Knows nothing of the ViT internals or
of where the tokens go in the LLM's input (the model splices them at the placeholder ids).
"""

from __future__ import annotations

import torch
from torch import nn

from longvita.config import VisionConfig


def pixel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """Merge each 2x2 block of a token grid into one token with 4x the channels.

    x: [T, g, g, C], a grid G[row, col] of ViT patch tokens (row-major patch order), g even.
    Returns [T, (g/2)*(g/2), 4C]; output token (r, c), row-major, is the channel concatenation
    [G[2r, 2c], G[2r, 2c+1], G[2r+1, 2c], G[2r+1, 2c+1]]. This is the order of InternVL's
    `pixel_shuffle(x, scale_factor=0.5)` (ps_version v2) followed by flattening the grid.
    """
    if x.dim() != 4 or x.shape[1] != x.shape[2] or x.shape[1] % 2:
        raise ValueError(f"pixel_shuffle expects [T, g, g, C] with g even; got {tuple(x.shape)}")
    num_tiles, grid, _, dim = x.shape
    half = grid // 2
    x = x.reshape(num_tiles, half, 2, half, 2, dim)  # [T, r, dr, c, dc, C]
    x = x.permute(0, 1, 3, 2, 4, 5)  # [T, r, c, dr, dc, C]
    return x.reshape(num_tiles, half * half, 4 * dim)  # [T, r*c, (dr, dc, C)]


class VisionProjector(nn.Module):
    """Drop CLS -> pixel shuffle -> LayerNorm(4C) -> Linear -> GELU -> Linear (no biases)."""

    def __init__(self, vision: VisionConfig, llm_hidden_size: int) -> None:
        super().__init__()
        self.grid_size = vision.grid_size
        in_dim = vision.projector_input_size
        self.pre_proj_layernorm = nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, vision.hidden_size, bias=False),
            nn.GELU(),
            nn.Linear(vision.hidden_size, llm_hidden_size, bias=False),
        )

    def forward(self, vit_hidden: torch.Tensor) -> torch.Tensor:
        """vit_hidden [T, 1 + g*g, C] (CLS first) -> [T, tokens_per_tile, llm_hidden]."""
        num_tiles, num_tokens, dim = vit_hidden.shape
        if num_tokens != 1 + self.grid_size**2:
            raise ValueError(
                f"expected {1 + self.grid_size**2} ViT tokens per tile (CLS + "
                f"{self.grid_size}x{self.grid_size}); got {num_tokens}"
            )
        grid = vit_hidden[:, 1:].reshape(num_tiles, self.grid_size, self.grid_size, dim)
        tokens = pixel_shuffle(grid)  # [T, (g/2)^2, 4C]
        return self.mlp(self.pre_proj_layernorm(tokens))  # [T, (g/2)^2, llm_hidden]
