"""Video frame selection and decoding (longvita.processing.video), on synthetic videos."""

import re

import av
import numpy as np
import pytest
from PIL import Image

from longvita.errors import MediaError
from longvita.processing.video import (
    frame_dir_indices,
    list_frame_files,
    load_video_frames,
    video_frame_indices,
)

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


def _gray(level, size=(32, 24)):
    return Image.new("RGB", size, (level, level, level))


def test_list_frame_files_natural_recursive(tmp_path):
    for name in ["frame10.jpg", "frame2.jpg", "frame1.png", "notes.txt", "frame3.JPG"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "frame0.jpeg").write_bytes(b"")
    names = [p.relative_to(tmp_path).as_posix() for p in list_frame_files(tmp_path)]
    # ".JPG" is skipped: the suffix match is case-sensitive, as in the official code
    assert names == ["frame1.png", "frame2.jpg", "frame10.jpg", "sub/frame0.jpeg"]


def test_load_video_frames_from_directory(tmp_path):
    for k in range(10):
        _gray(GRAY_STEP * k).save(tmp_path / f"img_{k}.png")
    frames = load_video_frames(tmp_path, max_frames=4)  # indices [0, 2, 4, 6]
    assert [f.mode for f in frames] == ["RGB"] * 4
    assert [f.getpixel((0, 0))[0] for f in frames] == [0, 16, 32, 48]


def test_load_video_frames_empty_directory(tmp_path):
    (tmp_path / "readme.txt").write_text("no frames here")
    with pytest.raises(MediaError, match=re.escape(str(tmp_path))):
        load_video_frames(tmp_path)


def _write_video(path, num_frames, fps):
    """Solid gray frames (level GRAY_STEP * k), mpeg4 at a high bit rate so levels survive."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        stream.bit_rate = 20_000_000
        for k in range(num_frames):
            pixels = np.full((24, 32, 3), GRAY_STEP * k, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _frame_numbers(frames):
    return [round(float(np.asarray(f).mean()) / GRAY_STEP) for f in frames]


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_load_video_frames_from_file(tmp_path, suffix):
    # 24 frames at 4 fps, max_fps 1: step = max(4, 24/9) = 4 -> [0, 4, 8, 12, 16, 20]
    path = _write_video(tmp_path / f"clip{suffix}", 24, 4)
    frames = load_video_frames(path, max_frames=8, max_fps=1.0)
    assert all(f.mode == "RGB" and f.size == (32, 24) for f in frames)
    assert _frame_numbers(frames) == [0, 4, 8, 12, 16, 20]


def test_mkv_has_no_frame_count_header(tmp_path):
    # Matroska leaves stream.frames at 0, so the loader must count packets instead.
    path = _write_video(tmp_path / "clip.mkv", 5, 4)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    assert len(load_video_frames(path)) == 2  # step = max(4, 5/4097) = 4 -> [0, 4]


def test_load_video_frames_long_video_and_repeats(tmp_path):
    path = _write_video(tmp_path / "clip.mp4", 30, 2)
    # step = max(2/1, 30/5) = 6 -> [0, 6, 12, 18]: frames 19..29 are never seen (known defect)
    assert _frame_numbers(load_video_frames(path, max_frames=4)) == [0, 6, 12, 18]
    # step = max(2/4, 30/101) = 0.5 -> int(k/2) for k < 100, kept while < 30: each frame twice
    frames = load_video_frames(path, max_frames=100, max_fps=4.0)
    assert _frame_numbers(frames) == [k // 2 for k in range(60)]


def test_load_video_frames_missing_path(tmp_path):
    with pytest.raises(MediaError, match="nothing.mp4"):
        load_video_frames(tmp_path / "nothing.mp4")


def test_load_video_frames_garbage_file(tmp_path):
    path = tmp_path / "garbage.mp4"
    path.write_bytes(b"definitely not a video container" * 10)
    with pytest.raises(MediaError, match="garbage.mp4"):
        load_video_frames(path)


def test_load_video_frames_audio_only_file(tmp_path):
    path = tmp_path / "sound.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), np.int16), format="s16", layout="mono"
        )
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(MediaError, match="no video stream"):
        load_video_frames(path)
