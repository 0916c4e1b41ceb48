"""The decode pool: a batch engine's decode step with the decoding sequences' caches side by side
(`infer.decode_pool`, the default) against each in its own cache (`pool_tokens=0`), same model,
same process.

For each number of sequences, the median time of the steps in which every sequence decodes
(short text prompts, 24 greedy tokens each), the two modes alternating, `--runs` runs of each;
reported: the median over runs of each mode and their ratio. Model: the shipped demo model
(`longvita/demo_model`, one torch thread, as `longvita serve --threads 1` runs it in
`results/serve.md`), or `--model DIR` with torch's threads; on the CPU in float32 by default,
or `--device cuda` (`make gpu-check` runs it there, in bfloat16: where the calls the pool saves
are kernel launches).

    python benchmarks/decode_pool.py                  # demo model, ~5 s on 2 cores
    python benchmarks/decode_pool.py --model /tmp/bench-work/qwen2.5-0.5b-shaped --sequences 1,8
    python benchmarks/decode_pool.py --device cuda --dtype bfloat16

Prints one JSON object to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from common import engine_step_ms

import longvita
from longvita.assets import resolve_model_dir
from longvita.infer.decode_pool import DEFAULT_POOL_TOKENS


def measure(pipe, sequences: int, runs: int) -> dict:
    times: dict[str, list[float]] = {"pool": [], "own caches": []}
    for _ in range(runs):
        for mode, times_of_mode in times.items():
            pool_tokens = 0 if mode == "own caches" else DEFAULT_POOL_TOKENS
            times_of_mode.append(engine_step_ms(pipe, sequences, 24, pool_tokens=pool_tokens))
    pooled, own = statistics.median(times["pool"]), statistics.median(times["own caches"])
    return {
        "sequences": sequences,
        "step_ms_pool": round(pooled, 3),
        "step_ms_own_caches": round(own, 3),
        "own_over_pool": round(own / pooled, 2),
        "runs_ms": {mode: [round(t, 3) for t in ts] for mode, ts in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the demo model)")
    parser.add_argument("--sequences", default="1,2,4,8,16,32", help="comma-separated counts")
    parser.add_argument("--runs", type=int, default=5, help="runs of each mode (5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    args = parser.parse_args()
    model = args.model or str(resolve_model_dir("demo"))
    threads = args.threads or (1 if args.model is None else torch.get_num_threads())
    torch.set_num_threads(threads)
    pipe = longvita.load(model, device=args.device, dtype=args.dtype)
    started = time.perf_counter()
    counts = [int(n) for n in args.sequences.split(",")]
    report = {
        "benchmark": "decode_pool",
        "config": {
            "model": model,
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "torch_threads": threads,
            "device": args.device,
            "dtype": args.dtype,
            "runs": args.runs,
        },  # fmt: skip
        "steps": [measure(pipe, n, args.runs) for n in counts],
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
