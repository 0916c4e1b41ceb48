"""Training memory and speed: longest sequence in a budget, tokens/s, FSDP2/CP, checkpoints.

A Qwen2.5-0.5B-shaped text LLM (hidden 896, intermediate 4864, 14/2 heads of 64, vocab 151,936,
tied embeddings; `--layers` of its 24 decoder layers), fp32, random weights, the ViT a stub.
One packed text sequence of S random tokens per step, `--supervised` of them answers (the end of
every 1,024-token turn), AdamW from the trainer's builders, clipping at 1.0.

- Ours: `train.loop.train_step` (logits-masked loss, `--loss-chunk` rows at a time) on the model
  `parallel.fsdp.parallelize` makes ready (activation checkpointing on every decoder layer;
  FSDP2 over dp x cp when there is more than one rank); the LLM trains, ViT and projector are
  frozen. Baseline: transformers' `Qwen2ForCausalLM` (sdpa) holding the same weights (our
  module names are its keys), `activation_checkpointing_enable()` (v5's name for
  `gradient_checkpointing_enable`), its own loss (`labels=`, -100 where unsupervised: shift +
  cross entropy over full [S, V] logits), the same AdamW, clipping and schedule. Both give the
  same loss on the warm-up step; every SDPA call is counted, and neither side may pass a mask.
- Each (side, S) is a fresh process: build, one warm-up step at `--warmup-len` (kernels,
  optimizer state), reset the resident high-water mark (/proc/self/clear_refs), steps at S.
  "peak" is VmHWM minus VmRSS after building the model: what training adds, optimizer state
  and gradients included. glibc's mmap threshold is fixed so freed blocks leave the heap.

Measured:
1. peak of one step at each of `--ours-lengths` / `--baseline-lengths`, a least-squares line per
   side through them and the longest S within `--budget-gib` from it. The lengths must lie
   where the line is straight: below them the optimizer step's own peak (the 136M-row tied
   embedding's gradient and AdamW temporaries, ~1.9 GB whatever S) hides the part that grows
   with S. A baseline length is skipped when its line predicts more than `--max-fraction` of
   MemAvailable (the baseline at 8K needs ~18 GB: not on a 24 GB machine shared with tests);
2. tokens/s at `--speed-len` (median of `--steps` steps, both sides at the same S), at
   `--supervised` and at 1.0;
3. per-rank peak of one step at `--parallel-len` for dp = 2 (a sequence per rank) and cp = 2
   (one sequence over both ranks) through `parallel.launch` (gloo, one thread per rank),
   against one process, with `--parallel-layers` (default all 24 of Qwen2.5-0.5B: at 2K tokens
   the state dominates and fits; with 4 layers the tied 136M-row embedding is 70% of the
   parameters and FSDP must hold it and its gradient whole in backward); here "peak" is VmHWM
   minus VmRSS before the model is built, so the (sharded) model and optimizer state count;
4. `parallel.dcp.save` / `load` of model + AdamW + scheduler + RNG + loader state, for
   `longvita.config.tiny()` and this model, one process: seconds (median of 3), bytes on disk.

    python benchmarks/train_memory.py            # the issue's numbers, ~50 min on 2 cores
    python benchmarks/train_memory.py --quick    # small model and lengths, ~2 min

Prints one JSON object to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    add_model_flags,
    fit_line,
    peak_since,
    reset_peak,
    run_in_fresh_process,
    status_kib,
    text_model_config,
)

from longvita.config import tiny
from longvita.data.packed import PackedSequence
from longvita.infer.plan import free_memory_bytes
from longvita.ops.loss import IGNORE_INDEX, shift_labels
from longvita.parallel import dcp
from longvita.parallel.fsdp import parallelize
from longvita.parallel.launch import launch
from longvita.parallel.state import ParallelState
from longvita.testing import random_model
from longvita.train.config import StageConfig
from longvita.train.loop import train_step
from longvita.train.optim import build_optimizer, build_scheduler, freeze, param_groups

PAD_ID = 0
TURN_LEN = 1024
WORKER_FLAGS = (
    "hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "supervised", "loss_chunk",
    "warmup_len", "steps", "threads", "seed",
)  # fmt: skip
MODEL_SIZES = {  # flag -> default: Qwen2.5-0.5B, fewer layers
    "hidden": 896, "intermediate": 4864, "layers": 4, "heads": 14, "kv_heads": 2, "vocab": 151936,
}  # fmt: skip
BASELINE_KEYS = ("lm_head.", "model.embed_tokens.", "model.layers.", "model.norm.")
SHARED_FIELDS = (  # Qwen2Config fields that take our config's values
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
    "tie_word_embeddings",
)  # fmt: skip


# -- model, data, the two training steps ----------------------------------------------------


def model_config(args: argparse.Namespace):
    return dataclasses.replace(text_model_config(args), tie_word_embeddings=True)


def text_sequence(
    seq_len: int, vocab: int, supervised: float, seed: int
) -> tuple[PackedSequence, torch.Tensor]:
    """One packed text sequence and its unshifted labels [S]: the last `supervised` share of
    every turn of TURN_LEN tokens (or of S, if shorter) is the answer, the rest is -100."""
    turn_len = min(TURN_LEN, seq_len)
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (seq_len,), generator=gen)  # [S], never PAD_ID
    in_turn = torch.arange(seq_len) % turn_len  # [S]
    labels = torch.where(in_turn >= turn_len * (1 - supervised), input_ids, IGNORE_INDEX)
    seq = PackedSequence(
        input_ids=input_ids,
        targets=shift_labels(labels),
        position_ids=torch.arange(seq_len),
        cu_seqlens=torch.tensor([0, seq_len]),
        visual_mask=torch.zeros(seq_len, dtype=torch.bool),
    )
    return seq, labels


def stage_config(args: argparse.Namespace):
    return StageConfig.from_dict({
        "init": {"model": "unused", "tokenizer": "unused"},
        "data": {"mixture": "unused.yaml", "seq_len": args.seq_len or 2},
        "trainable": {"vision": False, "projector": False, "llm": True},
        "optim": {"lr": 1e-5, "min_lr": 1e-6, "clip": 1.0},
        "schedule": {"steps": 1000, "warmup_fraction": 0.0},
        "parallel": {"activation_checkpointing": True},
        "loss": {"logits_masked": True, "chunk_size": args.loss_chunk},
    })  # fmt: skip


class Ours:
    """`train_step` on the model `parallelize` makes ready (checkpointing; FSDP2 if sharded)."""

    def __init__(self, config, state: ParallelState, args: argparse.Namespace) -> None:
        self.state, self.stage = state, stage_config(args)
        self.model = random_model(config, seed=args.seed).train()
        freeze(self.model, self.stage.trainable)
        parallelize(self.model, state, activation_checkpointing=True, vision_trains=False)
        self.optimizer = build_optimizer(
            param_groups(self.model, self.stage.optim), self.stage.optim
        )
        self.scheduler = build_scheduler(self.optimizer, self.stage.optim, self.stage.schedule)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def step(self, seq: PackedSequence, _labels: torch.Tensor) -> float:
        outcome = train_step(
            self.model,
            [seq],
            self.state,
            self.stage,
            pad_id=PAD_ID,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            params=self.params,
        )
        return outcome.loss


class Baseline:
    """transformers' Qwen2ForCausalLM with our weights, its own loss, the same optimizer."""

    def __init__(self, config, state: ParallelState, args: argparse.Namespace) -> None:
        import transformers

        hf_config = transformers.Qwen2Config(
            **{name: getattr(config, name) for name in SHARED_FIELDS},
            use_sliding_window=False,
            use_cache=False,
            attn_implementation="sdpa",
        )
        self.model = transformers.Qwen2ForCausalLM(hf_config).train()
        ours = random_model(config, seed=args.seed).state_dict()
        self.model.load_state_dict(
            {k: v for k, v in ours.items() if k.startswith(BASELINE_KEYS)}, strict=True
        )
        del ours
        assert self.model.lm_head.weight is self.model.model.embed_tokens.weight  # tied
        self.model.activation_checkpointing_enable()  # gradient_checkpointing_enable, v5 name
        self.stage = stage_config(args)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": self.params, "lr_mult": 1.0, "name": "llm"}]
        self.optimizer = build_optimizer(groups, self.stage.optim)
        self.scheduler = build_scheduler(self.optimizer, self.stage.optim, self.stage.schedule)

    def step(self, seq: PackedSequence, labels: torch.Tensor) -> float:
        loss = self.model(input_ids=seq.input_ids[None], labels=labels[None]).loss  # HF Trainer
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.stage.optim.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


