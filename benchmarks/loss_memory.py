"""Peak memory of the LM loss: full [N, V] logits + cross entropy against the masked chunked loss.

Each configuration runs forward + backward in a fresh subprocess; its peak is the process
high-water mark (VmHWM, reset through /proc/self/clear_refs once the inputs exist) minus the
resident memory at that moment, so it counts what the loss itself adds (activations,
temporaries, the hidden and weight gradients) and nothing the other configurations left behind.

The full-logits path is run only where its estimated peak fits in the available memory; where
it does not (32K x 152,064 needs tens of GB), its peak at the requested length is extrapolated
linearly from the lengths it was measured at, and labelled "extrapolated". Loss values are
compared at every length: against the full path where it ran, otherwise against the full-logits
loss computed forward-only over row blocks of the same inputs.

    python benchmarks/loss_memory.py                # issue 3: 8K and 32K, 1% and 50%, fp32
    python benchmarks/loss_memory.py --quick        # small smoke run, a few seconds

Prints one JSON object to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from common import peak_since, reset_peak, run_in_fresh_process

from longvita.infer.plan import free_memory_bytes
from longvita.ops.loss import IGNORE_INDEX, full_logits_loss, masked_lm_loss, shift_labels

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Live [N, V] float32-sized tensors the full path was measured to hold at its peak (plus slack):
# logits, log-softmax and their gradients. Used only to skip runs that would not fit.
FULL_PATH_FP32_COPIES = 3.5


def make_inputs(seq_len: int, hidden_size: int, vocab_size: int, fraction: float, dtype, seed=0):
    """hidden [N, H], weight [V, H], targets [N] (round(fraction * N) labels, shifted)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(seq_len, hidden_size, generator=gen).to(dtype)  # [N, H]
    weight = (torch.randn(vocab_size, hidden_size, generator=gen) * 0.02).to(dtype)  # [V, H]
    labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long)  # [N]
    num_supervised = round(fraction * seq_len)
    positions = torch.randperm(seq_len - 1, generator=gen)[:num_supervised] + 1  # never 0
    labels[positions] = torch.randint(0, vocab_size, (num_supervised,), generator=gen)
    return hidden, weight, shift_labels(labels)


def run_worker(args: argparse.Namespace) -> dict:
    """One configuration, in this (fresh) process: forward + backward, peak above the inputs."""
    dtype = DTYPES[args.dtype]
    hidden, weight, targets = make_inputs(
        args.seq_len, args.hidden_size, args.vocab_size, args.fraction, dtype
    )
    if args.path == "reference":  # forward-only full-logits loss over row blocks, no grad
        with torch.no_grad():
            sums = [
                full_logits_loss(hidden[i : i + 2048], weight, targets[i : i + 2048])
                for i in range(0, args.seq_len, 2048)
            ]
        loss_sum = torch.stack([s for s, _ in sums]).sum()
        count = sum(int(c) for _, c in sums)
        return {"loss_sum": loss_sum.item(), "count": count}
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    base_bytes = reset_peak()
    start = time.perf_counter()
    if args.path == "masked":
        loss_sum, count = masked_lm_loss(hidden, weight, targets, chunk_size=args.chunk_size)
    else:
        loss_sum, count = full_logits_loss(hidden, weight, targets)
    loss_sum.backward()
    seconds = time.perf_counter() - start
    peak_bytes = peak_since(base_bytes)
    return {
        "loss_sum": loss_sum.item(),
        "count": int(count),
        "peak_bytes": peak_bytes,
        "seconds": round(seconds, 3),
    }


def spawn(args: argparse.Namespace, path: str, seq_len: int, fraction: float) -> dict:
    options = {"path": path, "seq_len": seq_len, "fraction": fraction, "dtype": args.dtype,
               "hidden_size": args.hidden_size, "vocab_size": args.vocab_size,
               "chunk_size": args.chunk_size}  # fmt: skip
    result = run_in_fresh_process(__file__, options, f"{path} N={seq_len} fraction={fraction}")
    print(f"  -> {result}", file=sys.stderr, flush=True)
    return result


