"""Long-context generation: peak memory, longest prompt in a budget, prefill/decode speed, CP.

Text-only prompts of random token ids, random weights, 8 greedy tokens. Ours is the engine
(`longvita.infer.engine.generate`: chunked prefill into a KV cache allocated once, logits of the
last prompt position only) on the model `longvita.load` reads from a checkpoint written by
`longvita.testing.make_tiny_checkpoint`. The baseline is transformers' `Qwen2ForCausalLM`
(sdpa) holding the same weights (`model.embed_tokens/layers/norm` and `lm_head`, 1:1), run with
`model.generate(max_new_tokens=8, do_sample=False)`; both must give the same tokens.

Every run is a fresh subprocess. It loads the weights, builds the prompt, runs a 64-token
warm-up, resets the resident high-water mark (`/proc/self/clear_refs`) and generates once:
"peak" is VmHWM minus VmRSS at the reset, i.e. what generation adds beyond the weights (KV
cache included); glibc's mmap threshold is fixed so freed blocks leave the heap. Times come
from hooks on the model's forward: prefill is the call to the end of the last multi-token
forward, each decode step one single-token forward (median reported).

- memory at `--lengths` (peak-len among them); the baseline is skipped at a length where the
  line through its smaller lengths predicts more than 80% of the available memory;
- longest prompt within `--budget-gib` beyond the weights, from a least-squares line through
  each side's measured peaks (extrapolated: a prefill at those lengths takes hours on 2 cores;
  ours is fitted on lengths >= prefill_chunk, where only its KV cache still grows);
- prefill tokens/s at `--prefill-len` (`--repeats` runs, ours and baseline alternating) and
  decode tokens/s at `--decode-len`;
- `--cp` sizes at `--cp-len` (`longvita.parallel.launch` + `generate_sharded` on token ids):
  time to first token, per-rank KV cache bytes and peak; `--threads` cores shared by the ranks.

Its worker (`--worker`) also serves `kv_cache_dtype.py` and `prefill_speed.py`: hidden flags
pick the KV cache dtype (`--kv-cache-dtype`: ours' `auto|bfloat16|int8`, the baseline's
`auto|fp8`), the number of new tokens and a file for their logits (`--scores-out`).

On an accelerator (`--device cuda --dtype bfloat16`) both sides run there and "peak" is the
allocator's peak above what the loaded model holds (`torch.accelerator.max_memory_allocated`);
the CP runs need one device per rank.

    python benchmarks/long_context.py            # issue 5's numbers, ~17 min on 2 cores
    python benchmarks/long_context.py --quick    # small model and prompts, under a minute
    python benchmarks/long_context.py --device cuda --dtype bfloat16 --cp   # on a GPU

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
    peak_since,
    random_checkpoint,
    reset_peak,
    run_in_fresh_process,
)

from longvita.infer.plan import free_memory_bytes

PROMPT_SEED = 0
WARMUP_TOKENS = 64
MAX_NEW_TOKENS = 8
BASELINE_KEYS = ("lm_head.", "model.embed_tokens.", "model.layers.", "model.norm.")
SHARED_FIELDS = (  # Qwen2Config fields that take our config's values
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
)  # fmt: skip


# -- model and memory -----------------------------------------------------------------------


def prompt_ids(length: int, vocab: int) -> torch.Tensor:
    """[length] random token ids, the same for ours and the baseline."""
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(PROMPT_SEED))


class ForwardTimer:
    """Start/end time and query length of every forward of a module (hooks)."""

    def __init__(self, module: torch.nn.Module, device: str = "cpu") -> None:
        self.calls: list[tuple[int, float, float]] = []  # (num query tokens, start, end)
        self.synchronize = torch.accelerator.synchronize if device != "cpu" else lambda: None
        module.register_forward_pre_hook(self._pre, with_kwargs=True)
        module.register_forward_hook(self._post)

    def _pre(self, _module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]  # [1, n]
        self.synchronize()
        self.calls.append((ids.shape[-1], time.perf_counter(), float("nan")))

    def _post(self, _module, _args, _out):
        self.synchronize()
        n, start, _ = self.calls[-1]
        self.calls[-1] = (n, start, time.perf_counter())

    def timings(self, started: float) -> dict:
        """Prefill seconds (from `started`) and the single-token decode steps."""
        prefill_end = max(end for n, _, end in self.calls if n > 1)
        steps = [end - start for n, start, end in self.calls if n == 1]
        return {
            "prefill_seconds": round(prefill_end - started, 3),
            "decode_step_seconds": [round(s, 4) for s in steps],
        }


# -- one run, in a worker process -----------------------------------------------------------


def load_ours(checkpoint: str, device: str = "cpu", dtype: str = "float32"):
    import longvita

    return longvita.load(checkpoint, device=device, dtype=dtype).model


def load_baseline(checkpoint: str, device: str = "cpu", dtype: str = "float32"):
    import transformers

    from longvita.config import LongVITAConfig
    from longvita.model.checkpoint import iter_tensors, weight_files

    config = LongVITAConfig.from_pretrained(checkpoint)
    hf_config = transformers.Qwen2Config(
        **{name: getattr(config, name) for name in SHARED_FIELDS},
        tie_word_embeddings=False,
        use_sliding_window=False,
        attn_implementation="sdpa",
    )
    model = transformers.Qwen2ForCausalLM(hf_config).to(getattr(torch, dtype)).eval()
    state = {
        key: tensor
        for key, tensor in iter_tensors(weight_files(checkpoint))
        if key.startswith(BASELINE_KEYS)
    }
    model.load_state_dict(state, strict=True)  # every key 1:1, nothing left over
    model.generation_config.eos_token_id = None  # always 8 new tokens, as ours (no stop ids)
    model.generation_config.pad_token_id = 0
    return model.to(device)


def make_resident(model: torch.nn.Module) -> None:
    """Read every weight once, so all its pages are resident before the peak is reset.

    `longvita.load` leaves the tensors mapped from the safetensors file: pages come in when
    first read, and the embedding rows of a long random prompt would otherwise count as
    generation memory (hundreds of MB). The baseline copies its weights, so they are resident.
    """
    for tensor in model.state_dict().values():
        tensor.sum()


def generate_ours(
    model, ids: torch.Tensor, args: argparse.Namespace, new_tokens: int = MAX_NEW_TOKENS
) -> tuple[list[int], torch.Tensor | None]:
    """Greedy tokens and, with --scores-out, their logits [new_tokens, vocab]."""
    from longvita.infer.engine import generate
    from longvita.infer.request import SamplingParams
    from longvita.runtime import resolve_kv_cache_dtype

    out = generate(
        model,
        ids,
        params=SamplingParams(max_new_tokens=new_tokens),
        stop_ids=(),
        prefill_chunk=args.prefill_chunk,
        kv_cache_dtype=resolve_kv_cache_dtype(args.kv_cache_dtype, model.lm_head.weight.dtype),
        return_scores=args.scores_out is not None,
    )
    return out.token_ids, out.scores


def generate_baseline(
    model, ids: torch.Tensor, args: argparse.Namespace, new_tokens: int = MAX_NEW_TOKENS
) -> tuple[list[int], None]:
    """Greedy tokens of `model.generate`, with its default cache or (--kv-cache-dtype fp8)
    transformers' own 8-bit one."""
    from transformers.cache_utils import QuantizedCache

    ids = ids.to(model.device)
    cache = {}
    if args.kv_cache_dtype == "fp8":
        cache["past_key_values"] = QuantizedCache(backend="fp8", config=model.config)
    out = model.generate(
        ids[None],
        attention_mask=torch.ones(1, ids.numel(), dtype=torch.long, device=ids.device),
        max_new_tokens=new_tokens,
        do_sample=False,
        **cache,
    )  # [1, seq + new_tokens]
    return out[0, ids.numel() :].tolist(), None


