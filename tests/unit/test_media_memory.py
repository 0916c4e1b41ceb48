"""Host memory of decoding media (processing.tiles, processing.video): a materialized video holds
one decoded frame at a time, a frame far above 4K UHD is never converted to RGB at full size, and
`TileSource.decode_bytes` bounds the peak memory measured while decoding real files.

Peak memory is measured in one subprocess (C allocations included): before each measurement
freed memory goes back to the system (`malloc_trim`) and the peak is reset
(`/proc/self/clear_refs`), then the growth of the peak resident set (VmHWM) is the cost.
"""

import json
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from longvita.processing import tiles as tiles_module
from longvita.processing.image import to_pixel_values
from longvita.processing.tiles import ImageTiles, TileSource, VideoFrameTiles
from longvita.processing.video import iter_video_frames, plan_video
from longvita.testing import encode_frames

MiB = 2**20
TILE = 448


def _smooth_video(path, width, height, num_frames, *, options, fps=4):
    """Smooth moving content (a bicubic-upscaled random image, shifted every frame)."""
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (9, 16, 3), dtype=np.uint8))
    base = np.asarray(small.resize((width + 8 * num_frames, height), Image.Resampling.BICUBIC))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options
        pixels = (np.ascontiguousarray(base[:, 8 * k : 8 * k + width]) for k in range(num_frames))
        encode_frames(container, stream, (av.VideoFrame.from_ndarray(p) for p in pixels))
    return path