class SdpaCalls:
    """Counts F.scaled_dot_product_attention calls, and those given a mask, while active."""

    def __init__(self) -> None:
        self.calls = self.masked = 0

    def __enter__(self) -> SdpaCalls:
        self.original = F.scaled_dot_product_attention

        def counting(*args, **kwargs):
            self.calls += 1
            self.masked += (args[3] if len(args) > 3 else kwargs.get("attn_mask")) is not None
            return self.original(*args, **kwargs)

        F.scaled_dot_product_attention = counting
        return self

    def __exit__(self, *exc) -> None:
        F.scaled_dot_product_attention = self.original


def rss_bytes() -> int:
    gc.collect()
    return status_kib("VmRSS") * 1024


def warm_up_and_measure(side, args: argparse.Namespace, seed: int, rss_from: int) -> dict:
    """One warm-up step, reset the peak, `args.steps` steps at `args.seq_len`."""
    warm = text_sequence(args.warmup_len, args.vocab, args.supervised, seed)
    with SdpaCalls() as sdpa:
        warmup_loss = side.step(*warm)
    seq = text_sequence(args.seq_len, args.vocab, args.supervised, seed)
    rss_at_reset = rss_bytes()
    base = reset_peak()
    seconds, cpu_seconds, losses = [], [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(side.step(*seq))
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    return {
        "peak_bytes": peak_since(rss_from),
        "step_peak_bytes": peak_since(base),
        "rss_at_reset_bytes": rss_at_reset,
        "seconds": [round(s, 3) for s in seconds],
        "cpu_seconds": [round(s, 3) for s in cpu_seconds],
        "warmup_loss": warmup_loss,
        "losses": losses,
        "sdpa_calls": sdpa.calls,
        "sdpa_calls_with_mask": sdpa.masked,
        "supervised_tokens": int((seq[0].targets != IGNORE_INDEX).sum()),
    }


# -- workers (each in a fresh process) ------------------------------------------------------


def run_side(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    side_cls = {"ours": Ours, "baseline": Baseline}[args.path]
    side = side_cls(model_config(args), ParallelState.single(), args)
    rss_after_load = rss_bytes()
    result = warm_up_and_measure(side, args, args.seed, rss_after_load)
    return {**result, "rss_after_load_bytes": rss_after_load}


def parallel_rank_main(state: ParallelState, args: argparse.Namespace, out_dir: str) -> None:
    """One rank of a dp x cp job: its own sequence per dp rank; peak above the RSS before the
    model, so the sharded model and optimizer state count."""
    rss_before_model = rss_bytes()
    side = Ours(model_config(args), state, args)
    rss_after_load = rss_bytes()
    result = warm_up_and_measure(side, args, args.seed + state.dp_rank, rss_before_model)
    record = {
        "rank": state.rank,
        "dp_rank": state.dp_rank,
        "cp_rank": state.cp_rank,
        "threads": torch.get_num_threads(),
        "rss_before_model_bytes": rss_before_model,
        "rss_after_load_bytes": rss_after_load,
        **result,
    }
    Path(out_dir, f"rank{state.rank}.json").write_text(json.dumps(record))


def run_parallel(args: argparse.Namespace) -> dict:
    """One process (here), then dp = 2 and cp = 2 (spawned ranks, one thread each)."""
    torch.set_num_threads(args.threads)  # the one-process run; spawned ranks take cores // 2
    runs = {}
    for name, world_size, cp in (("single", 1, 1), ("dp2", 2, 1), ("cp2", 2, 2)):
        with tempfile.TemporaryDirectory(prefix="longvita-bench-train-") as out_dir:
            launch(
                parallel_rank_main,
                cp=cp,
                world_size=world_size,
                args=(args, out_dir),
                timeout_s=3600,
            )
            ranks = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("rank*"))]
        runs[name] = {"world_size": world_size, "cp": cp, "ranks": ranks}
        print(f"  {name}: {[r['peak_bytes'] for r in ranks]}", file=sys.stderr, flush=True)
    return runs