def run_worker(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    load, generate = {
        "ours": (load_ours, generate_ours),
        "baseline": (load_baseline, generate_baseline),
    }[args.path]
    model = load(args.checkpoint, args.device, args.dtype)
    make_resident(model)
    timer = ForwardTimer(model, args.device)
    ids = prompt_ids(args.seq_len, model.config.vocab_size)  # [seq]
    with torch.inference_mode():
        generate(model, ids[:WARMUP_TOKENS], args)  # kernels, first-touch pages
        timer.calls.clear()
        base = reset_peak(args.device)
        started = time.perf_counter()
        tokens, scores = generate(model, ids, args, args.max_new_tokens)
    peak = peak_since(base, args.device)
    if scores is not None:
        torch.save(scores, args.scores_out)
    return {"peak_bytes": peak, "tokens": tokens, **timer.timings(started)}


# -- context parallel, on every rank of a launched job --------------------------------------


def cp_rank_main(
    state, checkpoint: str, seq_len: int, prefill_chunk: int, dtype: str, out_dir: str
) -> None:
    """Warm up, reset the peak, generate on this rank's shard; leave its record in out_dir."""
    from longvita.infer.cp_engine import generate_sharded
    from longvita.infer.request import SamplingParams

    device = state.device.type
    model = load_ours(checkpoint, str(state.device), dtype)
    make_resident(model)
    ids = prompt_ids(seq_len, model.config.vocab_size)  # [seq], the whole prompt on every rank

    def run(prompt: torch.Tensor):
        return generate_sharded(
            model,
            prompt,
            state=state,
            params=SamplingParams(max_new_tokens=MAX_NEW_TOKENS),
            stop_ids=(),
            pad_id=0,
            prefill_chunk=prefill_chunk,
        )

    run(ids[:WARMUP_TOKENS])
    base = reset_peak(device)
    result = run(ids)
    record = {
        "rank": state.cp_rank,
        "threads": torch.get_num_threads(),
        "peak_bytes": peak_since(base, device),
        "kv_cache_bytes": result.kv_cache_bytes_per_rank[state.cp_rank],
        "kv_cache_tokens": result.kv_cache_tokens_per_rank[state.cp_rank],
        "prefill_seconds": round(result.prefill_seconds, 3),
        "decode_seconds": round(result.decode_seconds, 3),
        "tokens": result.token_ids,
    }
    Path(out_dir, f"rank{state.cp_rank}.json").write_text(json.dumps(record))


def run_cp_worker(args: argparse.Namespace) -> dict:
    from longvita.parallel.launch import launch

    torch.set_num_threads(args.threads)  # cp = 1 runs here; spawned ranks take cores // cp
    with tempfile.TemporaryDirectory(prefix="longvita-bench-cp-") as out_dir:
        run_args = (args.checkpoint, args.seq_len, args.prefill_chunk, args.dtype, out_dir)
        launch(cp_rank_main, cp=args.cp_size, args=run_args, device=args.device, timeout_s=3600)
        files = [Path(out_dir, f"rank{rank}.json") for rank in range(args.cp_size)]
        ranks = [json.loads(file.read_text()) for file in files]
    return {"cp": args.cp_size, "ranks": ranks}


# -- orchestration --------------------------------------------------------------------------


def spawn(args: argparse.Namespace, checkpoint: str, path: str, seq_len: int, **extra) -> dict:
    options = {"path": path, "checkpoint": checkpoint, "seq_len": seq_len,
               "threads": args.threads, "prefill_chunk": args.prefill_chunk,
               "device": args.device, "dtype": args.dtype, **extra}  # fmt: skip
    result = run_in_fresh_process(__file__, options, f"{path} N={seq_len} {extra or ''}")
    summary = {k: v for k, v in result.items() if k not in ("tokens", "ranks")}
    print(f"  -> {summary}", file=sys.stderr, flush=True)
    return result


def fits(points: dict[int, int], seq_len: int, device: str) -> bool:
    """Whether the line through the measured peaks predicts < 80% of the available memory."""
    if len(points) < 2:
        return True
    intercept, slope = fit_line(points)
    return intercept + slope * seq_len < 0.8 * free_memory_bytes(device)


def decode_rate(run: dict) -> float:
    return round(1.0 / statistics.median(run["decode_step_seconds"]), 2)


def measure_lengths(args: argparse.Namespace, checkpoint: str) -> dict:
    """Every length once per path; at prefill-len, `repeats` runs alternating ours/baseline."""
    runs: dict[str, dict[int, list[dict]]] = {"ours": {}, "baseline": {}}
    for seq_len in sorted(set(args.lengths) | {args.prefill_len, args.decode_len}):
        repeats = args.repeats if seq_len == args.prefill_len else 1
        for _ in range(repeats):
            for path in ("ours", "baseline"):
                measured = {n: r[0]["peak_bytes"] for n, r in runs[path].items()}
                if path == "baseline" and not fits(measured, seq_len, args.device):
                    print(f"skipping baseline N={seq_len}: predicted not to fit", file=sys.stderr)
                    continue
                runs[path].setdefault(seq_len, []).append(spawn(args, checkpoint, path, seq_len))
    return runs


def length_rows(runs: dict) -> list[dict]:
    rows = []
    for seq_len in sorted(runs["ours"]):
        row: dict = {"seq_len": seq_len}
        for path in ("ours", "baseline"):
            done = runs[path].get(seq_len)
            if not done:
                row[path] = None
                continue
            row[path] = {
                "peak_bytes": [r["peak_bytes"] for r in done],
                "prefill_seconds": [r["prefill_seconds"] for r in done],
                "median_prefill_tokens_per_s": round(
                    seq_len / statistics.median(r["prefill_seconds"] for r in done), 1
                ),
                "median_decode_tokens_per_s": decode_rate(done[0]),
                "decode_step_seconds": done[0]["decode_step_seconds"],
            }
        if row["baseline"]:
            ours, base = runs["ours"][seq_len][0], runs["baseline"][seq_len][0]
            row["tokens_match"] = ours["tokens"] == base["tokens"]
            row["peak_ratio_baseline_over_ours"] = round(
                min(row["baseline"]["peak_bytes"]) / max(row["ours"]["peak_bytes"]), 2
            )
        rows.append(row)
    return rows


def budget_lengths(runs: dict, budget: int, prefill_chunk: int) -> dict:
    """Longest prompt under `budget` bytes beyond weights, from each side's fitted line.

    Ours is fitted on the lengths of at least one full chunk, where its working memory has
    stopped growing and only the KV cache does; the baseline on every length it ran.
    """
    out: dict = {"budget_bytes": budget}
    for path in ("ours", "baseline"):
        points = {n: max(r["peak_bytes"] for r in done) for n, done in runs[path].items()}
        if path == "ours" and sum(n >= prefill_chunk for n in points) >= 2:
            points = {n: p for n, p in points.items() if n >= prefill_chunk}
        intercept, slope = fit_line(points)
        residual = max(abs(intercept + slope * n - p) / p for n, p in points.items())
        within = [n for n, p in points.items() if p <= budget]
        out[path] = {
            "longest_tokens_extrapolated": int((budget - intercept) / slope),
            "intercept_bytes": round(intercept),
            "bytes_per_token": round(slope, 1),
            "fit_max_rel_residual": round(residual, 4),
            "fitted_on": sorted(points),
            "longest_measured_within_budget": max(within, default=None),
        }
    longest = {path: out[path]["longest_tokens_extrapolated"] for path in ("ours", "baseline")}
    out["ratio_ours_over_baseline"] = round(longest["ours"] / longest["baseline"], 2)
    return out


def cp_summary(runs: list[dict]) -> dict:
    rows = []
    for run in runs:
        ranks = run["ranks"]
        rows.append({
            "cp": run["cp"],
            "threads_per_rank": ranks[0]["threads"],
            "ttft_seconds": max(r["prefill_seconds"] for r in ranks),
            "decode_seconds": max(r["decode_seconds"] for r in ranks),
            "kv_cache_bytes_per_rank": [r["kv_cache_bytes"] for r in ranks],
            "kv_cache_tokens_per_rank": [r["kv_cache_tokens"] for r in ranks],
            "peak_bytes_per_rank": [r["peak_bytes"] for r in ranks],
            "tokens": ranks[0]["tokens"],
            "process_seconds": run["process_seconds"],
        })  # fmt: skip
    base = next((r for r in rows if r["cp"] == 1), None)
    for row in rows:
        if base is not None and row is not base:
            row["ttft_ratio_vs_cp1"] = round(row["ttft_seconds"] / base["ttft_seconds"], 2)
            kv_ratio = max(row["kv_cache_bytes_per_rank"]) / max(base["kv_cache_bytes_per_rank"])
            row["kv_per_rank_ratio_vs_cp1"] = round(kv_ratio, 3)
            peak_ratio = max(row["peak_bytes_per_rank"]) / max(base["peak_bytes_per_rank"])
            row["peak_per_rank_ratio_vs_cp1"] = round(peak_ratio, 3)
            row["tokens_match_cp1"] = row["tokens"] == base["tokens"]
    return {"seq_len": runs[0]["seq_len"], "runs": rows}


def targets(rows: dict[int, dict], budget: dict, args: argparse.Namespace) -> dict:
    """Issue 5's targets: each measured value, its ratio and whether it holds."""
    peak_row = rows[args.peak_len]
    out = {}
    if peak_row["baseline"]:
        ratio = peak_row["peak_ratio_baseline_over_ours"]
        out["peak_at_peak_len_ours_le_third"] = {"ratio": ratio, "met": ratio >= 3}
    ratio = budget["ratio_ours_over_baseline"]
    out["budget_length_ours_ge_4x"] = {"ratio": ratio, "met": ratio >= 4, "extrapolated": True}
    for key, seq_len in (("prefill", args.prefill_len), ("decode", args.decode_len)):
        row, rate = rows[seq_len], f"median_{key}_tokens_per_s"
        if row["baseline"]:
            ratio = round(row["ours"][rate] / row["baseline"][rate], 2)
            out[f"{key}_tokens_per_s_ours_ge_baseline"] = {"ratio": ratio, "met": ratio >= 1}
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384, 32768])
    parser.add_argument("--peak-len", type=int, default=32768, help="target 1's length")
    parser.add_argument("--prefill-len", type=int, default=8192)
    parser.add_argument("--decode-len", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3, help="runs per path at prefill-len")
    parser.add_argument("--budget-gib", type=float, default=8.0)
    parser.add_argument("--cp", type=int, nargs="*", default=[1, 2], help="empty: skip CP")
    parser.add_argument("--cp-len", type=int, default=32768)
    add_model_flags(parser, LONG_CONTEXT_MODEL)
    parser.add_argument("--prefill-chunk", type=int, default=4096, help="ours (engine default)")
    parser.add_argument("--threads", type=int, default=2, help="cores, shared by the CP ranks")
    parser.add_argument("--device", default="cpu", help="cpu (default) or an accelerator: cuda")
    parser.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    parser.add_argument("--checkpoint", help="reuse this checkpoint instead of writing one")
    parser.add_argument("--kv-cache-dtype", default="auto", help=argparse.SUPPRESS)
    parser.add_argument(
        "--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help=argparse.SUPPRESS
    )
    parser.add_argument("--scores-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small model and prompts, < 1 min")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=["ours", "baseline", "cp"], help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cp-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick and not args.worker:
        args.lengths, args.repeats, args.budget_gib, args.prefill_chunk = [256, 1024], 1, 0.25, 256
        args.peak_len = args.prefill_len = args.decode_len = args.cp_len = 1024
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 128, 352, 2, 4, 2
        args.vocab = 8192
    if args.peak_len not in args.lengths and not args.worker:
        parser.error(f"--peak-len {args.peak_len} must be one of --lengths {args.lengths}")
    return args


