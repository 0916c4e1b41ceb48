"""Image pixels: loading, dynamic tiling and normalisation into the vision tower's input tensor.

This module owns the path from an image file (or a PIL image) to float32 pixel tensors, and
reproduces the official Long-VITA `ImageProcessor` ("dynamic" mode) bit for bit: the same grid
choice, the same PIL resizes and the same float32 op order. It knows nothing about tokens,
prompts or the model; video frame selection lives in `longvita.processing.video`.

`load_image` is the one place a file becomes RGB pixels, for images and frame files alike:
- the size is read from the header and checked against `max_pixels` before any pixel is
  decoded (`check_pixels`: decompression bombs are refused, not decoded);
- EXIF orientation (tags 2-8) is applied, and `image_size` reports the oriented size, so the
  grid planned from the header is the grid tiled;
- 16-bit greys (`I;16*`, and `I` whose values pass 255) are scaled from 0..65535 to 0..255
  (`round(v / 257)`), not clipped (Pillow itself keeps the high byte of 16-bit RGB(A) PNGs,
  also a scaling); an `I` image within 0..255 (`convert("I")`, an int32 array) is 8-bit
  data and is taken as it is, as Pillow's own conversion does;
- transparency (RGBA, LA, PA, P or L/RGB with a transparent colour) is composited on
  `ALPHA_BACKGROUND`, white. A documented difference from the official code, which drops the
  alpha channel (so a transparent area shows whatever colour its pixels hold, often black);
  an opaque image is unchanged.
A PIL image passed in is taken as it is oriented; its mode is converted the same way.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import ExifTags, Image

from longvita.errors import MediaError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The official code pads with `tuple(int(x * 255) for x in self.mean)`: int() truncates, so the
# fill is (123, 116, 103), not the rounded (124, 116, 104) given in LONGVITA.md. We follow the code.
PAD_FILL = tuple(int(x * 255) for x in IMAGENET_MEAN)

DEFAULT_MAX_PIXELS = 89_478_485
"""Default of the `max_pixels` setting: the most pixels (width * height) an image or a video
frame may have. Pillow's own default `Image.MAX_IMAGE_PIXELS` (1024**3 // 4 // 3, a 256 MiB
image at 3 bytes per pixel); larger media are refused before a pixel is decoded. Pillow refuses
images above twice its own limit whatever this setting says (this module never changes
Pillow's globals)."""

ALPHA_BACKGROUND = (255, 255, 255)
"""The colour transparent pixels are composited on (white); see the module docstring."""

PIL_RGB_BYTES = 4
"""Bytes per pixel of a PIL image in mode RGB (stored as RGBX)."""

# ImageOps.exif_transpose's table: EXIF orientation -> the transpose that undoes it.
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class PixelLimitError(MediaError):
    """An image or video frame with more pixels than the `max_pixels` setting allows."""


def check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    """PixelLimitError naming `name` (e.g. "image 'a.png'") when width * height > max_pixels."""
    if width * height > max_pixels:
        raise PixelLimitError(
            f"{name} is {width}x{height} = {width * height:,} pixels, more than the limit of "
            f"{max_pixels:,} pixels; refused before decoding (a possible decompression bomb). "
            "To accept it, raise the max_pixels setting: longvita.load(..., max_pixels=N), "
            "--max-pixels N on the command line, or Processor(..., max_pixels=N)"
        )


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


def _open_image(path: str, max_pixels: int) -> Image.Image:
    """The image file opened (header read, no pixel decoded) and checked against max_pixels."""
    try:
        opened = Image.open(path)
    except Image.DecompressionBombError as e:  # above 2x Pillow's own limit
        raise PixelLimitError(
            f"image {path!r} is larger than Pillow accepts ({e}); it cannot be loaded"
        ) from e
    except (OSError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
        raise MediaError(f"cannot read image {path!r}: {e}") from e
    try:
        check_pixels(f"image {path!r}", *opened.size, max_pixels)
    except PixelLimitError:
        opened.close()
        raise
    return opened


def _orientation(opened: Image.Image) -> int:
    """The EXIF orientation (1 to 8) read from the header; 1 when there is none.

    A PNG whose eXIf chunk comes after the pixel data is taken as 1: reading it needs decoding,
    and planning reads headers only (load_image uses this same answer, so sizes agree).
    """
    if opened.format == "PNG" and "exif" not in opened.info:
        return 1
    if opened.format == "TIFF" and _pillow_orients_tiffs():
        return 1  # this Pillow has oriented it already: its size, and its pixels on load
    orientation = opened.getexif().get(ExifTags.Base.Orientation, 1)
    return orientation if orientation in _EXIF_TRANSPOSE else 1


@functools.cache
def _pillow_orients_tiffs() -> bool:
    """Whether the installed Pillow applies a TIFF's Orientation tag itself (Pillow 13 does:
    the size it opens with is oriented, the pixels are turned on load; older ones do not)."""
    probe = Image.new("L", (2, 1))
    exif = probe.getexif()
    exif[ExifTags.Base.Orientation] = 6  # a quarter turn: the size tells
    buffer = io.BytesIO()
    probe.save(buffer, "TIFF", exif=exif)
    with Image.open(buffer) as reopened:
        return reopened.size == (1, 2)


def check_pil_image(image: Image.Image, name: str, max_pixels: int, *, decode: bool) -> None:
    """MediaError naming `name` when a PIL image given in memory has no pixel or more than
    max_pixels; with `decode`, also when its pixels cannot be read (`load_pil`)."""
    width, height = image.size
    if width < 1 or height < 1:
        raise MediaError(f"{name} has no pixels ({width}x{height})")
    check_pixels(name, width, height, max_pixels)
    if decode:
        load_pil(image, name)


def load_pil(image: Image.Image, name: str) -> None:
    """Decode a PIL image's pixels now (as `load_image` does a file's): MediaError naming
    `name` when it is closed or was opened lazily from a truncated or corrupt file."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as err:  # ValueError: "Operation on closed image"
        raise MediaError(f"cannot read {name}: {err}") from err


def image_size(
    image: str | os.PathLike | Image.Image,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode: bool = False,
) -> tuple[int, int]:
    """(width, height) of an image as `load_image` returns it (EXIF orientation applied), read
    from the file header without decoding the pixels; with `decode`, after decoding them all
    (once the size is checked), so a file whose header reads but whose data is truncated or
    corrupt fails here (a server checks this before it answers).

    Raises PixelLimitError (a MediaError) when width * height > max_pixels, MediaError naming
    the path when the file is missing or not an image (or, with `decode`, not decodable).
    """
    if isinstance(image, Image.Image):
        check_pil_image(image, "image (PIL)", max_pixels, decode=True)  # one image: read it now
        return image.size
    path = os.fspath(image)
    with _open_image(path, max_pixels) as opened:
        width, height = opened.size
        try:
            orientation = _orientation(opened)
            if decode:
                opened.load()
        except (OSError, SyntaxError) as e:
            raise MediaError(f"cannot read image {path!r}: {e}") from e
    return (height, width) if orientation >= 5 else (width, height)


def load_image(
    image: str | os.PathLike | Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Open an image file (or take a PIL image) as 8-bit RGB; see the module docstring.

    Raises PixelLimitError (a MediaError) when width * height > max_pixels, before decoding;
    MediaError naming the path when the file is missing, unreadable, truncated or not an image.
    """
    if isinstance(image, Image.Image):
        check_pil_image(image, "image (PIL)", max_pixels, decode=True)
        return to_rgb(image)
    path = os.fspath(image)
    with _open_image(path, max_pixels) as opened:
        try:
            orientation = _orientation(opened)
            opened.load()  # decode now so that truncated files fail here
        except (OSError, SyntaxError) as e:
            raise MediaError(f"cannot read image {path!r}: {e}") from e
        rgb = to_rgb(opened)
    if orientation != 1:
        rgb = rgb.transpose(_EXIF_TRANSPOSE[orientation])
    return rgb


def to_rgb(image: Image.Image) -> Image.Image:
    """A new 8-bit RGB image: 16-bit greys scaled, transparency on ALPHA_BACKGROUND."""
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and _passes_eight_bits(image)):
        image = _sixteen_to_eight_bits(image)
    if not image.has_transparency_data:
        return image.convert("RGB")
    if image.mode in ("La", "RGBa"):  # premultiplied alpha: Pillow converts these to LA/RGBA only
        image = image.convert(image.mode.upper())
    if image.mode not in ("RGBA", "LA"):  # P, PA, or L/RGB with a transparent colour
        image = image.convert("RGBA")
    rgb = Image.new("RGB", image.size, ALPHA_BACKGROUND)
    rgb.paste(image, mask=image)  # round(v * a / 255 + background * (1 - a / 255)) per channel
    return rgb


def _passes_eight_bits(image: Image.Image) -> bool:
    """Whether a 32-bit integer image holds a value above 255: 16-bit data (older Pillows
    open a 16-bit grey PNG as `I`), not 8-bit data in a wide mode."""
    return bool(np.asarray(image).max(initial=0) > 255)


def _sixteen_to_eight_bits(image: Image.Image) -> Image.Image:
    """A 16-bit grey (`I;16*`, or `I` above 255, taken as 0..65535) as 8-bit L,
    round(v * 255 / 65535); with a transparent grey value (a PNG's tRNS), as LA whose alpha is
    0 where it was."""
    raw = np.asarray(image).astype(np.int32)  # [H, W], native byte order
    values = np.clip(raw, 0, 65535)
    values += 128
    values //= 257  # (v + 128) // 257 == round(v / 257): v / 257 is never a half
    key = image.info.get("transparency")
    if not isinstance(key, int):
        return Image.fromarray(values.astype(np.uint8))
    alpha = np.where(raw == key, 0, 255)
    # [H, W, 2] -> LA (Image.merge("LA") makes an image that pastes its alpha as green)
    return Image.fromarray(np.stack([values, alpha], axis=-1).astype(np.uint8))


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
    if image.mode != "RGB":  # (converting an RGB image would only copy it)
        image = image.convert("RGB")
    image = expand_to_square(image, PAD_FILL)
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