def _solid_video(path, width, height, num_frames):
    """Solid frames written straight in YUV: a few hundred KB even at 8192x8192."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}

        def frames():
            for k in range(num_frames):
                frame = av.VideoFrame(width, height, "yuv420p")
                for plane, level in zip(frame.planes, (40 + 60 * k, 128, 128), strict=True):
                    np.frombuffer(plane, np.uint8)[:] = level
                yield frame

        encode_frames(container, stream, frames())
    return path


# --- one decoded frame at a time -----------------------------------------------------------------


def test_materialize_normalizes_each_frame_as_it_is_decoded(tmp_path, monkeypatch):
    path = _smooth_video(tmp_path / "clip.mp4", 96, 64, 12, options={"g": "4"})
    indices = plan_video(path, max_frames=16, max_fps=4.0).indices  # every frame
    live = most_live = 0  # decoded frames not yet freed
    pixel_batches = []
    iter_frames, pixel_values = tiles_module.iter_video_frames, tiles_module.to_pixel_values

    def freed():
        nonlocal live
        live -= 1

    def counting_frames(*args, **kwargs):
        nonlocal live, most_live
        for frame in iter_frames(*args, **kwargs):
            live += 1
            most_live = max(most_live, live)
            weakref.finalize(frame, freed)
            yield frame

    def counting_pixels(images, *, tile_size):
        pixel_batches.append(len(images))
        return pixel_values(images, tile_size=tile_size)

    monkeypatch.setattr(tiles_module, "iter_video_frames", counting_frames)
    monkeypatch.setattr(tiles_module, "to_pixel_values", counting_pixels)
    segment = VideoFrameTiles(path, indices, tile_size=56)
    source = TileSource([segment], tile_size=56).materialize()
    assert most_live == 1 and pixel_batches == [1] * 12 and segment.num_passes == 1
    eager = to_pixel_values(list(iter_video_frames(path, indices)), tile_size=56)  # [12, 3, 56, 56]
    torch.testing.assert_close(source.get_all(), eager, rtol=0, atol=0)


def test_decode_bytes_reads_no_pixel_and_takes_the_largest_medium(tmp_path, monkeypatch):
    video = _smooth_video(tmp_path / "clip.mp4", 320, 240, 4, options={}, fps=1)
    image = tmp_path / "photo.png"
    Image.new("RGB", (1200, 900)).save(image)
    prompt_tiles = [
        VideoFrameTiles.from_plan(video, plan_video(video), tile_size=56, max_pixels=10**9),
        ImageTiles(image, (4, 3), tile_size=56, max_tiles=12, size=(1200, 900)),
    ]
    monkeypatch.setattr(tiles_module, "iter_video_frames", None)  # nothing may be decoded
    monkeypatch.setattr(tiles_module, "load_image", None)
    source = TileSource(prompt_tiles, tile_size=56)
    tile = 3 * 56 * 56 * 4
    video_bytes, image_bytes = (segment.decode_bytes(8) for segment in prompt_tiles)
    assert image_bytes > 9 * 1200 * 900 > video_bytes  # the 1200x900 image costs the most
    assert source.decode_bytes(8) == 8 * tile + image_bytes
    assert source.decode_bytes(64) == 17 * tile + prompt_tiles[1].decode_bytes(64)  # 4 + 13
    with pytest.raises(ValueError, match="batch_size"):
        source.decode_bytes(0)


# --- peak memory, measured in a subprocess ------------------------------------------------------

MEASURE = textwrap.dedent(
    """
    import ctypes, gc, json, sys
    from longvita.processing.image import choose_grid, image_size
    from longvita.processing.tiles import ImageTiles, TileSource, VideoFrameTiles
    from longvita.processing.video import plan_video

    trim = getattr(ctypes.CDLL(None), "malloc_trim", lambda pad: 0)  # glibc only

    def status(field):
        with open("/proc/self/status") as lines:
            return next(int(l.split()[1]) * 1024 for l in lines if l.startswith(field + ":"))

    def source(kind, path):
        if kind == "video":
            plan = plan_video(path, max_frames=64, max_fps=1.0)  # 1-fps videos: every frame
            return TileSource([VideoFrameTiles.from_plan(path, plan, tile_size=448,
                                                         max_pixels=10**9)], tile_size=448)
        width, height = image_size(path)
        grid = choose_grid(width, height, tile_size=448)
        tiles = ImageTiles(path, grid, tile_size=448, max_tiles=12, size=(width, height))
        return TileSource([tiles], tile_size=448)

    def read(tiles, batch):
        for start in range(0, tiles.num_tiles, batch):
            tiles.get(range(start, min(start + batch, tiles.num_tiles)))
        tiles.close()

    warm_up, cases = json.loads(sys.argv[1])
    for kind, path in warm_up:  # small media through the same code: libraries, codecs
        read(source(kind, path), 2)
    results = {}
    for name, kind, path, batch in cases:
        tiles = source(kind, path)
        gc.collect()
        trim(0)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # the peak (VmHWM) restarts from the current resident set
        before = status("VmRSS")
        read(tiles, batch)
        results[name] = {"grew": status("VmHWM") - before, "bound": tiles.decode_bytes(batch)}
    print(json.dumps(results))
    """
)


def _measure(root, cases):
    """{case: {"grew": peak growth, "bound": decode_bytes}}, in bytes, for cases (name, kind,
    path, batch size) measured one after the other in a new Python process."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError as e:
        pytest.skip(f"peak memory cannot be reset here (Linux only): {e}")
    small = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8))
    small.save(root / "small.jpg")
    warm_up = [("video", str(_solid_video(root / "small.mp4", 64, 48, 2)))]
    warm_up.append(("image", str(root / "small.jpg")))
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps([warm_up, cases])],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_huge_frames_are_never_converted_at_full_size(tmp_path):
    # An 8192x8192 frame: 67 M pixels, 256 MiB as a PIL RGB image. Converting it at full size
    # (the path up to 4K UHD) would peak above 1 GiB (measured: 1,027 MiB); scaled down during
    # the conversion, what remains is mostly the decoder's own YUV frames (1.5 bytes a pixel).
    video = _solid_video(tmp_path / "huge.mp4", 8192, 8192, 1)  # 250 KB
    huge = _measure(tmp_path, [("huge", "video", str(video), 1)])["huge"]
    assert huge["grew"] < 6 * 8192 * 8192, f"{huge['grew'] / MiB:.0f} MiB"
    assert huge["grew"] <= huge["bound"]


@pytest.mark.slow
def test_decode_bytes_bounds_the_measured_peak(tmp_path):
    photo = tmp_path / "photo.jpg"
    small = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8))
    small.resize((4000, 3000), Image.Resampling.BICUBIC).save(photo, quality=90)
    options = {"preset": "superfast", "ref": "3", "bf": "2"}  # reference frames and B-frames
    video = _smooth_video(tmp_path / "hd.mp4", 1920, 1080, 8, options=options, fps=1)
    frames = tmp_path / "frames"
    frames.mkdir()
    for k in range(6):
        small.resize((1920 + 8 * k, 1080), Image.Resampling.BICUBIC).save(frames / f"{k}.jpg")
    cases = [("video", "video", str(video), 4), ("image", "image", str(photo), 4)]
    cases.append(("frame directory", "video", str(frames), 4))
    for case, peak in _measure(tmp_path, cases).items():
        grew, bound = peak["grew"], peak["bound"]
        assert grew <= bound <= 3 * grew, (
            f"{case}: measured {grew / MiB:.0f} MiB, bound {bound / MiB:.0f}"
        )
