"""A linear layer on a few rows: `F.linear` against `longvita.ops.linear`, on the shapes of a
batched decode step.

For each weight shape (out x in) and row count, under `torch.inference_mode()`, the median time
of `F.linear(x, w, b)` against the weight-on-the-left product (`weight_left_linear`, whatever the
rows), and of an `nn.Linear` against the model's layer (`SmallBatchLinear`, which takes the
weight-on-the-left path where `use_weight_left` says so and is `F.linear` elsewhere), all four
alternating, after a warm-up.
Shapes: Qwen2.5-0.5B's q (896x896), k/v (128x896), o, gate/up (4864x896), down (896x4864) and
the serve benchmark's LM head (4096x896); Qwen2.5-7B's gate/up (18944x3584); the demo model's
MLP (128x64, below the size threshold: both sides are `F.linear`).

With `--model DIR`, also the decode step of `infer.batch.BatchEngine` on that model at 1-8
sequences (12 new tokens each, greedy), with the weight-on-the-left path on and off (the row
range set empty), alternating, the median step of each of two runs, the median of those.

    python benchmarks/small_batch_linear.py            # ~1 min on 2 cores
    python benchmarks/small_batch_linear.py --quick
    python benchmarks/small_batch_linear.py --model /tmp/bench-work/qwen2.5-0.5b-shaped

Prints one JSON object to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from common import engine_step_ms, median_ms

from longvita.ops.linear import SmallBatchLinear, use_weight_left, weight_left_linear

SHAPES = {
    "0.5b q/o 896x896": (896, 896),
    "0.5b k/v 128x896": (128, 896),
    "0.5b gate/up 4864x896": (4864, 896),
    "0.5b down 896x4864": (896, 4864),
    "bench lm_head 4096x896": (4096, 896),
    "7b gate/up 18944x3584": (18944, 3584),
    "demo mlp 128x64": (128, 64),
}
ROWS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 32, 64)


def measure(out_features: int, in_features: int, rows: int, repeats: int) -> dict:
    layer = SmallBatchLinear(in_features, out_features)
    plain = torch.nn.Linear(in_features, out_features)
    plain.load_state_dict(layer.state_dict())
    weight, bias = layer.weight.detach(), layer.bias.detach()
    x = torch.randn(rows, in_features)
    variants = {
        "f_linear": lambda: F.linear(x, weight, bias),
        "weight_left": lambda: weight_left_linear(x, weight, bias),
        "nn_linear": lambda: plain(x),
        "layer": lambda: layer(x),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for fn in [*variants.values()] * 2:  # warm-up
            fn()
        for _ in range(3):  # alternate the variants, three medians each
            for name, fn in variants.items():
                times[name].append(median_ms(fn, repeats))
        taken = use_weight_left(rows, weight)
    ms = {name: statistics.median(values) for name, values in times.items()}
    return {
        "rows": rows,
        "layer_takes_weight_left": taken,
        **{f"{name}_ms": round(value, 4) for name, value in ms.items()},
        "weight_left_speedup": round(ms["f_linear"] / ms["weight_left"], 2),
        "layer_speedup": round(ms["nn_linear"] / ms["layer"], 2),
    }


def measure_engine(model_dir: str) -> list[dict]:
    """The decode step at 1-8 sequences with the weight-on-the-left path on and off."""
    import longvita
    import longvita.ops.linear as linear

    pipe = longvita.load(model_dir)
    rows_on = linear.SMALL_BATCH_ROWS
    results = []
    for sequences in (1, 2, 3, 4, 8):
        times: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(2):
            for mode in times:
                linear.SMALL_BATCH_ROWS = rows_on if mode == "on" else (0, -1)
                times[mode].append(engine_step_ms(pipe, sequences))
        linear.SMALL_BATCH_ROWS = rows_on
        on, off = statistics.median(times["on"]), statistics.median(times["off"])
        results.append(
            {"sequences": sequences, "step_ms_on": round(on, 1), "step_ms_off": round(off, 1),
             "off_over_on": round(off / on, 2)}
        )  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per median (20)")
    parser.add_argument("--quick", action="store_true", help="two shapes, 1-8 rows, 5 repeats")
    parser.add_argument("--model", help="also time BatchEngine decode steps on this checkpoint")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes, rows, repeats = SHAPES, ROWS, args.repeats
    if args.quick:
        shapes = {k: SHAPES[k] for k in ("0.5b gate/up 4864x896", "demo mlp 128x64")}
        rows, repeats = (1, 2, 8), 5
    torch.manual_seed(0)
    started = time.perf_counter()
    results = {name: [measure(*shape, r, repeats) for r in rows] for name, shape in shapes.items()}
    report = {
        "benchmark": "small_batch_linear",
        "config": {
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "repeats": repeats,
        },
        "shapes": results,
        **(
            {"engine": {"model": args.model, "steps": measure_engine(args.model)}}
            if args.model
            else {}
        ),  # fmt: skip
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
