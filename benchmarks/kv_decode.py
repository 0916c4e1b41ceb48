"""Decode speed at a long context per KV cache dtype: the 8-bit cache against float32 (issue 14).

A decode step's cost depends on how many tokens the cache holds, not on their values, so each
worker fills a cache of `--length` tokens with random keys and values (every layer, through
`KVCache.write`, which quantizes them in an int8 cache as a prefill does) instead of prefilling
a prompt (a 32K prefill takes ~4 minutes on 2 cores), then times `--steps` greedy steps: the
model's forward over one token with the cache as its attention (what `LocalRunner` runs per
token) and the argmax. The first two steps are warm-up. Model: long_context.py's (issue 5's:
hidden 1,024, 8 layers, 16 query / 4 KV heads of 64, vocab 152,064), random weights (seed 0),
float32.

Each (threads, dtype) runs in `--repeats` fresh processes, the dtypes alternating and their
order flipping each round; per process the median step, per (threads, dtype) the median over
processes and the tokens/s ratio of each dtype to float32's. The workers run with glibc's
default malloc settings: the fixed mmap threshold of the memory benchmarks' workers turns every
large temporary into page faults (`common.run_in_fresh_process`).

    python benchmarks/kv_decode.py                  # 32K, 1 and 2 threads, 5 processes each
    python benchmarks/kv_decode.py --quick          # 4K, 2 processes: a smoke run

Prints one JSON object to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import LONG_CONTEXT_MODEL, add_model_flags, run_in_fresh_process, text_model_config

from longvita.infer.engine import allocate_cache
from longvita.model.long_vita import LongVITAForCausalLM
from longvita.runtime import resolve_kv_cache_dtype

SEED = 0
WARMUP_STEPS = 2


def run_worker(args: argparse.Namespace) -> dict:
    """One process: the model, a cache of --length random tokens, --steps timed steps."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    model = LongVITAForCausalLM(text_model_config(args)).eval()
    kv_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, model.lm_head.weight.dtype)
    cache = allocate_cache(model, args.length + args.steps, kv_dtype)
    config = model.config
    shape = (1, config.num_key_value_heads, args.length, config.head_dim)
    generator = torch.Generator().manual_seed(SEED + 1)
    for layer in range(config.num_hidden_layers):
        keys, values = (torch.randn(shape, generator=generator) for _ in range(2))
        cache.write(layer, keys, values)
    cache.advance(args.length)
    token, times = torch.tensor([[0]]), []
    with torch.inference_mode():
        for step in range(args.steps):
            start = time.perf_counter()
            logits = model(
                token,
                position_ids=torch.tensor([[args.length + step]]),
                attention_fn=cache,
                logit_positions=torch.tensor([0]),
            )  # [1, 1, vocab]
            cache.advance(1)
            token = logits[0].argmax(dim=-1, keepdim=True)
            times.append(time.perf_counter() - start)
    timed = times[WARMUP_STEPS:]
    return {
        "kv_cache_dtype": args.kv_cache_dtype,
        "threads": args.threads,
        "cache_bytes": cache.num_bytes,
        "step_ms": [round(t * 1e3, 2) for t in timed],
        "median_step_ms": round(statistics.median(timed) * 1e3, 2),
    }


def run_all(args: argparse.Namespace) -> dict:
    dtypes = args.cache_dtypes
    results: dict = {}
    for threads in args.threads:
        runs: dict[str, list[dict]] = {dtype: [] for dtype in dtypes}
        for round_idx in range(args.repeats):
            for dtype in dtypes if round_idx % 2 == 0 else dtypes[::-1]:
                options = {
                    **{name: getattr(args, name) for name in LONG_CONTEXT_MODEL},
                    "length": args.length,
                    "steps": args.steps,
                    "threads": threads,
                    "kv_cache_dtype": dtype,
                }
                label = f"{dtype}, {threads} thread(s), round {round_idx + 1}"
                runs[dtype].append(
                    run_in_fresh_process(__file__, options, label, fixed_mmap_threshold=False)
                )
        medians = {
            dtype: statistics.median(run["median_step_ms"] for run in runs[dtype])
            for dtype in dtypes
        }
        results[str(threads)] = {
            dtype: {
                "median_step_ms": round(medians[dtype], 2),
                "tokens_per_s": round(1e3 / medians[dtype], 3),
                "vs_float32": round(medians["float32"] / medians[dtype], 3),
                "per_process_median_step_ms": [run["median_step_ms"] for run in runs[dtype]],
                "cache_bytes": runs[dtype][0]["cache_bytes"],
            }
            for dtype in dtypes
        }
    return results


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=32768, help="tokens in the cache")
    parser.add_argument("--steps", type=int, default=12, help="per process, 2 of them warm-up")
    parser.add_argument("--repeats", type=int, default=5, help="processes per dtype and threads")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--cache-dtypes",
        nargs="+",
        default=["float32", "int8"],
        help="the first must be float32 (the reference of the ratios)",
    )
    add_model_flags(parser, LONG_CONTEXT_MODEL)
    parser.add_argument("--quick", action="store_true", help="4K tokens, 2 processes, 2 threads")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kv-cache-dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.length, args.repeats, args.threads, args.steps = 4096, 2, [2], 6
    if args.cache_dtypes[0] != "float32":
        parser.error(f"--cache-dtypes must start with float32, got {args.cache_dtypes}")
    if args.steps <= WARMUP_STEPS or args.repeats < 1 or args.length < 1:
        parser.error(
            f"need --steps > {WARMUP_STEPS}, --repeats >= 1 and --length >= 1, got "
            f"{args.steps}, {args.repeats}, {args.length}"
        )
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        args.threads = args.threads[0]
        print(json.dumps(run_worker(args)))
        return
    started = time.perf_counter()
    report = {
        "benchmark": "kv_decode",
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("worker", "kv_cache_dtype")},
            "torch": torch.__version__,
        },
        "threads": run_all(args),
    }
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