class FakeLoader:
    """What `checkpoint_states` asks of a loader: a small, plain state."""

    def __init__(self) -> None:
        self.position = {"epoch": 0, "sample": 1234, "buffer": list(range(256))}

    def state_dict(self) -> dict:
        return dict(self.position)

    def load_state_dict(self, state: dict) -> None:
        self.position = dict(state)


def checkpoint_set(config, args: argparse.Namespace, seed: int):
    args = argparse.Namespace(**{**vars(args), "seed": seed})
    side, state = Ours(config, ParallelState.single(), args), ParallelState.single()
    counters = {"step": 0, "skipped_steps": 0}
    training = dcp.TrainingState(side.model, side.optimizer, side.scheduler, counters)
    return side, dcp.checkpoint_states(training, state, FakeLoader())


def time_checkpoint(config, args: argparse.Namespace, repeats: int = 3) -> dict:
    """Save a trained set `repeats` times, load it into a fresh set `repeats` times."""
    single = ParallelState.single()
    side, states = checkpoint_set(config, args, seed=args.seed)
    side.step(*text_sequence(args.warmup_len, config.vocab_size, 1.0, 0))  # AdamW state
    states["app"].counters["step"] = 1
    saves, loads = [], []
    with tempfile.TemporaryDirectory(prefix="longvita-bench-dcp-") as tmp:
        directory = Path(tmp, "step_1")
        for _ in range(repeats):
            start = time.perf_counter()
            dcp.save(directory, states, single)
            saves.append(time.perf_counter() - start)
        disk = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
        for _ in range(repeats):
            fresh, fresh_states = checkpoint_set(config, args, seed=args.seed + 1)
            start = time.perf_counter()
            dcp.load(directory, fresh_states, single)
            loads.append(time.perf_counter() - start)
        same = all(
            torch.equal(a, b)
            for a, b in zip(
                side.model.state_dict().values(), fresh.model.state_dict().values(), strict=True
            )
        )
        moments = [s["exp_avg"] for s in fresh.optimizer.state.values()]
        same &= all(
            torch.equal(a["exp_avg"], b)
            for a, b in zip(side.optimizer.state.values(), moments, strict=True)
        )
        same &= fresh_states["app"].counters == {"step": 1, "skipped_steps": 0}
    return {
        "parameters": sum(p.numel() for p in side.model.parameters()),
        "bytes_on_disk": disk,
        "save_seconds": [round(s, 3) for s in saves],
        "load_seconds": [round(s, 3) for s in loads],
        "median_save_seconds": round(statistics.median(saves), 3),
        "median_load_seconds": round(statistics.median(loads), 3),
        "restored_exactly": bool(same),
    }


