"""Many questions about one long video: time to first token of the second question, with the
first question's keys and values reused (the prefix cache), against the first question.

The benchmark model of `long_context.py` (random weights: hidden 1,024, 8 layers, 16 query / 4
KV heads, vocab 152,064, fp32) with its 1-layer stub ViT (56-pixel tiles, 4 tokens per frame,
6 with the frame's delimiters), written by `make_tiny_checkpoint`. The video is synthetic
(`make_video`: 640x360 MPEG-4 at 1 fps, so every frame is taken), `--frames` long. The first
question is "<video>\\nWhat happens in this video?", the second "<video>\\nWhat colour is the
bar at the end?": they share everything up to the question.

Per frame count, all side by side in one run:
- one process (`longvita.load(..., prefix_cache_dir=DIR)`): a warm-up, the first question cold
  (decode every frame, ViT, prefill; its keys and values kept in memory and written to DIR at
  the end), the second question (in-memory hit), then the second question cold on the same
  model with the cache off (the same work as the first: the tokens must match the hit's);
- a second process: the second question, read from DIR (disk hit: no frame decoded);
- the same two processes at `--cp 2` (`parallel.launch`, one thread per rank): each rank
  writes and reads its own shard.
Time to first token is wall time from `Pipeline.stream` / `Pipeline.open` (prompt planning,
media hashing, lookup and copy included) to the first token; every measurement is a fresh
process with the weights loaded and warmed up before. Disk bytes are the cache files of the
first question's prompt (all ranks).

    python benchmarks/prefix_cache.py                 # 256 / 1,024 / 4,096 frames, cp 1 and 2
    python benchmarks/prefix_cache.py --quick         # small model and videos, ~1 min

Prints one JSON object to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import LONG_CONTEXT_MODEL, add_model_flags, random_checkpoint

FIRST = "<video>\nWhat happens in this video?"
SECOND = "<video>\nWhat colour is the bar at the end?"
MAX_NEW_TOKENS = 8
VIDEO_SIZE = (640, 360)


# -- one question, timed ---------------------------------------------------------------------


def ask(pipe, question: str, video: str, *, state=None) -> dict:
    """Time to first token and what the answer says about the prefix cache."""
    from longvita.infer.request import GenerationRequest

    request = GenerationRequest.create(question, videos=[video], max_new_tokens=MAX_NEW_TOKENS)
    started = time.perf_counter()
    stream = pipe.open(request, state=state)
    first = None
    for step in stream:
        if first is None and step.token_id is not None:
            first = time.perf_counter() - started
    total = time.perf_counter() - started
    out = stream.output
    return {
        "ttft_seconds": round(total if first is None else first, 3),
        "total_seconds": round(total, 3),
        "prefill_seconds": round(out.prefill_seconds, 3),
        "prompt_tokens": out.prompt_tokens,
        "cached_tokens": out.cached_tokens,
        "tiles_encoded": sum(out.tiles_encoded_per_rank),
        "tokens": out.token_ids,
    }


def load(checkpoint: str, cache_dir: str, device: str, *, memory: bool, state=None):
    """The pipeline with its prefix cache (in memory when `memory`, and in `cache_dir`), its
    weights resident and its kernels and collectives warmed up without the cache."""
    import longvita
    from longvita.infer.request import GenerationRequest

    budget = None if memory else 0
    pipe = longvita.load(
        checkpoint, device=device, prefix_cache_bytes=budget, prefix_cache_dir=cache_dir
    )
    for tensor in pipe.model.state_dict().values():  # every page of the weights resident
        tensor.sum()
    warm_up = GenerationRequest.create("Warm up the kernels.", max_new_tokens=2)
    cold_pipeline(pipe).open(warm_up, state=state).run()
    return pipe


def cold_pipeline(pipe):
    """The same model and processor without a prefix cache."""
    from longvita.infer.pipeline import Pipeline
    from longvita.infer.prefix_cache import PrefixCache

    tokens_per_tile = pipe.config.vision.tokens_per_tile
    cache = PrefixCache(max_bytes=0, tokens_per_tile=tokens_per_tile)
    return Pipeline(pipe.model, pipe.processor, prefix_cache=cache)


def ask_first_then_second(pipe, video: str, *, state=None) -> dict:
    """The first question (cold, written to the cache directory), then the second from
    memory, not written: the second process asks it for the first time."""
    first = ask(pipe, FIRST, video, state=state)
    pipe.prefix_cache.disk = None
    return {"first": first, "second_memory": ask(pipe, SECOND, video, state=state)}


def run_first(args: argparse.Namespace) -> dict:
    """Process 1: first question cold, second from memory, second cold."""
    pipe = load(args.checkpoint, args.cache_dir, args.device, memory=True)
    runs = ask_first_then_second(pipe, args.video)
    return runs | {"second_cold": ask(cold_pipeline(pipe), SECOND, args.video)}


def run_second(args: argparse.Namespace) -> dict:
    """Process 2: the second question from the disk cache."""
    pipe = load(args.checkpoint, args.cache_dir, args.device, memory=False)
    return {"second_disk": ask(pipe, SECOND, args.video)}


def cp_rank_main(state, checkpoint: str, video: str, cache_dir: str, phase: str, out_dir: str):
    """Every rank: the questions of `phase` ("first" or "second"); rank 0 leaves the record."""
    pipe = load(checkpoint, cache_dir, str(state.device), memory=phase == "first", state=state)
    if phase == "first":
        record = ask_first_then_second(pipe, video, state=state)
    else:
        record = {"second_disk": ask(pipe, SECOND, video, state=state)}
    if state.cp_rank == 0:
        Path(out_dir, "record.json").write_text(json.dumps(record))


def run_cp(args: argparse.Namespace) -> dict:
    from longvita.parallel.launch import launch

    with tempfile.TemporaryDirectory(prefix="longvita-bench-prefix-") as out_dir:
        run_args = (args.checkpoint, args.video, args.cache_dir, args.phase, out_dir)
        launch(cp_rank_main, cp=args.cp_size, args=run_args, device=args.device, timeout_s=3600)
        return json.loads(Path(out_dir, "record.json").read_text())


# -- orchestration ---------------------------------------------------------------------------


def spawn(args: argparse.Namespace, phase: str, video: str, cache_dir: str, cp: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--phase", phase]
    cmd += ["--checkpoint", args.checkpoint, "--video", video, "--cache-dir", cache_dir]
    cmd += ["--cp-size", str(cp), "--device", args.device, "--threads", str(args.threads)]
    print(f"  {phase} question(s), cp {cp}", file=sys.stderr, flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads // cp)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    result = json.loads(out)
    shown = {
        k: {"ttft": v["ttft_seconds"], "cached": v["cached_tokens"]} for k, v in result.items()
    }
    print(f"  -> {shown}", file=sys.stderr, flush=True)
    return result


def disk_bytes(cache_dir: str) -> int:
    return sum(path.stat().st_size for path in Path(cache_dir).glob("*.safetensors"))


def measure(args: argparse.Namespace, video: str, cp: int, cold_tokens: list | None) -> dict:
    """Both processes at one cp size, with a fresh cache directory; cold_tokens: the second
    question's tokens without the cache (from the cp 1 run)."""
    with tempfile.TemporaryDirectory(prefix="longvita-prefix-cache-") as cache_dir:
        runs = spawn(args, "first", video, cache_dir, cp)
        stored = disk_bytes(cache_dir)  # the first question's prompt, every rank's file
        runs |= spawn(args, "second", video, cache_dir, cp)
    first = runs["first"]
    cold_tokens = runs["second_cold"]["tokens"] if "second_cold" in runs else cold_tokens
    row = {"cp": cp, **runs, "disk_bytes": stored}
    row["disk_bytes_per_token"] = round(stored / first["prompt_tokens"], 1)
    for name in ("second_memory", "second_disk"):
        hit = runs[name]
        row[f"{name}_speedup"] = round(first["ttft_seconds"] / hit["ttft_seconds"], 1)
        row[f"{name}_tokens_match_cold"] = hit["tokens"] == cold_tokens
    if "second_cold" in runs:
        row["second_cold_over_first"] = round(
            runs["second_cold"]["ttft_seconds"] / first["ttft_seconds"], 2
        )
    return row


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--cp", type=int, nargs="*", default=[1, 2], help="empty: cp 1 only")
    add_model_flags(parser, LONG_CONTEXT_MODEL)
    parser.add_argument("--threads", type=int, default=2, help="cores, shared by the CP ranks")
    parser.add_argument("--device", default="cpu", help="cpu (default) or an accelerator: cuda")
    parser.add_argument("--checkpoint", help="reuse this checkpoint instead of writing one")
    parser.add_argument("--quick", action="store_true", help="small model and videos, ~1 min")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=["first", "second"], help=argparse.SUPPRESS)
    parser.add_argument("--video", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--cp-size", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick and not args.worker:
        args.frames = [16, 64]
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 128, 352, 2, 4, 2
        args.vocab = 8192
    return args


def run_worker(args: argparse.Namespace) -> dict:
    torch.set_num_threads(max(1, args.threads // args.cp_size))
    if args.cp_size > 1:
        return run_cp(args)
    return run_first(args) if args.phase == "first" else run_second(args)


def run_all(args: argparse.Namespace) -> dict:
    from longvita.testing import make_video

    rows = []
    with tempfile.TemporaryDirectory(prefix="longvita-bench-video-") as media:
        for frames in args.frames:
            print(f"{frames} frames: writing the video", file=sys.stderr, flush=True)
            video = str(make_video(Path(media, f"{frames}.mp4"), num_frames=frames, fps=1,
                                   size=VIDEO_SIZE))  # fmt: skip
            cold_tokens = None
            for cp in sorted(set([1, *args.cp])):
                rows.append({"frames": frames, **measure(args, video, cp, cold_tokens)})
                cold_tokens = rows[-1]["second_cold"]["tokens"] if cp == 1 else cold_tokens
            Path(video).unlink()
    return rows


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    started = time.perf_counter()
    with random_checkpoint(args) as checkpoint:
        args.checkpoint = checkpoint
        rows = run_all(args)
    hidden = ("worker", "phase", "video", "cache_dir", "cp_size")
    config = {k: v for k, v in vars(args).items() if k not in hidden}
    report = {
        "benchmark": "prefix_cache",
        "config": {**config, "video_size": VIDEO_SIZE, "torch": torch.__version__},
        "ttft": "wall seconds from Pipeline.stream/open to the first token, fresh process each",
        "runs": rows,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
