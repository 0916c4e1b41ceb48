"""Video frame selection and decoding (longvita.processing.video, processing.video_seek), on
synthetic videos."""

import re
from fractions import Fraction

import av
import numpy as np
import pytest

from longvita.errors import MediaError
from longvita.processing.video import (
    frame_dir_indices,
    frame_to_image,
    iter_video_frames,
    open_video,
    plan_video,
    video_frame_indices,
)
from longvita.processing.video_seek import FrameTable, SeekMismatch, scan_frame_table, seek_frames
from longvita.testing import encode_frames

GRAY_STEP = 8  # frame k is a solid gray of level GRAY_STEP * k


@pytest.mark.parametrize(
    ("num_frames", "fps", "max_frames", "max_fps", "expected"),
    [
        # step = max(25/1, 100/9 = 11.1) = 25
        (100, 25.0, 8, 1.0, [0, 25, 50, 75]),
        # step = max(30, 300/5 = 60) = 60
        (300, 30.0, 4, 1.0, [0, 60, 120, 180]),
        # step = max(1, 10/4097) = 1: every frame
        (10, 1.0, 4096, 1.0, list(range(10))),
        # step = max(30/2 = 15, 100/4097) = 15
        (100, 30.0, 4096, 2.0, [0, 15, 30, 45, 60, 75, 90]),
        # step = max(1, 1000/4 = 250) = 250: the last frame taken is 750 (the known defect)
        (1000, 1.0, 3, 1.0, [0, 250, 500]),
        # step = max(0.5, 4/9) = 0.5: frames repeat when the video is slower than max_fps
        (4, 1.0, 8, 2.0, [0, 0, 1, 1, 2, 2, 3, 3]),
        # step = max(29.97, 10/5) = 29.97: only frame 0 is inside the video
        (10, 29.97, 4, 1.0, [0]),
    ],
)
def test_video_frame_indices(num_frames, fps, max_frames, max_fps, expected):
    assert video_frame_indices(num_frames, fps, max_frames=max_frames, max_fps=max_fps) == expected


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"fps": 0.0, "max_frames": 4, "max_fps": 1.0}, "fps"),
        ({"fps": 30.0, "max_frames": 0, "max_fps": 1.0}, "max_frames"),
        ({"fps": 30.0, "max_frames": 4, "max_fps": 0.0}, "max_fps"),
    ],
)
def test_video_frame_indices_rejects_bad_values(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        video_frame_indices(100, **kwargs)


@pytest.mark.parametrize(
    ("num_files", "max_frames", "max_fps", "expected"),
    [
        (10, 4, 1.0, [0, 2, 4, 6]),  # target 4, stride int(10/4) = 2
        (5, 4096, 1.0, [0, 1, 2, 3, 4]),  # target 5, stride 1
        (10, 4096, 0.5, [0, 2, 4, 6, 8]),  # target int(5.0) = 5, stride 2
        (7, 3, 1.0, [0, 2, 4]),  # target 3, stride int(7/3) = 2
    ],
)
def test_frame_dir_indices(num_files, max_frames, max_fps, expected):
    assert frame_dir_indices(num_files, max_frames=max_frames, max_fps=max_fps) == expected


def test_frame_dir_indices_rejects_empty_target():
    with pytest.raises(ValueError, match="num_files=1"):
        frame_dir_indices(1, max_frames=4, max_fps=0.5)  # target int(0.5) = 0


def _decode(path, indices, *, allow_seek=True):
    """Every frame `iter_video_frames` yields for indices, at once."""
    return list(iter_video_frames(path, indices, allow_seek=allow_seek))


def _planned_frames(path, **limits):
    """The frames `plan_video` selects, decoded: what the Processor streams into tiles."""
    return _decode(path, plan_video(path, **limits).indices)


def _rgb_frame(pixels):
    return av.VideoFrame.from_ndarray(pixels, format="rgb24")


def _write_video(path, num_frames, fps):
    """Solid gray frames (level GRAY_STEP * k), mpeg4 at a high bit rate so levels survive."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        stream.bit_rate = 20_000_000
        pixels = (np.full((24, 32, 3), GRAY_STEP * k, dtype=np.uint8) for k in range(num_frames))
        encode_frames(container, stream, (_rgb_frame(p) for p in pixels))
    return path


def _frame_numbers(frames):
    return [round(float(np.asarray(f).mean()) / GRAY_STEP) for f in frames]


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_planned_frames_from_file(tmp_path, suffix):
    # 24 frames at 4 fps, max_fps 1: step = max(4, 24/9) = 4 -> [0, 4, 8, 12, 16, 20]
    path = _write_video(tmp_path / f"clip{suffix}", 24, 4)
    frames = _planned_frames(path, max_frames=8, max_fps=1.0)
    assert all(f.mode == "RGB" and f.size == (32, 24) for f in frames)
    assert _frame_numbers(frames) == [0, 4, 8, 12, 16, 20]


def test_mkv_has_no_frame_count_header(tmp_path):
    # Matroska leaves stream.frames at 0, so the loader must count packets instead.
    path = _write_video(tmp_path / "clip.mkv", 5, 4)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    assert len(_planned_frames(path)) == 2  # step = max(4, 5/4097) = 4 -> [0, 4]


def test_planned_frames_long_video_and_repeats(tmp_path):
    path = _write_video(tmp_path / "clip.mp4", 30, 2)
    # step = max(2/1, 30/5) = 6 -> [0, 6, 12, 18]: frames 19..29 are never seen (known defect)
    assert _frame_numbers(_planned_frames(path, max_frames=4)) == [0, 6, 12, 18]
    # step = max(2/4, 30/101) = 0.5 -> int(k/2) for k < 100, kept while < 30: each frame twice
    frames = _planned_frames(path, max_frames=100, max_fps=4.0)
    assert _frame_numbers(frames) == [k // 2 for k in range(60)]


def test_planned_frames_missing_path(tmp_path):
    with pytest.raises(MediaError, match="nothing.mp4"):
        _planned_frames(tmp_path / "nothing.mp4")


def test_planned_frames_garbage_file(tmp_path):
    path = tmp_path / "garbage.mp4"
    path.write_bytes(b"definitely not a video container" * 10)
    with pytest.raises(MediaError, match="garbage.mp4"):
        _planned_frames(path)


def test_a_codec_without_a_decoder_is_a_media_error(tmp_path):
    """PyAV opens such a stream with no codec context (an unknown Matroska codec, an .svg)."""
    path = _write_video(tmp_path / "clip.mkv", 4, 4)
    data = path.read_bytes()
    assert b"V_MPEG4/ISO/ASP" in data
    path.write_bytes(data.replace(b"V_MPEG4/ISO/ASP", b"V_MPEG4/ISO/XYZ"))  # same length
    with pytest.raises(MediaError, match=r"clip.mkv'.*codec has no decoder.*re-encode it"):
        _planned_frames(path)


def test_planned_frames_audio_only_file(tmp_path):
    path = tmp_path / "sound.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), np.int16), format="s16", layout="mono"
        )
        frame.sample_rate = 8000
        encode_frames(container, stream, [frame])
    with pytest.raises(MediaError, match="no video stream"):
        _planned_frames(path)


# --- decoding by seeking: the same pixels as sequential decoding ---------------------------------

CODE_SIZE = (64, 48)  # frame k carries k in binary: 12 black/white 16x16 blocks, row-major


def _coded_pixels(k):
    width, height = CODE_SIZE
    pixels = np.zeros((height, width, 3), dtype=np.uint8)  # [H, W, 3]
    for bit in range(12):
        if k >> bit & 1:
            row, col = divmod(bit, 4)
            pixels[16 * row : 16 * row + 16, 16 * col : 16 * col + 16] = 255
    pixels[..., 2] = (7 * k) % 200  # the blue plane changes every frame
    return pixels


def _coded_numbers(frames):
    arrays = [np.asarray(f) for f in frames]
    return [
        sum(1 << b for b in range(12) if a[16 * (b // 4) + 8, 16 * (b % 4) + 8, 0] > 128)
        for a in arrays
    ]


def _write_coded_video(path, *, codec, gop, bframes, keyframes=(), num_frames=240, fmt=None):
    """Frames 0..num_frames-1 (see _coded_pixels) at 25 fps; a keyframe every gop frames (scene
    cut detection off) and at each index in keyframes (forced IDR frames)."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height = CODE_SIZE
        stream.pix_fmt = "yuv420p"
        options = {"g": str(gop), "bf": str(bframes)}
        if codec == "libx264":
            options |= {"forced-idr": "1", "x264-params": "scenecut=0"}
        else:
            options |= {"sc_threshold": "1000000000"}
            stream.bit_rate = 2_000_000
        stream.options = options

        def frames():
            for k in range(num_frames):
                frame = _rgb_frame(_coded_pixels(k))
                if k in keyframes:
                    frame.pict_type = av.video.frame.PictureType.I
                yield frame

        encode_frames(container, stream, frames())
    return path


def _has_reordered_frames(path):
    """Whether some packet is presented before the packet decoded just before it (B-frames)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        pts = [p.pts for p in container.demux(stream) if p.size > 0]
    return any(b < a for a, b in zip(pts, pts[1:], strict=False))


def _assert_same_pixels(frames, expected):
    assert len(frames) == len(expected)
    for got, want in zip(frames, expected, strict=True):
        assert got.mode == want.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


CODED_VIDEOS = {
    # name: (file name, encoder settings, keyframe indices the table must show)
    "mpeg4-gop12": ("a.mp4", dict(codec="mpeg4", gop=12, bframes=0), list(range(0, 240, 12))),
    "mpeg4-bframes-gop12": ("b.mkv", dict(codec="mpeg4", gop=12, bframes=2), None),
    "x264-bframes-gop12": ("c.mp4", dict(codec="libx264", gop=12, bframes=3), None),
    "x264-bframes-gop60": ("d.mkv", dict(codec="libx264", gop=60, bframes=3), [0, 60, 120, 180]),
    "x264-bframes-irregular": (
        "e.mp4",
        dict(codec="libx264", gop=100, bframes=3, keyframes={17, 40, 41, 150, 151, 200}),
        [0, 17, 40, 41, 141, 150, 151, 200],
    ),
}
INDEX_SETS = [
    video_frame_indices(240, 25.0, max_frames=8, max_fps=1.0),  # [0, 26, 53, ..., 186]
    [3, 4, 5, 100, 101, 150, 239],  # near and far frames, the last frame
    [239],  # straight to the end: the decoder is flushed
    [0, 0, 50, 50, 51, 200, 200],  # repeats
    sorted(np.random.default_rng(0).choice(240, size=20, replace=False).tolist()),
]


@pytest.fixture(scope="module", params=list(CODED_VIDEOS))
def coded_video(request, tmp_path_factory):
    name, settings, keyframes = CODED_VIDEOS[request.param]
    path = _write_coded_video(tmp_path_factory.mktemp("coded") / name, **settings)
    return path, settings, keyframes


def test_frame_table_of_coded_videos(coded_video):
    path, settings, keyframes = coded_video
    table = scan_frame_table(str(path))
    assert table is not None and len(table.pts) == 240
    assert table.pts == sorted(table.pts)
    if keyframes is not None:
        assert table.keyframes == keyframes
    gaps = np.diff(table.keyframes)
    assert gaps.max() >= 12 and table.keyframe_before(239) == table.keyframes[-1]
    if settings["codec"] == "libx264" or settings["bframes"]:
        assert _has_reordered_frames(path), "the encoder wrote no B-frame: test is vacuous"


def _decode_seeking(path, wanted, table):
    """({index: RGB image} decoded by the seeking path alone, its number of seeks)."""
    images = {}
    with open_video(str(path)) as (container, stream):  # the decoder iter_video_frames opens
        frames = seek_frames(container, stream, wanted, table)
        while True:
            try:
                index, frame = next(frames)
            except StopIteration as stop:
                return images, stop.value
            images[index] = frame_to_image(frame)


def _decode_sequential(path, wanted):
    """{index: frame} decoded from the start, without seeking."""
    return dict(zip(wanted, _decode(path, wanted, allow_seek=False), strict=True))


@pytest.mark.parametrize("indices", INDEX_SETS, ids=lambda i: f"{len(i)}-frames")
def test_seeking_gives_the_pixels_of_sequential_decoding(coded_video, indices):
    path, _settings, _keyframes = coded_video
    wanted = sorted(set(indices))
    sequential = _decode_sequential(path, wanted)
    assert _coded_numbers(sequential[i] for i in wanted) == wanted

    seeking, num_seeks = _decode_seeking(path, wanted, scan_frame_table(str(path)))
    assert num_seeks > 0  # every set has a frame far past the previous one: no silent fallback
    _assert_same_pixels([seeking[i] for i in wanted], [sequential[i] for i in wanted])

    frames = _decode(path, indices)  # the public path, repeats kept
    assert _coded_numbers(frames) == sorted(indices)
    _assert_same_pixels(frames, _decode(path, indices, allow_seek=False))


def test_planned_frames_seek_long_gop(tmp_path, caplog):
    path = _write_coded_video(tmp_path / "long.mp4", codec="libx264", gop=60, bframes=3)
    # 240 frames at 25 fps: step = max(25, 240/9) = 26.67 -> [0, 26, 53, 80, 106, 133, 160, 186]
    with caplog.at_level("DEBUG", logger="longvita.processing.video_seek"):
        frames = _planned_frames(path, max_frames=8)
    assert _coded_numbers(frames) == [0, 26, 53, 80, 106, 133, 160, 186]
    # keyframes 0, 60, 120, 180: only keyframe 180 is more than SEEK_MIN_SKIP = 16 frames past
    # the frame decoded before (160), so frame 186 is reached by a seek, the others by decoding on
    assert any(re.search(r": 8 frames in 1 seeks$", r.getMessage()) for r in caplog.records)


def test_variable_frame_rate_seeks_by_table(tmp_path):
    # Frame durations of 20-119 ms: no constant-rate formula gives a frame's pts, the table does.
    durations = np.random.default_rng(0).integers(20, 120, 240)
    frame_pts = np.cumsum(durations).tolist()
    path = tmp_path / "vfr.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height = CODE_SIZE
        stream.pix_fmt = "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"g": "30", "bf": "3", "x264-params": "scenecut=0"}
        frames = [_rgb_frame(_coded_pixels(k)) for k in range(len(frame_pts))]
        for frame, pts in zip(frames, frame_pts, strict=True):
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
        encode_frames(container, stream, frames)
    table = scan_frame_table(str(path))
    assert table.pts == frame_pts and table.keyframes == list(range(0, 240, 30))
    wanted = [0, 50, 100, 150, 239]
    seeking, num_seeks = _decode_seeking(path, wanted, table)
    assert num_seeks == 4 and _coded_numbers(seeking[i] for i in wanted) == wanted
    sequential = _decode_sequential(path, wanted)
    _assert_same_pixels([seeking[i] for i in wanted], [sequential[i] for i in wanted])


def test_dense_indices_skip_the_frame_table(tmp_path, monkeypatch):
    path = _write_coded_video(tmp_path / "dense.mp4", codec="libx264", gop=12, bframes=3)

    def no_scan(path):
        raise AssertionError("dense indices must decode sequentially without a demux pass")

    monkeypatch.setattr("longvita.processing.video.scan_frame_table", no_scan)
    assert _coded_numbers(_decode(path, range(0, 100, 10))) == list(range(0, 100, 10))


def test_stream_without_timestamps_decodes_sequentially(tmp_path):
    # A raw H.264 stream: packets carry no pts, so there is no frame table to seek with.
    path = _write_coded_video(tmp_path / "raw.h264", codec="libx264", gop=12, bframes=3, fmt="h264")
    assert scan_frame_table(str(path)) is None
    indices = [0, 50, 120, 239]
    frames = _decode(path, indices)
    assert _coded_numbers(frames) == indices
    _assert_same_pixels(frames, _decode(path, indices, allow_seek=False))


def test_unpredicted_frame_falls_back_to_sequential(tmp_path, monkeypatch):
    path = _write_coded_video(tmp_path / "clip.mp4", codec="libx264", gop=12, bframes=3)
    table = scan_frame_table(str(path))
    # A table that misses frame 50's pts (as if its packet decoded to nothing): to reach frame
    # 55 it seeks to keyframe 48, then sees frame 50 where the table expects frame 51's pts.
    # (A wrong table is caught only where the seeking path decodes through the error.)
    pts = table.pts[:50] + table.pts[51:]
    wrong = FrameTable(
        pts=pts,
        keyframes=[k - (k > 50) for k in table.keyframes],
        keyframe_at_pts={p: k - (k > 50) for p, k in table.keyframe_at_pts.items()},
    )
    with pytest.raises(SeekMismatch):
        _decode_seeking(path, [0, 55], wrong)
    monkeypatch.setattr("longvita.processing.video.scan_frame_table", lambda path: wrong)
    assert _coded_numbers(_decode(path, [0, 55])) == [0, 55]


def test_iter_video_frames_bad_input(tmp_path):
    path = tmp_path / "garbage.mkv"
    path.write_bytes(b"\x1a\x45\xdf\xa3 not really matroska" * 100)
    with pytest.raises(MediaError, match="garbage.mkv"):
        _decode(path, [0, 100])
    truncated = _write_coded_video(tmp_path / "cut.mp4", codec="libx264", gop=12, bframes=3)
    truncated.write_bytes(truncated.read_bytes()[:2000])  # the index (moov) is at the end: lost
    with pytest.raises(MediaError, match="cut.mp4"):
        _planned_frames(truncated, max_frames=8)
    assert _decode(path, []) == []


def test_allow_seek_false_never_scans_or_seeks(tmp_path, monkeypatch):
    path = _write_coded_video(tmp_path / "sparse.mp4", codec="libx264", gop=12, bframes=3)

    def no_scan(path):
        raise AssertionError("allow_seek=False must decode sequentially without a demux pass")

    monkeypatch.setattr("longvita.processing.video.scan_frame_table", no_scan)
    frames = _decode(path, [0, 120, 239], allow_seek=False)
    assert _coded_numbers(frames) == [0, 120, 239]
