"""Training data throughput and packing efficiency on a realistic mix (issue 4).

Data set, written once and cached under benchmarks/results/tmp/data_throughput/ (JSONL files in
the official format, a mixture YAML with one group per kind, ratio 1):

- text: conversations of 1-3 turns, questions of 8-40 words, answers of 30-400 words;
- image: one JPEG per sample (quality 90, a pool of --num-distinct-images files): half are
  640x480 (official tiling: a 4x3 grid, 12 tiles + thumbnail), the rest 640 px on the long side
  in other aspect ratios (640x640 -> 2x2, 640x320 -> 2x1, 320x640 -> 1x2, 480x480 -> 1x1), so
  the mix covers 1 to 12 tiles;
- video: one 60 s, 640x360, 25 fps libx264 video per sample (keyframe every 2 s; a pool of
  --num-distinct-videos files), 64 frames each (max_frames 64 at fps 2:
  step = max(25 / 2, 1500 / 65) = 23.08).

The samples go through the real pipeline: `PackedLoader` (mixture order, `SampleReader`, the
Processor with the official 448-px vision settings, `long_vita_14b().vision`, and a Qwen2
tokenizer: the tiny byte-level one from `longvita.testing` unless --tokenizer names another),
packed across sources (stages 3-4) into --seq-len token sequences, one epoch, with 0 and 2
DataLoader workers. Reports samples/s and tokens/s (non-pad tokens) over the epoch's wall time.

Packing efficiency (share of non-pad tokens) is reported twice: the loader's own epoch summary
(which includes the partly filled bins flushed at the end of the epoch, per worker), and the
steady state of a long run: the token counts of the samples just encoded, replayed through the
same `GreedyPacker` over --replay-epochs shuffled epochs, full sequences only, for both packing
modes and --replay-bins open bins per pool (official: 1 per source, 2 across sources).

    python benchmarks/data_throughput.py            # issue 4: ~8 min on 2 busy cores (+ data once)
    python benchmarks/data_throughput.py --quick    # a smoke run on a few samples

Prints one JSON object to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from video_seek import write_video

from longvita.config import long_vita_14b
from longvita.data.config import DataConfig
from longvita.data.loader import PackedLoader
from longvita.data.mixture import Mixture
from longvita.data.packing import DEFAULT_NUM_BINS, PACKING_MODES, GreedyPacker
from longvita.processing.processor import Processor
from longvita.testing import (
    conversation,
    make_image,
    write_jsonl,
    write_mixture,
    write_tiny_tokenizer,
)

DATA_DIR = Path(__file__).resolve().parent / "results" / "tmp" / "data_throughput"
IMAGE_SIZES = [(640, 480)] * 4 + [(640, 640), (640, 320), (320, 640), (480, 480)]
WORDS = " ".join(
    [
        "the a of and to in is it that on for with as was by at an be this from or which are",
        "one video frame image picture scene person car street tree sky water left right top",
        "bottom red blue green small large bright dark moving standing sitting holding looking",
        "table first then after before while because shows appears there their about into over",
        "under describe what where when how many colour shape text sign window door building",
    ]
).split()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _text(rng: np.random.Generator, low: int, high: int) -> str:
    words = rng.choice(WORDS, size=int(rng.integers(low, high + 1)))
    return " ".join(words).capitalize() + "."


def _records(kind: str, count: int, media: list[str], rng: np.random.Generator) -> list[dict]:
    records = []
    for k in range(count):
        question = _text(rng, 8, 40)
        if kind == "text":
            answers = [_text(rng, 30, 400) for _ in range(int(rng.integers(1, 4)))]
            records.append(conversation(question, answers))
            continue
        tag, path = f"<{kind}>", media[k % len(media)]
        records.append(
            conversation(
                f"{tag}\n{question}",
                _text(rng, 30, 200),
                images=[path] if kind == "image" else (),
                videos=[path] if kind == "video" else (),
            )
        )
    return records


def build_data(args: argparse.Namespace, data_dir: Path) -> Path:
    """The data set of args under data_dir (reused when its recipe is unchanged)."""
    recipe = {
        k: getattr(args, k)
        for k in ("num_text", "num_image", "num_video", "num_distinct_images")
        + ("num_distinct_videos", "video_seconds")
    }
    marker = data_dir / "recipe.json"
    mixture = data_dir / "mixture.yaml"
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return mixture
    media = data_dir / "media"
    media.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(data_dir / "tokenizer")
    images = []
    for k in range(args.num_distinct_images):
        path = media / f"image_{k:03d}.jpg"
        make_image(path, IMAGE_SIZES[k % len(IMAGE_SIZES)], seed=k)
        Image.open(path).convert("RGB").save(path, quality=90)
        images.append(path.relative_to(data_dir).as_posix())
    videos = []
    for k in range(args.num_distinct_videos):
        path = media / f"video_{k:02d}.mp4"
        if not path.is_file():
            _log(f"writing {path} ({args.video_seconds} s)")
            write_video(path, seconds=args.video_seconds, fps=25, gop=50, size=(640, 360))
        videos.append(path.relative_to(data_dir).as_posix())
    rng = np.random.default_rng(0)
    counts = {"text": args.num_text, "image": args.num_image, "video": args.num_video}
    pools = {"text": [], "image": images, "video": videos}
    groups = {}
    for kind, count in counts.items():
        write_jsonl(data_dir / f"{kind}.jsonl", _records(kind, count, pools[kind], rng))
        groups[kind] = {"ratio": 1.0, "data_paths": [f"{kind}.jsonl"]}
    write_mixture(mixture, groups)
    marker.write_text(json.dumps(recipe))
    return mixture


def run_epoch(mixture: Mixture, processor: Processor, config: DataConfig, lengths=None) -> dict:
    """One epoch through PackedLoader; lengths, if given, collects (source, tokens, seconds to
    read and encode) per sample (only with num_workers 0: the samples are read in this process)."""
    loader = PackedLoader(mixture, processor, config)
    if lengths is not None:
        assert config.num_workers == 0
        read = loader.reader.read

        def recording_read(record_id, stats, on_length=None):
            start = time.perf_counter()
            sample = read(record_id, stats, on_length)
            if sample is not None:
                seconds = time.perf_counter() - start
                lengths.append((sample.source, sample.num_tokens, seconds))
            return sample

        loader.reader.read = recording_read
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    first = None
    num_sequences = num_tiles = 0
    for packed in loader:
        first = first or time.perf_counter() - start
        num_sequences += 1
        num_tiles += packed.num_tiles
        if num_sequences % 10 == 0:
            _log(f"  {num_sequences} sequences, {time.perf_counter() - start:.0f} s")
    seconds = time.perf_counter() - start
    summary = loader.epoch_summaries[0]
    assert summary.num_sequences == num_sequences
    return {
        "num_workers": config.num_workers,
        "seconds": round(seconds, 2),
        "first_sequence_s": round(first or 0.0, 2),
        "samples": summary.num_samples,
        "sequences": num_sequences,
        "tokens": summary.num_tokens,
        "tiles": num_tiles,
        "samples_per_s": round(summary.num_samples / seconds, 2),
        "tokens_per_s": round(summary.num_tokens / seconds),
        "epoch_packing_efficiency": round(summary.packing_efficiency, 4),
        "skipped": dict(summary.skipped),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "samples_per_group": dict(summary.samples_per_group),
    }


def replay_efficiency(
    lengths: list[tuple], *, seq_len: int, mode: str, num_bins: int, epochs: int
) -> dict:
    """Non-pad share of the full sequences GreedyPacker makes of lengths over shuffled epochs."""
    packer = GreedyPacker(seq_len, mode=mode, num_bins=num_bins)
    rng = np.random.default_rng(0)
    num_tokens = num_sequences = 0
    for _ in range(epochs):
        for i in rng.permutation(len(lengths)):
            source, length, _ = lengths[i]
            for full in packer.add(None, num_tokens=length, key=source):
                num_tokens += full.num_tokens
                num_sequences += 1
    return {
        "sequences": num_sequences,
        "efficiency": round(num_tokens / (num_sequences * seq_len), 4),
    }


def per_kind(lengths: list[tuple]) -> dict:
    """Samples, tokens (mean, min, max) and mean read + encode milliseconds per kind."""
    by_kind: dict[str, list[tuple[int, float]]] = {}
    for source, length, seconds in lengths:
        by_kind.setdefault(Path(source).stem, []).append((length, seconds))
    summary = {}
    for kind, rows in sorted(by_kind.items()):
        tokens = [n for n, _ in rows]
        summary[kind] = {
            "samples": len(rows),
            "tokens_mean": round(float(np.mean(tokens))),
            "tokens_min": min(tokens),
            "tokens_max": max(tokens),
            "encode_ms_mean": round(1000 * float(np.mean([s for _, s in rows])), 1),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-text", type=int, default=600)
    parser.add_argument("--num-image", type=int, default=300)
    parser.add_argument("--num-video", type=int, default=48)
    parser.add_argument("--num-distinct-images", type=int, default=32)
    parser.add_argument("--num-distinct-videos", type=int, default=4)
    parser.add_argument("--video-seconds", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--replay-epochs", type=int, default=20)
    parser.add_argument("--replay-bins", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: tiny BPE)")
    parser.add_argument("--quick", action="store_true", help="a few samples of each kind")
    args = parser.parse_args()
    data_dir = DATA_DIR
    if args.quick:
        args.num_text, args.num_image, args.num_video = 30, 15, 3
        args.num_distinct_images, args.num_distinct_videos = 8, 1
        data_dir = DATA_DIR.with_name(DATA_DIR.name + "_quick")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    mixture_path = build_data(args, data_dir)
    tokenizer = args.tokenizer or data_dir / "tokenizer"
    processor = Processor.from_pretrained(tokenizer, long_vita_14b().vision)
    mixture = Mixture.from_yaml(mixture_path, data_root=data_dir, seed=0)
    runs, lengths = [], []
    for workers in args.workers:
        _log(f"epoch of {len(mixture)} samples with {workers} workers")
        config = DataConfig(
            seq_len=args.seq_len,
            packing="cross_source",
            max_frames=64,
            fps=2.0,
            num_epochs=1,
            num_workers=workers,
        )
        runs.append(run_epoch(mixture, processor, config, lengths if workers == 0 else None))
        _log(f"  {runs[-1]}")
    result = {
        "data": {
            "samples": {"text": args.num_text, "image": args.num_image, "video": args.num_video},
            "distinct_files": {
                "images": args.num_distinct_images,
                "videos": args.num_distinct_videos,
            },
            "video": f"{args.video_seconds} s 640x360 25 fps libx264 GOP 50, 64 frames (fps 2)",
            "tokenizer": str(tokenizer),
            "tile": "448 px, 256 tokens (long_vita_14b().vision), max 12 tiles + thumbnail",
        },
        "seq_len": args.seq_len,
        "packing": "cross_source",
        "cores": os.cpu_count(),
        "runs": runs,
    }
    if lengths:
        result["per_kind_workers_0"] = per_kind(lengths)
        result["steady_state_packing_efficiency"] = {
            mode: {
                f"num_bins={n}" + (" (default)" if n == DEFAULT_NUM_BINS[mode] else ""): (
                    replay_efficiency(
                        lengths,
                        seq_len=args.seq_len,
                        mode=mode,
                        num_bins=n,
                        epochs=args.replay_epochs,
                    )
                )
                for n in args.replay_bins
            }
            for mode in PACKING_MODES
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
