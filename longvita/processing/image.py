"""Image pixels: loading, dynamic tiling and normalisation into the vision tower's input tensor.

This module owns the path from an image file (or a PIL image) to float32 pixel tensors, and
reproduces the official Long-VITA `ImageProcessor` ("dynamic" mode) bit for bit: the same grid
choice, the same PIL resizes and the same float32 op order. It knows nothing about tokens,
prompts or the model; video frame selection lives in `longvita.processing.video`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from longvita.errors import MediaError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The official code pads with `tuple(int(x * 255) for x in self.mean)`: int() truncates, so the
# fill is (123, 116, 103), not the rounded (124, 116, 104) given in LONGVITA.md. We follow the code.
PAD_FILL = tuple(int(x * 255) for x in IMAGENET_MEAN)


@dataclass(frozen=True)
class TiledImage:
    """The tiles of one image, in the order they are fed to the vision tower."""

    tiles: list[Image.Image]
    """The thumbnail first (only when the grid has more than one cell), then the grid row-major."""
    grid: tuple[int, int]
    """(cols, rows) of the chosen grid."""

    @property
    def num_tiles(self) -> int:
        """Number of vision tiles, thumbnail included."""
        return len(self.tiles)


def load_image(image: str | os.PathLike | Image.Image) -> Image.Image:
    """Open an image file (or take a PIL image) and convert it to RGB.

    Raises MediaError naming the path when the file is missing, unreadable, truncated or not an
    image.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = os.fspath(image)
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now so that truncated files fail here
            return opened.convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise MediaError(f"cannot read image {path!r}: {e}") from e


def candidate_grids(max_tiles: int = 12, min_tiles: int = 1) -> list[tuple[int, int]]:
    """All (cols, rows) grids with min_tiles <= cols*rows <= max_tiles, by increasing area.

    Built exactly as the official code does (a set, then a stable sort by area), so grids of equal
    area keep the set's iteration order, which decides ties in `choose_grid`.
    """
    if min_tiles < 1 or max_tiles < min_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles=}, {max_tiles=}")
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def choose_grid(
    width: int, height: int, *, tile_size: int, max_tiles: int = 12, min_tiles: int = 1
) -> tuple[int, int]:
    """The (cols, rows) grid whose aspect ratio is closest to width/height.

    On an exact tie in aspect difference, a later (larger) grid wins only if the image area
    exceeds half the grid's pixel area: `width*height > 0.5 * tile_size**2 * cols*rows`.
    """
    if width < 1 or height < 1 or tile_size < 1:
        raise ValueError(f"need positive sizes, got {width=}, {height=}, {tile_size=}")
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(max_tiles, min_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def tile_image(image: Image.Image, *, tile_size: int, max_tiles: int = 12) -> TiledImage:
    """Split an RGB image into a grid of tile_size tiles, with a thumbnail when there are several.

    The whole image is resized to the grid (ignoring aspect, PIL's default filter) and cropped
    row-major; the thumbnail is the original image resized to one tile.
    """
    if image.mode != "RGB":
        raise ValueError(f"tile_image needs an RGB image (see load_image), got mode {image.mode!r}")
    cols, rows = choose_grid(image.width, image.height, tile_size=tile_size, max_tiles=max_tiles)
    resized = image.resize((tile_size * cols, tile_size * rows))
    tiles = []
    for k in range(cols * rows):
        col, row = k % cols, k // cols
        box = (col * tile_size, row * tile_size, (col + 1) * tile_size, (row + 1) * tile_size)
        tiles.append(resized.crop(box))
    if cols * rows > 1:
        tiles.insert(0, image.resize((tile_size, tile_size)))
    return TiledImage(tiles=tiles, grid=(cols, rows))


def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Pad the shorter side with `fill`, keeping the image centred (official `expand2square`)."""
    width, height = image.size
    if width == height:
        return image
    if width > height:
        square = Image.new(image.mode, (width, width), fill)
        square.paste(image, (0, (width - height) // 2))
    else:
        square = Image.new(image.mode, (height, height), fill)
        square.paste(image, ((height - width) // 2, 0))
    return square


def _normalize(image: Image.Image, tile_size: int) -> np.ndarray:
    """One image to a float32 [S, S, 3] array, in the official op order (do not reorder)."""
    image = expand_to_square(image.convert("RGB"), PAD_FILL)
    image = image.resize((tile_size, tile_size), resample=Image.Resampling.BICUBIC)
    x = np.array(image, dtype=np.float32)  # [S, S, 3]
    x = x * 1.0 / 255.0
    mean = np.array(IMAGENET_MEAN, dtype=np.float32)  # [3]
    std = np.array(IMAGENET_STD, dtype=np.float32)  # [3]
    return (x - mean) / std  # [S, S, 3]


def to_pixel_values(images: Sequence[Image.Image], *, tile_size: int) -> torch.Tensor:
    """Pad to square, bicubic-resize to tile_size, ImageNet-normalise: float32 [n, 3, S, S]."""
    if tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    if not images:
        return torch.empty(0, 3, tile_size, tile_size, dtype=torch.float32)
    hwc = np.stack([_normalize(image, tile_size) for image in images])  # [n, S, S, 3]
    return torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()  # [n, 3, S, S]
