"""Image loading, dynamic tiling and pixel normalisation (longvita.processing.image)."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageOps

from longvita.errors import MediaError
from longvita.processing.image import (
    ALPHA_BACKGROUND,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PAD_FILL,
    TiledImage,
    candidate_grids,
    choose_grid,
    expand_to_square,
    image_size,
    load_image,
    tile_image,
    to_pixel_values,
)
from longvita.processing.tiles import ImageTiles

TILE = 448


def test_candidate_grids_cover_all_products_by_area():
    grids = candidate_grids(12, 1)
    expected = {(i, j) for i in range(1, 13) for j in range(1, 13) if i * j <= 12}
    assert set(grids) == expected and len(grids) == len(expected) == 35
    areas = [i * j for i, j in grids]
    assert areas == sorted(areas) and areas[0] == 1 and areas[-1] == 12


def test_candidate_grids_min_tiles_and_bad_limits():
    assert all(2 <= i * j <= 6 for i, j in candidate_grids(6, 2))
    assert (1, 1) not in candidate_grids(6, 2)
    with pytest.raises(ValueError, match="min_tiles"):
        candidate_grids(3, 4)
    with pytest.raises(ValueError, match="min_tiles"):
        candidate_grids(12, 0)


@pytest.mark.parametrize(
    ("size", "grid"),
    [
        # aspect 1: (1,1) has diff 0; the ties (2,2), (3,3) need area > 0.5*448^2*4 = 401408: no.
        ((10, 10), (1, 1)),
        # area 200704 < 401408: the tie (2,2) is refused.
        ((448, 448), (1, 1)),
        # area 802816 > 401408 takes (2,2); (3,3) needs > 903168: no.
        ((896, 896), (2, 2)),
        # area 1806336 > 903168 takes (3,3); no 4x4 within 12 tiles.
        ((1344, 1344), (3, 3)),
        # aspect 5: (2,1), (3,1), (4,1) get closer, (5,1) is exact; no later grid has aspect 5.
        ((1000, 200), (5, 1)),
        # aspect 0.2: (1,2), (1,3), (1,4) get closer, (1,5) is exact.
        ((200, 1000), (1, 5)),
        # aspect 4/3: (1,1) d=1/3, tie (2,2) refused (307200 < 401408), (3,2) d=1/6, (4,3) exact.
        ((640, 480), (4, 3)),
        # aspect 13.3: the widest candidate (12,1) is the closest; the 12-tile cap holds.
        ((4000, 300), (12, 1)),
        # aspect 1.5: (2,1) ties (1,1) and wins (area 1.5M > 200704), then (3,2) is exact.
        ((1500, 1000), (3, 2)),
    ],
)
def test_choose_grid_table(size, grid):
    assert choose_grid(*size, tile_size=TILE) == grid


def test_choose_grid_respects_max_tiles():
    # aspect 13.3 with at most 4 tiles: the widest is (4,1).
    assert choose_grid(4000, 300, tile_size=TILE, max_tiles=4) == (4, 1)
    with pytest.raises(ValueError, match="width"):
        choose_grid(0, 10, tile_size=TILE)


def _noise(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("size", "grid", "num_tiles"),
    [((10, 10), (1, 1), 1), ((896, 896), (2, 2), 5), ((1000, 200), (5, 1), 6)],
)
def test_tile_image_count_and_thumbnail(size, grid, num_tiles):
    image = _noise(*size)
    tiled = tile_image(image, tile_size=TILE)
    assert isinstance(tiled, TiledImage)
    assert tiled.grid == grid and tiled.num_tiles == num_tiles
    assert all(t.size == (TILE, TILE) for t in tiled.tiles)
    resized = image.resize((TILE * grid[0], TILE * grid[1]))
    if num_tiles == 1:  # no thumbnail: the single tile is the resized image
        assert np.array_equal(np.array(tiled.tiles[0]), np.array(resized))
        return
    assert np.array_equal(np.array(tiled.tiles[0]), np.array(image.resize((TILE, TILE))))
    # tile k (after the thumbnail) is at col k % cols, row k // cols
    cols = grid[0]
    for k, tile in enumerate(tiled.tiles[1:]):
        c, r = k % cols, k // cols
        box = (c * TILE, r * TILE, (c + 1) * TILE, (r + 1) * TILE)
        assert np.array_equal(np.array(tile), np.array(resized.crop(box)))


def test_tile_image_needs_rgb():
    with pytest.raises(ValueError, match="RGBA"):
        tile_image(Image.new("RGBA", (8, 8)), tile_size=TILE)


def test_pad_fill_truncates_like_official_code():
    assert PAD_FILL == (123, 116, 103)


def test_expand_to_square_centres_image():
    wide = expand_to_square(Image.new("RGB", (6, 2), (255, 0, 0)), PAD_FILL)
    assert wide.size == (6, 6)
    assert wide.getpixel((0, 1)) == PAD_FILL and wide.getpixel((0, 2)) == (255, 0, 0)
    assert wide.getpixel((5, 3)) == (255, 0, 0) and wide.getpixel((5, 4)) == PAD_FILL
    tall = expand_to_square(Image.new("RGB", (3, 7), (0, 255, 0)), PAD_FILL)
    assert tall.size == (7, 7)
    assert tall.getpixel((1, 0)) == PAD_FILL and tall.getpixel((2, 0)) == (0, 255, 0)
    square = Image.new("RGB", (4, 4))
    assert expand_to_square(square, PAD_FILL) is square


def _expected(rgb):
    x = np.array(rgb, dtype=np.float32) * 1.0 / 255.0
    return (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)


def test_to_pixel_values_solid_colour_is_exact():
    colour = (200, 30, 90)
    pixels = to_pixel_values([Image.new("RGB", (64, 64), colour)], tile_size=32)
    assert pixels.dtype == torch.float32 and pixels.shape == (1, 3, 32, 32)
    for channel, value in enumerate(_expected(colour)):
        assert torch.all(pixels[0, channel] == torch.tensor(value))


def test_to_pixel_values_pads_with_mean_fill():
    # 32x8 white strip: rows 0..11 and 20..31 of the 32x32 square are PAD_FILL.
    pixels = to_pixel_values([Image.new("RGB", (32, 8), (255, 255, 255))], tile_size=32)
    pad = torch.from_numpy(_expected(PAD_FILL))  # [3]
    assert torch.equal(pixels[0, :, 0, 0], pad) and torch.equal(pixels[0, :, 31, 31], pad)
    assert torch.equal(pixels[0, :, 16, 16], torch.from_numpy(_expected((255, 255, 255))))


def test_to_pixel_values_empty_and_batch():
    assert to_pixel_values([], tile_size=16).shape == (0, 3, 16, 16)
    images = [Image.new("RGB", (5, 9), (i, i, i)) for i in (0, 128)]
    assert to_pixel_values(images, tile_size=16).shape == (2, 3, 16, 16)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "LA"])
def test_load_image_converts_modes_to_rgb(tmp_path, mode):
    path = tmp_path / f"image_{mode}.png"
    Image.new("RGB", (12, 10), (40, 80, 120)).convert(mode).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (12, 10)
    assert to_pixel_values([image], tile_size=8).shape == (1, 3, 8, 8)
    assert load_image(Image.open(path)).mode == "RGB"


def test_load_image_missing_file(tmp_path):
    path = tmp_path / "missing.png"
    with pytest.raises(MediaError, match="missing.png"):
        load_image(path)


def test_load_image_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is text, not a PNG")
    with pytest.raises(MediaError, match="notes.png"):
        load_image(str(path))


def test_load_image_truncated(tmp_path):
    path = tmp_path / "cut.png"
    _noise(64, 64).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(MediaError, match="cut.png"):
        load_image(path)


# --- orientation, bit depth, transparency, pixel limit -------------------------------------------


def _marked(size=(40, 20)):
    """A wide image whose quadrants differ, so that every flip and rotation shows."""
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)  # [H, W, 3]
    h, w = size[1] // 2, size[0] // 2
    array[:h, :w], array[:h, w:], array[h:, :w] = (250, 0, 0), (0, 250, 0), (0, 0, 250)
    return Image.fromarray(array)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied_and_reported_by_image_size(tmp_path, orientation, suffix):
    path = tmp_path / f"photo{suffix}"
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    _marked().save(path, exif=exif, quality=95)
    expected = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    assert image_size(path) == expected.size == ((20, 40) if orientation >= 5 else (40, 20))
    image = load_image(path)
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(expected))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_tiff_orientation_is_applied_once(tmp_path, orientation):
    """Pillow 13 turns a TIFF upright itself (size on open, pixels on load); older ones do not.
    Either way the image comes out as a JPEG with the same tag does."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    tiff, png = tmp_path / "photo.tif", tmp_path / "photo.png"
    _marked().save(tiff, exif=exif)
    _marked().save(png, exif=exif)
    assert image_size(tiff) == image_size(png) == ((20, 40) if orientation >= 5 else (40, 20))
    assert np.array_equal(np.asarray(load_image(tiff)), np.asarray(load_image(png)))