def full_path_fits(args: argparse.Namespace, seq_len: int) -> bool:
    estimate = FULL_PATH_FP32_COPIES * seq_len * args.vocab_size * 4
    return estimate < 0.8 * free_memory_bytes("cpu")


def extrapolate(points: list[tuple[int, int]], seq_len: int) -> int:
    """Least-squares line through (N, peak bytes), evaluated at seq_len."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x in xs)
    return round(mean_y + slope * (seq_len - mean_x))


def measure_full_path(args: argparse.Namespace, fraction: float) -> dict[int, dict]:
    """Full path at every requested length that fits; for one that does not, at its halvings."""
    lengths = set(args.seq_lens)
    for seq_len in args.seq_lens:
        if not full_path_fits(args, seq_len):
            lengths |= {seq_len // 2**k for k in range(1, 5)}
    return {n: spawn(args, "full", n, fraction) for n in sorted(lengths) if full_path_fits(args, n)}


def compare(args: argparse.Namespace, fraction: float) -> list[dict]:
    full = measure_full_path(args, fraction)
    fit = [(n, r["peak_bytes"]) for n, r in full.items()]
    rows = []
    for seq_len in args.seq_lens:
        masked = spawn(args, "masked", seq_len, fraction)
        row = {"seq_len": seq_len, "fraction": fraction, "count": masked["count"]}
        row["masked"] = {k: masked[k] for k in ("loss_sum", "peak_bytes", "seconds")}
        if seq_len in full:
            reference, measured = full[seq_len], True
            row["full"] = {k: reference[k] for k in ("loss_sum", "peak_bytes", "seconds")}
            row["full"]["measured"] = True
        else:
            reference, measured = spawn(args, "reference", seq_len, fraction), False
            if len(fit) < 2:
                raise SystemExit(f"full path fits at fewer than two lengths: {sorted(full)}")
            row["full"] = {
                "loss_sum": reference["loss_sum"],
                "loss_from": "full_logits_loss forward-only over 2048-row blocks",
                "peak_bytes": extrapolate(fit, seq_len),
                "measured": False,
                "extrapolated_from": {str(n): b for n, b in fit},
            }
        assert reference["count"] == masked["count"], (reference["count"], masked["count"])
        rel = abs(masked["loss_sum"] - reference["loss_sum"]) / max(abs(reference["loss_sum"]), 1)
        row["loss_rel_diff"] = rel
        row["peak_ratio_full_over_masked"] = round(
            row["full"]["peak_bytes"] / max(masked["peak_bytes"], 1), 2
        )
        row["ratio_measured"] = measured
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.5])
    parser.add_argument("--hidden-size", type=int, default=896)
    parser.add_argument("--vocab-size", type=int, default=152064)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--quick", action="store_true", help="small smoke run (a few seconds)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=["masked", "full", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fraction", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    if args.quick:
        args.seq_lens, args.fractions = [512, 2048], [0.5]
        args.vocab_size, args.hidden_size, args.chunk_size = 8192, 64, 256
    loss_tolerance = {"float32": 1e-5, "bfloat16": 1e-3}[args.dtype]
    rows = [row for fraction in args.fractions for row in compare(args, fraction)]
    report = {
        "benchmark": "loss_memory",
        "config": {
            "seq_lens": args.seq_lens,
            "fractions": args.fractions,
            "hidden_size": args.hidden_size,
            "vocab_size": args.vocab_size,
            "dtype": args.dtype,
            "chunk_size": args.chunk_size,
            "torch_threads": torch.get_num_threads(),
            "quick": args.quick,
        },
        "peak": "VmHWM - VmRSS after inputs, forward + backward, fresh process per config",
        "loss_tolerance_rel": loss_tolerance,
        "losses_agree": all(row["loss_rel_diff"] <= loss_tolerance for row in rows),
        "results": rows,
    }
    for fraction in args.fractions:
        peaks = [r["masked"]["peak_bytes"] for r in rows if r["fraction"] == fraction]
        report[f"masked_peak_max_over_min_at_{fraction}"] = round(max(peaks) / min(peaks), 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
