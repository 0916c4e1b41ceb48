"""What the benchmark scripts share: the process memory probe, workers in fresh processes, the
least-squares line through measured peaks, the median time of repeated calls, and the
text-only model config with its flags and its random checkpoint.

Imported by the scripts in this folder (run as `python benchmarks/NAME.py`, so this folder is on
sys.path); not part of the library.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from longvita.config import LongVITAConfig, VisionConfig

LONG_CONTEXT_MODEL = {  # flag -> default: the model of issue 5 (long_context.py and others)
    "hidden": 1024, "intermediate": 2816, "layers": 8, "heads": 16, "kv_heads": 4, "vocab": 152064,
}  # fmt: skip
STUB_VISION = {  # text-only prompts never run the ViT: keep it as small as a ViT can be
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 56,
}


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak(device: str = "cpu") -> int:
    """Reset the peak memory of `device`: on the CPU this process's resident high-water mark
    (VmHWM := VmRSS), on an accelerator the allocator's peak. Returns the bytes in use now."""
    if device == "cpu":
        Path("/proc/self/clear_refs").write_text("5")
        return status_kib("VmRSS") * 1024
    torch.accelerator.synchronize()
    torch.accelerator.reset_peak_memory_stats()
    return torch.accelerator.memory_allocated()


def peak_since(base_bytes: int, device: str = "cpu") -> int:
    """Bytes the peak rose above `base_bytes` (from `reset_peak` on the same device)."""
    if device == "cpu":
        return status_kib("VmHWM") * 1024 - base_bytes
    torch.accelerator.synchronize()
    return torch.accelerator.max_memory_allocated() - base_bytes


def run_in_fresh_process(
    script: str, options: dict, label: str, *, fixed_mmap_threshold: bool = True
) -> dict:
    """Run `script --worker --KEY VALUE...` (options' keys with "_" as "-") in a fresh process;
    its JSON result (stdout) plus "process_seconds". A failed worker's stderr tail is printed and
    raised as a RuntimeError naming `label`. fixed_mmap_threshold: for memory peaks (below);
    False for speed, as the threshold makes every large temporary a fresh mapping, page
    faults included, which a process with glibc's default (adaptive) threshold reuses."""
    cmd = [sys.executable, os.path.abspath(script), "--worker"]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    print(f"running {label}", file=sys.stderr, flush=True)
    # Without a fixed mmap threshold glibc keeps freed multi-MB blocks in its heap, and the
    # high-water mark reports the heap's history instead of the live peak.
    env = dict(os.environ)
    if fixed_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise RuntimeError(f"worker {label} exited with {done.returncode}")
    result = json.loads(done.stdout)
    result["process_seconds"] = round(time.perf_counter() - start, 1)
    return result


def median_ms(call, repeats: int) -> float:
    """The median wall time of `repeats` calls of `call()`, in milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def engine_step_ms(pipe, sequences: int, new_tokens: int = 12, **engine_options) -> float:
    """Median time of a `BatchEngine` step (`engine_options`: its keyword arguments) in which
    all `sequences` decode: short text prompts, `new_tokens` greedy tokens each."""
    from longvita.infer.batch import BatchEngine, BatchSequence
    from longvita.infer.request import GenerationRequest

    engine = BatchEngine(pipe.model, max_batch=sequences, **engine_options)
    for i in range(sequences):
        request = GenerationRequest.create(
            f"Tell me about the number {i}, please.", max_new_tokens=new_tokens, ignore_eos=True
        )
        prompt, sampling = pipe.prepare(request)
        runner, continuation = pipe.sequence(
            prompt.input_ids, prompt.visual_mask, prompt.tiles, sampling
        )
        engine.add(BatchSequence(runner, continuation, lambda step: None, lambda *end: None))
    steps = []
    while not engine.idle:
        start = time.perf_counter()
        tokens = engine.step()
        steps.append((time.perf_counter() - start, tokens))
    return statistics.median(t for t, tokens in steps if tokens == sequences) * 1e3


def fit_line(points: dict[int, int]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of peak bytes against length."""
    xs, ys = list(points), list(points.values())
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var
    return mean_y - slope * mean_x, slope


def add_model_flags(parser: argparse.ArgumentParser, sizes: dict[str, int]) -> None:
    """--hidden, --intermediate, --layers, --heads, --kv-heads, --vocab with `sizes`' defaults
    (what `text_model_config` reads)."""
    for name, default in sizes.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)


def text_model_config(args: argparse.Namespace) -> LongVITAConfig:
    """An fp32 LongVITA from the script's --vocab/--hidden/--intermediate/--layers/--heads/
    --kv-heads flags, with a stub ViT."""
    return LongVITAConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=1 << 20,
        torch_dtype="float32",
        vision=VisionConfig(**STUB_VISION),
    )


@contextlib.contextmanager
def random_checkpoint(args: argparse.Namespace) -> Iterator[str]:
    """The script's `--checkpoint`, else a random one of `text_model_config(args)` written to a
    temporary directory that is removed afterwards."""
    if args.checkpoint is not None:
        yield args.checkpoint
        return
    from longvita.testing import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="longvita-bench-ckpt-") as tmp:
        print("writing the random checkpoint", file=sys.stderr, flush=True)
        yield str(make_tiny_checkpoint(tmp, config=text_model_config(args)))