def test_rotated_photo_is_tiled_on_the_planned_grid(tmp_path):
    path = tmp_path / "portrait.jpg"
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored 1000x200, shown 200x1000
    _marked((1000, 200)).save(path, exif=exif)
    width, height = image_size(path)
    grid = choose_grid(width, height, tile_size=TILE)
    assert grid == (1, 5)
    tiles = ImageTiles(path, grid, tile_size=TILE, max_tiles=12, size=(width, height))
    assert tiles.load([0, 5]).shape == (2, 3, TILE, TILE)  # no "changed since planned" error


@pytest.mark.parametrize("dtype", ["<u2", ">u2", "<i4"])
def test_sixteen_bit_grey_is_scaled_to_eight_bits(tmp_path, dtype):
    values = np.array([[0, 128, 129, 257, 32896, 65406, 65535, 1000]])  # [1, 8]
    source = Image.fromarray(values.astype(dtype))
    assert source.mode in ("I;16", "I;16B", "I")
    path = tmp_path / ("deep.tif" if source.mode == "I" else "deep.png")
    source.save(path)  # a 16-bit grey PNG opens as I;16
    expected = [0, 0, 1, 1, 128, 254, 255, 4]  # round(v * 255 / 65535), not min(v, 255)
    for image in (load_image(source), load_image(path)):
        assert image.mode == "RGB"
        assert np.asarray(image)[0, :, 0].tolist() == expected
        assert np.array_equal(np.asarray(image)[..., 0], np.asarray(image)[..., 2])


