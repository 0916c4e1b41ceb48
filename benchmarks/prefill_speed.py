"""Prefill speed against transformers at long prompts, in alternating fresh processes (issue 14).

Each run is one worker of `long_context.py` (`--worker --path ours|baseline`): the same random
checkpoint (long_context.py's model: hidden 1,024, 8 layers, 16 query / 4 KV heads of 64, vocab
152,064, fp32), the same random prompt of `--lengths` tokens, a 64-token warm-up, then the
prompt and 8 greedy tokens; prefill is the time to the end of the last multi-token forward.
Ours: `longvita.load` and the engine (chunks of `--prefill-chunk`); the baseline: transformers'
`Qwen2ForCausalLM` (sdpa) and its `generate`. Per length, `--repeats` rounds of one process per
side, the order flipping each round; it reports every run, the medians of prefill tokens/s and
their ratio, and whether both sides chose the same greedy tokens. The workers run with glibc's
default malloc settings (not the fixed mmap threshold of long_context.py's memory runs, which
turns every large temporary into page faults, more of them on the side that allocates more).

    python benchmarks/prefill_speed.py                    # 8K and 32K, 5 rounds: ~40 min on 2 cores
    python benchmarks/prefill_speed.py --lengths 8192     # ~5 min
    python benchmarks/prefill_speed.py --quick            # 1K, 2 rounds: a smoke run

Prints one JSON object to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import LONG_CONTEXT_MODEL, add_model_flags, random_checkpoint, run_in_fresh_process

WORKER = Path(__file__).with_name("long_context.py")
SIDES = ("ours", "baseline")


def measure_length(args: argparse.Namespace, checkpoint: str, length: int) -> dict:
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for round_idx in range(args.repeats):
        for side in SIDES if round_idx % 2 == 0 else SIDES[::-1]:
            options = {
                "path": side,
                "checkpoint": checkpoint,
                "seq_len": length,
                "threads": args.threads,
                "prefill_chunk": args.prefill_chunk,
                "device": "cpu",
                "dtype": "float32",
            }
            label = f"{side} N={length} round {round_idx + 1}"
            result = run_in_fresh_process(WORKER, options, label, fixed_mmap_threshold=False)
            runs[side].append(result)
    rates = {
        side: statistics.median(length / run["prefill_seconds"] for run in runs[side])
        for side in SIDES
    }
    same = [
        ours["tokens"] == base["tokens"]
        for ours, base in zip(runs["ours"], runs["baseline"], strict=True)
    ]
    return {
        side: {
            "prefill_seconds": [run["prefill_seconds"] for run in runs[side]],
            "median_prefill_tokens_per_s": round(rates[side], 1),
        }
        for side in SIDES
    } | {
        "ours_vs_baseline": round(rates["ours"] / rates["baseline"], 3),
        "same_greedy_tokens": all(same),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--repeats", type=int, default=5, help="rounds (one process per side)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill-chunk", type=int, default=4096, help="ours (engine default)")
    parser.add_argument("--checkpoint", help="reuse this checkpoint instead of writing one")
    add_model_flags(parser, LONG_CONTEXT_MODEL)
    parser.add_argument("--quick", action="store_true", help="1K tokens, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.repeats = [1024], 2
    if args.repeats < 1 or min(args.lengths) <= 64:
        parser.error(f"need --repeats >= 1 and lengths > 64, got {args.repeats}, {args.lengths}")
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    with random_checkpoint(args) as checkpoint:
        report = {
            "benchmark": "prefill_speed",
            "config": {**vars(args), "torch": torch.__version__},
            "lengths": {str(n): measure_length(args, checkpoint, n) for n in args.lengths},
        }
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