def run_checkpoints(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    return {
        "tiny": time_checkpoint(tiny(), args),
        "model": time_checkpoint(model_config(args), args),
    }


# -- orchestration --------------------------------------------------------------------------


def spawn(args: argparse.Namespace, path: str, seq_len: int = 0, **extra) -> dict:
    """Run one worker in a fresh process; its JSON result."""
    options = {"path": path, "seq_len": seq_len,
               **{name: getattr(args, name) for name in WORKER_FLAGS}, **extra}  # fmt: skip
    result = run_in_fresh_process(__file__, options, f"{path} S={seq_len} {extra or ''}")
    brief = {k: v for k, v in result.items() if not isinstance(v, dict | list) or k == "seconds"}
    print(f"  -> {brief}", file=sys.stderr, flush=True)
    return result


def fits(runs: dict[int, dict], seq_len: int, max_fraction: float) -> bool:
    """Whether the process the line through `runs` predicts at `seq_len` (the loaded model
    plus the peak) stays under `max_fraction` of MemAvailable now."""
    if len(runs) < 2:
        return True
    intercept, slope = fit_line({n: r["peak_bytes"] for n, r in runs.items()})
    loaded = max(r["rss_after_load_bytes"] for r in runs.values())
    return intercept + slope * seq_len + loaded < max_fraction * free_memory_bytes("cpu")


def measure(args: argparse.Namespace) -> dict[str, dict]:
    """Every length of each side (alternating), then both at the speed length fully supervised.
    Memory-only lengths run one step, the speed length `args.steps`."""
    runs: dict[str, dict] = {"ours": {}, "baseline": {}, "ours_full": {}, "baseline_full": {}}
    wanted = {"ours": set(args.ours_lengths), "baseline": set(args.baseline_lengths)}
    for seq_len in sorted(wanted["ours"] | wanted["baseline"] | {args.speed_len}):
        for path in ("ours", "baseline"):
            if seq_len not in wanted[path] | {args.speed_len}:
                continue
            if path == "baseline" and not fits(runs[path], seq_len, args.max_fraction):
                print(f"skipping baseline S={seq_len}: predicted not to fit", file=sys.stderr)
                continue
            steps = args.steps if seq_len == args.speed_len else 1
            runs[path][seq_len] = spawn(args, path, seq_len, steps=steps)
    base_len = max(n for n in runs["baseline"] if n <= args.speed_len)
    for path, seq_len in (("ours", args.speed_len), ("baseline", base_len)):
        runs[f"{path}_full"][seq_len] = spawn(args, path, seq_len, supervised=1.0)
    return runs


def budget_lengths(runs: dict, args: argparse.Namespace) -> dict:
    """Longest S under the budget from each side's line through its fitted lengths."""
    budget = int(args.budget_gib * 2**30)
    out: dict = {"budget_bytes": budget}
    for path, lengths in (("ours", args.ours_lengths), ("baseline", args.baseline_lengths)):
        measured = {n: r["peak_bytes"] for n, r in sorted(runs[path].items())}
        points = {n: p for n, p in measured.items() if n in lengths}
        intercept, slope = fit_line(points)
        longest = int((budget - intercept) / slope)
        out[path] = {
            "longest_tokens": longest,
            "extrapolated": longest > max(points),
            "intercept_bytes": round(intercept),
            "bytes_per_token": round(slope, 1),
            "fitted_on": sorted(points),
            "fit_residual_bytes": {n: round(p - intercept - slope * n) for n, p in points.items()},
            "fit_max_rel_residual": float(
                f"{max(abs(p - intercept - slope * n) / p for n, p in points.items()):.2g}"
            ),
            "measured_peak_bytes": measured,
        }
    ratio = out["ours"]["longest_tokens"] / out["baseline"]["longest_tokens"]
    out["ratio_ours_over_baseline"] = round(ratio, 2)
    return out


def speed_rows(runs: dict, args: argparse.Namespace) -> dict:
    """Median tokens/s of both sides at the speed length (the baseline's longest if shorter)."""
    rows = {}
    for name, suffix in ((f"supervised_{args.supervised}", ""), ("supervised_1.0", "_full")):
        row = {}
        for path in ("ours", "baseline"):
            seq_len = max(n for n in runs[path + suffix] if n <= args.speed_len)
            seconds = runs[path + suffix][seq_len]["seconds"]
            rate = seq_len / statistics.median(seconds)
            row[path] = {
                "seq_len": seq_len,
                "step_seconds": seconds,
                "median_tokens_per_s": round(rate, 1),
            }
        rate = row["ours"]["median_tokens_per_s"] / row["baseline"]["median_tokens_per_s"]
        row["ratio_ours_over_baseline"] = round(rate, 2)
        row["same_length"] = row["ours"]["seq_len"] == row["baseline"]["seq_len"]
        rows[name] = row
    return rows


def parallel_rows(runs: dict) -> dict:
    rows = {}
    for name, run in runs.items():
        ranks = run["ranks"]
        rows[name] = {
            "world_size": run["world_size"],
            "cp": run["cp"],
            "threads_per_rank": ranks[0]["threads"],
            "peak_bytes_per_rank": [r["peak_bytes"] for r in ranks],
            "state_bytes_per_rank": [
                r["rss_after_load_bytes"] - r["rss_before_model_bytes"] for r in ranks
            ],
            "step_seconds_per_rank": [r["seconds"] for r in ranks],
            "loss": ranks[0]["losses"][-1],
        }
    single = max(rows["single"]["peak_bytes_per_rank"])
    rows["cp2"]["loss_abs_diff_vs_single"] = abs(rows["cp2"]["loss"] - rows["single"]["loss"])
    for name in ("dp2", "cp2"):
        rows[name]["max_rank_over_single"] = round(
            max(rows[name]["peak_bytes_per_rank"]) / single, 3
        )
    return rows


def check_sides(runs: dict) -> dict:
    """Both sides' warm-up losses (the same weights and tokens) agree; no SDPA call had a mask."""
    ours, base = next(iter(runs["ours"].values())), next(iter(runs["baseline"].values()))
    every = [run for done in runs.values() for run in done.values()]
    return {
        "warmup_loss": {
            "ours": ours["warmup_loss"],
            "baseline": base["warmup_loss"],
            "abs_diff": abs(ours["warmup_loss"] - base["warmup_loss"]),
        },
        "sdpa_calls_in_warmup": {"ours": ours["sdpa_calls"], "baseline": base["sdpa_calls"]},
        "sdpa_calls_with_mask": sum(r["sdpa_calls_with_mask"] for r in every),
    }


def targets(budget: dict, speeds: dict, parallel: dict) -> dict:
    ratio = budget["ratio_ours_over_baseline"]
    extrapolated = budget["ours"]["extrapolated"] or budget["baseline"]["extrapolated"]
    goal = {"value": ratio, "goal": ">= 5", "met": ratio >= 5, "extrapolated": extrapolated}
    out = {"budget_length_ours_over_baseline": goal}
    for name, row in speeds.items():
        ratio = row["ratio_ours_over_baseline"]
        out[f"tokens_per_s_{name}_ours_over_baseline"] = {
            "value": ratio,
            "goal": ">= 1.0",
            "met": ratio >= 1.0,
            "seq_len": row["ours"]["seq_len"],
            "same_length": row["same_length"],
        }
    for name in ("dp2", "cp2"):
        ratio = parallel[name]["max_rank_over_single"]
        out[f"{name}_max_rank_peak_over_single"] = {
            "value": ratio,
            "goal": "<= 0.6",
            "met": ratio <= 0.6,
        }
    return out


def run_all(args: argparse.Namespace) -> dict:
    import transformers

    runs = measure(args)
    budget = budget_lengths(runs, args)
    speeds = speed_rows(runs, args)
    parallel_runs = spawn(args, "parallel", args.parallel_len, layers=args.parallel_layers)
    parallel_runs.pop("process_seconds")
    parallel = parallel_rows(parallel_runs)
    checkpoints = spawn(args, "checkpoint")
    hidden = ("worker", "path", "seq_len")
    config = {k: v for k, v in vars(args).items() if k not in hidden}
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    return {
        "benchmark": "train_memory",
        "config": {**config, **versions},
        "peak": "VmHWM after a warm-up step and a reset, minus VmRSS after building the model "
        "(parallel: before building it); one fresh process per run",
        "targets": targets(budget, speeds, parallel),
        "checks": check_sides(runs),
        "budget": budget,
        "speed": speeds,
        "parallel": parallel,
        "checkpoint": checkpoints,
        "runs": {
            path: {n: {k: v for k, v in r.items() if k != "losses"} for n, r in done.items()}
            for path, done in runs.items()
        },
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(parser, MODEL_SIZES)
    parser.add_argument(
        "--ours-lengths",
        type=int,
        nargs="+",
        default=[8192, 12288, 16384],
        help="ours: lengths the budget line is fitted on",
    )
    parser.add_argument("--baseline-lengths", type=int, nargs="+", default=[2048, 3072, 4096])
    parser.add_argument("--speed-len", type=int, default=4096, help="tokens/s at this S")
    parser.add_argument("--parallel-len", type=int, default=2048, help="dp 2 / cp 2 at this S")
    parser.add_argument(
        "--parallel-layers",
        type=int,
        default=24,
        help="dp 2 / cp 2 with this many layers (default 24, Qwen2.5-0.5B's own depth)",
    )
    parser.add_argument("--supervised", type=float, default=0.25, help="share of answer tokens")
    parser.add_argument("--budget-gib", type=float, default=16.0)
    parser.add_argument(
        "--max-fraction",
        type=float,
        default=0.6,
        help="skip a baseline length predicted above this share of free RAM",
    )
    parser.add_argument("--loss-chunk", type=int, default=4096, help="ours: masked-loss rows")
    parser.add_argument("--warmup-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps at the speed length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small model and lengths, ~1 min")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick and not args.worker:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 64, 128, 2, 4, 2
        args.vocab, args.loss_chunk, args.warmup_len, args.steps = 2048, 256, 32, 1
        args.ours_lengths = args.baseline_lengths = [256, 512]
        args.speed_len = args.parallel_len = 512
        args.parallel_layers = args.layers
        args.budget_gib = 0.5
    if not 0 < args.supervised <= 1:
        parser.error(f"--supervised must be in (0, 1], got {args.supervised}")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        worker = {"parallel": run_parallel, "checkpoint": run_checkpoints}.get(args.path, run_side)
        print(json.dumps(worker(args)))
        return
    started = time.perf_counter()
    report = run_all(args)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
