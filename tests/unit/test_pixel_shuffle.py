"""The 2x2 pixel shuffle: hand-written expected tokens and a slow loop reference."""

from __future__ import annotations

import pytest
import torch

from longvita.model.projector import pixel_shuffle


def grid_10_row_plus_col(g: int) -> torch.Tensor:
    """[1, g, g, 1] with G[row, col] = 10*row + col."""
    rows = torch.arange(g).view(g, 1)
    cols = torch.arange(g).view(1, g)
    return (10 * rows + cols).float().view(1, g, g, 1)


def test_hand_made_grid_one_channel() -> None:
    # G = [[ 0,  1,  2,  3],
    #      [10, 11, 12, 13],
    #      [20, 21, 22, 23],
    #      [30, 31, 32, 33]]
    out = pixel_shuffle(grid_10_row_plus_col(4))
    expected = [
        [0, 1, 10, 11],  # (r, c) = (0, 0)
        [2, 3, 12, 13],  # (0, 1)
        [20, 21, 30, 31],  # (1, 0)
        [22, 23, 32, 33],  # (1, 1)
    ]
    assert out.shape == (1, 4, 4)
    assert out[0].tolist() == expected


def test_hand_made_grid_two_channels() -> None:
    # channel 0 = 10*row + col, channel 1 = 100 + 10*row + col
    base = grid_10_row_plus_col(4)
    out = pixel_shuffle(torch.cat([base, base + 100], dim=-1))
    expected = [
        [0, 100, 1, 101, 10, 110, 11, 111],
        [2, 102, 3, 103, 12, 112, 13, 113],
        [20, 120, 21, 121, 30, 130, 31, 131],
        [22, 122, 23, 123, 32, 132, 33, 133],
    ]
    assert out.shape == (1, 4, 8)
    assert out[0].tolist() == expected


def pixel_shuffle_loop(x: torch.Tensor) -> torch.Tensor:
    """The definition, token by token."""
    num_tiles, g, _, dim = x.shape
    out = torch.empty(num_tiles, (g // 2) ** 2, 4 * dim, dtype=x.dtype)
    for t in range(num_tiles):
        for r in range(g // 2):
            for c in range(g // 2):
                blocks = [x[t, 2 * r, 2 * c], x[t, 2 * r, 2 * c + 1]]
                blocks += [x[t, 2 * r + 1, 2 * c], x[t, 2 * r + 1, 2 * c + 1]]
                out[t, r * (g // 2) + c] = torch.cat(blocks)
    return out


@pytest.mark.parametrize(("num_tiles", "grid", "dim"), [(1, 2, 1), (3, 4, 5), (2, 8, 3), (0, 4, 2)])
def test_matches_loop(num_tiles: int, grid: int, dim: int) -> None:
    x = torch.randn(num_tiles, grid, grid, dim, generator=torch.Generator().manual_seed(grid))
    torch.testing.assert_close(pixel_shuffle(x), pixel_shuffle_loop(x), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 3, 3, 2), (1, 4, 2, 2), (4, 4, 2)])
def test_rejects_bad_grid(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="pixel_shuffle"):
        pixel_shuffle(torch.zeros(shape))
