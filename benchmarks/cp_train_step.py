"""Context parallelism on this machine: per-rank peak memory and time of one training step.

One forward + backward of a packed text sequence through a tiny-but-wide LongVITA (ring
attention in every layer, the logits-masked loss, gradients summed over the CP group), at
CP = 1, 2, 4, each CP size in fresh processes (gloo, file rendezvous). Prints one JSON object.

    python benchmarks/cp_train_step.py                 # 16K tokens, CP 1/2/4
    python benchmarks/cp_train_step.py --quick         # 2K tokens, seconds

Memory: each rank resets its resident high-water mark (/proc/self/clear_refs) after building
the model and the data, runs the steps, and reports VmHWM minus the resident size before the
steps ("step peak": activations, gradients, communication buffers). Time: median over steps,
CP = 1 with `threads` threads against CP = 2 with `threads / 2` threads per rank, so both use
the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from common import peak_since, reset_peak, text_model_config

from longvita.data.packed import PackedSequence
from longvita.ops.loss import IGNORE_INDEX, shift_labels
from longvita.parallel.context_parallel import all_reduce_gradients, sequence_loss
from longvita.parallel.state import ParallelState
from longvita.testing import random_model


def text_sequence(seq_len: int, vocab: int, supervised: float) -> PackedSequence:
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (seq_len,), generator=gen)
    labels = input_ids.clone()
    labels[torch.rand(seq_len, generator=gen) >= supervised] = IGNORE_INDEX
    return PackedSequence(
        input_ids=input_ids,
        targets=shift_labels(labels),
        position_ids=torch.arange(seq_len),
        cu_seqlens=torch.tensor([0, seq_len]),
        visual_mask=torch.zeros(seq_len, dtype=torch.bool),
    )


def _rank_main(rank: int, cp: int, workdir: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, args.threads // cp))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(cp), LOCAL_RANK=str(rank))
    state = ParallelState.init(cp, init_method=f"file://{workdir}/rendezvous", timeout_s=600)
    model = random_model(text_model_config(args), seed=0).train()
    seq = text_sequence(args.seq_len, args.vocab, args.supervised)
    before_bytes = reset_peak()
    times, losses = [], []
    for _ in range(args.steps):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        result = sequence_loss(model, seq, state, pad_id=0, chunk_size=args.loss_chunk)
        result.loss.backward()
        all_reduce_gradients(model, state.cp_group)
        times.append(time.perf_counter() - start)
        losses.append(float(result.mean))
    record = {
        "rank": rank,
        "step_peak_mb": peak_since(before_bytes) / 2**20,
        "rss_before_mb": before_bytes / 2**20,
        "seconds": times,
        "loss": losses[-1],
    }
    Path(workdir, f"rank{rank}.json").write_text(json.dumps(record))
    state.destroy()


def run_cp(cp: int, args: argparse.Namespace) -> dict:
    # glibc keeps freed multi-MB blocks in its heap unless they are mmapped: without this the
    # resident high-water mark reports the heap's history, not the step's live peak.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    with tempfile.TemporaryDirectory(prefix="longvita-bench-") as workdir:
        mp.spawn(_rank_main, args=(cp, workdir, args), nprocs=cp, join=True)
        ranks = [json.loads(Path(workdir, f"rank{r}.json").read_text()) for r in range(cp)]
    step_seconds = [max(r["seconds"][i] for r in ranks) for i in range(args.steps)]
    return {
        "cp": cp,
        "threads_per_rank": max(1, args.threads // cp),
        "max_rank_step_peak_mb": round(max(r["step_peak_mb"] for r in ranks), 1),
        "rank_step_peak_mb": [round(r["step_peak_mb"], 1) for r in ranks],
        "rss_before_mb": round(max(r["rss_before_mb"] for r in ranks), 1),
        "median_step_seconds": round(statistics.median(step_seconds[1:] or step_seconds), 3),
        "step_seconds": [round(s, 3) for s in step_seconds],
        "loss": ranks[0]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--supervised", type=float, default=0.5)
    parser.add_argument("--loss-chunk", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3, help="the first is a warm-up")
    parser.add_argument("--threads", type=int, default=2, help="cores shared by all ranks")
    parser.add_argument("--quick", action="store_true", help="2K tokens, 2 steps")
    args = parser.parse_args()
    if args.quick:
        args.seq_len, args.steps = 2048, 2
    runs = [run_cp(cp, args) for cp in args.cp]
    base = next((r for r in runs if r["cp"] == 1), None)
    summary = {}
    for run in runs:
        if base is None or run["cp"] == 1:
            continue
        ratio = base["max_rank_step_peak_mb"] / run["max_rank_step_peak_mb"]
        summary[f"cp{run['cp']}"] = {
            "step_peak_ratio_vs_cp1": round(ratio, 2),
            "fraction_of_ideal": round(ratio / run["cp"], 2),
            "time_ratio_vs_cp1": round(run["median_step_seconds"] / base["median_step_seconds"], 2),
            "loss_diff_vs_cp1": abs(run["loss"] - base["loss"]),
        }
    config = {k: v for k, v in vars(args).items() if k != "quick"}
    print(json.dumps({"config": config, "runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
