"""Training on one GPU in bf16 (issue 10's GPU figures): memory and speed against transformers,
and the MFU of a 7B-shaped layer stack.

The sides are `train_memory.py`'s, moved to the device in `--dtype` (weights, gradients and
AdamW state all in bf16 on both sides): ours is `train.loop.train_step` (logits-masked loss,
activation checkpointing on every decoder layer), the baseline transformers'
`Qwen2ForCausalLM` (sdpa, its activation checkpointing, its own `labels=` loss) with the same
weights, optimizer, clipping and schedule. Model: Qwen2.5-0.5B-shaped (hidden 896, vocab
151,936, tied; `--layers` of its 24 layers). One packed text sequence of S random tokens per
step, a quarter of them supervised.

1. Peak memory of a step at each of `--lengths` (the allocator's high-water mark above what the
   model, its gradients and optimizer state hold after a warm-up step), per side, a line
   through the peaks and the longest S within `--budget-gib` from it (measured where it fits);
   a baseline length is skipped once its line predicts more than 80% of the free memory.
2. Tokens/s of a step at `--speed-len`, both sides (median of `--steps`), same S.
3. MFU: ours on `--mfu-layers` decoder layers of Qwen2.5-7B's shape (hidden 3,584,
   intermediate 18,944, 28/4 heads of 128, vocab 152,064, untied) at `--mfu-len` tokens:
   model FLOPs (6 x the layers' matmul parameters x tokens, causal attention 6 x S^2 x 3,584
   per layer, the LM head over the supervised rows; activation checkpointing's recompute not
   counted) per second over the device's dense bf16 peak (H100/H200 SXM: 989.4 TFLOPS).

Everything runs in this one process, sides one after the other (the allocator's peak is reset
between measurements, so they do not mix).

    python benchmarks/train_gpu.py                 # on a GPU machine (make gpu-check), ~2 min
    python benchmarks/train_gpu.py --quick --device cpu --dtype float32   # a smoke run

Prints one JSON object to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time

import torch
from common import fit_line, text_model_config
from train_memory import MODEL_SIZES, Baseline, Ours, text_sequence

from longvita.data.packed import PackedSequence
from longvita.parallel.state import ParallelState

QWEN25_7B_LAYER = {  # flag -> value: the decoder layers of Qwen2.5-7B
    "hidden": 3584, "intermediate": 18944, "heads": 28, "kv_heads": 4, "vocab": 152064,
}  # fmt: skip
QUICK_LAYER = {"hidden": 128, "intermediate": 256, "heads": 4, "kv_heads": 2, "vocab": 2048}
DENSE_BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
"""Dense bf16 tensor FLOP/s of SXM parts, by a name fragment of `torch.cuda.get_device_name`."""


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def allocated(device: torch.device) -> int:
    return torch.accelerator.memory_allocated() if device.type != "cpu" else 0


def on_device(seq: PackedSequence, labels: torch.Tensor, device: torch.device):
    moved = {
        f.name: getattr(seq, f.name).to(device)
        for f in dataclasses.fields(seq)
        if isinstance(getattr(seq, f.name), torch.Tensor)
    }
    return dataclasses.replace(seq, **moved), labels.to(device)


def build(side_cls, config, args: argparse.Namespace, device: torch.device):
    side = side_cls(config, ParallelState.single(), args)
    side.model.to(device=device, dtype=getattr(torch, args.dtype))  # parameters kept: the
    return side  # optimizer (no state yet) and the tied embedding follow them


def timed_steps(side, seq_len: int, args, device: torch.device, steps: int) -> dict:
    """A warm-up step at `--warmup-len`, then `steps` steps at seq_len: seconds, losses and
    the peak above what was allocated after the warm-up (model, gradients, optimizer)."""
    warm = on_device(*text_sequence(args.warmup_len, args.vocab, 0.25, args.seed), device)
    side.step(*warm)
    seq = on_device(*text_sequence(seq_len, args.vocab, 0.25, args.seed), device)
    synchronize(device)
    base = allocated(device)
    if device.type != "cpu":
        torch.accelerator.reset_peak_memory_stats()
    seconds, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(side.step(*seq))  # the loss on the host: the step has run
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak = torch.accelerator.max_memory_allocated() - base if device.type != "cpu" else None
    return {"seconds": [round(s, 4) for s in seconds], "losses": losses, "peak_bytes": peak}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type != "cpu":
        torch.accelerator.empty_cache()


def free_bytes(device: torch.device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def memory_and_speed(args: argparse.Namespace, device: torch.device) -> dict:
    config = dataclasses.replace(text_model_config(args), tie_word_embeddings=True)
    out: dict = {}
    for name, side_cls in (("ours", Ours), ("baseline", Baseline)):
        print(f"{name}: memory at {args.lengths}, speed at {args.speed_len}", file=sys.stderr)
        side = build(side_cls, config, args, device)
        peaks: dict[int, int] = {}
        skipped = []
        for seq_len in sorted(args.lengths):
            if len(peaks) >= 2 and free_bytes(device) is not None:
                intercept, slope = fit_line(peaks)
                if intercept + slope * seq_len > 0.8 * free_bytes(device):
                    skipped.append(seq_len)
                    continue
            peaks[seq_len] = timed_steps(side, seq_len, args, device, 1)["peak_bytes"]
            print(f"  S={seq_len}: peak {peaks[seq_len]}", file=sys.stderr, flush=True)
        speed = timed_steps(side, args.speed_len, args, device, args.steps)
        step = statistics.median(speed["seconds"])
        out[name] = {
            "peak_bytes": peaks,
            "skipped_lengths": skipped,
            "speed": {**speed, "tokens_per_s": round(args.speed_len / step, 1)},
        }
        del side
        free(device)
    budget = int(args.budget_gib * 2**30)
    for name in ("ours", "baseline"):
        peaks = {n: p for n, p in out[name]["peak_bytes"].items() if p is not None}
        if len(peaks) >= 2:
            intercept, slope = fit_line(peaks)
            out[name]["longest_in_budget"] = {
                "tokens": int((budget - intercept) / slope),
                "measured_within": max((n for n, p in peaks.items() if p <= budget), default=None),
                "how": "least-squares line through the measured peaks",
            }
    if all("longest_in_budget" in out[name] for name in ("ours", "baseline")):
        ours, base = (out[n]["longest_in_budget"]["tokens"] for n in ("ours", "baseline"))
        out["longest_ratio_ours_over_baseline"] = round(ours / base, 2)
    rates = [out[name]["speed"]["tokens_per_s"] for name in ("ours", "baseline")]
    out["speed_ratio_ours_over_baseline"] = round(rates[0] / rates[1], 3)
    return out


def model_flops(config, seq_len: int, supervised: int) -> float:
    """Training FLOPs of one step (forward + backward, no recompute): module docstring."""
    hidden, heads, head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
    kv = config.num_key_value_heads * head_dim
    per_layer = (
        hidden * heads * head_dim * 2  # q and o
        + hidden * kv * 2  # k and v
        + hidden * config.intermediate_size * 3  # gate, up, down
    )
    matmuls = 6 * per_layer * config.num_hidden_layers * seq_len
    attention = 6 * seq_len**2 * heads * head_dim * config.num_hidden_layers  # causal: half
    head = 6 * hidden * config.vocab_size * supervised
    return float(matmuls + attention + head)


def mfu(args: argparse.Namespace, device: torch.device) -> dict:
    sizes = dict(QUICK_LAYER if args.quick else QWEN25_7B_LAYER, layers=args.mfu_layers)
    shape = argparse.Namespace(**{**vars(args), **sizes})
    config = text_model_config(shape)
    print(f"MFU: {args.mfu_layers} layers of Qwen2.5-7B at {args.mfu_len}", file=sys.stderr)
    side = build(Ours, config, shape, device)
    run = timed_steps(side, args.mfu_len, shape, device, args.steps)
    del side
    free(device)
    step = statistics.median(run["seconds"])
    seq, _ = text_sequence(args.mfu_len, shape.vocab, 0.25, args.seed)
    supervised = int((seq.targets != -100).sum())
    flops = model_flops(config, args.mfu_len, supervised)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in DENSE_BF16_PEAK.items() if k in name), None)
    return {
        "layers": args.mfu_layers,
        "seq_len": args.mfu_len,
        "step_seconds": run["seconds"],
        "model_tflops_per_step": round(flops / 1e12, 2),
        "achieved_tflops": round(flops / step / 1e12, 1),
        "device": name,
        "dense_bf16_peak_tflops": None if peak is None else peak / 1e12,
        "mfu": None if peak is None else round(flops / step / peak, 3),
        "peak_bytes": run["peak_bytes"],
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 (default) or float32")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536], help="memory"
    )
    parser.add_argument("--speed-len", type=int, default=8192, help="tokens/s at this S")
    parser.add_argument("--budget-gib", type=float, default=16.0)
    parser.add_argument("--mfu-layers", type=int, default=4, help="Qwen2.5-7B-shaped layers")
    parser.add_argument("--mfu-len", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--warmup-len", type=int, default=256)
    parser.add_argument("--loss-chunk", type=int, default=4096, help="ours: masked-loss rows")
    parser.add_argument("--seed", type=int, default=0)
    for name, default in MODEL_SIZES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--quick", action="store_true", help="small shapes and lengths")
    args = parser.parse_args()
    args.supervised, args.threads, args.seq_len = 0.25, torch.get_num_threads(), 0
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 64, 128, 2, 4, 2
        args.vocab, args.lengths, args.speed_len, args.budget_gib = 2048, [256, 512], 512, 0.5
        args.mfu_layers, args.mfu_len, args.steps, args.warmup_len = 1, 256, 1, 32
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    started = time.perf_counter()
    report = {
        "benchmark": "train_gpu",
        "config": {**vars(args), "torch": torch.__version__},
        "memory_and_speed": memory_and_speed(args, device),
        "mfu": mfu(args, device),
    }
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