def test_eight_bit_values_in_a_32_bit_image_are_kept(tmp_path):
    """convert("I") or an int32 array of 0..255 is 8-bit data: scaling it by 257 made it black."""
    grey = Image.fromarray(np.array([[0, 1, 128, 200, 255]], dtype=np.uint8))
    wide = grey.convert("I")
    assert wide.mode == "I"
    path = tmp_path / "wide.tif"
    wide.save(path)
    for image in (load_image(wide), load_image(path)):
        assert np.asarray(image)[0, :, 0].tolist() == [0, 1, 128, 200, 255]


def test_sixteen_bit_grey_with_a_transparent_value_is_composited(tmp_path):
    values = np.array([[0, 1000, 65535]], dtype="<u2")
    path = tmp_path / "keyed.png"
    Image.fromarray(values).save(path, transparency=1000)  # a tRNS grey: 1000 is transparent
    assert Image.open(path).info["transparency"] == 1000
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 255, 255]
    assert np.asarray(load_image(path))[0, 2].tolist() == [255, 255, 255]  # opaque white


def test_premultiplied_alpha_modes_are_converted():
    for mode in ("La", "RGBa"):
        image = Image.new(mode, (2, 1), 0)  # transparent black
        assert np.asarray(load_image(image)).tolist() == [[[255, 255, 255]] * 2]


def _png_rgb16(path, pixels):
    """A 16-bit RGB PNG written by hand (Pillow cannot write one): pixels uint16 [H, W, 3]."""

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)  # filter 0
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def test_sixteen_bit_rgb_png_keeps_its_scale(tmp_path):
    pixels = np.array([[[0, 0x00FF, 0x8000], [0xFFFF, 0x1234, 0x7FFF]]], dtype=np.uint16)
    path = _png_rgb16(tmp_path / "deep_rgb.png", pixels)
    image = load_image(path)  # Pillow keeps the high byte: floor(v / 256), a scaling
    assert np.asarray(image).tolist() == [[[0, 0, 128], [255, 0x12, 0x7F]]]


def _over_white(rgb, alpha):
    return [round(int(c) * int(alpha) / 255 + 255 * (1 - int(alpha) / 255)) for c in rgb]


def test_transparency_is_composited_on_white(tmp_path):
    assert ALPHA_BACKGROUND == (255, 255, 255)
    array = np.zeros((2, 3, 4), dtype=np.uint8)  # [H, W, RGBA]
    array[0] = [(200, 100, 50, 255), (200, 100, 50, 128), (200, 100, 50, 0)]
    array[1] = [(0, 0, 0, 255), (0, 0, 0, 128), (10, 20, 30, 1)]
    path = tmp_path / "alpha.png"
    Image.fromarray(array).save(path)
    image = np.asarray(load_image(path)).astype(int).tolist()
    for y in range(2):
        for x in range(3):
            assert image[y][x] == _over_white(array[y, x, :3], array[y, x, 3])


def test_opaque_images_are_unchanged_by_compositing():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    for image in (rgb.convert("RGBA"), rgb.convert("L").convert("LA"), rgb):
        expected = image.convert("RGB")
        assert np.array_equal(np.asarray(load_image(image)), np.asarray(expected))


def test_grey_with_alpha_and_palette_with_transparency(tmp_path):
    grey = Image.new("LA", (4, 1), (100, 255))
    grey.putpixel((1, 0), (100, 0))
    grey.putpixel((2, 0), (0, 51))  # 20 % opaque black
    assert np.asarray(load_image(grey))[0, :, 0].tolist() == [100, 255, 204, 100]

    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0])  # 0 red, 1 blue, 2 green
    palette.putpixel((1, 0), 1)
    palette.putpixel((2, 0), 2)
    path = tmp_path / "palette.png"
    palette.save(path, transparency=1)  # blue is transparent
    loaded = Image.open(path)
    assert loaded.mode == "P" and loaded.info["transparency"] == 1
    assert np.asarray(load_image(path)).tolist() == [[[255, 0, 0], [255, 255, 255], [0, 255, 0]]]
    pa = Image.new("PA", (1, 1), (0, 0))  # palette index 0 (black), fully transparent
    assert np.asarray(load_image(pa)).tolist() == [[[255, 255, 255]]]