def run_all(args: argparse.Namespace, checkpoint: str) -> dict:
    runs = measure_lengths(args, checkpoint)
    rows = length_rows(runs)
    budget = budget_lengths(runs, int(args.budget_gib * 2**30), args.prefill_chunk)
    cp_runs = [
        {**spawn(args, checkpoint, "cp", args.cp_len, cp_size=cp), "seq_len": args.cp_len}
        for cp in args.cp
    ]
    hidden = ("worker", "path", "seq_len", "cp_size")
    config = {k: v for k, v in vars(args).items() if k not in hidden}
    weights = sum(p.stat().st_size for p in Path(checkpoint).glob("*.safetensors"))
    report = {
        "benchmark": "long_context",
        "config": {**config, "checkpoint_weight_bytes": weights, "torch": torch.__version__},
        "peak": "VmHWM - VmRSS after loading and a 64-token warm-up, fresh process per run",
        "targets": targets({r["seq_len"]: r for r in rows}, budget, args),
        "lengths": rows,
        "budget": budget,
    }
    if cp_runs:
        report["cp"] = cp_summary(cp_runs)
    return report


def main() -> None:
    args = parse_args()
    if args.worker:
        result = run_cp_worker(args) if args.path == "cp" else run_worker(args)
        print(json.dumps(result))
        return
    started = time.perf_counter()
    with random_checkpoint(args) as checkpoint:
        report = run_all(args, checkpoint)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
