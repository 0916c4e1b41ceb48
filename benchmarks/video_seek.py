"""Frame sampling by seeking against decoding every frame up to the last selected one (issue 4).

Writes (once, cached under benchmarks/results/tmp/) a synthetic video: 640x360, 25 fps,
10 minutes, libx264 at its defaults (preset medium, CRF 23, 3 B-frames) except the keyframe
interval, which is --gop frames (default 50: a keyframe every 2 s). Its content moves every frame
(scrolling sine patterns over a fixed noise texture), so no frame is a copy of the previous one.

Then, on the same file and in the same run, alternating the order each repetition:

- seek: `plan_video(path, max_frames=64)` and `iter_video_frames(path, indices)`, which seeks to
  the keyframe before each far selected frame and decodes forward from it;
- sequential: the same plan, then every frame decoded from the start up to the last selected one
  (`iter_video_frames(..., allow_seek=False)`, what the loader did before seeking).

Reports the median seconds of each, the speedup (ratio of the medians, and the median of the
per-repetition ratios, which is steadier on a shared machine), the 1-minute load average before
and after, whether the 64 frames are pixel-identical, and how many seeks the seeking path made
(checked outside the timed runs, so that a silent fallback to sequential decoding cannot pass
for seeking).

    python benchmarks/video_seek.py              # issue 4: 10 min, 64 frames, GOP 50
    python benchmarks/video_seek.py --gop 250    # x264's default keyframe interval (10 s)
    python benchmarks/video_seek.py --quick      # 1 min, 2 repetitions: a smoke run

Prints one JSON object to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import av
import numpy as np

from longvita.processing.video import iter_video_frames, open_video, plan_video
from longvita.processing.video_seek import FrameTable, scan_frame_table, seek_frames
from longvita.testing import encode_frames

CACHE_DIR = Path(__file__).resolve().parent / "results" / "tmp"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_video(path: Path, *, seconds: int, fps: int, gop: int, size: tuple[int, int]) -> None:
    """A libx264 video (x264 defaults but keyint=gop) of moving patterns, written atomically."""
    width, height = size
    num_frames = seconds * fps
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 32, (height, 2 * width, 3), dtype=np.uint8)  # scrolls sideways
    xs = np.arange(width, dtype=np.float32)
    ys = np.arange(height, dtype=np.float32)[:, None]

    def frames():
        for k in range(num_frames):
            phase = k / fps
            pixels = np.empty((height, width, 3), dtype=np.float32)  # [H, W, 3]
            pixels[..., 0] = 110 + 90 * np.sin(xs / 40 + 1.3 * phase)  # [W] over rows
            pixels[..., 1] = 110 + 90 * np.sin(ys / 30 - 0.9 * phase)  # [H, 1] over columns
            pixels[..., 2] = 110 + 90 * np.sin((xs + ys) / 50 + 0.5 * phase)  # [H, W]
            shift = (3 * k) % width
            pixels += texture[:, shift : shift + width]
            pixels[:8, : (k * width) // num_frames + 1] = 255  # a progress bar
            yield av.VideoFrame.from_ndarray(pixels.astype(np.uint8), format="rgb24")
            if k % (60 * fps) == 0:
                _log(f"  encoded {k // fps} s of {seconds} s")

    partial = path.with_suffix(".partial.mp4")
    with av.open(str(partial), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"g": str(gop), "crf": "23"}
        encode_frames(container, stream, frames())
    os.replace(partial, path)


def cached_video(args: argparse.Namespace) -> Path:
    width, height = args.size
    name = f"x264_{width}x{height}_{args.fps}fps_{args.seconds}s_g{args.gop}.mp4"
    path = CACHE_DIR / name
    if not path.is_file():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        _log(f"writing {path} (once; cached)")
        start = time.perf_counter()
        write_video(path, seconds=args.seconds, fps=args.fps, gop=args.gop, size=args.size)
        _log(f"  done in {time.perf_counter() - start:.0f} s")
    return path


def planned_frames(path: Path, max_frames: int, *, allow_seek: bool) -> list:
    """Plan from the headers (probe, select), then decode the selected frames, all at once."""
    indices = plan_video(path, max_frames=max_frames, max_fps=1.0).indices
    return list(iter_video_frames(path, indices, allow_seek=allow_seek))


def sequential_frames(path: Path, max_frames: int) -> list:
    """The loader before seeking: decode every frame up to the last selected one."""
    return planned_frames(path, max_frames, allow_seek=False)


def seeking_frames(path: Path, max_frames: int) -> list:
    return planned_frames(path, max_frames, allow_seek=True)


def count_seeks(path: Path, wanted: list[int], table: FrameTable) -> int:
    """The seeks `seek_frames` makes for wanted (ascending, distinct): its return value."""
    with open_video(str(path)) as (container, stream):
        frames = seek_frames(container, stream, wanted, table)
        while True:
            try:
                next(frames)
            except StopIteration as stop:
                return stop.value


def video_facts(path: Path, max_frames: int) -> dict:
    """Frame count, keyframes, selected indices and the seeks the seeking path makes."""
    plan = plan_video(path, max_frames=max_frames, max_fps=1.0)
    indices = plan.indices
    table = scan_frame_table(str(path))
    if table is None:
        raise SystemExit(f"{path}: no usable frame table, the seeking path would not run")
    num_seeks = count_seeks(path, sorted(set(indices)), table)
    keyframe_gaps = np.diff(table.keyframes)
    return {
        "num_frames": plan.source.num_frames,
        "fps": plan.source.fps,
        "file_mb": round(path.stat().st_size / 1e6, 1),
        "num_keyframes": len(table.keyframes),
        "keyframe_interval_median": float(np.median(keyframe_gaps)) if len(keyframe_gaps) else None,
        "num_selected": len(indices),
        "last_selected_index": max(indices),
        "num_seeks": num_seeks,
    }


def time_paths(path: Path, max_frames: int, repeats: int) -> tuple[dict, bool]:
    paths = {"seek": seeking_frames, "sequential": sequential_frames}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    frames = {name: fn(path, max_frames) for name, fn in paths.items()}  # warm-up, page cache
    identical = len(frames["seek"]) == len(frames["sequential"]) and all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(frames["seek"], frames["sequential"], strict=True)
    )
    for rep in range(repeats):
        order = list(paths) if rep % 2 == 0 else list(reversed(paths))
        for name in order:
            start = time.perf_counter()
            paths[name](path, max_frames)
            seconds[name].append(time.perf_counter() - start)
        _log(f"  rep {rep}: " + ", ".join(f"{n} {seconds[n][-1]:.3f} s" for n in paths))
    return seconds, identical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=600, help="video length (600 = 10 min)")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--gop", type=int, default=50, help="keyframe interval in frames")
    parser.add_argument("--size", type=int, nargs=2, default=(640, 360), metavar=("W", "H"))
    parser.add_argument("--max-frames", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="60 s video, 2 repetitions")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.repeats = 60, 2
    args.size = tuple(args.size)

    path = cached_video(args)
    facts = video_facts(path, args.max_frames)
    _log(f"{path.name}: {facts}")
    load_before = os.getloadavg()[0]
    seconds, identical = time_paths(path, args.max_frames, args.repeats)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    speedup = medians["sequential"] / medians["seek"]
    paired = [b / a for a, b in zip(seconds["seek"], seconds["sequential"], strict=True)]
    result = {
        "video": {
            "codec": "libx264 (preset medium, crf 23, bframes 3)",
            "size": list(args.size),
            "seconds": args.seconds,
            "gop_frames": args.gop,
            **facts,
        },
        "max_frames": args.max_frames,
        "repeats": args.repeats,
        "decoder_threads": f"AUTO ({os.cpu_count()} cores)",
        "seconds_median": {name: round(value, 4) for name, value in medians.items()},
        "seconds_all": {name: [round(v, 4) for v in values] for name, values in seconds.items()},
        "speedup": round(speedup, 2),
        "speedup_paired_median": round(statistics.median(paired), 2),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "frames_identical": identical,
        "target_5x_met": bool(identical and speedup >= 5.0),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
