"""The KV cache's dtype (issue 14): memory, longest prompt, accuracy and decode per dtype.

Every run is one worker of `long_context.py` (`--worker`) in a fresh process, on the same random
checkpoint (long_context.py's model by default: hidden 1,024, 8 layers, 16 query / 4 KV heads of
64, vocab 152,064, fp32) and the same random prompt, with a 64-token warm-up; "peak" is what
generation adds beyond the loaded weights (VmHWM - VmRSS, glibc's mmap threshold fixed).

- memory (`--parts memory`): ours with each of `--memory-dtypes` (int8) at the `--lengths` of
  more than one chunk (once a chunk reads the cache, only the cache grows), the baseline
  (transformers' `Qwen2ForCausalLM`, sdpa) with its default cache and with its own 8-bit cache
  (`QuantizedCache(backend="fp8")`, per-tensor float8 e4m3, built in: nothing to install) at
  the `--lengths` up to `--baseline-max-len`; each side's least-squares line and the longest
  prompt within `--budget-gib`, with the ratios of ours to the baseline's;
- accuracy (`--parts accuracy`): at `--accuracy-len`, the greedy tokens of `--accuracy-steps`
  steps with each of `--cache-dtypes` and their logits against ours with the model-dtype
  ("auto") cache (max relative error, first differing step), and the decode rate of each over
  `--accuracy-repeats` rounds of fresh processes that alternate the dtypes. Decode rates here
  run under the fixed mmap threshold; `kv_decode.py` is the speed comparison.

    python benchmarks/kv_cache_dtype.py --parts memory --lengths 2048 4096 8192 16384 \
        --threads 1                                    # ~16 min on 2 cores
    python benchmarks/kv_cache_dtype.py --parts accuracy --threads 2      # ~14 min
    python benchmarks/kv_cache_dtype.py --quick        # small model and prompts, < 1 min

Prints one JSON object to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    LONG_CONTEXT_MODEL,
    add_model_flags,
    fit_line,
    random_checkpoint,
    run_in_fresh_process,
)

WORKER = Path(__file__).with_name("long_context.py")


def spawn(args: argparse.Namespace, checkpoint: str, path: str, seq_len: int, **extra) -> dict:
    """One `long_context.py` worker run of `path` (ours|baseline) at `seq_len` tokens."""
    options = {"path": path, "checkpoint": checkpoint, "seq_len": seq_len,
               "threads": args.threads, "prefill_chunk": args.prefill_chunk,
               "device": "cpu", "dtype": "float32", **extra}  # fmt: skip
    result = run_in_fresh_process(WORKER, options, f"{path} N={seq_len} {extra}")
    summary = {k: v for k, v in result.items() if k != "tokens"}
    print(f"  -> {summary}", file=sys.stderr, flush=True)
    return result


def run_cache_dtypes(args: argparse.Namespace, checkpoint: str) -> dict:
    """Memory lines and longest prompts per cache dtype, then accuracy and decode at
    --accuracy-len (the --parts asked for); ours' float cache is "auto" (the model's dtype)."""
    report: dict = {}
    if "accuracy" in args.parts:
        report["accuracy"] = cache_accuracy(args, checkpoint)
    if "memory" not in args.parts:
        return report
    sides = [("ours", dtype) for dtype in args.memory_dtypes]
    sides += [("baseline", "auto"), ("baseline", "fp8")]
    peaks: dict[str, dict[int, int]] = {f"{path} {dtype}": {} for path, dtype in sides}
    for seq_len in sorted(args.lengths):
        for path, dtype in sides:
            if path == "ours" and seq_len <= args.prefill_chunk:
                continue  # ours' line: once a chunk reads the cache, only the cache grows
            if path == "baseline" and seq_len > args.baseline_max_len:
                continue
            run = spawn(args, checkpoint, path, seq_len, kv_cache_dtype=dtype)
            peaks[f"{path} {dtype}"][seq_len] = run["peak_bytes"]
    budget = int(args.budget_gib * 2**30)
    longest = {}
    for side, points in peaks.items():
        intercept, slope = fit_line(points)
        longest[side] = {
            "peaks_bytes": points,
            "intercept_bytes": round(intercept),
            "bytes_per_token": round(slope, 1),
            "longest_tokens_extrapolated": int((budget - intercept) / slope),
        }
    ratios = {
        f"{ours} / {base}": round(
            longest[ours]["longest_tokens_extrapolated"]
            / longest[base]["longest_tokens_extrapolated"],
            2,
        )
        for ours in peaks
        if ours.startswith("ours")
        for base in peaks
        if base.startswith("baseline")
    }
    return {**report, "budget_bytes": budget, "memory": longest, "longest_prompt_ratios": ratios}


def cache_accuracy(args: argparse.Namespace, checkpoint: str) -> dict:
    """Greedy tokens and logits of --accuracy-steps steps at --accuracy-len per cache dtype
    against the model-dtype cache, and decode rates (--accuracy-repeats rounds, dtypes
    alternating)."""
    dtypes = ["auto", *[d for d in args.cache_dtypes if d != "auto"]]
    runs: dict[str, list[dict]] = {dtype: [] for dtype in dtypes}
    scores: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="longvita-bench-scores-") as tmp:
        for round_idx in range(args.accuracy_repeats):
            for dtype in dtypes if round_idx % 2 == 0 else dtypes[::-1]:
                out = Path(tmp, f"{dtype}.pt")
                extra = {"kv_cache_dtype": dtype, "max_new_tokens": args.accuracy_steps}
                runs[dtype].append(
                    spawn(args, checkpoint, "ours", args.accuracy_len, **extra, scores_out=out)
                )
                scores.setdefault(dtype, torch.load(out))
    reference, result = runs["auto"][0], {}
    for dtype in dtypes:
        tokens = runs[dtype][0]["tokens"]
        differ = [a != b for a, b in zip(tokens, reference["tokens"], strict=True)]
        first = differ.index(True) if any(differ) else None
        steps = len(tokens) if first is None else first + 1  # the same context up to there
        error = (scores[dtype][:steps] - scores["auto"][:steps]).abs().max()
        decode = [statistics.median(r["decode_step_seconds"]) for r in runs[dtype]]
        result[dtype] = {
            "tokens_equal_to_auto": first is None,
            "first_differing_step": first,
            "max_relative_logit_error": float(error / scores["auto"][:steps].abs().max()),
            "prefill_seconds": [r["prefill_seconds"] for r in runs[dtype]],
            "decode_tokens_per_s": [round(1 / step, 3) for step in decode],
            "median_decode_tokens_per_s": round(1 / statistics.median(decode), 3),
            "peak_bytes": [r["peak_bytes"] for r in runs[dtype]],
        }
    for dtype in dtypes:
        ratio = (
            result[dtype]["median_decode_tokens_per_s"]
            / result["auto"]["median_decode_tokens_per_s"]
        )
        result[dtype]["decode_ratio_vs_auto"] = round(ratio, 3)
    return {"seq_len": args.accuracy_len, "steps": args.accuracy_steps, "dtypes": result}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache-dtypes",
        nargs="+",
        default=["int8", "bfloat16"],
        help="ours' cache dtypes compared with auto (the model's dtype) for accuracy (%(default)s)",
    )
    parser.add_argument(
        "--memory-dtypes",
        nargs="+",
        default=["int8"],
        help="ours' cache dtypes whose memory line is measured (%(default)s)",
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["memory", "accuracy"],
        default=["memory", "accuracy"],
        help="which comparisons to run (both)",
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--budget-gib", type=float, default=8.0)
    parser.add_argument("--baseline-max-len", type=int, default=16384, help="longest baseline")
    parser.add_argument("--accuracy-len", type=int, default=32768)
    parser.add_argument("--accuracy-steps", type=int, default=32)
    parser.add_argument("--accuracy-repeats", type=int, default=1, help="decode-rate rounds")
    parser.add_argument("--prefill-chunk", type=int, default=4096, help="ours (engine default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", help="reuse this checkpoint instead of writing one")
    add_model_flags(parser, LONG_CONTEXT_MODEL)
    parser.add_argument("--quick", action="store_true", help="small model and prompts, < 1 min")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.budget_gib, args.prefill_chunk = [256, 512, 1024], 0.25, 256
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 128, 352, 2, 4, 2
        args.vocab = 8192
        args.accuracy_len, args.accuracy_steps, args.baseline_max_len = 1024, 8, 1024
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    with random_checkpoint(args) as checkpoint:
        report = {
            "benchmark": "kv_cache_dtype",
            "config": {**vars(args), "torch": torch.__version__},
            **run_cache_dtypes(args, checkpoint),
        }
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
