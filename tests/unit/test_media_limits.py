"""The `max_pixels` cap and decode-time downscaling (processing.image, processing.video): media
above the cap are refused from their headers, before any pixel is decoded; frames above
DECODE_DOWNSCALE_PIXELS are scaled down by the RGB conversion, smaller ones are untouched."""

import av
import numpy as np
import pytest
from PIL import Image, ImageFile

from longvita.config import tiny
from longvita.errors import MediaError
from longvita.processing import video as video_module
from longvita.processing.image import (
    DEFAULT_MAX_PIXELS,
    IMAGENET_STD,
    PixelLimitError,
    image_size,
    load_image,
    to_pixel_values,
)
from longvita.processing.processor import Processor
from longvita.processing.tokens import load_tokenizer
from longvita.processing.video import (
    DECODE_DOWNSCALE_PIXELS,
    downscaled_size,
    frame_to_image,
    iter_video_frames,
    plan_video,
)
from longvita.testing import encode_frames, write_tiny_tokenizer


def _forbidden(*args, **kwargs):
    raise AssertionError("pixels decoded before the refusal")


def _solid_video(path, width, height, num_frames, fps=1):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        pixels = (np.full((height, width, 3), 40 * k, np.uint8) for k in range(num_frames))
        encode_frames(container, stream, (av.VideoFrame.from_ndarray(p) for p in pixels))
    return path


def test_default_is_pillows_default_limit():
    assert DEFAULT_MAX_PIXELS == 1024 * 1024 * 1024 // 4 // 3 == 89_478_485


def test_image_above_max_pixels_is_refused_from_its_header(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    monkeypatch.setattr(ImageFile.ImageFile, "load", _forbidden)
    message = r"'.*big\.png' is 300x200 = 60,000 pixels, more than the limit of 59,999.*max_pixels"
    for read in (image_size, load_image):
        with pytest.raises(PixelLimitError, match=message):
            read(path, max_pixels=59_999)
    with pytest.raises(PixelLimitError, match="PIL"):
        image_size(Image.new("RGB", (300, 200)), max_pixels=59_999)
    assert image_size(path, max_pixels=60_000) == (300, 200)


def test_video_above_max_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    path = _solid_video(tmp_path / "clip.mp4", 64, 48, 2)
    monkeypatch.setattr(video_module, "frame_to_image", _forbidden)
    message = r"video '.*clip\.mp4' is 64x48 = 3,072 pixels, more than the limit of 3,071"
    with pytest.raises(PixelLimitError, match=message + r".*max_pixels=N"):
        plan_video(path, max_pixels=3071)
    with pytest.raises(PixelLimitError, match=message):  # the decoder checks again
        next(iter_video_frames(path, [0, 1], max_pixels=3071))
    assert plan_video(path, max_pixels=3072).indices == [0, 1]


def test_processor_max_pixels_refuses_media_before_decoding(tmp_path, monkeypatch):
    tokenizer = load_tokenizer(write_tiny_tokenizer(tmp_path / "tok"))
    assert Processor(tokenizer, tiny().vision).max_pixels == DEFAULT_MAX_PIXELS
    with pytest.raises(ValueError, match="max_pixels"):
        Processor(tokenizer, tiny().vision, max_pixels=0)
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48)).save(image)
    video = _solid_video(tmp_path / "v.mp4", 64, 48, 2)
    strict = Processor(tokenizer, tiny().vision, max_pixels=64 * 48 - 1)
    monkeypatch.setattr(ImageFile.ImageFile, "load", _forbidden)
    monkeypatch.setattr(video_module, "frame_to_image", _forbidden)
    with pytest.raises(MediaError, match=r"a\.png' is 64x48.*3,071"):
        strict("<image>\nWhat is this?", images=[image])
    with pytest.raises(MediaError, match=r"v\.mp4' is 64x48.*3,071"):
        strict("<video>\nWhat is this?", videos=[video])
    monkeypatch.undo()
    prompt = Processor(tokenizer, tiny().vision, max_pixels=64 * 48)("<video>\nx", videos=[video])
    assert prompt.video_frames == [2]


def test_downscaled_size_keeps_4k_and_the_aspect_ratio():
    assert DECODE_DOWNSCALE_PIXELS == 3840 * 2160
    assert downscaled_size(3840, 2160) == (3840, 2160)
    assert downscaled_size(2160, 3840) == (2160, 3840)
    assert downscaled_size(7680, 4320) == (3840, 2160)
    assert downscaled_size(8192, 8192) == (2880, 2880)
    for size in [(3841, 2160), (10000, 500), (500, 20000), (4097, 4097)]:
        width, height = downscaled_size(*size)
        assert width * height <= DECODE_DOWNSCALE_PIXELS
        assert abs(width / height - size[0] / size[1]) < 2 / min(width, height)


def _yuv_frame(rgb):
    return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")


def test_frames_up_to_4k_convert_exactly_as_before():
    rng = np.random.default_rng(0)
    frame = _yuv_frame(rng.integers(0, 256, (2160, 3840, 3), dtype=np.uint8))
    image = frame_to_image(frame)
    assert image.size == (3840, 2160)
    assert np.array_equal(np.asarray(image), np.asarray(frame.to_image()))


def test_larger_frames_give_nearly_the_tile_of_the_full_frame():
    # A smooth 4096x2304 frame (above 4K UHD) is converted at 3840x2160; its 56-pixel tile is
    # within about one grey level of the tile made from the full-size frame.
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (18, 32, 3), dtype=np.uint8))
    frame = _yuv_frame(np.asarray(small.resize((4096, 2304), Image.Resampling.BICUBIC)))
    image = frame_to_image(frame)
    assert image.size == (3840, 2160) and image.mode == "RGB"
    ours = to_pixel_values([image], tile_size=56)
    full = to_pixel_values([frame.to_image()], tile_size=56)
    level = 1 / 255 / max(IMAGENET_STD)  # one grey level, normalized
    assert (ours - full).abs().mean() < level and (ours - full).abs().max() < 8 * level
